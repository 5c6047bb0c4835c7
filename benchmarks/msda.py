"""Benchmark of multi-scale deformable attention: the PyTorch reference against the compiled op.

Prints a table and writes JSON to benchmarks/results/msda-<device>.json with the machine, torch version, threads,
git commit and shapes. For each shape and backend it measures forward time, backward time (median over --repeat runs
after a warm-up) and the peak extra memory of one forward + backward, in MiB above what was allocated before:
on CPU from the allocations and frees that the torch profiler records (profile_memory=True), on CUDA from
torch.cuda.max_memory_allocated. Both include the output and the gradients.

Inputs follow the model: encoder queries sit at the pixel centres of every level, decoder queries at random points;
each samples P points per level at Gaussian offsets of 2 pixels of that level around its reference point.

    python benchmarks/msda.py                      # all shapes, 2 threads
    python benchmarks/msda.py --quick              # encoder shape only, fewer repeats
    python benchmarks/msda.py --shapes decoder --repeat 10

On CUDA, when the JSON of `benchmarks/official_kernel.py time` (the official Deformable DETR kernel beside ours, timed
with CUDA events in one run) is given with --official-json or found at results/msda-vs-official.json, a second table
shows the official kernel's times beside this run's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddetr.ops import build, ms_deform_attn  # noqa: E402

M, D, P = 8, 32, 4
LEVELS_512 = [(64, 96), (32, 48), (16, 24), (8, 12)]
LEVELS_800 = [(100, 167), (50, 84), (25, 42), (13, 21)]
# name: (N, levels, Lq); Lq None means one query per value position (the encoder).
SHAPES = {
    "encoder": (2, LEVELS_512, None),
    "decoder": (2, LEVELS_512, 300),
    "encoder-800": (2, LEVELS_800, None),
}
RESULTS = Path(__file__).resolve().parent / "results"
OFFICIAL_JSON = RESULTS / "msda-vs-official.json"  # the default --out of benchmarks/official_kernel.py time
# This script's CUDA variants under their names in that JSON.
OFFICIAL_NAMES = {"cuda fp32": "ours fp32", "cuda bf16": "ours bf16", "cuda fp16": "ours fp16"}


def make_inputs(N: int, levels: list[tuple[int, int]], Lq: int | None, device: str, dtype: torch.dtype):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) as the model makes them."""
    shapes = torch.tensor(levels, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(levels)
    if Lq is None:  # encoder: a query at every pixel centre of every level
        centres = []
        for H, W in levels:
            y, x = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        reference = torch.cat(centres).expand(N, S, 2)
    else:
        reference = torch.rand(N, Lq, 2)
    Lq = reference.shape[1]
    pixel = 1.0 / shapes.flip(-1).cpu().float()  # (L, 2): size of one pixel of each level as (x, y)
    offsets = torch.randn(N, Lq, M, L, P, 2) * 2.0 * pixel[None, None, None, :, None, :]
    locations = (reference[:, :, None, None, None, :] + offsets).to(device)
    weights = torch.randn(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P).to(device)
    value = torch.randn(N, S, M, D).to(device=device, dtype=dtype)
    return value, shapes, starts, locations, weights


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(backend: str, inputs, device: str, repeat: int) -> dict[str, float]:
    """Median forward and backward seconds, and the peak extra MiB of one forward + backward."""
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]

    def forward(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)

    grad_output = torch.randn_like(forward(False))
    forward_times, backward_times = [], []
    for i in range(repeat + 1):  # the first round warms up caches and lazy initialisation
        _sync(device)
        start = time.perf_counter()
        forward(False)
        _sync(device)
        forward_time = time.perf_counter() - start
        out = forward(True)
        _sync(device)
        start = time.perf_counter()
        out.backward(grad_output)
        _sync(device)
        backward_time = time.perf_counter() - start
        for t in leaves:
            t.grad = None
        del out
        if i:
            forward_times.append(forward_time)
            backward_times.append(backward_time)
    peak = peak_extra_memory(lambda: forward(True).backward(grad_output), device)
    return {
        "forward_s": statistics.median(forward_times),
        "backward_s": statistics.median(backward_times),
        "peak_extra_mib": peak / 2**20,
    }


