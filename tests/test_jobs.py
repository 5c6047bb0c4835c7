"""jobs/submit.py: entrypoints and runtime env offline; submit, follow, stop and token auth against a real head.

The Ray tests start their own head (`ray start --head --block`) on free ports, in a short temp dir, with token
authentication on and its token in a temp file; they never set RAY_ADDRESS in this process, and they end the
head by signalling the process they started (not `ray stop`, which would end every Ray on the machine,
including the suite's in-process one).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.job_submission import JobStatus

from ddetr import jobs as submit
from tests.fake_cluster import free_ports

HEAD_START_TIMEOUT_S = 120  # `ray start --head` takes ~4 s alone, several times that on a loaded 2-core machine
TEST_TIMEOUT_S = 180  # hard limit per Ray test: a hang here is otherwise silent


# ---- offline ---------------------------------------------------------------------------------------------------


def test_train_entrypoint_quotes_and_orders_arguments() -> None:
    cmd = submit.train_entrypoint("tiny", "s3://b/coco shards", ["train.epochs=2"], storage="s3://b/runs")
    assert cmd == "ddetr train --preset tiny --data 's3://b/coco shards' train.storage_path=s3://b/runs train.epochs=2"
    assert submit.eval_entrypoint("gs://b/ckpt", "/data") == "ddetr eval --checkpoint gs://b/ckpt --data /data"


def test_runtime_env_ships_the_checkout_without_heavy_folders() -> None:
    env = submit.runtime_env(env_vars={"A": "1"}, pip=["rich"])
    assert env["working_dir"] == str(submit.REPO_ROOT) and (submit.REPO_ROOT / "ddetr").is_dir()
    for folder in ("/.venv/", "/.git/", "/data/", "/runs/", "/build/"):
        assert folder in env["excludes"]
    assert env["env_vars"] == {"A": "1"} and env["pip"] == ["rich"]
    assert submit.runtime_env(working_dir=None) == {}


def test_find_token_looks_where_ray_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert submit.find_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.find_token() == ("path-token", str(tmp_path / "tok"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert submit.find_token() == ("env-token", "$RAY_AUTH_TOKEN")


def test_unreachable_dashboard_is_explained() -> None:
    with pytest.raises(submit.SubmitError, match="Cannot reach the Ray dashboard"):
        submit.connect(f"http://127.0.0.1:{_free_port()}", token="x")


def test_cli_builds_the_ddetr_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_STORAGE", "gs://b/runs")
    argv = ["train", "--preset", "box_refine", "--data", "gs://b/coco", "--env", "A=1=2", "train.epochs=50", "--follow"]
    args = submit.build_parser().parse_args(argv)
    assert args.follow and args.env == [("A", "1=2")]
    expected = "ddetr train --preset box_refine --data gs://b/coco train.storage_path=gs://b/runs train.epochs=50"
    assert submit.entrypoint_for(args) == expected
    args = submit.build_parser().parse_args(["eval", "--checkpoint", "ck", "--data", "d"])
    assert submit.entrypoint_for(args) == "ddetr eval --checkpoint ck --data d"


def test_submit_predict_takes_the_inputs_of_ddetr_predict() -> None:
    """Images (files, folders, globs, s3:// prefixes) or --shards/--data, and a run folder as --checkpoint: the
    entrypoint is a `ddetr predict` command line that the cluster's ddetr parses to the same inputs, a glob
    unexpanded (the cluster's ddetr expands it where the images are)."""
    import shlex

    from ddetr.cli import build_parser as ddetr_parser

    argv = ["predict", "--checkpoint", "s3://b/runs/r50", "--out", "s3://b/preds", "--threshold", "0.3",
            "s3://b/cameras/", "photos/**/*.jpg", "one.jpg", "--actors", "4"]  # fmt: skip
    entrypoint = submit.entrypoint_for(submit.build_parser().parse_args(argv))
    assert entrypoint == (
        "ddetr predict --checkpoint s3://b/runs/r50 --out s3://b/preds --batch --actors 4 --threshold=0.3 "
        "s3://b/cameras/ 'photos/**/*.jpg' one.jpg"
    )
    ran = ddetr_parser().parse_args(shlex.split(entrypoint)[1:])
    assert ran.images == ["s3://b/cameras/", "photos/**/*.jpg", "one.jpg"] and ran.batch and ran.shards is None
    assert (ran.checkpoint, ran.out, ran.actors, ran.threshold) == ("s3://b/runs/r50", "s3://b/preds", 4, 0.3)

    args = submit.build_parser().parse_args(["predict", "--checkpoint", "runs/a/latest", "--data", "s3://b/coco",
                                             "--out", "p", "--batch-size", "16"])  # fmt: skip
    entrypoint = submit.entrypoint_for(args)
    assert entrypoint == "ddetr predict --checkpoint runs/a/latest --out p --shards s3://b/coco --batch-size=16"
    ran = ddetr_parser().parse_args(shlex.split(entrypoint)[1:])
    assert (ran.shards, ran.batch_size, ran.images, ran.batch) == ("s3://b/coco", 16, [], False)

    for wrong, says in ((["--shards", "s", "a.jpg"], "not both"), ([], "one of them")):
        args = submit.build_parser().parse_args(["predict", "--checkpoint", "c", "--out", "o", *wrong])
        with pytest.raises(submit.SubmitError, match=f"ddetr submit predict: give the images .*{says}"):
            submit.entrypoint_for(args)


def test_cli_rejects_malformed_env() -> None:
    with pytest.raises(SystemExit):
        submit.build_parser().parse_args(["run", "--entrypoint", "true", "--env", "NOEQUALS"])


# ---- against a real head -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest, hard_timeout) -> Iterator[None]:
    """Fail a Ray test that runs past TEST_TIMEOUT_S instead of hanging the suite."""
    if "ray" not in request.keywords:
        yield
        return
    with hard_timeout(TEST_TIMEOUT_S):
        yield


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, str]]:
    """A token-authenticated Ray head of 1 CPU; yields (dashboard address, token). Ended by SIGTERM."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"no `ray` next to {sys.executable}")
    # Unix socket paths are limited to ~107 bytes and Ray nests several folders under --temp-dir: keep it short.
    tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token = "ddetr-jobs-test-" + os.urandom(16).hex()
    (tmp / "token").write_text(token)
    ports = free_ports(("gcs", "dashboard", "client", "agent"))  # all different
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_AUTH_TOKEN", None)
    cmd = [
        str(ray_cli), "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(ports["gcs"]), "--ray-client-server-port", str(ports["client"]),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
        "--dashboard-agent-listen-port", str(ports["agent"]), "--include-dashboard", "true",
        "--num-cpus", "1", "--temp-dir", str(tmp / "t"),
    ]  # fmt: skip
    log = open(tmp / "head.log", "w")
    # Its own session, so that the head and nothing else can be signalled at the end.
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        _wait_for_dashboard(address, token, proc, tmp / "head.log")
        yield address, token
    finally:
        _end(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str, proc: subprocess.Popen, log: Path) -> None:
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:  # refused while starting; HTTPError too
            time.sleep(0.5)
    pytest.fail(
        f"the Ray dashboard at {address} did not come up in {HEAD_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM makes a `--block` head drain and end the processes it started; SIGKILL its session if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the session started above, if any
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.mark.ray
@pytest.mark.slow
def test_job_runs_the_shipped_checkout_and_logs(head: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    address, token = head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # found by connect() like a user's token would be
    client = submit.connect(address)
    entrypoint = """python -c "import ddetr; print('ddetr', ddetr.__version__, ddetr.__file__)" """
    job_id = submit.submit(client, entrypoint, submit.runtime_env())
    out = io.StringIO()
    assert submit.follow(client, job_id, out) == JobStatus.SUCCEEDED
    import ddetr

    line = next(line for line in client.get_job_logs(job_id).splitlines() if line.startswith("ddetr "))
    _, version, path = line.split()
    assert version == ddetr.__version__
    # The job imported the uploaded copy of the checkout, not the repository itself.
    assert not Path(path).is_relative_to(submit.REPO_ROOT) and "runtime_resources" in path
    assert line in out.getvalue()  # follow() streamed it


@pytest.mark.ray
@pytest.mark.slow
def test_long_job_is_stopped(head: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    address, token = head
    client = submit.connect(address, token=token)
    job_id = submit.submit(client, 'python -c "import time; time.sleep(600)"', submit.runtime_env(working_dir=None))
    deadline = time.monotonic() + 60
    while client.get_job_status(job_id) != JobStatus.RUNNING:
        assert time.monotonic() < deadline, f"job never started: {client.get_job_info(job_id)}"
        time.sleep(0.2)
    assert submit.stop(client, job_id, timeout_s=60) == JobStatus.STOPPED
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert submit.main(["--address", address, "status", job_id]) == 1  # the CLI reports a stopped job as failure


@pytest.mark.ray
@pytest.mark.slow
def test_cli_follows_a_failing_job_and_exits_1(
    head: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address, token = head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    entrypoint = "python -c \"import sys; print('about to fail'); sys.exit(3)\""
    argv = ["--address", address, "run", "--entrypoint", entrypoint, "--no-working-dir", "--follow"]
    assert submit.main(argv) == 1
    captured = capsys.readouterr()
    assert "about to fail" in captured.out and "FAILED" in captured.err


@pytest.mark.ray
@pytest.mark.slow
def test_missing_or_wrong_token_is_explained(
    head: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = head
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    with pytest.raises(submit.SubmitError, match="needs a token and none was found.*RAY_AUTH_TOKEN"):
        submit.connect(address)
    with pytest.raises(submit.SubmitError, match="rejected the token"):
        submit.connect(address, token="wrong")


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_config_sent_with_the_job_is_read_on_the_cluster(head: tuple[str, str], tmp_path: Path) -> None:
    """Ray's job supervisor runs the entrypoint with /bin/sh: the config file written there from the entrypoint's
    text is read by the command; `--list` shows the command, not the text."""
    from ddetr.job_entrypoints import command

    address, token = head
    client = submit.connect(address, token=token)
    config = tmp_path / "exp.yaml"
    config.write_text("preset: tiny\nmodel: {num_queries: 23}  # a comment, 'quotes' and $HOME stay as they are\n")
    entrypoint = command([sys.executable, "-m", "ddetr.cli", "config", "--config", str(config)])
    config.unlink()  # the job has the text, not the path
    job_id = submit.submit(client, entrypoint, submit.runtime_env(working_dir=None))
    assert submit.wait(client, job_id, timeout_s=120) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "num_queries: 23" in client.get_job_logs(job_id)
    listed = io.StringIO()
    submit.list_jobs(client, listed)
    line = next(line for line in listed.getvalue().splitlines() if line.startswith(job_id))
    assert line.endswith(' -m ddetr.cli config --config "$f1"/exp.yaml'), line
