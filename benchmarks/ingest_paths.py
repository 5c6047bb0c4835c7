"""One pipeline of the ingest benchmark (``ingest.py``) in its own process: two epochs, timed; prints ``RESULT {json}``.

    python benchmarks/ingest_paths.py ray_data|dataloader|official FOLDER SPLIT --cpus N [--batch-size 4 ...]

``FOLDER`` is a COCO-like folder (``images/``, ``annotations.json``), ``SPLIT`` its converted shards. The caller pins
this process to its cores; what it starts (Ray's processes, DataLoader workers) inherits that.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def paper_transforms() -> Any:
    from ddetr.config import get_preset
    from ddetr.data.transforms import TransformConfig

    return TransformConfig.for_training(get_preset("deformable_detr").data)


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux ``/proc/PID/task/*/children``); [] once it has ended."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:  # ended meanwhile
        pass
    return kids


def tree_cpu_s() -> float:
    """CPU seconds (user + system) this process and its descendants have used, those that ended included: each
    live process's own time and its reaped children's (Linux ``/proc/PID/stat`` fields 14-17). A process that ends
    without a process of the tree reaping it is missed (workers Ray stops while others reap them, say): a figure to
    trust where the processes live through the epoch."""
    ticks, todo, total = os.sysconf("SC_CLK_TCK"), [os.getpid()], 0
    while todo:
        pid = todo.pop()
        todo += children(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime, after the ")"
    return total / ticks


def _epoch(batches: Iterable[Any], count: Callable[[Any], int]) -> tuple[float, int]:
    """Take every batch; the time to the first one and the number of images."""
    start = time.perf_counter()
    first, images = None, 0
    for batch in batches:
        images += count(batch)
        if first is None:
            first = time.perf_counter() - start
    return first if first is not None else float("nan"), images


def timed_epochs(build: Callable[[int], Iterable[Any]], count: Callable[[Any], int], cpus: int) -> dict[str, Any]:
    """Epoch 0 cold (from the call that builds it: the time to the first batch), then epoch 1 whole: the steady
    rate, each epoch's own start included, as a trainer pays it every epoch, and the CPU time the process tree spent
    on it. (The time after the first batch of one epoch is no measure: Ray Data decodes ahead while the first batch is
    on its way.)"""
    start = time.perf_counter()
    batches = build(0)
    built_s = time.perf_counter() - start
    first, _ = _epoch(batches, count)
    first += built_s
    cold_s = time.perf_counter() - start
    cpu0, start = tree_cpu_s(), time.perf_counter()
    first1, images = _epoch(build(1), count)
    steady_s = time.perf_counter() - start
    cpu_s = tree_cpu_s() - cpu0
    rate = images / steady_s
    return {
        "images": images,
        "time_to_first_batch_s": round(first, 3),
        "epoch0_s": round(cold_s, 3),
        "epoch1_s": round(steady_s, 3),
        "epoch1_first_batch_s": round(first1, 3),
        "images_per_s": round(rate, 2),
        "images_per_s_per_core": round(rate / cpus, 2),
        "epoch1_cpu_s": round(cpu_s, 2),
        "images_per_cpu_s": round(images / cpu_s, 2) if cpu_s > 0 else None,
    }


def run_ray_data(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from ddetr.data.pipeline import DetrCollateFn, build_ray_dataset

    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    if args.object_store_mb:
        from ray.data import DataContext, ExecutionResources

        limits = ExecutionResources(object_store_memory=args.object_store_mb * 2**20)
        DataContext.get_current().execution_options.resource_limits = limits
    cfg = paper_transforms()

    def build(epoch: int) -> Iterable[Any]:
        # As ddetr/train/ray_worker.py builds and iterates it (one rank; CPU: no pinning).
        ds = build_ray_dataset(
            str(args.split),
            cfg,
            train=True,
            seed=args.seed,
            epoch=epoch,
            num_cpus=args.map_cpus,
            deal_size=args.batch_size,
            decode_batch_size=args.decode_batch_size,
            read_size=args.read_size,
            max_tasks=args.max_tasks or None,
        )
        return ds.iter_torch_batches(
            batch_size=args.batch_size, collate_fn=DetrCollateFn(), drop_last=True, prefetch_batches=args.prefetch
        )

    try:
        result = timed_epochs(build, lambda b: len(b["targets"]), args.cpus)
    finally:
        ray.shutdown()
    return {**result, "ray_init_s": round(ray_init_s, 3)}


def run_dataloader(args: argparse.Namespace) -> dict[str, Any]:
    from ddetr.data.loader import build_dataloader

    cfg = paper_transforms()

    def build(epoch: int) -> Iterable[Any]:
        return build_dataloader(
            str(args.split), cfg, train=True, batch_size=args.batch_size, seed=args.seed, epoch=epoch,
            num_workers=args.cpus, pin_memory=False,
        )  # fmt: skip

    return timed_epochs(build, lambda b: len(b["targets"]), args.cpus)


def import_official(repo: Path) -> tuple[Any, Any]:
    """The official repository's ``datasets.coco`` and ``util.misc`` modules, imported from ``repo``.

    torchvision comes from the environment or ``DDETR_TORCHVISION_DIR``. If its package ``__init__`` fails (a CUDA
    build's compiled ops on a CPU-only torch), its pure-Python submodules are imported without it: the official data
    path uses only ``transforms.functional`` on PIL images, ``datasets.vision`` and ``ops.boxes.box_area``.
    ``util.misc`` reads ``float(torchvision.__version__[:3])`` ("0.2" for 0.28) and then imports helpers torchvision
    removed long ago: it is shown a version string of 0.9 while it imports (a known breakage of that file; the helper
    it guards, ``interpolate``, is for masks, which the detection path does not resize).
    """
    extra = os.environ.get("DDETR_TORCHVISION_DIR")
    if extra:
        sys.path.insert(0, extra)
    sys.path.insert(0, str(repo))
    try:
        import torchvision
    except Exception as err:  # noqa: BLE001 - any failure of its compiled part: fall back as described
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "the official pipeline needs torchvision: install it or set DDETR_TORCHVISION_DIR"
            ) from err
        torchvision = types.ModuleType("torchvision")
        torchvision.__path__ = list(spec.submodule_search_locations)
        torchvision.__version__ = "0.0"
        sys.modules["torchvision"] = torchvision
        print(f"note: torchvision's __init__ failed ({type(err).__name__}); using its Python modules", file=sys.stderr)
    import torchvision.transforms.functional  # noqa: F401

    real = torchvision.__version__
    torchvision.__version__ = "0.9"
    try:
        import util.misc as misc
    finally:
        torchvision.__version__ = real
    import datasets.coco as coco

    return coco, misc


def run_official(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    coco, misc = import_official(Path(os.environ["DDETR_OFFICIAL_REPO"]))
    torch.manual_seed(args.seed)

    def build(epoch: int) -> Iterable[Any]:
        # As the official main.py builds its training loader (pin_memory only with CUDA).
        dataset = coco.CocoDetection(
            args.folder / "images", args.folder / "annotations.json", transforms=coco.make_coco_transforms("train"),
            return_masks=False,
        )  # fmt: skip
        sampler = BatchSampler(RandomSampler(dataset), args.batch_size, drop_last=True)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=misc.collate_fn, num_workers=args.cpus,
            pin_memory=torch.cuda.is_available(),
        )  # fmt: skip

    return timed_epochs(build, lambda b: len(b[1]), args.cpus)


RUNNERS = {"ray_data": run_ray_data, "dataloader": run_dataloader, "official": run_official}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", choices=sorted(RUNNERS))
    p.add_argument("folder", type=Path)
    p.add_argument("split", type=Path)
    p.add_argument("--cpus", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--map-cpus", type=float, default=0.5)
    p.add_argument("--decode-batch-size", type=int, default=16)
    p.add_argument("--read-size", type=int, default=128)
    p.add_argument("--max-tasks", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--object-store-mb", type=int, default=0, help="Ray Data's object store limit (0: Ray's own)")
    args = p.parse_args()
    result = RUNNERS[args.path](args)
    print("RESULT " + json.dumps({"path": args.path, **result}), flush=True)


if __name__ == "__main__":
    main()
