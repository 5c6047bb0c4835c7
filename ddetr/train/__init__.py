"""Training: the plain PyTorch engine and loop, the single-process runtime, and the Ray Train adapter.

    from ddetr.config import get_preset
    from ddetr.train import train
    metrics = train(cfg, engine="ray")      # or engine="local": one process, no Ray

Importing this package does not import Ray; `engine="ray"` does.
"""

from __future__ import annotations

import logging
from typing import Any

from ddetr.config import Config

log = logging.getLogger(__name__)


def train(cfg: Config, engine: str = "ray", resume: str | None = None) -> dict[str, Any]:
    """Train `cfg` and return the metrics of its last epoch.

    Args:
        engine: "ray" (a TorchTrainer with `train.num_workers` workers on the running or a new local Ray) or
            "local" (this process, one device).
        resume: a checkpoint folder to start from. Without it, a run whose storage path and name already hold
            checkpoints continues from the latest one.
    """
    if engine == "local":
        from ddetr.train.local import LocalRuntime
        from ddetr.train.loop import fit

        runtime = LocalRuntime(cfg, resume=resume)
        try:
            return fit(cfg, runtime)
        finally:
            runtime.close()
    if engine == "ray":
        from ddetr.train.engine import NonFiniteLossError
        from ddetr.train.ray_train import NONFINITE_KEY, build_trainer, init_local_ray

        init_local_ray()
        result = build_trainer(cfg, resume=resume).fit()
        if result.error is not None:
            raise result.error
        if NONFINITE_KEY in (result.metrics or {}):
            raise NonFiniteLossError(
                f"{result.metrics[NONFINITE_KEY]}; the run stopped, its last good checkpoint is {result.checkpoint}"
            )
        log.info("run stored at %s", result.path)
        return dict(result.metrics or {})
    raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
