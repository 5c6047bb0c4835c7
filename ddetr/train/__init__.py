"""Training: the plain PyTorch engine and loop, the single-process runtime, and the Ray Train adapter.

    from ddetr.config import get_preset
    from ddetr.train import train
    metrics = train(cfg, engine="ray")      # or engine="local": one process, no Ray

    from ddetr.train import build_trainer, check_result     # a TorchTrainer to fit yourself (e.g. in a Tune trial)
    metrics = check_result(build_trainer(cfg).fit())

Importing this package does not import Ray; `engine="ray"`, `build_trainer` and `check_result` do.
"""

from __future__ import annotations

import logging
from typing import Any

from ddetr.config import Config

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "check_result", "train"]


def train(cfg: Config, engine: str = "ray", resume: str | None = None) -> dict[str, Any]:
    """Train `cfg` and return the metrics of its last epoch.

    Args:
        engine: "ray" (a TorchTrainer with `train.num_workers` workers on the running or a new local Ray) or
            "local" (this process, one device).
        resume: a checkpoint folder to start from (a run folder: its latest checkpoint). Without it, a run whose
            storage path and name already hold checkpoints continues from the latest one.

    The run folder (`train.storage_path/train.name`) holds `config.yaml` (the resolved config) and `log.txt` (the
    driver's console log) from the moment the checks pass, before Ray starts.

    Raises:
        ConfigError, FileNotFoundError: a mistake in the config or in the paths it names, found here before any
            worker starts (`ddetr.train.preflight`); a RunInUseError (a ConfigError) when another live run holds the
            run folder's lease (`ddetr.train.lease`).
    """
    from ddetr.config import named
    from ddetr.train.checkpoints import run_dir
    from ddetr.train.lease import check_free
    from ddetr.train.preflight import preflight
    from ddetr.train.run_files import run_files

    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    cfg = named(cfg)
    resume = preflight(cfg, resume)
    # Another live run's folder is refused before anything is written there (on Ray, before its controller writes);
    # the runtime then takes the lease: the local engine's process, or rank 0 of the Ray workers.
    check_free(run_dir(cfg.train.storage_path, cfg.train.name))
    # The run folder explains itself from here on: config.yaml, and log.txt of the console (ddetr/train/run_files.py).
    with run_files(cfg, engine):
        if engine == "local":
            from ddetr.train.local import LocalRuntime
            from ddetr.train.loop import fit

            runtime = LocalRuntime(cfg, resume=resume)
            try:
                return fit(cfg, runtime)
            finally:
                runtime.close()
        from ddetr.train.ray_train import build_trainer, check_result, init_local_ray, plan_run

        init_local_ray()
        cfg = plan_run(cfg)  # GPUs, workers and CPUs from what the cluster can become; refused now if it cannot
        result = build_trainer(cfg, resume=resume).fit()
        metrics = check_result(result)
        log.info("run stored at %s", result.path)
        return metrics


def __getattr__(name: str) -> Any:
    # Ray is imported only when its adapter is asked for.
    if name in ("build_trainer", "check_result"):
        from ddetr.train import ray_train

        return getattr(ray_train, name)
    raise AttributeError(f"module 'ddetr.train' has no attribute {name!r}")
