"""Time one training step (forward, criterion, backward) of Deformable DETR, per MSDA backend, on CPU or GPU.

    python benchmarks/train_step.py                        # reference and cpp, deformable_detr, 2 x 320x480
    python benchmarks/train_step.py --backends reference --steps 2
    python benchmarks/train_step.py --device cuda --amp bf16 --batch 4 --height 800 --width 1216
    python benchmarks/train_step.py --device cuda --amp bf16 --backends cpp --compile   # torch.compile'd model

On CUDA the clock waits for the device (synchronize) around each timed call, and the peak memory of one training
step per backend (torch.cuda.max_memory_allocated, above what was allocated before) is recorded too.

Besides the whole step it times each component alone, forward plus backward, on the inputs it receives in
a real step: backbone (with input projections), encoder, decoder, matcher + criterion. Backends alternate
run by run and the best of N is reported (the median too, in the JSON). Prints a table and
writes JSON to benchmarks/results/train_step-<device>.json with the machine, torch, threads, commit and shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ddetr import io
from ddetr.config import get_preset
from ddetr.models import build_model

RESULTS_DIR = Path(__file__).parent / "results"


def make_batch(
    batch: int, height: int, width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        n = 6
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, 91, (n,), generator=g), "boxes": torch.cat([centre, size], 1)})
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device), mask.to(device), targets


def _grad_like(x):
    return x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x


class Capture:
    """Forward hook that keeps a module's (detached) inputs, to replay the module alone."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.args = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.args = tuple(_grad_like(a) for a in args)
        self.handle.remove()


def _backward_sum(outputs) -> None:
    """Backward of a weighted sum of every float output, so each gets a gradient."""
    outs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    total = sum((o.float() * 1e-3).sum() for o in outs if torch.is_tensor(o) and o.requires_grad)
    total.backward()


def setup_backend(
    preset: str,
    backend: str,
    images: torch.Tensor,
    mask: torch.Tensor,
    targets: list[dict],
    amp: torch.dtype | None = None,
    compile_model: bool = False,
) -> tuple[dict, list]:
    """The timed functions of one backend: "step" (the whole training step) and one per component.

    compile_model: run the step's model under `torch.compile` (the criterion stays eager: the matcher runs on the
    host); then only "step" is timed, since the components would time the eager model. The first (warm-up) call
    compiles.

    Returns:
        (name -> zero-argument function, the encoder's spatial shapes).
    """
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, msda_backend=backend))
    torch.manual_seed(0)  # same weights for every backend
    model, criterion, _ = build_model(cfg, load_backbone_weights=False)  # timing only: nothing to fetch offline
    model.to(images.device).train()
    autocast = functools.partial(torch.autocast, images.device.type, dtype=amp, enabled=amp is not None)
    stepped = torch.compile(model) if compile_model else model

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion.total_loss(criterion(stepped(images, mask), targets))
        loss.backward()

    # Inputs of each component, captured from one real forward.
    enc, dec = Capture(model.transformer.encoder), Capture(model.transformer.decoder)
    outputs = model(images, mask)
    detached = {
        "pred_logits": _grad_like(outputs["pred_logits"]),
        "pred_boxes": _grad_like(outputs["pred_boxes"]),
        "aux_outputs": [{k: _grad_like(v) for k, v in a.items()} for a in outputs.get("aux_outputs", [])],
    }

    def backbone() -> None:
        features, _ = model.backbone(images, mask)
        srcs = [proj(x) for proj, (x, _) in zip(model.input_proj, features, strict=False)]
        for lvl in range(len(features), model.num_feature_levels):
            srcs.append(model.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1]))
        _backward_sum(srcs)

    def under_autocast(fn):
        def run() -> None:
            with autocast():
                fn()

        return run

    if compile_model:
        return {"step": step}, enc.args[1].tolist()
    fns = {
        "step": step,
        "backbone": under_autocast(backbone),
        "encoder": under_autocast(lambda: _backward_sum(model.transformer.encoder(*enc.args))),
        "decoder": under_autocast(lambda: _backward_sum(model.transformer.decoder(*dec.args))),
        "matcher+criterion": lambda: criterion.total_loss(criterion(detached, targets)).backward(),
    }
    return fns, enc.args[1].tolist()


