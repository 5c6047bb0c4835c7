"""Benchmark of `ddetr predict` over a folder: peak resident memory for 50, 200 and 800 images, against earlier ways.

A tiny checkpoint is trained for one step with the single-process runtime (tiny preset, synthetic data), then each
variant runs in a fresh Python process per image count, so that each peak RSS (VmHWM) is its own:

- streamed: `ddetr predict --checkpoint RUN --out OUT FOLDER`, as a user runs it (`inference.predict_images`: a
  batch read ahead, detections.json and drawings written as the batches come);
- streamed_cache1024: the same with oneDNN's default kernel cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024`) instead of
  the 64 kernels `Detector` asks for on the CPU: images of many sizes fill it with kernels of a few MB each;
- collected: the command before it took folders: `Detector.predict_files` (a batch decoded at a time, reduced) into a
  dict of every image's detections, then every drawing, then every record in one list, then one JSON write;
- loaded_first: as `predict_files` was before that (what issue 28 describes): every image decoded at full size before
  the first batch. It shows that the measurement sees memory that grows with the images.

Each side of each synthetic image is drawn between the two numbers of `--size` (480 to 640 px), so batches come in many
shapes, as photos of many cameras do.

Seconds are each child's wall time from its first ddetr import (imports and the checkpoint load included); on a shared
machine they vary by tens of percent from run to run. Prints a table and writes JSON to
benchmarks/results/predict-memory-cpu.json with the machine, the commit and the shapes.

    python benchmarks/predict_memory.py                      # 50, 200 and 800 images, sides 480 to 640 px
    python benchmarks/predict_memory.py --counts 50 200 --size 240x320
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msda import machine  # noqa: E402

from ddetr.config import build_config  # noqa: E402
from ddetr.data.synthetic import make_synthetic_coco  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("streamed", "streamed_cache1024", "collected", "loaded_first")

# Run in a child process: argv = variant, run folder, image folder, output folder, batch size. Prints one JSON line.
CHILD = r"""
import json, sys, time
variant, run, folder, out, batch = sys.argv[1:6]
start = time.perf_counter()
if variant == "streamed":
    from ddetr.cli import main
    assert main(["-q", "predict", "--checkpoint", run, "--out", out, "--batch-size", batch, folder]) == 0
else:
    from pathlib import Path
    from ddetr import io
    from ddetr.image_sources import list_images
    from ddetr.inference import Detector, coco_records, draw_detections, read_image
    detector = Detector.from_checkpoint(run, device="cpu")
    paths = [image.path for image in list_images([folder])]
    if variant == "collected":
        detections = detector.predict_files(paths, batch_size=int(batch))
    else:  # loaded_first
        pixels = [read_image(p) for p in paths]
        detections = {}
        for i in range(0, len(paths), int(batch)):
            detections.update(zip(paths[i : i + int(batch)], detector.predict(pixels[i : i + int(batch)]), strict=True))
    records = []
    for i, (path, det) in enumerate(detections.items()):
        draw_detections(path, det, io.join(out, f"{Path(path).stem}.png"), names=detector.class_names)
        found = coco_records(i, det["scores"].numpy(), det["labels"].numpy(), det["boxes"].numpy())
        records += [{**r, "file_name": str(path)} for r in found]
    io.atomic_write(io.join(out, "detections.json"), json.dumps(records))
seconds = time.perf_counter() - start
records = json.loads(open(f"{out}/detections.json").read())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report its parent's peak.
status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("Vm")}
print(json.dumps({"peak_rss_mb": status["VmHWM"] / 1024, "end_rss_mb": status["VmRSS"] / 1024, "seconds": seconds,
                  "images": len({r["file_name"] for r in records}), "records": len(records),
                  "named": sum("category_name" in r for r in records)}))
