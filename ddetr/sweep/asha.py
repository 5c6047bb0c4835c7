"""ASHA whose rungs survive an interrupted sweep, kept as JSON of our own.

Tune pickles the scheduler into the sweep folder once, when the sweep starts, and `Tuner.restore` brings back
that copy: an ASHA with empty rungs. The trials that run after a restore would then be compared only with each
other, and a trial that the first part of the sweep would have stopped runs to the end. `ResumableASHA` writes
its rungs beside the sweep after every result it records, and reads them back the first time it is used after a
restore. The state file may be in object storage, beside a sweep stored there, so that a sweep continued from
another machine remembers its rungs.

The file is JSON (`asha_state.json`), never a pickle: ASHA's own `save`/`restore` pickle the scheduler, and a
pickle read from a bucket runs whatever code its writer put in it. Its content:

    {"format": "ddetr-asha/1", "time_attr": "epoch", "metric": "val/AP", "mode": "max",
     "brackets": [{"rungs": [{"milestone": 2, "recorded": {"<trial id>": 0.31, ...}}, ...]}, ...],
     "trials": {"<trial id>": <bracket index>, ...},   # trials added and not yet complete
     "num_stopped": 3}

Recorded values are ASHA's own (`val/AP` times +1 for "max", -1 for "min"). A sweep started by an older ddetr has
`asha_state.pkl` instead: it is refused, never loaded (`refuse_pickled_state`).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from ddetr import io
from ddetr.config import ConfigError

STATE_FILE = "asha_state.json"  # beside Tune's files in the sweep folder
LEGACY_STATE_FILE = "asha_state.pkl"  # what older versions wrote with ASHA's `save` (a pickle): never read
FORMAT = "ddetr-asha/1"


def legacy_state_file(folder: str) -> str:
    """Where an older ddetr kept the pickled ASHA state of the sweep in `folder`."""
    return io.join(folder, LEGACY_STATE_FILE)


def refuse_pickled_state(folder: str) -> None:
    """Refuse a sweep folder holding ASHA state as a pickle (written by an older ddetr, or planted).

    Raises:
        ConfigError: naming the file and what to do; the file is not opened.
    """
    legacy = legacy_state_file(folder)
    if io.exists(legacy):
        raise ConfigError(
            f"{legacy}: ASHA state saved as a pickle, which ddetr never loads (unpickling a file from storage can run "
            f"any code); delete it to continue the sweep with empty rungs (they are kept as {STATE_FILE} from now on), "
            "or start a new sweep with another --name"
        )


def _folder(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if io.is_uri(path) else os.path.dirname(path)


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler(**kwargs)` that keeps its rungs in `state_file` (a local path or a URI, JSON)."""

    def __init__(self, state_file: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._loaded = False

    # ---- the JSON state -----------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The rungs and the trials' brackets as the module docstring describes them."""
        index = {id(b): i for i, b in enumerate(self._brackets)}
        return {
            "format": FORMAT,
            "time_attr": self._time_attr,
            "metric": self._metric,
            "mode": self._mode,
            "brackets": [
                {"rungs": [{"milestone": m, "recorded": dict(recorded)} for m, recorded in b._rungs]}
                for b in self._brackets
            ],
            "trials": {trial_id: index[id(b)] for trial_id, b in self._trial_info.items()},
            "num_stopped": self._num_stopped,
        }

    def load_state(self, state: Any, where: str) -> None:
        """Take the rungs and trials of `state` (read from `where`, named in errors), checked field by field.

        Raises:
            ConfigError: not this format, or rungs at other milestones than this scheduler's (another sweep's file).
        """

        def bad(what: str) -> ConfigError:
            return ConfigError(f"{where}: not ASHA state of this sweep ({what}); delete it to continue, rungs empty")

        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise bad(f"expected a JSON object with format {FORMAT!r}")
        brackets = state.get("brackets")
        if not isinstance(brackets, list) or len(brackets) != len(self._brackets):
            raise bad(f"expected {len(self._brackets)} brackets")
        rungs: list[list[dict[str, float]]] = []
        for i, (saved, bracket) in enumerate(zip(brackets, self._brackets, strict=True)):
            saved_rungs = saved.get("rungs") if isinstance(saved, dict) else None
            mine = [m for m, _ in bracket._rungs]
            theirs = [r.get("milestone") if isinstance(r, dict) else None for r in saved_rungs or []]
            if theirs != mine:
                raise bad(f"bracket {i} has rungs at {theirs}, this sweep's at {mine}")
            rungs.append([_recorded(r.get("recorded"), f"bracket {i} rung {r['milestone']}", bad) for r in saved_rungs])
        trials = state.get("trials", {})
        if not isinstance(trials, dict) or not all(
            isinstance(t, str) and isinstance(b, int) and 0 <= b < len(self._brackets) for t, b in trials.items()
        ):
            raise bad("'trials' must map trial ids to bracket indices")
        for bracket, recorded_rungs in zip(self._brackets, rungs, strict=True):
            for (_, recorded), saved in zip(bracket._rungs, recorded_rungs, strict=True):
                recorded.update(saved)
        for trial_id, b in trials.items():
            self._trial_info.setdefault(trial_id, self._brackets[b])
        stopped = state.get("num_stopped", 0)
        self._num_stopped = stopped if isinstance(stopped, int) else 0

    # ---- kept beside the sweep ----------------------------------------------------------------------------------

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._state_file.endswith(".pkl"):  # restored from the Tune state of a sweep begun by an older ddetr
            self._state_file = io.join(_folder(self._state_file), STATE_FILE)
        refuse_pickled_state(_folder(self._state_file))
        if not io.exists(self._state_file):
            return
        try:
            state = json.loads(io.read_text(self._state_file))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(
                f"{self._state_file}: not JSON ({e}); delete it to continue the sweep with empty rungs"
            ) from e
        self.load_state(state, self._state_file)

    def _save(self) -> None:
        io.atomic_write(self._state_file, json.dumps(self.state(), indent=1, sort_keys=True))

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


def _recorded(values: Any, where: str, bad: Callable[[str], ConfigError]) -> dict[str, float]:
    """A rung's {trial id: recorded value}, every value a number (NaN included: ASHA's percentiles skip it)."""
    if not isinstance(values, dict):
        raise bad(f"{where}: 'recorded' must map trial ids to numbers")
    out = {}
    for trial_id, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"{where}: trial {trial_id!r} has {value!r}, not a number")
        out[str(trial_id)] = float(value)
    return out
