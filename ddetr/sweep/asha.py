"""ASHA whose rungs survive an interrupted sweep.

Tune pickles the scheduler into the sweep folder once, when the sweep starts, and `Tuner.restore` brings back
that copy: an ASHA with empty rungs. The trials that run after a restore would then be compared only with each
other, and a trial that the first part of the sweep would have stopped runs to the end. `ResumableASHA` writes
its state (ASHA's own `save`) beside the sweep after every result it records, and reads it back the first time
it is used after a restore. The state file may be in object storage, beside a sweep stored there, so that a sweep
continued from another machine remembers its rungs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from ddetr import io


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler(**kwargs)` that keeps its rungs in `state_file` (a local path or a URI)."""

    def __init__(self, state_file: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._loaded = False

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if io.exists(self._state_file):
            state_file = self._state_file
            with io.local_copy(state_file) as local:  # ASHA's restore reads a local pickle
                self.restore(str(local))
            self._state_file, self._loaded = state_file, True

    def _save(self) -> None:
        with tempfile.TemporaryDirectory(prefix="ddetr-asha-") as tmp:
            local = Path(tmp, "state.pkl")
            self.save(str(local))
            io.atomic_write(self._state_file, local.read_bytes())

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
