"""Starting or joining Ray: the one place where training, sweeps, serving and batch inference get their Ray.

    started = start_or_join()            # $RAY_ADDRESS's cluster, else a new local Ray (train, serve, batch)
    join(address, pass_address=True)     # a sweep's driver: every process of the sweep gets the address
    start_local(log_to_driver=False)     # a sweep without a cluster: a local Ray that a second driver joins

Every start is quiet (`RAY_USAGE_STATS_ENABLED=0` unless set) and a local one is made for this machine alone:
token authentication off (`RAY_AUTH_MODE=disabled` unless set), the dashboard on 127.0.0.1. What may differ between
callers is whether the workers' output is forwarded to the driver's console (`log_to_driver`).
"""

from __future__ import annotations

import os

import ray


def _quiet() -> None:
    """No usage statistics sent: set before Ray starts or connects, which is when Ray reads it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_local(num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Start a new Ray on this machine (`num_cpus`: all when None), its dashboard on 127.0.0.1.

    `log_to_driver`: forward the workers' output to this process's console (a sweep's trials print too much).
    """
    _quiet()
    # A Ray started here serves this machine only: jobs and `ddetr tune`'s second driver join without a token.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The dashboard serves the State API that Ray Train's placement-group cleaner polls: without it the cleaner
    # takes a live run for dead, removes its placement group and so kills the workers (and stopped Tune trials leak
    # their placement groups, hanging the sweep).
    # "local": a new Ray even where /tmp/ray/ray_current_cluster names another one, which a Ray that died
    # without `ray stop` leaves behind; ray.init() would try to join that address and hang.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=log_to_driver,
        configure_logging=False,
    )


def join(address: str | None = None, *, log_to_driver: bool = True, pass_address: bool = False) -> None:
    """Connect to a running Ray: `address`, or $RAY_ADDRESS's when None (Ray reads it).

    `pass_address`: every process this driver starts gets RAY_ADDRESS=`address` in its environment (the job's
    runtime environment). Ray Train's placement-group cleaner asks the State API for "the" cluster; on a machine
    running several Ray instances it cannot tell which, and a sweep's stopped trials leak their placement groups.

    Raises:
        ValueError: `pass_address` without an address to pass.
    """
    _quiet()
    if not pass_address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    if not address:
        raise ValueError("ray_session.join(pass_address=True) needs the address to pass on; got none")
    ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}}, log_to_driver=log_to_driver)


def start_or_join(num_cpus: int | None = None, *, log_to_driver: bool = True) -> bool:
    """Make sure this process has a Ray: the one it already has, else $RAY_ADDRESS's cluster, else a new local one.

    `num_cpus` applies to a new local Ray only. Returns True when this call started a local Ray (one that cannot add
    nodes, and that ends with this process).
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        join(log_to_driver=log_to_driver)
        return False
    start_local(num_cpus, log_to_driver=log_to_driver)
    return True
