"""The README's performance table, rendered from the benchmarks' JSON (never typed by hand).

    python benchmarks/summary.py            # print the table
    python benchmarks/summary.py --write    # replace the table between the README's markers

Reads `benchmarks/results/ingest-cpu.json` (`ingest.py`), `convert-cpu.json` (`convert.py`),
`ray-overhead-cpu.json` (`ray_overhead.py`) and `train-cpu.json` (`train.py`); `tests/test_readme.py` checks that
the README holds what this renders from the committed JSON, so a new measurement changes the README only through this
script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- performance table: benchmarks/summary.py -->", "<!-- end of performance table -->"
IMAGES_PER_GPU = 20  # what a fast H100 step of the paper's model consumes (issue's derivation, field anchors)
GPUS_PER_NODE = 8


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _load_average(ingest: dict) -> str:
    before = ingest.get("load_average_1_5_15min", {}).get("before")
    return f"load average {before[0]:.1f} at start" if before else "load average not recorded"


def render() -> str:
    """The markdown table (with its caption) from the committed JSON."""
    ingest, convert, overhead = _load("ingest-cpu.json"), _load("convert-cpu.json"), _load("ray-overhead-cpu.json")
    paths = ingest["paths"]
    cores = ingest["settings"]["cpus"]

    def rate(name: str) -> str:
        low, median, high = paths[name]["images_per_s_per_core_min_median_max"]
        return f"{median:.1f} ({low:.1f}–{high:.1f})"

    def ratio(key: str) -> str:
        return f"{ingest[key]:.2f}× ({ingest[key + '_cpu']:.2f}× per CPU-second)"

    ray_rate = paths["ray_data"]["images_per_s_per_core"]
    needed = IMAGES_PER_GPU * GPUS_PER_NODE / ray_rate
    conv = convert["summary"]["median"]
    sizes = sorted({int(key.split("x")[0]) for key in conv})
    serial = [conv[f"{n}x1"] for n in sizes]
    ovh = overhead["summary"]["overhead"]
    one, two = ovh["ray-1w-1t vs local-1t"], ovh["ray-1w-2t vs local-2t"]
    train = _load("train-cpu.json")
    ray_starts = [r["startup"] for r in train["runs"] if "fit_to_first_batch_s" in r["startup"]]
    rows = [
        ("Ray Data, images/s per core (median, min–max)", rate("ray_data")),
        ("ddetr's DataLoader, images/s per core", rate("dataloader")),
        ("official pipeline, images/s per core", rate("official") if "official" in paths else "not run"),
        ("Ray Data / official", ratio("ray_data_vs_official")),
        ("Ray Data / DataLoader", ratio("ray_data_vs_dataloader")),
        ("first batch: Ray Data (after `ray.init`) / DataLoader / official",
         " / ".join(f"{paths[p]['time_to_first_batch_s']:.1f} s" for p in ("ray_data", "dataloader", "official")
                    if p in paths)),
        ("peak memory (PSS) of the process tree: Ray Data / DataLoader / official",
         " / ".join(f"{paths[p]['peak_pss_mb'] / 1024:.1f} GB" for p in ("ray_data", "dataloader", "official")
                    if p in paths)),
        (f"cores to feed {GPUS_PER_NODE} GPUs at {IMAGES_PER_GPU} images/s each (Ray Data's rate)", f"{needed:.1f}"),
        ("`ddetr data convert`, images/s (one process)",
         " / ".join(f"{row['images_per_s']:.0f} at {n:,}" for n, row in zip(sizes, serial, strict=True))),
        ("`ddetr data convert`, peak memory (PSS)",
         " / ".join(f"{row['peak_tree_pss_mb']:.0f} MB at {n:,}" for n, row in zip(sizes, serial, strict=True))),
        ("Ray Train (1 worker) against one process, step time, 1 / 2 torch threads",
         f"{one['overhead_pct']:+.1f}% / {two['overhead_pct']:+.1f}%"),
        (f"Ray Train, `fit()` to rank 0's first batch ({train['settings']['workers']} workers, "
         f"{train['settings']['preset']} model; of it, to the training loop)",
         " / ".join(f"{s['fit_to_first_batch_s']:.1f} s ({s['fit_to_loop_s']:.1f} s)" for s in ray_starts)),
    ]  # fmt: skip
    lines = [
        f"COCO-like JPEGs (~640×480, ~160 KB), the paper's training augmentation, {cores} pinned cores of a "
        f"{ingest['machine']['cpus']}-core machine, {_load_average(ingest)}, {ingest['settings']['repeats']} repeats:",
        "",
        "| measured | result |",
        "|---|---|",
        *(f"| {what} | {value} |" for what, value in rows),
    ]
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """What the README holds between the markers (raises ValueError without them)."""
    if START not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {START!r} and {END!r}")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the README's table")
    args = parser.parse_args()
    table = render()
    if not args.write:
        print(table)
        return
    text = README.read_text()
    readme_block(text)  # the markers are there
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    tmp.replace(README)
    print(f"wrote the table into {README}")


if __name__ == "__main__":
    main()