"""


def tiny_run(root: Path) -> Path:
    """A one-step local training of the tiny preset on a few synthetic images: its run folder."""
    from ddetr.train import train

    data = make_synthetic_coco(str(root / "train-data"), 4, 2, seed=0, image_size=(96, 128))
    overrides = ["data.scale=0.3", "data.loader_workers=0", "train.epochs=1", "train.max_steps_per_epoch=1",
                 "train.batch_size=2", "train.draw_images=0", f"train.storage_path={root / 'runs'}",
                 "train.name=bench", "train.log_every=1000"]  # fmt: skip
    train(build_config("tiny", data.root, overrides), engine="local")
    return root / "runs" / "bench"


def images(root: Path, count: int, size: tuple[int, int]) -> Path:
    """A folder of `count` synthetic JPEGs, each side drawn between size's two numbers."""
    data = make_synthetic_coco(str(root / f"images-{count}"), 1, count, seed=1, image_size=size)
    return Path(data.val_images)


def measure(variant: str, run: Path, folder: Path, out: Path, batch: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if variant.endswith("_cache1024"):  # oneDNN's own default, which `Detector` lowers unless the variable is set
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "1024"
        variant = variant.removesuffix("_cache1024")
    done = subprocess.run([sys.executable, "-c", CHILD, variant, str(run), str(folder), str(out), str(batch)],
                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{variant} over {folder} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["drawings"] = len(list(out.rglob("*.png")))
    return result


def print_table(rows: list[dict]) -> None:
    """A markdown table of the rows: (title, key, format) per column, the format's width the title's."""
    columns = [("variant           ", "variant", "<18"), ("images", "count", ">6"),
               ("peak RSS (MB)", "peak_rss_mb", ">13.1f"), ("end RSS (MB)", "end_rss_mb", ">12.1f"),
               ("seconds", "seconds", ">7.1f"),
               ("images/s", "speed", ">8.1f"), ("records", "records", ">7"), ("named", "named", ">5"),
               ("drawings", "drawings", ">8")]  # fmt: skip
    print("\n| " + " | ".join(title for title, _, _ in columns) + " |")
    print("|" + "|".join("-" * (len(title) + 1) + ("-" if fmt[0] == "<" else ":") for title, _, fmt in columns) + "|")
    for r in rows:
        r = {**r, "speed": r["images"] / r["seconds"]}
        print("| " + " | ".join(format(r[key], fmt) for _, key, fmt in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--size", default="480x640", help="MINxMAX: each image side drawn between them")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "predict-memory-cpu.json")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="ddetr-predict-memory-") as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        run = tiny_run(root)
        print(f"tiny checkpoint trained for one step in {time.perf_counter() - start:.1f} s: {run}")
        rows = []
        for count in args.counts:
            folder = images(root, count, size)
            for variant in VARIANTS:
                result = measure(variant, run, folder, root / f"out-{variant}-{count}", args.batch_size)
                rows.append({"variant": variant, "count": count, **result})
                print(f"{variant:>18} {count:>5} images: {result['peak_rss_mb']:7.1f} MB peak RSS, "
                      f"{result['end_rss_mb']:7.1f} MB at the end, "
                      f"{result['seconds']:6.1f} s", flush=True)  # fmt: skip
    print_table(rows)
    growth: dict[str, dict[str, dict[str, float]]] = {}
    for variant in VARIANTS:
        mine = {r["count"]: r for r in rows if r["variant"] == variant}
        counts = sorted(mine)
        for lo, hi in itertools.pairwise(counts):
            step = {key: round(mine[hi][key] - mine[lo][key], 1) for key in ("peak_rss_mb", "end_rss_mb")}
            growth.setdefault(variant, {})[f"{lo}->{hi}"] = step
            print(f"{variant}: peak {step['peak_rss_mb']:+.1f} MB, end {step['end_rss_mb']:+.1f} MB from {lo} to {hi} "
                  "images")  # fmt: skip
    report = {"benchmark": "predict_memory", "machine": machine(), "image_sides_px": list(size),
              "batch_size": args.batch_size, "preset": "tiny", "data_scale": 0.3, "rows": rows,
              "growth_mb": growth}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")  # written whole, then renamed: no half-written result files
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
