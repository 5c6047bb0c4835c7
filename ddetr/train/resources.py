"""What a Ray training run asks for: GPUs or not, how many workers, how many CPUs each; decided before it starts.

The decision is made from what the cluster can become (`ddetr.cluster.capacity`: the node types an autoscaler can
add), and only on a fixed cluster from the nodes up now: an autoscaling GPU cluster starts with no GPU node up,
and a decision from what is up would train on CPUs. Every refusal names the setting to change.

    cfg = resolve_resources(cfg, capacity())   # use_gpu "true"/"false", num_workers >= 1, cpus_per_worker > 0
    check_fits(cfg, capacity())                # ConfigError when the cluster could never run it
"""

from __future__ import annotations

import dataclasses
import logging
import math

from ddetr.cluster import Capacity
from ddetr.config import Config, ConfigError

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8  # `train.num_workers=-1` on GPUs: one worker per GPU, at most this many (one 8-GPU node)
CPU_WORKERS = 2  # `train.num_workers=-1` on CPUs
GPU_WORKER_CPUS = 1.0  # what a GPU worker holds when derived: its data is decoded by Ray Data tasks beside it


def resolve_resources(cfg: Config, cap: Capacity) -> Config:
    """`cfg` with `train.use_gpu`, `train.num_workers` and `train.cpus_per_worker` decided for `cap`.

    "auto" GPUs: a GPU per worker when the cluster has or can add GPUs. Workers (-1): one per GPU up to
    MAX_AUTO_WORKERS, else CPU_WORKERS. Derived CPUs (0): GPU_WORKER_CPUS per GPU worker; on CPUs, the cluster's CPUs
    less one decode task (`data.map_cpus`) per worker, split between the workers and no more than one node offers,
    so Ray Data always has CPUs to decode with.
    """
    t = cfg.train
    total = cap.total
    use_gpu = t.use_gpu == "true" or (t.use_gpu == "auto" and total.get("GPU", 0) > 0)
    workers = t.num_workers
    if workers < 0:
        workers = max(1, min(int(total.get("GPU", 0)), MAX_AUTO_WORKERS)) if use_gpu else CPU_WORKERS
    cpus = t.cpus_per_worker
    if cpus <= 0:
        if use_gpu:
            cpus = min(GPU_WORKER_CPUS, cap.largest("CPU", on="GPU") or GPU_WORKER_CPUS)
        else:
            free = total.get("CPU", 0) - max(1, workers) * cfg.data.map_cpus
            per_worker = math.floor(10 * free / max(1, workers)) / 10
            per_node = cap.largest("CPU")
            cpus = max(0.1, min(per_worker, per_node) if per_node > 0 else per_worker)
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(t, use_gpu="true" if use_gpu else "false", num_workers=workers, cpus_per_worker=cpus),
    )


def check_fits(cfg: Config, cap: Capacity) -> None:
    """Refuse, before starting, a run of a resolved `cfg` that `cap` could never schedule (or never feed).

    Raises:
        ConfigError: naming the settings to change and what the cluster offers.
    """
    t = cfg.train
    where = f"this cluster ({cap.describe()})"
    gpus = cap.total.get("GPU", 0)
    if t.use_gpu == "true" and gpus < t.num_workers:
        raise ConfigError(
            f"train.num_workers={t.num_workers} with train.use_gpu=true needs {t.num_workers} GPUs, but {where} has "
            f"{gpus:g}: set train.num_workers={int(gpus)} (or leave it unset: a worker per GPU)"
            if gpus >= 1
            else f"train.use_gpu=true, but {where} has no GPU: set train.use_gpu=auto or false"
        )
    node_cpus = cap.largest("CPU", on="GPU" if t.use_gpu == "true" else None)
    if cap.node_types and t.cpus_per_worker > node_cpus + 1e-9:
        raise ConfigError(
            f"train.cpus_per_worker={t.cpus_per_worker:g}, but the largest {'GPU ' if t.use_gpu == 'true' else ''}node "
            f"of {where} has {node_cpus:g} CPUs: lower train.cpus_per_worker (0 derives it)"
        )
    need = t.num_workers * t.cpus_per_worker + cfg.data.map_cpus
    have = cap.total.get("CPU", 0)
    if need > have + 1e-9:
        raise ConfigError(
            f"train.num_workers x train.cpus_per_worker + data.map_cpus = {t.num_workers} x {t.cpus_per_worker:g} + "
            f"{cfg.data.map_cpus:g} = {need:g} CPUs, but {where} has {have:g}: the workers would wait forever, or "
            "leave no CPU to decode the data. Lower train.cpus_per_worker (0 derives it), train.num_workers or "
            "data.map_cpus"
        )


def describe(cfg: Config, cap: Capacity) -> str:
    """One line saying what a resolved run asks for and why, e.g. "2 workers x (1 GPU, 1 CPU) from the node
    types' maxima (2 GPUs, 4 CPUs)"."""
    t = cfg.train
    each = f"1 GPU, {t.cpus_per_worker:g} CPU" if t.use_gpu == "true" else f"{t.cpus_per_worker:g} CPU"
    total = cap.total
    return (
        f"{t.num_workers} worker{'s' * (t.num_workers != 1)} x ({each}) + data tasks of {cfg.data.map_cpus:g} CPU, "
        f"from {cap.describe()} ({total.get('GPU', 0):g} GPUs, {total.get('CPU', 0):g} CPUs)"
    )
