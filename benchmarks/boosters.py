"""What the training-only boosters give on the demo's data, and what the one-to-many branch costs per step.

    python benchmarks/boosters.py                          # the full measurement: 5 variants x 3 seeds, demo-sized
    python benchmarks/boosters.py --seeds 0 --train-images 48 --val-images 16 --epochs 1 --skip-full-size
    python benchmarks/boosters.py --cost-only              # only the step time and memory of the branch
    python benchmarks/boosters.py --variants hybrid all --equal-wall-clock --skip-demo-steps --out /tmp/eq.json
    python benchmarks/boosters.py --merge A.json B.json --out benchmarks/results/boosters-ap-cpu.json

AP: each variant trains the demo's model (`ddetr.demo.DEMO_OVERRIDES`: the tiny preset, two-stage with refinement,
10 queries, data scale 0.2) in one process on the demo's synthetic data (800 + 200 images, 3 epochs of 200 steps of
4 images, the demo's 2 workers x 2 images as one batch of 4), then is evaluated on the validation split. Variants:
plain, hybrid matching (T = 5 x the queries, K = 6: H-DETR's 1500 for 300), look forward twice, mixed query
selection, and all three. Dropout is not a variant: the tiny preset already trains without it. Variants alternate
within a seed; seeds give mean and spread (max - min). A run's AP depends on its seed and thread count, not on the
machine's load.

Equal wall-clock (`--equal-wall-clock`): plain's budget is the demo's steps. Each variant's step time is measured
against plain's in the same invocation, the two alternating step by step on one batch (`measure_step_ratios`), so
the ratio does not depend on the machine's load as whole runs' training seconds do; a variant whose ratio exceeds
`--same-within` (1.03) trains again for demo steps / ratio steps, the others keep their result at the demo's steps.

Several invocations (a seed or a variant each) merge into one report with `--merge` (`boosters_report.py`).

Cost: one training step (forward, criterion with the Hungarian matcher, backward) of the demo's model and of the
preset `two_stage_12ep_boosted` at full size (ResNet-50, 300 + 1500 queries), with the branch off and on, the two
alternating step by step; best and median of N. Memory on the CPU is the bytes autograd saves for the backward pass
(distinct storages, counted by a saved-tensors hook): the activation memory a step holds at its peak, which is what
the branch adds to.

Prints tables and writes benchmarks/results/boosters-cpu.json or --out (machine, torch, threads, commit, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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

sys.path.insert(0, str(Path(__file__).parent))
from boosters_report import EQUAL_HOW, merge_files, summarise  # noqa: E402 - benchmarks/boosters_report.py, beside

RESULTS = Path(__file__).parent / "results" / "boosters-cpu.json"
DEMO_QUERIES = 10
DEMO_BATCH = 4  # the demo's 2 workers x 2 images, as one batch
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
            f"train.batch_size={DEMO_BATCH}",
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


def measure_ap(args: argparse.Namespace, work: Path, save: Callable[[dict], None]) -> dict:
    """Train each variant for each seed; the `ap` and `equal_wall_clock` sections and the step ratios measured,
    passed to `save` once the step ratios are measured and after every run (a run takes minutes: an invocation cut
    short keeps what it measured)."""
    data_root = work / "synthetic"
    make_synthetic_coco(str(data_root), args.train_images, args.val_images, seed=DEMO_SEED)
    ratios = measure_step_ratios(args) if args.equal_wall_clock else {}
    demo_steps = args.epochs * (args.max_steps or args.train_images // DEMO_BATCH)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants if not args.skip_demo_steps}
    equal: dict[str, list[dict]] = {v: [] for v in ratios}

    def sections() -> dict:
        ap, equal_summary = summarise(runs, equal, {v: {r["ratio"]} for v, r in ratios.items()})
        report = {"ap": ap} if runs else {}
        if args.equal_wall_clock:
            report["step_ratios"] = ratios
            report["equal_wall_clock"] = {"how": EQUAL_HOW, "threshold": args.same_within, "variants": equal_summary}
        return report

    # A variant within the noise of plain's step trains the same steps in the same time: its result at the demo's
    # steps is its equal-wall-clock result, recorded now (and saved with the ratios) for every seed.
    same = {v for v, r in ratios.items() if r["ratio"] <= args.same_within}
    for variant in same:
        equal[variant] = [
            {"seed": s, "step_ratio": ratios[variant]["ratio"], "same_as_demo_steps": True} for s in args.seeds
        ]
    save(sections())
    for seed in args.seeds:
        for variant in args.variants:  # alternate within a seed: the machine's load drifts alike for every variant
            if not args.skip_demo_steps:
                runs[variant].append(train_variant(args, data_root, work, variant, seed))
                save(sections())
            if variant not in ratios or variant in same:
                continue
            ratio = ratios[variant]["ratio"]
            # The steps plain's time buys this variant, spread over the same epochs (the lr drop keeps its epoch).
            steps = max(args.epochs, round(demo_steps / ratio))
            result = train_variant(args, data_root, work, variant, seed, max_steps=-(-steps // args.epochs))
            equal[variant].append({**result, "step_ratio": ratio, "target_steps": steps})
            save(sections())
    return sections()


def train_variant(
    args: argparse.Namespace, data_root: Path, work: Path, variant: str, seed: int, max_steps: int = 0
) -> dict:
    """One run of `variant` at `seed`: the demo's steps, or `max_steps` per epoch (its equal-wall-clock run)."""
    name = f"{variant}-{seed}" + (f"-{max_steps}" if max_steps else "")
    capped = argparse.Namespace(**{**vars(args), "max_steps": max_steps or args.max_steps})
    cfg = demo_run_config(capped, str(data_root), str(work / "runs"), name, seed, *VARIANTS[variant])
    result = {"seed": seed, **train_and_evaluate(cfg), "load_average": os.getloadavg()}
    print(f"seed {seed} {variant:<22} AP {result['AP']:.3f}  {result['steps']} steps  {result['train_s']:.0f} s")
    return result


