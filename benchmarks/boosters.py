"""What the training-only boosters give on the demo's data, and what the one-to-many branch costs per step.

    python benchmarks/boosters.py                          # the full measurement: 5 variants x 3 seeds, demo-sized
    python benchmarks/boosters.py --seeds 0 --train-images 48 --val-images 16 --epochs 1 --skip-full-size
    python benchmarks/boosters.py --cost-only              # only the step time and memory of the branch

AP: each variant trains the demo's model (`ddetr.demo.DEMO_OVERRIDES`: the tiny preset, two-stage with refinement,
10 queries, data scale 0.2) in one process on the demo's synthetic data (800 + 200 images, 3 epochs of 200 steps of
4 images, the demo's 2 workers x 2 images as one batch of 4), then is evaluated on the validation split. Variants:
plain, hybrid matching (T = 5 x the queries, K = 6: H-DETR's 1500 for 300), look forward twice, mixed query
selection, and all three. Dropout is not a variant: the tiny preset already trains without it. With
`--equal-wall-clock` each variant slower per step than plain trains again for the steps plain's training time
buys it. Variants alternate within a seed; seeds give mean and spread (max - min).

Cost: one training step (forward, criterion with the Hungarian matcher, backward) of the demo's model and of the
preset `two_stage_12ep_boosted` at full size (ResNet-50, 300 + 1500 queries), with the branch off and on, the two
alternating step by step; best and median of N. Memory on the CPU is the bytes autograd saves for the backward pass
(distinct storages, counted by a saved-tensors hook): the activation memory a step holds at its peak, which is what
the branch adds to.

Prints tables and writes benchmarks/results/boosters-cpu.json (machine, torch, threads, commit, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddetr import io
from ddetr.config import Config, apply_overrides, build_config, get_preset
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.demo import DEMO_OVERRIDES, DEMO_SEED
from ddetr.models import build_model
from ddetr.train.local import LocalRuntime
from ddetr.train.logbook import read_metrics
from ddetr.train.loop import fit

RESULTS = Path(__file__).parent / "results" / "boosters-cpu.json"
DEMO_QUERIES = 10
# The switches on the demo's model; hybrid matching at H-DETR's ratio (1500 beside 300 queries, 6 copies).
HYBRID = [f"loss.one_to_many_queries={5 * DEMO_QUERIES}", "loss.one_to_many_repeat=6"]
VARIANTS = {
    "plain": [],
    "hybrid": HYBRID,
    "look_forward_twice": ["loss.look_forward_twice=true"],
    "mixed_query_selection": ["model.mixed_query_selection=true"],
    "all": [*HYBRID, "loss.look_forward_twice=true", "model.mixed_query_selection=true"],
}


def demo_run_config(args: argparse.Namespace, data: str, storage: str, name: str, seed: int, *extra: str) -> Config:
    """The demo's model and data settings in one process: one batch of 4 images per step, evaluated at the end."""
    steps = [f"train.max_steps_per_epoch={args.max_steps}"] if args.max_steps else []
    return build_config(
        "tiny",
        data,
        [
            *DEMO_OVERRIDES,
            "train.batch_size=4",
            f"train.epochs={args.epochs}",
            f"train.lr_drop={max(1, args.epochs - 1)}",
            f"train.eval_every={args.epochs}",
            f"train.seed={seed}",
            f"data.loader_workers={args.loader_workers}",
            f"train.storage_path={storage}",
            f"train.name={name}",
            "train.log_every=100000",
            "train.keep_checkpoints=1",
            *steps,
            *extra,
        ],
    )


def train_and_evaluate(cfg: Config) -> dict:
    """Train `cfg` to its end with the plain engine: val AP, steps, training seconds (the sum of step_s)."""
    runtime = LocalRuntime(cfg, device="cpu")
    start = time.time()
    try:
        metrics = fit(cfg, runtime)
    finally:
        runtime.close()
    steps = [r for r in read_metrics(Path(cfg.train.storage_path) / cfg.train.name) if r["kind"] == "step"]
    step_s = [r["step_s"] for r in steps if "step_s" in r]
    return {
        "AP": metrics.get("val/AP"),
        "AP50": metrics.get("val/AP50"),
        "steps": len(step_s),
        "train_s": sum(step_s),
        "median_step_s": statistics.median(step_s) if step_s else None,
        "wall_s": time.time() - start,
    }


