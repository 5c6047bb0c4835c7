"""Shared test fixtures: device skips and one local Ray runtime for the whole session."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """A quiet local Ray with 2 CPUs and the dashboard on (Tune needs it), shut down at the end."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
