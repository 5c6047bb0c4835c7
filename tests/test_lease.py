"""A run folder's lease (`ddetr/train/lease.py`): a second live run on a folder is refused, a stale or dead holder's
lease is taken over, a launch takes its own lease back, the lease is released at the end; locally and in object
storage (the S3 server on loopback). The other holder is a real process (`holder`): stopped (SIGSTOP) its heartbeat
ages while it stays alive; killed, it is gone."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddetr import cli, io
from ddetr.config import build_config
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.train import train
from ddetr.train.lease import LEASE_FILE, RunInUseError, RunLease, read_lease
from ddetr.train.local import LocalRuntime
from tests.s3_server import s3_dir, s3_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
PERIOD_S = 0.2  # the holder's heartbeat: stale after 3 x 0.2 s
HOLD = """import sys
from ddetr.train.lease import RunLease
RunLease.acquire(sys.argv[1], owner=sys.argv[2] or None, period_s=float(sys.argv[3]))
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holder(run: str, owner: str = "") -> Iterator[subprocess.Popen]:
    """Another process holding the lease of `run` (heartbeat every PERIOD_S) until the block ends."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, run, owner, str(PERIOD_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("lease_data")
    make_synthetic_coco(str(root), 4, 0, seed=0, image_size=(64, 96))
    return str(root)


def overrides(storage: Path) -> list[str]:
    return ["data.scale=0.1", "data.loader_workers=0", "train.epochs=1", "train.max_steps_per_epoch=1",
            "train.log_every=1000", f"train.storage_path={storage}", "train.name=leased"]  # fmt: skip


def test_a_second_local_run_on_a_leased_folder_is_refused(tmp_path: Path, data: str, capsys) -> None:
    run = tmp_path / "leased"
    with holder(str(run)) as other:
        before = read_lease(str(run))
        assert cli.main(["train", "--engine", "local", "--preset", "tiny", "--data", data, *overrides(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"error: run folder {run} is in use by another live run (pid {other.pid} on {socket.gethostname()}, "
            "heartbeat "
        ), err
        assert re.search(rf"heartbeat \d+ s ago; {run / LEASE_FILE}\): give this run another train.name", err[0])
        assert "a lease is taken over once its heartbeat is 0.6 s old" in err[0]  # 3 x the holder's 0.2 s
        with pytest.raises(RunInUseError, match="in use by another live run"):  # the runtime itself, without train()
            LocalRuntime(build_config("tiny", data, overrides(tmp_path)), device="cpu")
        assert sorted(os.listdir(run)) == [LEASE_FILE]  # nothing of the refused runs was written there
        time.sleep(2 * PERIOD_S)
        after = read_lease(str(run))
        assert after["token"] == before["token"] and after["heartbeat"] > before["heartbeat"]  # still the holder's


@pytest.mark.slow
def test_a_stale_lease_is_taken_over_and_released_at_the_end(tmp_path: Path, data: str, caplog) -> None:
    run = tmp_path / "leased"
    with holder(str(run)) as other:
        other.send_signal(signal.SIGSTOP)  # alive, but its heartbeat stops
        time.sleep(4 * PERIOD_S)
        with caplog.at_level("WARNING", logger="ddetr.train.lease"):
            metrics = train(build_config("tiny", data, overrides(tmp_path)), engine="local")
        assert metrics["step"] == 1
        assert f"taking over the lease of {run} from a run that is not alive (pid {other.pid}" in caplog.text
        assert not (run / LEASE_FILE).exists()  # released when the run ended
        assert any(p.name.startswith("checkpoint_") for p in run.iterdir())


def test_a_dead_holder_on_this_machine_frees_the_folder_at_once(tmp_path: Path, data: str, caplog) -> None:
    run = tmp_path / "leased"
    with holder(str(run)) as other:
        other.kill()
        other.wait()
    assert read_lease(str(run))["heartbeat"] > time.time() - 30  # fresh: only its process's absence frees it
    cfg = build_config("tiny", data, overrides(tmp_path))
    with caplog.at_level("WARNING", logger="ddetr.train.lease"):
        runtime = LocalRuntime(cfg, device="cpu")
    assert f"(pid {other.pid} on {socket.gethostname()}, no longer running)" in caplog.text
    assert read_lease(str(run))["pid"] == os.getpid()
    runtime.close()
    assert not (run / LEASE_FILE).exists()
    (run / LEASE_FILE).write_text("{not a lease")  # a file that is not a lease holds nothing
    with caplog.at_level("WARNING", logger="ddetr.train.lease"):
        LocalRuntime(cfg, device="cpu").close()
    assert "is not a lease; it is replaced" in caplog.text


def test_a_launch_takes_its_own_lease_back(tmp_path: Path) -> None:
    """Ray Train restarts an attempt with the same pickled train function: its owner id, made once on the driver,
    takes the lease back at once (a new rank 0, wherever it runs); another launch's id is refused."""
    from ddetr.train.ray_worker import WorkerLoop

    loop = WorkerLoop()
    restarted = pickle.loads(pickle.dumps(loop))  # how each attempt receives it
    assert restarted.lease_owner == loop.lease_owner
    assert WorkerLoop().lease_owner != loop.lease_owner  # another launch
    run = str(tmp_path / "run")
    with holder(run, owner=loop.lease_owner):
        with pytest.raises(RunInUseError):
            RunLease.acquire(run, owner=WorkerLoop().lease_owner)
        with RunLease.acquire(run, owner=restarted.lease_owner, period_s=PERIOD_S) as lease:
            assert read_lease(run)["token"] == lease.record["token"]
            time.sleep(3 * PERIOD_S)  # the old holder's next heartbeat finds another token: it stops writing
            assert read_lease(run)["token"] == lease.record["token"]
    assert not Path(run, LEASE_FILE).exists()


def test_a_lease_in_object_storage(s3_server, s3_dir) -> None:  # noqa: F811
    run = f"{s3_dir}/leased"
    key = f"{run.split('/', 3)[3]}/{LEASE_FILE}"
    with holder(run) as other:
        first = read_lease(run)
        time.sleep(3 * PERIOD_S)
        assert read_lease(run)["heartbeat"] > first["heartbeat"]  # refreshed in the bucket
        with pytest.raises(RunInUseError, match=f"run folder {run} is in use by another live run \\(pid {other.pid}"):
            RunLease.acquire(run)
        other.send_signal(signal.SIGSTOP)
        time.sleep(4 * PERIOD_S)
        with RunLease.acquire(run, period_s=PERIOD_S) as lease:  # stale: taken over
            assert io.read_text(run + "/" + LEASE_FILE).count(lease.record["token"]) == 1
            assert key in s3_server.keys(run)
            # It wakes up, maybe in the middle of a heartbeat it writes over ours with, and leaves the lease to the
            # later acquisition within a few heartbeats.
            other.send_signal(signal.SIGCONT)
            time.sleep(5 * PERIOD_S)
            assert read_lease(run)["token"] == lease.record["token"] and not lease.lost
    assert key not in s3_server.keys(run)  # released
