"""The cluster from zero: `ddetr submit` of a training, a sweep and batch inference on an autoscaling cluster that
starts empty, and a worker node drained mid-epoch (a spot reclaim's notice).

Each test starts its own fake cluster (tests/fake_cluster.py): a head with no CPUs and one worker node type the
autoscaler adds (at most two nodes) and removes after 10 idle seconds; the drain test runs Ray's autoscaler v2,
which replaces a draining node. The jobs run the checkout's code, shipped as their working directory, or, where a
job outlives a node, imported from the checkout (the fake nodes share one session folder, so a node that ends
deletes the shipped copy under the others). Their step records (metrics.jsonl) give the measured times, printed
with `-s`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddetr import jobs
from tests.fake_cluster import FakeCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NODE = {"resources": {"CPU": 2, "object_store_memory": 150 * 1024 * 1024}, "max_workers": 2}
TINY = [
    "data.scale=0.2",
    "train.cpus_per_worker=1",
    "data.map_cpus=0.5",
    "data.loader_workers=0",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ddetr.data.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("autoscale_data")
    make_synthetic_coco(str(root), 64, 8, seed=0, image_size=(64, 96))
    return root


def start_cluster(hard_timeout, autoscaler_v2: bool = False, worker_types: dict | None = None) -> Iterator[FakeCluster]:
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": "",  # the jobs import the shipped checkout (their working directory), nothing else
    }
    c = FakeCluster(worker_types or {"cpu": NODE}, idle_timeout_s=10, env=env, autoscaler_v2=autoscaler_v2)
    try:
        with hard_timeout(120):
            c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(hard_timeout) -> Iterator[FakeCluster]:
    yield from start_cluster(hard_timeout)


@pytest.fixture
def cluster_v2(hard_timeout) -> Iterator[FakeCluster]:
    """Ray's autoscaler v2, which replaces a node being drained (v1 counts its CPUs as capacity until it is gone,
    and the fake provider never marks a lost node for replacement)."""
    yield from start_cluster(hard_timeout, autoscaler_v2=True)


class NodeCounter(threading.Thread):
    """Samples the number of alive worker nodes every second; `most` is the largest count seen."""

    def __init__(self, cluster: FakeCluster) -> None:
        super().__init__(daemon=True)
        self.cluster, self.most, self.done = cluster, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                self.most = max(self.most, len(self.cluster.worker_nodes()))
            except Exception:  # noqa: BLE001 - a GCS call timing out on a busy machine: sample again
                pass


def steps(run: Path) -> list[dict]:
    """The "step" records of a run's metrics.jsonl, in the order written."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "step"]


def report(name: str, **numbers: float) -> None:
    print(
        f"\n[{name}] " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    )


def test_submit_trains_on_an_empty_cluster(
    cluster: FakeCluster, synth_data: Path, tmp_path: Path, hard_timeout, capsys: pytest.CaptureFixture
) -> None:
    before = len(cluster.worker_nodes())
    counter = NodeCounter(cluster)
    counter.start()
    with hard_timeout(240):
        start = time.time()
        argv = ["--address", cluster.address, "train", "--preset", "tiny", "--data", str(synth_data), "--follow",
                *TINY, "train.num_workers=2", "train.epochs=1", "train.max_steps_per_epoch=4",
                f"train.storage_path={tmp_path}", "train.name=from-zero"]  # fmt: skip
        from ddetr.cli import main

        code = main(["submit", *argv])
        ended = time.time()
        counter.done.set()
        logs = capsys.readouterr()
        assert code == 0, logs.out[-3000:] + logs.err[-3000:]
        records = steps(tmp_path / "from-zero")
        assert [r["step"] for r in records] == list(range(1, 5))
        first_step_s = records[0]["unix_time"] - start
        # Every node goes away once idle: the idle timeout (10 s) and a few autoscaler rounds (raises otherwise). A
        # node holding Ray Data's detached stats actor never would: the driver keeps it on the head.
        cluster.wait_for_workers(0, timeout_s=90)
    report("submit", nodes_before=before, nodes_most=counter.most, nodes_after=len(cluster.worker_nodes()),
           first_step_s=first_step_s, job_s=ended - start, job_end_to_no_nodes_s=time.time() - ended)  # fmt: skip
    assert before == 0 and counter.most >= 1


