"""Time one AdamW step over a model's trainable parameters: torch's per-tensor loop, foreach, and fused.

    python benchmarks/optim.py                       # the demo's model and deformable_detr, on CPU, 1 thread
    python benchmarks/optim.py --device cuda --threads 0

The parameters get random gradients once; each variant is built over the same parameter groups as training
(`ddetr.train.optim.param_groups`), warmed up, then the variants alternate round by round and the best and median
of the rounds are reported. Prints a table and writes benchmarks/results/optim-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ddetr import io
from ddetr.config import build_config
from ddetr.demo import DEMO_OVERRIDES
from ddetr.models import build_model
from ddetr.train.optim import build_optimizer, param_groups

RESULTS_DIR = Path(__file__).parent / "results"
VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
MODELS = {"demo (tiny)": ("tiny", DEMO_OVERRIDES), "deformable_detr": ("deformable_detr", [])}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(preset: str, overrides: list[str], device: torch.device, rounds: int, steps: int) -> dict:
    cfg = build_config(preset, "", [*overrides, "model.pretrained_backbone=none"])
    model = build_model(cfg, load_backbone_weights=False)[0].to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {
        name: torch.optim.AdamW(param_groups(model, cfg.train), lr=1e-4, weight_decay=1e-4, **kw)
        for name, kw in VARIANTS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for opt in optimizers.values():
        opt.step()
    for _ in range(rounds):
        for name, opt in optimizers.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    chosen = build_optimizer(model, cfg.train).defaults
    return {
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "training_uses": "fused" if chosen.get("fused") else "foreach" if chosen.get("foreach") else "loop",
        "ms": {name: {"best": min(ts), "median": statistics.median(ts)} for name, ts in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 leaves torch's default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--out", type=Path, default=None, help="default: results/optim-<device>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {name: time_model(*spec, device, args.rounds, args.steps) for name, spec in MODELS.items()}

    threads = torch.get_num_threads()
    print(f"\nAdamW step, ms (best of {args.rounds} rounds of {args.steps}), {device}, {threads} threads")
    print(f"{'model':18s} {'tensors':>8s} {'params':>11s} " + " ".join(f"{v:>9s}" for v in VARIANTS) + "  loop/fused")
    for name, r in results.items():
        ms = [r["ms"][v]["best"] for v in VARIANTS]
        print(
            f"{name:18s} {r['tensors']:8d} {r['parameters']:11d} "
            + " ".join(f"{m:9.1f}" for m in ms)
            + f"  {ms[0] / ms[2]:9.1f}x"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "commit": commit,
        "rounds": args.rounds,
        "steps": args.steps,
        "results": results,
    }
    out = args.out or RESULTS_DIR / f"optim-{device.type}.json"
    io.atomic_write(out, json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