def measure_ap(args: argparse.Namespace, work: Path) -> dict:
    data_root = work / "synthetic"
    make_synthetic_coco(str(data_root), args.train_images, args.val_images, seed=DEMO_SEED)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:  # alternate within a seed: the machine's load drifts alike for every variant
            cfg = demo_run_config(
                args, str(data_root), str(work / "runs"), f"{variant}-{seed}", seed, *VARIANTS[variant]
            )
            result = {"seed": seed, **train_and_evaluate(cfg)}
            print(
                f"seed {seed} {variant:<22} AP {result['AP']:.3f}  {result['steps']} steps  {result['train_s']:.0f} s"
            )
            runs[variant].append(result)
        if args.equal_wall_clock and "plain" in runs:
            budget = runs["plain"][-1]["train_s"]
            for variant in args.variants:
                last = runs[variant][-1]
                if variant == "plain" or last["train_s"] <= budget:
                    continue
                steps = max(1, int(last["steps"] * budget / last["train_s"]))
                equal = argparse.Namespace(**{**vars(args), "max_steps": -(-steps // args.epochs)})
                name = f"{variant}-{seed}-equal"
                cfg = demo_run_config(equal, str(data_root), str(work / "runs"), name, seed, *VARIANTS[variant])
                last["equal_wall_clock"] = train_and_evaluate(cfg)
    return {v: summarise(r) for v, r in runs.items()}


def summarise(runs: list[dict]) -> dict:
    def spread(key: str, rows: list[dict]) -> dict:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            return {}
        return {"mean": statistics.fmean(values), "spread": max(values) - min(values), "values": values}

    out = {"runs": runs, "AP": spread("AP", runs), "AP50": spread("AP50", runs), "train_s": spread("train_s", runs)}
    equal = [r["equal_wall_clock"] for r in runs if "equal_wall_clock" in r]
    if equal:
        out["AP_equal_wall_clock"] = spread("AP", equal)
    return out


class SavedBytes:
    """Bytes autograd saves for backward inside the context (distinct storages): a step's activation memory."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def synthetic_batch(batch: int, height: int, width: int, objects: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        centre, size = torch.rand(objects, 2, generator=g) * 0.6 + 0.2, torch.rand(objects, 2, generator=g) * 0.2 + 0.05
        targets.append({"labels": torch.randint(1, 7, (objects,), generator=g), "boxes": torch.cat([centre, size], 1)})
    images = torch.randn(batch, 3, height, width, generator=g)
    return images, torch.zeros(batch, height, width, dtype=torch.bool), targets


def training_step(cfg: Config, batch: tuple) -> Callable[[], float]:
    """A closure running one training step of `cfg`'s model (forward, criterion, backward) that returns the MiB of
    activations autograd saved for it."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, load_backbone_weights=False)
    model.train()
    images, mask, targets = batch

    def step() -> float:
        with SavedBytes() as saved:
            loss = criterion.total_loss(criterion(model(images, mask), targets))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return saved.mib

    return step


def measure_cost(args: argparse.Namespace) -> dict:
    """The branch off and on, alternating step by step (one warm-up each), for the demo's model and (unless skipped)
    the full-size preset: best and median seconds of `--repeats` steps, and the activations saved."""
    demo = build_config("tiny", None, [*DEMO_OVERRIDES, "model.num_classes=7"])
    cases = {"demo (10 + 50 queries, 4 images 160x240)": (demo, HYBRID, synthetic_batch(4, 160, 240, 4))}
    if not args.skip_full_size:
        boosted = apply_overrides(get_preset("two_stage_12ep_boosted"), ["model.pretrained_backbone=none"])
        off = ["loss.one_to_many_queries=0", "loss.look_forward_twice=false"]
        cases["two_stage_12ep_boosted (R50, 300 + 1500 queries, 1 image 512x768)"] = (
            apply_overrides(boosted, off),
            ["loss.one_to_many_queries=1500", "loss.look_forward_twice=true"],
            synthetic_batch(1, 512, 768, 10),
        )
    report = {}
    for name, (base, branch, batch) in cases.items():
        steps = {"off": training_step(base, batch), "on": training_step(apply_overrides(base, branch), batch)}
        times: dict[str, list[float]] = {k: [] for k in steps}
        saved = {k: step() for k, step in steps.items()}  # the warm-up
        for _ in range(args.repeats):
            for k, step in steps.items():
                start = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - start)
        report[name] = {
            k: {"min_s": min(t), "median_s": statistics.median(t), "saved_activations_mib": saved[k]}
            for k, t in times.items()
        }
        on, off = report[name]["on"], report[name]["off"]
        report[name]["time_ratio"] = on["min_s"] / off["min_s"]
        report[name]["memory_ratio"] = on["saved_activations_mib"] / off["saved_activations_mib"]
        del steps  # the full-size models go before the next case
    return report


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (no commit)"


def print_tables(report: dict) -> None:
    if report.get("ap"):
        print(f"\n{'variant':<24}{'AP mean':>9}{'spread':>8}{'AP50':>8}{'train s':>9}{'AP equal time':>15}")
        for variant, r in report["ap"].items():
            equal = r.get("AP_equal_wall_clock", {}).get("mean")
            print(
                f"{variant:<24}{r['AP']['mean']:>9.3f}{r['AP']['spread']:>8.3f}{r['AP50']['mean']:>8.3f}"
                f"{r['train_s']['mean']:>9.0f}{'' if equal is None else f'{equal:.3f}':>15}"
            )
    print(f"\n{'one-to-many branch':<70}{'step s off':>11}{'on':>8}{'x':>6}{'saved MiB off':>15}{'on':>8}{'x':>6}")
    for name, r in report["cost"].items():
        off, on = r["off"], r["on"]
        print(
            f"{name:<70}{off['min_s']:>11.3f}{on['min_s']:>8.3f}{r['time_ratio']:>6.2f}"
            f"{off['saved_activations_mib']:>15.0f}{on['saved_activations_mib']:>8.0f}{r['memory_ratio']:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train-images", type=int, default=800, help="the demo's 800")
    parser.add_argument("--val-images", type=int, default=200, help="the demo's 200")
    parser.add_argument("--epochs", type=int, default=3, help="the demo's 3")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: every batch)")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--equal-wall-clock", action="store_true", help="also train slower variants for plain's time")
    parser.add_argument("--cost-only", action="store_true", help="only the step time and memory of the branch")
    parser.add_argument("--skip-full-size", action="store_true", help="cost of the demo's model only")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cost case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
        "threads": args.threads,
        "commit": git_commit(),
        "load_average": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "variants": VARIANTS,
        "demo_overrides": DEMO_OVERRIDES,
        "cost": measure_cost(args),
    }
    if not args.cost_only:
        with tempfile.TemporaryDirectory(prefix="ddetr-boosters-") as work:
            report["ap"] = measure_ap(args, Path(work))
    print_tables(report)
    io.atomic_write(args.out, json.dumps(report, indent=2))  # a reader never sees a half-written file
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
