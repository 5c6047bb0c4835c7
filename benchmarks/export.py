"""Benchmark of the ONNX export: latency per image of PyTorch (compiled op) against onnxruntime, on the CPU.

For each image size it exports the model once (ddetr.deploy.onnx, raw outputs), then times one image at a time
(batch 1, median over --repeat runs after warm-ups) through PyTorch with the compiled deformable attention and
through onnxruntime's CPU provider with the same number of threads, and records the parity of the two on a padded
batch of two images: the largest difference of the logits and of the boxes, and whether the top-100 detections
are the same. Prints a table and writes JSON to benchmarks/results/export-cpu.json with the machine, the commit
and the shapes.

    python benchmarks/export.py                          # tiny preset at 320 and 640 px, 2 threads
    python benchmarks/export.py --preset deformable_detr --sizes 384x512 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msda import machine  # noqa: E402

from ddetr.config import get_preset  # noqa: E402
from ddetr.deploy.onnx import export_model  # noqa: E402
from ddetr.models import build_detector  # noqa: E402
from ddetr.models.deformable_detr import PostProcess  # noqa: E402
from ddetr.ops.ms_deform_attn import select_backend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeat: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (all threads of this process) of `fn()` over `repeat` runs
    after `warmup` untimed ones. On a shared machine the wall time grows with the others' load; the CPU time
    much less, so both are kept."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(model: torch.nn.Module, size: tuple[int, int], repeat: int, threads: int, folder: Path) -> dict:
    H, W = size
    start = time.perf_counter()
    path = export_model(model, folder / f"model-{H}x{W}.onnx")
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    images = torch.randn(1, 3, H, W)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    feed = {"images": images.numpy(), "mask": mask.numpy()}
    with torch.no_grad():
        torch_s, torch_cpu = timed(lambda: model(images, mask), repeat)
    onnx_s, onnx_cpu = timed(lambda: session.run(None, feed), repeat)

    # Parity on a padded batch: the second image covers three quarters of the height and two thirds of the width.
    batch = torch.randn(2, 3, H, W)
    pad = torch.zeros(2, H, W, dtype=torch.bool)
    pad[1, (3 * H) // 4 :], pad[1, :, (2 * W) // 3 :] = True, True
    with torch.no_grad():
        expected = model(batch, pad)
    logits, boxes = session.run(None, {"images": batch.numpy(), "mask": pad.numpy()})
    sizes = torch.tensor([[H, W]] * 2)
    post = PostProcess(100)
    top_torch = post(expected, sizes)
    top_onnx = post({"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}, sizes)
    return {
        "size": [H, W],
        "export_s": round(export_s, 2),
        "pytorch_ms_per_image": round(torch_s * 1e3, 2),
        "onnxruntime_ms_per_image": round(onnx_s * 1e3, 2),
        "onnxruntime_speedup": round(torch_s / onnx_s, 2),
        "pytorch_cpu_ms_per_image": round(torch_cpu * 1e3, 2),
        "onnxruntime_cpu_ms_per_image": round(onnx_cpu * 1e3, 2),
        "max_abs_diff_logits": float(np.abs(logits - expected["pred_logits"].numpy()).max()),
        "max_abs_diff_boxes": float(np.abs(boxes - expected["pred_boxes"].numpy()).max()),
        "same_top100_labels": all(
            torch.equal(a["labels"], b["labels"]) for a, b in zip(top_torch, top_onnx, strict=True)
        ),
    }


def print_table(rows: list[dict], preset: str, backend: str) -> None:
    print(f"{preset}, batch 1, PyTorch deformable attention: {backend}")
    print(
        f"{'size':>10} {'PyTorch ms':>11} {'ORT ms':>8} {'speed-up':>9} {'PyTorch cpu ms':>15} {'ORT cpu ms':>11} "
        f"{'|dlogits|':>10} {'|dboxes|':>10} top-100"
    )
    for r in rows:
        size = "x".join(map(str, r["size"]))
        print(
            f"{size:>10} {r['pytorch_ms_per_image']:>11.1f} {r['onnxruntime_ms_per_image']:>8.1f} "
            f"{r['onnxruntime_speedup']:>8.2f}x {r['pytorch_cpu_ms_per_image']:>15.1f} "
            f"{r['onnxruntime_cpu_ms_per_image']:>11.1f} {r['max_abs_diff_logits']:>10.1e} "
            f"{r['max_abs_diff_boxes']:>10.1e} {'same' if r['same_top100_labels'] else 'DIFFERENT'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (random weights: latency does not need more)")
    parser.add_argument("--sizes", default="320x320,640x640", help="comma-separated HxW image sizes")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="threads of PyTorch and of onnxruntime")
    parser.add_argument("--out", type=Path, default=RESULTS / "export-cpu.json")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = dataclasses.replace(get_preset(args.preset).model, pretrained_backbone="none")
    model = build_detector(m, load_backbone_weights=False).eval()
    backend = select_backend(m.msda_backend, torch.device("cpu"))  # "cpp" when the compiled op builds
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(model, size, args.repeat, args.threads, Path(folder)) for size in sizes]
    print_table(rows, args.preset, backend)
    notes = {
        "latency": "median wall ms per image (batch 1) over --repeat runs after 2 warm-ups; PyTorch under no_grad",
        "cpu_ms": "median CPU ms of the process (all its threads) per image: less sensitive to other load",
        "parity": "a batch of 2 random images, the second padded; top-100 labels from PostProcess on both outputs",
        "weights": "random (the preset's init); the graph does not depend on the values",
    }
    report = {
        "machine": machine(),
        "preset": args.preset,
        "pytorch_msda_backend": backend,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "notes": notes,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")  # written whole, then renamed: no half-written result files
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
