"""An S3-compatible server on loopback for the tests: moto's server mode in a subprocess.

Tests reach it as users reach MinIO or any S3-compatible store: plain `s3://bucket/key` URIs, with the standard
variables set (`AWS_ENDPOINT_URL` with an http scheme, which pyarrow 26 honours, and the AWS credentials). No
mocks: every byte goes over HTTP to the server process.

    from tests.s3_server import ray_s3, s3_dir, s3_server  # noqa: F401  (fixtures)

    def test_x(s3_dir):  # "s3://ddetr-tests/<test>-<hex>", a fresh prefix in the session's bucket
        io.atomic_write(f"{s3_dir}/a.txt", "hello")

Ray's processes take their environment from the process that starts Ray: `ray_s3` makes sure the variables are
set before Ray starts, restarting the session's Ray when it was started without them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "ddetr-tests"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str]  # the variables a client (a Ray worker, a subprocess) needs to reach it

    def client(self):
        """A boto3 client of the server: an independent reader, to check what ddetr wrote."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"])

    def keys(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix` (an `s3://bucket/...` URI or a key prefix)."""
        prefix = prefix.removeprefix(f"s3://{self.bucket}/")
        found: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(endpoint: str, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the S3 server exited with status {process.returncode}: {tail}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except urllib.error.HTTPError:  # it answers: up
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the S3 server at {endpoint} did not answer within {timeout_s:g} s")


def _raise_priority() -> None:
    try:
        os.nice(-10)
    except PermissionError:  # only a privileged user may raise a priority; the server then runs at the default
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port with one bucket, and the AWS variables pointing at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Objects in memory (moto spills those above 5 MB to temporary files, which it reads whole for every ranged
    # GET), and the server ahead of the training processes for the CPUs: a 2-core machine running two workers and
    # their data tasks would otherwise starve it past the AWS SDK's 3 s request timeout.
    server_env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(2**31)}
    # The server logs a line per request: to a file, not a pipe nobody reads, which would fill after some
    # thousand requests and block every request thread of the server on its next log line.
    log = tmp_path_factory.mktemp("s3-server") / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=server_env,
            preexec_fn=_raise_priority,
        )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no probing of a cloud's metadata service for credentials
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            wait_until_up(endpoint, process, log)
            server = S3Server(endpoint, BUCKET, env)
            server.client().create_bucket(Bucket=BUCKET)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def s3_dir(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh `s3://` prefix for one test."""
    return f"s3://{s3_server.bucket}/{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def ray_s3(s3_server: S3Server, request: pytest.FixtureRequest):
    """The session's Ray (`ray_local`), started, or started again, with the S3 variables in its environment."""
    ray = request.getfixturevalue("ray_local")

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3_server.endpoint:
        # Started by an earlier test, before the server: its raylet, and so every worker, lacks the variables.
        from tests.conftest import start_test_ray

        ray.shutdown()
        start_test_ray()
        assert ray.get(endpoint.remote()) == s3_server.endpoint
    return ray