def run_interleaved(setups: dict[str, dict], steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall times per backend and function; backends alternate run by run, so load from other processes on a
    shared machine falls on all of them alike."""
    times: dict[str, dict[str, list[float]]] = {b: {name: [] for name in fns} for b, fns in setups.items()}
    names = list(next(iter(setups.values())))
    for name in names:
        for i in range(warmup + steps):
            for backend, fns in setups.items():
                synchronize()
                start = time.perf_counter()
                fns[name]()
                synchronize()
                if i >= warmup:
                    times[backend][name].append(time.perf_counter() - start)
    return times


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_step_mib(fns: dict) -> float | None:
    """Peak CUDA memory of one training step above what was allocated before it; None on the CPU."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fns["step"]()
    synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (no commit)"


def cpp_available(device_type: str) -> tuple[bool, str]:
    """Whether the compiled op builds and has a kernel for `device_type` here; the reason when not."""
    try:
        from ddetr.ops import build

        build.load_extension()
        return device_type in build.extension_devices(), f"no {device_type} kernel"
    except Exception as e:  # no build module yet, or a compiler error: report and skip the backend
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def print_table(results: dict) -> None:
    """Best-of-N seconds per component and backend (the median is in the JSON)."""
    backends = list(results)
    print(f"{'seconds, fwd+bwd (min)':<24}" + "".join(f"{b:>12}" for b in backends))
    for name in next(iter(results.values()))["min_s"]:
        label = "full training step" if name == "step" else name
        print(f"{label:<24}" + "".join(f"{results[b]['min_s'][name]:>12.3f}" for b in backends))
    print(f"{'images/s (step)':<24}" + "".join(f"{results[b]['images_per_s']:>12.2f}" for b in backends))
    if all(results[b]["peak_step_mib"] is not None for b in backends):
        print(f"{'peak step memory, MiB':<24}" + "".join(f"{results[b]['peak_step_mib']:>12.0f}" for b in backends))
    if "reference" in results and "cpp" in results:
        speedup = results["reference"]["min_s"]["step"] / results["cpp"]["min_s"]["step"]
        print(f"speed-up of the training step with the cpp op: {speedup:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deformable_detr")
    parser.add_argument("--backends", nargs="+", default=["reference", "cpp"], choices=["reference", "cpp"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype of the step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model; time the whole step only")
    parser.add_argument("--out", type=Path, default=None, help="default: results/train_step-<device>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    out = args.out or RESULTS_DIR / f"train_step-{device.type}.json"

    images, mask, targets = make_batch(args.batch, args.height, args.width, device)
    setups, skipped, spatial = {}, {}, None
    for backend in args.backends:
        if backend == "cpp":
            ok, why = cpp_available(device.type)
            if not ok:
                skipped[backend] = why
                print(f"skipping the cpp backend: {why}")
                continue
        setups[backend], spatial = setup_backend(args.preset, backend, images, mask, targets, amp, args.compile)
    times = run_interleaved(setups, args.steps, args.warmup)
    results = {
        b: {
            "min_s": {n: min(t) for n, t in per.items()},
            "median_s": {n: statistics.median(t) for n, t in per.items()},
            "all_s": per,
            "images_per_s": args.batch / min(per["step"]),
            "peak_step_mib": peak_step_mib(setups[b]),
        }
        for b, per in times.items()
    }
    print_table(results)
    report = {
        "benchmark": "train_step",
        "preset": args.preset,
        "shapes": {
            "batch": args.batch,
            "height": args.height,
            "width": args.width,
            "spatial_shapes": spatial,
            "num_tokens": int(sum(h * w for h, w in spatial)),
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": args.amp,
        "compile": args.compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "results": results,
        "skipped": skipped,
    }
    if "reference" in results and "cpp" in results:
        report["speedup_cpp_vs_reference"] = {
            stat: results["reference"][stat]["step"] / results["cpp"][stat]["step"] for stat in ("min_s", "median_s")
        }
    io.atomic_write(out, json.dumps(report, indent=2))  # a reader never sees a half-written file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
