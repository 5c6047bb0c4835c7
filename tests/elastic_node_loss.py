"""A node lost in the middle of an elastic run, on this machine; run by `test_train_elastic.py` in its own process.

A Ray cluster of two nodes (`ray.cluster_utils.Cluster`: a head and one worker node, 1 CPU each) takes an
elastic run asking for 1 to 4 workers of 0.75 CPU: one fits on each node, so it starts with 2. Once the run has
trained past its first checkpoint, the worker node is removed (its raylet and every process on it are killed,
as when a cloud node goes away). Ray Train restarts the run from its latest checkpoint with what the remaining
node holds: 1 worker, which accumulates 2 micro-batches per step to keep the total batch at 2.

Usage: python elastic_node_loss.py TRAIN_SHARDS STORAGE_DIR TRACE_FILE
Prints one JSON line: {"error", "step", "epoch", "removed_after_step"}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

STEPS = 8
REMOVE_AFTER_STEP = 3
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained_steps(trace: Path) -> int:
    if not trace.exists():
        return 0
    return max((json.loads(line)["step"] for line in trace.read_text().splitlines()), default=0)


def main(train_shards: str, storage: str, trace: str) -> None:
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    os.environ["DDETR_TRACE_IMAGES"] = trace
    import ray
    from ray.cluster_utils import Cluster

    from ddetr.config import apply_overrides, get_preset
    from ddetr.train.ray_train import build_trainer

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 128 * MiB,
            "include_dashboard": True,  # Ray Train's placement-group cleaner polls its State API
            "dashboard_port": free_port(),  # another Ray on this machine (the test suite's) may hold the default
        },
    )
    worker_node = cluster.add_node(num_cpus=1, object_store_memory=128 * MiB)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cfg = apply_overrides(
        get_preset("tiny"),
        [
            f"data.train={train_shards}",
            "data.scale=0.1",
            "data.map_cpus=0.25",
            f"train.storage_path={storage}",
            "train.name=node_loss",
            "train.min_workers=1",
            "train.num_workers=4",
            "train.cpus_per_worker=0.75",
            "train.batch_size=1",
            "train.total_batch_size=2",
            "train.epochs=1",
            f"train.max_steps_per_epoch={STEPS}",
            "train.checkpoint_every_steps=2",
            "train.max_failures=2",
        ],
    )
    removed_after = []

    def remove_worker_node() -> None:
        deadline = time.monotonic() + 300
        while trained_steps(Path(trace)) < REMOVE_AFTER_STEP and time.monotonic() < deadline:
            time.sleep(0.2)
        removed_after.append(trained_steps(Path(trace)))
        cluster.remove_node(worker_node, allow_graceful=False)

    remover = threading.Thread(target=remove_worker_node, daemon=True)
    remover.start()
    try:
        result = build_trainer(cfg, controller_failure_limit=3).fit()
        state = json.loads((Path(result.checkpoint.path) / "metrics.json").read_text()) if result.checkpoint else {}
        summary = {
            "error": repr(result.error) if result.error else None,
            "step": state.get("step"),
            "epoch": state.get("epoch"),
            "removed_after_step": removed_after[0] if removed_after else None,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:4])
