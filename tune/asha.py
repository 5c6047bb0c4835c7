"""ASHA whose rungs survive an interrupted sweep.

Tune pickles the scheduler into the sweep folder once, when the sweep starts, and `Tuner.restore` brings back
that copy: an ASHA with empty rungs. The trials that run after a restore would then be compared only with each
other, and a trial that the first part of the sweep would have stopped runs to the end. `ResumableASHA` writes
its state (ASHA's own `save`) beside the sweep after every result it records, and reads it back the first time
it is used after a restore.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler(**kwargs)` that keeps its rungs in `state_file` (a local path)."""

    def __init__(self, state_file: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._loaded = False

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if Path(self._state_file).exists():
            state_file = self._state_file
            self.restore(state_file)
            self._state_file, self._loaded = state_file, True

    def _save(self) -> None:
        Path(self._state_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{self._state_file}.tmp"
        self.save(tmp)
        os.replace(tmp, self._state_file)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