def measure_step_ratios(args: argparse.Namespace) -> dict[str, dict]:
    """Each non-plain variant's training step (forward, criterion, backward) against plain's on one batch of the
    demo's shape, the two alternating step by step (and which goes first alternating too), so the machine's load
    falls alike on both: the median of the pairs' time ratios, and the ratio of the best steps.

    The data loading and the optimizer step, alike for every variant, are not timed: the ratio of whole training
    steps is nearer 1 than this one, so a variant's equal-wall-clock budget errs on the short side.
    """
    demo = build_config("tiny", None, [*DEMO_OVERRIDES, "model.num_classes=7"])
    batch = synthetic_batch(DEMO_BATCH, 160, 240, 4)  # the demo's images at data.scale 0.2, its 4 objects at most
    plain = training_step(demo, batch)
    plain()  # the warm-up
    ratios = {}
    for variant in args.variants:
        if variant == "plain":
            continue
        step = training_step(apply_overrides(demo, VARIANTS[variant]), batch)
        step()
        times: dict[str, list[float]] = {"plain": [], variant: []}
        for i in range(args.ratio_steps):
            for name, fn in [("plain", plain), (variant, step)][:: 1 if i % 2 else -1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        pairs = [v / p for v, p in zip(times[variant], times["plain"], strict=True)]
        ratios[variant] = {
            "ratio": statistics.median(pairs),
            "ratio_of_best": min(times[variant]) / min(times["plain"]),
            "pairs": len(pairs),
            "plain_median_s": statistics.median(times["plain"]),
            "variant_median_s": statistics.median(times[variant]),
            "load_average": os.getloadavg(),
        }
        r = ratios[variant]
        print(f"step ratio {variant:<22} {r['ratio']:.3f} (best steps {r['ratio_of_best']:.3f})")
    return ratios


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
    ap, equal = report.get("ap", {}), report.get("equal_wall_clock", {}).get("variants", {})
    if ap or equal:
        print(f"\n{'variant':<24}{'seeds':>8}{'AP mean':>9}{'spread':>8}{'AP50':>8}{'step x':>8}{'AP equal time':>15}")
        for variant in dict.fromkeys([*ap, *equal]):
            r, e = ap.get(variant, {}), equal.get(variant, {})
            cells = [r.get("AP", {}).get("mean"), r.get("AP", {}).get("spread"), r.get("AP50", {}).get("mean")]
            ratios = "/".join(f"{x:.2f}" for x in e.get("step_ratios", []))
            cells.append(e.get("AP", {}).get("mean"))
            text = ["" if c is None else f"{c:.3f}" for c in cells]
            seeds = ",".join(str(s) for s in r.get("seeds", e.get("seeds", [])))
            print(f"{variant:<24}{seeds:>8}{text[0]:>9}{text[1]:>8}{text[2]:>8}{ratios:>8}{text[3]:>15}")
    if not report.get("cost"):
        return
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
    parser.add_argument(
        "--equal-wall-clock",
        action="store_true",
        help="measure each variant's step time against plain's and train slower ones again for plain's time",
    )
    parser.add_argument("--ratio-steps", type=int, default=20, help="alternating step pairs timed per variant")
    parser.add_argument(
        "--same-within", type=float, default=1.03, help="step ratio up to which a variant keeps its demo-step result"
    )
    parser.add_argument(
        "--skip-demo-steps", action="store_true", help="only the equal-wall-clock runs (the others merged in later)"
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these reports by variant and seed into --out")
    parser.add_argument("--cost-only", action="store_true", help="only the step time and memory of the branch")
    parser.add_argument("--skip-full-size", action="store_true", help="cost of the demo's model only")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cost case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="the JSON written (default: benchmarks/results/boosters-cpu.json)")
    args = parser.parse_args()
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out: the file the merged report goes to")
        try:
            report = merge_files(args.merge)
        except ValueError as e:
            sys.exit(f"error: {e}")
        print_tables(report)
        io.atomic_write(args.out, json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
        return
    args.out = args.out or RESULTS
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

    def save(sections: dict) -> None:  # a reader never sees a half-written file
        io.atomic_write(args.out, json.dumps({**report, **sections}, indent=2))

    if not args.cost_only:
        with tempfile.TemporaryDirectory(prefix="ddetr-boosters-") as work:
            report.update(measure_ap(args, Path(work), lambda sections: save({**sections, "finished": False})))
    report["finished"] = True
    print_tables(report)
    save({})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
