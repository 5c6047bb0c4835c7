"""An autoscaling Ray cluster on this machine: Ray's fake multi-node provider, a head without worker capacity.

`FakeCluster.start()` writes a cluster config (provider `fake_multinode`) and runs `ray start --head --block
--autoscaling-config=...` on free ports in its own temp dir and process session; the autoscaler then starts and
ends worker "nodes" (raylets on this machine) as demand comes and goes. `stop()` signals only the processes of
this cluster: the head's session, then every process whose command line names this cluster's temp dir (the
worker nodes the autoscaler started). It never runs `ray stop`, which would end every Ray on the machine.

Ray's `AutoscalingCluster` is not used: it reads an example config the wheel does not ship, and its start and
shutdown run `ray stop --force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type
HEAD_NODE_ID = "f" * 51 + "00000"  # and the head's node id
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
DRIVER_RESOURCE = "ddetr_driver"  # on the head only: where sweep trial drivers are pinned (ddetr/sweep)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A free port per name, all different: each socket stays bound until every port is picked (`free_port` called
    once per name could give one port twice, which `ray start` refuses)."""
    with contextlib.ExitStack() as stack:
        sockets = {n: stack.enter_context(socket.socket()) for n in names}
        for s in sockets.values():
            s.bind(("127.0.0.1", 0))
        return {n: s.getsockname()[1] for n, s in sockets.items()}


def cluster_config(
    gcs_port: int, worker_types: dict[str, dict[str, Any]], idle_timeout_s: float, autoscaler_v2: bool = False
) -> dict[str, Any]:
    """A launcher config for the fake provider: a head with no worker capacity and the given worker node types
    ({name: {"resources": {...}, "max_workers": n}})."""
    types: dict[str, Any] = {HEAD_TYPE: {"resources": {}, "node_config": {}, "max_workers": 0}}
    for name, spec in worker_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **spec}
    provider: dict[str, Any] = {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        "gcs_address": f"127.0.0.1:{gcs_port}",
    }
    if autoscaler_v2:  # the same provider, named by its class: v2 reads the defaults of a named type from a file
        provider.update(type="external", module=FAKE_PROVIDER, launch_multiple=True, head_node_id=HEAD_NODE_ID)
    return {
        "cluster_name": "ddetr-fake",
        "max_workers": sum(spec["max_workers"] for spec in worker_types.values()),
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": provider,
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    """An autoscaling cluster of fake nodes; `address` (dashboard URL) and `gcs_address` once started."""

    worker_types: dict[str, dict[str, Any]]
    idle_timeout_s: float = 10.0
    head_resources: dict[str, float] = field(default_factory=lambda: {DRIVER_RESOURCE: 100})
    env: dict[str, str] = field(default_factory=dict)  # for the head, hence the jobs' drivers
    autoscaler_v2: bool = False
    root: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self, timeout_s: float = 90.0) -> FakeCluster:
        # Unix socket paths are limited to ~107 bytes and Ray nests several folders under --temp-dir: keep it short.
        self.root = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
        ports = free_ports(("gcs", "dashboard", "client", "agent", "nm", "om", "metrics"))
        low = free_port() // 100 * 100  # a block of worker ports of its own (best effort: free now), apart from
        while any(low <= port < low + 100 for port in ports.values()):  # the ports above, which Ray refuses to share
            low = free_port() // 100 * 100
        self.gcs_address = f"127.0.0.1:{ports['gcs']}"
        self.address = f"http://127.0.0.1:{ports['dashboard']}"
        config = self.root / "cluster.yaml"
        spec = cluster_config(ports["gcs"], self.worker_types, self.idle_timeout_s, self.autoscaler_v2)
        config.write_text(yaml.safe_dump(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            RAY_FAKE_CLUSTER="1",
            DDETR_CLUSTER_CONFIG=str(config),  # the node types' maxima, for sweeps and batch inference
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
            RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            **self.env,
        )
        if self.autoscaler_v2:
            env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=HEAD_NODE_ID,
                       RAY_OVERRIDE_NODE_ID_FOR_TESTING=HEAD_NODE_ID)  # fmt: skip
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_cli), "start", "--head", "--block", "--disable-usage-stats", "--autoscaling-config", str(config),
            "--port", str(ports["gcs"]), "--ray-client-server-port", str(ports["client"]),
            "--node-manager-port", str(ports["nm"]), "--object-manager-port", str(ports["om"]),
            "--metrics-export-port", str(ports["metrics"]),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 99),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
            "--dashboard-agent-listen-port", str(ports["agent"]), "--include-dashboard", "true",
            "--num-cpus", "0", "--num-gpus", "0", "--resources", json.dumps(self.head_resources),
            "--object-store-memory", str(200 * 1024 * 1024), "--temp-dir", str(self.root / "t"),
        ]  # fmt: skip
        self._log = open(self.root / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for_dashboard(timeout_s)
        return self

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {self.proc.returncode}:\n{self.head_log()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    if self.alive_nodes():  # and the GCS has the head
                        return
            except Exception:  # noqa: BLE001 - refused or not ready while starting
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the dashboard at {self.address} did not come up in {timeout_s:.0f} s:\n{self.head_log()}")

    def head_log(self) -> str:
        return (self.root / "head.log").read_text()[-3000:]

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The cluster's alive nodes (the head included), from the GCS: {"node_id", "resources"}."""
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.gcs_address).get_all_node_info(timeout=10)
        return [
            {"node_id": node_id.hex(), "resources": dict(info.resources_total)}
            for node_id, info in infos.items()
            if info.state == 0  # ALIVE
        ]

    def worker_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.alive_nodes() if n["node_id"] != HEAD_NODE_ID]

    def wait_for_workers(self, count: int, timeout_s: float) -> float:
        """Seconds until exactly `count` worker nodes are alive; raises TimeoutError."""
        start = time.monotonic()
        while len(self.worker_nodes()) != count:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{len(self.worker_nodes())} worker nodes after {timeout_s:.0f} s, not {count}")
            time.sleep(1.0)
        return time.monotonic() - start

    def ray(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster (e.g. `drain-node`)."""
        ray_cli = str(Path(sys.executable).with_name("ray"))
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS=self.gcs_address)
        return subprocess.run([ray_cli, *args, "--address", self.gcs_address], env=env, capture_output=True,
                              text=True, timeout=timeout_s, check=True)  # fmt: skip

    def own_pids(self) -> list[int]:
        """Processes of this cluster: every process whose command line names its temp dir."""
        mark = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def reclaim(self, node_id: str) -> int:
        """End a worker node as a cloud reclaiming it would: SIGKILL to its raylet and every process it started (the
        fake provider gives them the node id in RAY_OVERRIDE_NODE_ID_FOR_TESTING). Returns the processes ended."""
        mark = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
        ended = 0
        for pid in self.own_pids():
            try:
                if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
                    ended += 1
            except (OSError, ProcessLookupError):
                continue
        return ended

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:  # `ray start --block` takes ~30 s to exit on SIGTERM; a throwaway cluster is killed after 5 s instead
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.own_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1.0)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)