def test_drained_node_checkpoints_in_time_and_the_run_continues_on_a_replacement(
    cluster_v2: FakeCluster, synth_data: Path, tmp_path: Path, hard_timeout
) -> None:
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` on the training node mid-epoch: the worker sees the
    notice, writes a just-in-time checkpoint before the deadline and then trains no further step (one trained on
    the doomed node would be trained again after the restart, from that checkpoint). At the deadline the node is
    reclaimed (its processes killed, as the cloud would); the autoscaler replaces it and the run continues there from
    the checkpoint with the next step. With train.max_failures=0 the job would fail, were the preemption counted as
    a failure: it succeeds, every step of the epoch trained exactly once.
    """
    run = tmp_path / "drained"
    deadline_s = 15
    with hard_timeout(420):
        client = jobs.connect(cluster_v2.address)
        overrides = [*TINY, "train.num_workers=1", "train.batch_size=1", "train.epochs=1", "train.max_failures=0",
                     f"train.storage_path={tmp_path}", "train.name=drained"]  # fmt: skip
        start = time.time()
        job_id = jobs.submit(client, jobs.train_entrypoint("tiny", str(synth_data), overrides), jobs.runtime_env())
        while len(steps(run)) < 3:
            assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-3000:]
            time.sleep(0.2)
        first_step_s = steps(run)[0]["unix_time"] - start
        nodes = cluster_v2.worker_nodes()
        assert len(nodes) == 1, nodes
        doomed = nodes[0]["node_id"]
        drained_at = time.time()  # the deadline is set later, when the cluster takes the drain
        cluster_v2.ray("drain-node", "--node-id", doomed, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "spot reclaim", "--deadline-remaining-seconds", str(deadline_s))  # fmt: skip
        while not list(run.glob("checkpoint_0*")) and time.time() < drained_at + deadline_s:
            time.sleep(0.2)
        checkpointed_at = time.time()
        kept = sorted(p.name for p in run.glob("checkpoint_0*"))
        time.sleep(max(0.0, drained_at + deadline_s - time.time()))
        at_deadline = [r["step"] for r in steps(run)]
        cluster_v2.reclaim(doomed)  # the cloud takes the node at the deadline
        seen: set[str] = set()  # the worker nodes up while the run goes on: the replacement among them
        ends = time.time() + 300
        while not (status := client.get_job_status(job_id)).is_terminal():
            assert time.time() < ends, f"the job is still {status.value} 300 s after the reclaim"
            seen.update(n["node_id"] for n in cluster_v2.worker_nodes())
            time.sleep(1.0)
        logs = client.get_job_logs(job_id)
    records = steps(run)
    resumed = [r for r in records if r["step"] > at_deadline[-1]]
    replacement = seen - {doomed}
    report("drain", first_step_s=first_step_s, deadline_s=float(deadline_s), step_at_drain=3,
           step_at_checkpoint=at_deadline[-1], drain_to_checkpoint_s=checkpointed_at - drained_at,
           drain_to_first_step_on_replacement_s=resumed[0]["unix_time"] - drained_at if resumed else -1.0,
           job_s=time.time() - start)  # fmt: skip
    # The run's first checkpoint is the just-in-time one (a 64-step epoch, no periodic ones), in time; the worker
    # then trained nothing more: its last step is the checkpoint's.
    assert len(kept) == 1 and kept[0] == f"checkpoint_{at_deadline[-1]:08d}", (kept, at_deadline)
    assert checkpointed_at < drained_at + deadline_s and at_deadline[-1] < 64
    assert "being preempted: checkpoint at step" in logs and "waiting for the restart" in logs, logs[-3000:]
    # A preemption, not one of train.max_failures=0: the job ends well, on another node, every step once and in order.
    assert status.value == "SUCCEEDED", logs[-4000:]
    assert replacement, f"no worker node but the reclaimed one came up: {seen}"
    assert [r["step"] for r in records] == list(range(1, 65)), [r["step"] for r in records]


def test_tune_waits_for_capacity_on_an_empty_cluster(
    cluster: FakeCluster, synth_data: Path, tmp_path: Path, hard_timeout
) -> None:
    """`ddetr submit tune` on the empty cluster: concurrency from the node types' maxima (2 nodes x 2 CPUs: 3 trials
    of 1.01 CPUs beside one decode task), trials pending until nodes come, drivers pinned to the head."""
    with hard_timeout(300):
        client = jobs.connect(cluster.address)
        argv = ["--address", cluster.address, "tune", "--no-working-dir", "--preset", "tiny", "--data", str(synth_data),
                "--space", str(REPO / "tests" / "data" / "asha_space.yaml"), "--samples", "1", "--name", "zero",
                "--storage", str(tmp_path), *TINY, "train.num_workers=1", "train.epochs=1",
                "train.max_steps_per_epoch=2"]  # fmt: skip
        start = time.time()
        assert jobs.main(argv) == 0
        job_id = client.list_jobs()[-1].submission_id
        status = jobs.wait(client, job_id, timeout_s=280)
        logs = client.get_job_logs(job_id)
        assert status.value == "SUCCEEDED", logs[-4000:]
    folder = tmp_path / "zero"
    results = sorted(folder.glob("*/result.json"))
    first_result = min(json.loads(p.read_text().splitlines()[0])["timestamp"] for p in results)
    report("tune", first_trial_result_s=first_result - start, sweep_s=time.time() - start, trials=len(results))
    assert "3 trials at once (the node types' maxima: 4 CPUs)" in logs, logs[-3000:]
    assert len(results) == 2  # the space's grid of two learning rates
    # The trials' drivers hold some of the head's resource while they run (Tune's status lines show its use).
    used = [float(u) for u in re.findall(r"\(([\d.]+)/100(?:\.0)? ddetr_driver\)", logs)]
    assert used and max(used) > 0, logs[-3000:]


def test_batch_inference_pool_sized_by_the_node_types(
    cluster: FakeCluster, synth_data: Path, tmp_path: Path, hard_timeout
) -> None:
    """`ddetr submit predict` on the empty cluster: the actor pool may grow to what the node types allow (2 nodes x
    2 CPUs at 1 CPU per actor: 4), not to the 0 CPUs up when it starts, and every image is detected."""
    from ddetr.config import build_config
    from ddetr.train import train

    with hard_timeout(300):
        overrides = ["data.val=", "data.scale=0.2", "data.loader_workers=0", "train.epochs=1",
                     "train.max_steps_per_epoch=1", f"train.storage_path={tmp_path}", "train.name=ckpt"]  # fmt: skip
        cfg = build_config("tiny", str(synth_data), overrides)
        train(cfg, engine="local")
        checkpoint = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1]
        client = jobs.connect(cluster.address)
        entrypoint = jobs.predict_entrypoint(str(checkpoint), f"{synth_data}/shards/val", str(tmp_path / "preds"))
        start = time.time()
        job_id = jobs.submit(client, entrypoint, jobs.runtime_env(working_dir=None))
        status = jobs.wait(client, job_id, timeout_s=240)
        logs = client.get_job_logs(job_id)
        assert status.value == "SUCCEEDED", logs[-4000:]
    report("predict", job_s=time.time() - start)
    assert "with up to 4 CPU actors" in logs, logs[-3000:]
    assert "8 images," in logs  # the whole val split, detected
    assert isinstance(json.loads((tmp_path / "preds" / "detections.json").read_text()), list)


GPU_NODE = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 150 * 1024 * 1024}, "max_workers": 2}
ONE_CPU_NODE = {"resources": {"CPU": 1, "object_store_memory": 150 * 1024 * 1024}, "max_workers": 2}
DEFAULTS = ["data.scale=0.2", "data.loader_workers=0", "train.log_every=1"]  # every resource setting at its default


@pytest.fixture
def gpu_cluster(hard_timeout) -> Iterator[FakeCluster]:
    """GPU node types (the fake provider declares GPUs on nodes that have none: torch here is a CPU build)."""
    yield from start_cluster(hard_timeout, worker_types={"gpu": GPU_NODE})


@pytest.fixture
def one_cpu_cluster(hard_timeout) -> Iterator[FakeCluster]:
    yield from start_cluster(hard_timeout, worker_types={"cpu1": ONE_CPU_NODE})


def test_gpu_node_types_get_gpu_workers_and_a_torch_without_cuda_is_refused(
    gpu_cluster: FakeCluster, synth_data: Path, tmp_path: Path, hard_timeout, capsys: pytest.CaptureFixture
) -> None:
    """No node up, GPU node types: a default `ddetr submit train` and a `ddetr tune` trial ask for GPU workers (not
    the CPUs of the GPU nodes), and end in one line because this torch sees no CUDA device there."""
    from ddetr.cli import main

    refusal = "a training worker was given a GPU, but torch sees no CUDA device"
    with hard_timeout(300):
        argv = ["--address", gpu_cluster.address, "train", "--preset", "tiny", "--data", str(synth_data), "--follow",
                *DEFAULTS, "train.epochs=1", f"train.storage_path={tmp_path}", "train.name=gpu"]  # fmt: skip
        code = main(["submit", *argv])
        logs = capsys.readouterr().out
        assert code == 1, logs[-3000:]
        assert "resources: 2 workers x (1 GPU, 1 CPU)" in logs and "the node types' maxima (2 GPUs" in logs
        assert f"error: {refusal}" in logs and "Traceback" not in logs, logs[-3000:]
        # Refused before any worker started: the run folder holds what the driver writes first, and nothing else.
        assert {p.name for p in (tmp_path / "gpu").iterdir()} <= {"config.yaml", "log.txt"}

        client = jobs.connect(gpu_cluster.address)
        before = {j.submission_id for j in client.list_jobs()}
        argv = ["--address", gpu_cluster.address, "tune", "--no-working-dir", "--preset", "tiny", "--data",
                str(synth_data), "--space", str(REPO / "tests" / "data" / "asha_space.yaml"), "--samples", "1",
                "--name", "gpu-sweep", "--storage", str(tmp_path), *DEFAULTS, "train.epochs=1"]  # fmt: skip
        assert jobs.main(argv) == 0
        (job_id,) = {j.submission_id for j in client.list_jobs()} - before
        status = jobs.wait(client, job_id, timeout_s=200)
        logs = client.get_job_logs(job_id)
    assert status.value == "FAILED", logs[-3000:]
    assert "resources: 1 worker x (1 GPU, 1 CPU)" in logs and f"error: {refusal}" in logs, logs[-3000:]


def test_a_default_run_on_one_cpu_nodes_leaves_cpus_to_decode(
    one_cpu_cluster: FakeCluster, synth_data: Path, tmp_path: Path, hard_timeout, capsys: pytest.CaptureFixture
) -> None:
    """1-CPU node types, none up: the default CPU split comes from the node types (2 workers x 0.5 CPU beside the
    decode tasks), not from the 0 CPUs up at submit time, and the run trains to the end."""
    from ddetr.cli import main

    with hard_timeout(360):
        argv = ["--address", one_cpu_cluster.address, "train", "--preset", "tiny", "--data", str(synth_data),
                "--follow", *DEFAULTS, "train.epochs=1", "train.max_steps_per_epoch=4",
                f"train.storage_path={tmp_path}", "train.name=one-cpu"]  # fmt: skip
        code = main(["submit", *argv])
        logs = capsys.readouterr().out
    assert code == 0, logs[-3000:]
    assert "resources: 2 workers x (0.5 CPU)" in logs, logs[-3000:]
    assert [r["step"] for r in steps(tmp_path / "one-cpu")] == [1, 2, 3, 4]