def peak_extra_memory(step: Callable[[], None], device: str) -> float:
    """Peak bytes allocated by `step` above the allocations alive before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return float(peak)


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_flags": build.cpu_flags(),
        "git_commit": commit,
        # Other work on the machine slows both backends; the speed-ups compare runs made side by side.
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def variants(device: str) -> list[tuple[str, str, torch.dtype]]:
    """(label, backend, value dtype) to compare on `device`."""
    if device == "cuda":
        return [
            ("reference fp32", "reference", torch.float32),
            ("cuda fp32", "cpp", torch.float32),
            ("cuda bf16", "cpp", torch.bfloat16),
            ("cuda fp16", "cpp", torch.float16),
        ]
    return [("reference fp32", "reference", torch.float32), ("cpp fp32", "cpp", torch.float32)]


def run(shapes: list[str], device: str, repeat: int) -> list[dict[str, object]]:
    rows = []
    for name in shapes:
        N, levels, Lq = SHAPES[name]
        for label, backend, dtype in variants(device):
            torch.manual_seed(0)
            inputs = make_inputs(N, levels, Lq, device, dtype)
            result = measure(backend, inputs, device, repeat)
            rows.append(
                {
                    "shape": name,
                    "variant": label,
                    "N": N,
                    "levels": levels,
                    "S": inputs[0].shape[1],
                    "Lq": inputs[3].shape[1],
                    "M": M,
                    "D": D,
                    "P": P,
                    **result,
                }
            )
            print_row(rows[-1], rows)
    return rows


def print_row(row: dict[str, object], rows: list[dict[str, object]]) -> None:
    if len(rows) == 1:
        print(
            f"{'shape':<12} {'variant':<15} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'speed-up':>8} {'peak MiB':>9}"
        )
    total = row["forward_s"] + row["backward_s"]
    base = next(r for r in rows if r["shape"] == row["shape"])  # the reference comes first
    row["speedup_vs_reference"] = (base["forward_s"] + base["backward_s"]) / total
    print(
        f"{row['shape']:<12} {row['variant']:<15} {row['forward_s'] * 1e3:8.1f} {row['backward_s'] * 1e3:8.1f} "
        f"{total * 1e3:8.1f} {row['speedup_vs_reference']:7.1f}x {row['peak_extra_mib']:9.1f}"
    )


def official_table(path: Path, rows: list[dict[str, object]]) -> dict[str, object]:
    """Print the official kernel's fp32 times from `path` beside this run's CUDA rows; return them for the JSON.

    Two ratios per row: official / this run (host clocks here, CUDA events there: indicative only), and official /
    ours as measured side by side in the official JSON's own run (the one to quote).
    """
    official = json.loads(path.read_text())
    gpu = official["machine"]["gpu"]
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"\nofficial kernel, fp32 ({path}, {gpu}{'' if gpu == here else f'; this run: {here}'})")
    print(f"{'shape':<12} {'variant':<15} {'f+b ms':>8} {'official':>9} {'off/this':>9} {'off/ours same run':>18}")
    out = []
    for row in rows:
        shape = official["shapes"].get(row["shape"])
        name = OFFICIAL_NAMES.get(row["variant"])
        if shape is None or name is None:
            continue
        mine = (row["forward_s"] + row["backward_s"]) * 1e3
        theirs = shape["timings_ms"]["official fp32"]["forward_backward"]
        same_run = shape["official_over_ours"][name]["forward_backward"]
        print(
            f"{row['shape']:<12} {row['variant']:<15} {mine:8.2f} {theirs:9.2f} {theirs / mine:8.2f}x {same_run:17.2f}x"
        )
        out.append({"shape": row["shape"], "variant": row["variant"], "official_fwd_bwd_ms": theirs})
        out[-1].update(official_over_this_run=theirs / mine, official_over_ours_same_run=same_run)
    return {"path": str(path), "gpu": gpu, "rows": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--quick", action="store_true", help="encoder shape only, 2 repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the CPU runs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/msda-<device>.json)")
    parser.add_argument(
        "--official-json",
        type=Path,
        default=None,
        help=f"official-kernel JSON of benchmarks/official_kernel.py to show beside a CUDA run (default {OFFICIAL_JSON}"
        " when present)",
    )
    args = parser.parse_args()
    shapes = ["encoder"] if args.quick else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    if args.official_json is not None and not args.official_json.is_file():
        parser.error(f"--official-json {args.official_json}: no such file")
    torch.set_num_threads(args.threads)
    build.load_extension()
    rows = run(shapes, args.device, 2 if args.quick else args.repeat)
    out = args.out or RESULTS / f"msda-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")  # written whole, then renamed: no half-written result files
    notes = {
        "times": "median seconds over --repeat runs after one warm-up; forward without autograd, backward alone",
        "peak_extra_mib": "CPU: torch profiler allocation events (profile_memory); CUDA: max_memory_allocated; "
        "MiB above the allocations alive before one forward + backward, output and gradients included",
        "inputs": "encoder queries at every pixel centre, decoder queries uniform; P points per level at "
        "Gaussian offsets of 2 pixels; softmax attention weights",
    }
    report = {"machine": machine(), "device": args.device, "notes": notes, "results": rows}
    official = args.official_json or (OFFICIAL_JSON if OFFICIAL_JSON.is_file() else None)
    if official is not None and args.device == "cuda":
        try:
            report["official"] = official_table(official, rows)
        except (OSError, ValueError, KeyError, TypeError) as err:  # this run's own results are still written
            print(f"note: {official} is not a JSON of official_kernel.py time ({err!r}); official columns skipped")
    elif args.official_json is not None:
        print(f"note: --official-json is for CUDA runs; ignored on {args.device}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
