"""ddetr.ray_session: a driver joins the Ray that $RAY_ADDRESS names, and a sweep's passes that address on.

Starting a new local Ray is tested where the stale-address case is (tests/test_train_ray.py); this test joins the
suite's own Ray from a second driver process, as `ddetr tune`'s second driver and a job's driver do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# A second driver: start_or_join finds $RAY_ADDRESS and joins (started: False); join(pass_address=True) gives the
# address to every process of its job, which a task reads back.
SECOND_DRIVER = """
import json, os, ray
from ddetr import ray_session
started = ray_session.start_or_join(num_cpus=1)
cpus = ray.cluster_resources()["CPU"]
ray.shutdown()
address = os.environ.pop("RAY_ADDRESS")
ray_session.join(address, log_to_driver=False, pass_address=True)
seen = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_ADDRESS")).remote())
print(json.dumps({"started": started, "cpus": cpus, "seen": seen, "address": address,
                  "usage_stats": os.environ.get("RAY_USAGE_STATS_ENABLED")}))
"""


def test_a_second_driver_joins_and_passes_the_address_on(ray_local, hard_timeout):
    address = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}
    with hard_timeout(120):
        done = subprocess.run(
            [sys.executable, "-c", SECOND_DRIVER],
            env={**env, "RAY_ADDRESS": address},
            capture_output=True,
            text=True,
            timeout=110,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # The suite's Ray (2 CPUs), not a new one of 1 CPU; its workers were told where it is; nothing reported to Ray.
    assert (out["started"], out["cpus"], out["usage_stats"]) == (False, ray_local.cluster_resources()["CPU"], "0")
    assert out["seen"] == out["address"] == address
