"""An exponential moving average of the model's weights, the model to validate and deploy when it is on.

After every optimizer step each floating-point parameter and buffer e of the average moves towards the
trained model's w: e <- d * e + (1 - d) * w, with d = decay * (1 - exp(-updates / warmup_steps)), so the first
steps, when the weights change fastest, are averaged over a short horizon (the ramp of modern DETR trainers).

The decay is per optimizer step: the average spans about 1 / (1 - decay) steps, i.e. that many times the total
batch in images. To keep the same span in images when the total batch changes by a factor k, use decay ** k
(0.9997 at 32 images per step is 0.99985 at 16 and 0.99925 at 80).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """The average of `model`'s weights; `module` is a copy of the model holding it, in eval mode.

    Args:
        model: the trained model, unwrapped (not DistributedDataParallel).
        decay: the decay after the ramp, e.g. 0.9997.
        warmup_steps: the ramp's time constant in optimizer steps (0: none).
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 2000) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0

    def current_decay(self) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s weights (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        trained = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = trained[name].detach()
            if average.is_floating_point():
                average.mul_(d).add_(value.to(average.dtype), alpha=1.0 - d)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
