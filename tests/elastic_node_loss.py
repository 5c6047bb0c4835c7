"""An elastic run that loses a node and then gets one back, on this machine; run by `test_train_ray.py` in its
own process.

A Ray cluster of two nodes (`ray.cluster_utils.Cluster`: a head and one worker node, 1 CPU each) takes an
elastic run asking for 1 to 4 workers of 0.75 CPU: one fits on each node, so it starts with 2. Once the run has
trained past its first checkpoint, the worker node is removed (its raylet and every process on it are killed,
as when a cloud node goes away). Ray Train restarts the run from its latest checkpoint with what the remaining
node holds: 1 worker, which accumulates 2 micro-batches per step to keep the total batch at 2. Once that worker
has trained a step, a new node joins (as when the autoscaler adds one), and Ray Train restarts the run from its
latest checkpoint with 2 workers again.

Ray Train learns what fits from Ray Data's autoscaling coordinator, which looks at the cluster's nodes every 20 s,
so the phase on 1 worker has to outlast that: the epoch is long (80 steps) for the new node to be seen within it.
Nodes are added and removed from the main thread (Ray installs signal handlers when it starts a node); the run
is fitted in a second one.

Usage: python elastic_node_loss.py TRAIN_SHARDS STORAGE_DIR TRACE_FILE
Prints one JSON line: {"error", "step", "epoch", "removed_after_step", "added_after_step"}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

STEPS = 80
CHECKPOINT_EVERY = 4
REMOVE_AFTER_STEP = 5
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_step(trace: Path, world_size: int | None = None) -> int:
    """The highest step in the trace, of attempts with `world_size` workers when given."""
    lines = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    return max((x["step"] for x in lines if world_size in (None, x["world_size"])), default=0)


def wait_for(condition: Callable[[], bool], done: threading.Event, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.2)


def main(train_shards: str, storage: str, trace_file: str) -> None:
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    import ray
    from ray.cluster_utils import Cluster

    from ddetr.config import apply_overrides, get_preset
    from ddetr.train.callbacks import ImageTrace
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
            "data.scale=0.2",
            "data.map_cpus=0.25",
            f"train.storage_path={storage}",
            "train.name=node_loss",
            "train.min_workers=1",
            "train.num_workers=4",
            "train.cpus_per_worker=0.75",
            "train.elastic_resize_interval_s=2",
            "train.batch_size=1",
            "train.total_batch_size=2",
            "train.epochs=1",
            f"train.max_steps_per_epoch={STEPS}",
            f"train.checkpoint_every_steps={CHECKPOINT_EVERY}",
            "train.max_failures=2",
        ],
    )
    outcome: dict = {}
    done = threading.Event()

    def fit() -> None:
        try:
            outcome["result"] = build_trainer(
                apply_overrides(cfg, ["train.controller_failure_limit=3"]), step_callbacks=[ImageTrace(trace_file)]
            ).fit()
        finally:
            done.set()

    trace = Path(trace_file)
    events: dict[str, int] = {}
    try:
        threading.Thread(target=fit, daemon=True).start()
        wait_for(lambda: last_step(trace) >= REMOVE_AFTER_STEP, done)
        events["removed_after_step"] = last_step(trace)
        cluster.remove_node(worker_node, allow_graceful=False)
        wait_for(lambda: last_step(trace, world_size=1) > 0, done)
        events["added_after_step"] = last_step(trace)
        cluster.add_node(num_cpus=1, object_store_memory=128 * MiB)
        done.wait(timeout=420)
        result = outcome["result"]
        state = json.loads((Path(result.checkpoint.path) / "metrics.json").read_text()) if result.checkpoint else {}
        summary = {
            "error": repr(result.error) if result.error else None,
            "step": state.get("step"),
            "epoch": state.get("epoch"),
            **events,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:4])
