"""Direct calls of the compiled op's CUDA kernels, for the GPU checks that wrap a whole process (gpu_check.py).

    python benchmarks/op_subset.py                # small calls: every dtype and D, both backward modes (sanitizers)
    python benchmarks/op_subset.py --sync         # the same under torch.cuda.set_sync_debug_mode("error")
    python benchmarks/op_subset.py --encoder-800   # forward + both backward modes at encoder-800, fp32 and bf16 (ncu)

The small calls cover every vector width (D = 1 ... 256), both backward modes, an empty level, a level that disagrees
with S (the device guard) and points outside the map. The ops are called as `torch.ops.ddetr.*`, without Python
autograd, so the process launches few kernels besides ours: compute-sanitizer and ncu then filter to ours by name
(every kernel of the op is in namespace `ddetr`, so its mangled name contains "ddetr").
Needs a CUDA device and the op built with its CUDA kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
DTYPES_800 = (torch.float32, torch.bfloat16)  # training's dtypes at the size that matters


def small_cases() -> list[Inputs]:
    """Every dtype and channel count on 3 small levels (one empty), plus one call with an inconsistent level."""
    from test_ops import make_inputs

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for D in (1, 2, 12, 30, 32, 64, 256):
            cases.append(make_inputs(2, [(6, 7), (3, 4), (0, 3)], 9, 3, 2, D, dtype=dtype, device="cuda", spread=0.5))
    bad = list(make_inputs(2, [(6, 7), (3, 4)], 9, 2, 2, 16, dtype=torch.float32, device="cuda"))
    bad[1] = torch.tensor([[6, 7], [300, 400]], device="cuda")  # level 1 claims more positions than value holds
    cases.append(tuple(bad))
    return cases


def encoder_800_cases() -> list[Inputs]:
    """The encoder-800 shape of benchmarks/msda.py (N = 2), in fp32 and bf16."""
    from msda import LEVELS_800, make_inputs

    return [tuple(t.detach() for t in make_inputs(2, LEVELS_800, None, "cuda", dtype)) for dtype in DTYPES_800]


def call_all(cases: list[Inputs]) -> None:
    """Forward, then the backward in both modes (atomic and deterministic), of each case."""
    forward, backward = torch.ops.ddetr.ms_deform_attn_forward, torch.ops.ddetr.ms_deform_attn_backward
    for inputs in cases:
        out = forward(*inputs)
        grad = torch.randn_like(out)
        for deterministic in (False, True):
            backward(grad, *inputs, deterministic)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sync", action="store_true", help="fail on any host synchronisation inside the calls")
    mode.add_argument("--encoder-800", action="store_true", help="the large shape, for Nsight Compute")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: op_subset.py needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from ddetr.ops import build

    build.load_extension()
    if "cuda" not in build.extension_devices():
        print("error: the op was built without its CUDA kernel: put nvcc on PATH or set CUDA_HOME", file=sys.stderr)
        return 2
    if args.encoder_800:  # ncu profiles every launch it is told to: one pass, no warm-up
        call_all(encoder_800_cases())
        torch.cuda.synchronize()
        print("encoder-800: forward + backward (atomic, deterministic), fp32 and bf16")
        return 0
    cases = small_cases()
    call_all(cases)  # warm-up: lazy initialisation (cuBLAS handles, the allocator) may synchronise once
    torch.cuda.synchronize()
    if args.sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        call_all(cases)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    suffix = " (no host synchronisation)" if args.sync else ""
    print(f"{len(cases)} cases, forward + both backward modes: ok{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
