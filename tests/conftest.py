"""Shared test fixtures: device skips, a hard time limit, and one local Ray runtime for the whole session."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

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


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread once `seconds` have passed inside the block."""
    if threading.current_thread() is not threading.main_thread():  # SIGALRM is delivered to the main thread only
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"ran past its hard limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def hard_timeout() -> Callable[[int], AbstractContextManager[None]]:
    """`with hard_timeout(seconds): ...` fails the block past its limit: Ray hangs are silent, and a test that
    fails beats a suite that never ends."""
    return _time_limit


def start_test_ray() -> None:
    """A quiet local Ray with 2 CPUs and the dashboard on (Tune needs it); its processes get this environment."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    ray.init(
        address="local",  # not a stale /tmp/ray/ray_current_cluster left by a test cluster that was killed
        num_cpus=2,
        include_dashboard=True,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        configure_logging=False,
    )


@pytest.fixture(scope="session")
def ray_local():
    """The session's local Ray (`start_test_ray`), shut down at the end."""
    import ray

    start_test_ray()
    yield ray
    ray.shutdown()
