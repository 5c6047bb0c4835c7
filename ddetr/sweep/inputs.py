"""What a sweep was started with, and the default name that follows it, so that two sweeps never mix in one folder.

Running `ddetr tune` again with the same name continues the sweep in `<storage>/<name>/`. A sweep is defined by its
inputs: the preset, the data folder, the search space (its content, not its file name) and the overrides of every
trial. The default name carries a short hash of them, `<preset>_<space file stem>_<6 hex>`, so a rerun with other
data or overrides starts a new sweep instead of continuing (or returning) the old one. The inputs are kept as
`sweep_inputs.json` in the sweep folder when it starts; continuing a named sweep with other inputs is refused with
the difference:

    {"preset": "tiny", "data": "/abs/data/synth", "space": {"loss.focal_alpha": {"uniform": [0.1, 0.5]}},
     "overrides": {"train.epochs": "3", "data.scale": "0.2"}}

Importing this module loads no Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ddetr import io
from ddetr.config import ConfigError

INPUTS_FILE = "sweep_inputs.json"
DIGEST_CHARS = 6  # 16.7 M names per preset and space: a collision needs thousands of sweeps of both in one storage


@dataclass(frozen=True)
class SweepInputs:
    """A sweep's inputs: `data` an absolute path or a URI; `space` the loaded search space (flat key ->
    {distribution: arguments}); `overrides` flat key -> value text, the last of a repeated key winning as in
    `apply_overrides`."""

    preset: str
    data: str
    space: dict[str, Any]
    overrides: dict[str, str]

    @classmethod
    def of(cls, preset: str, data: str, space: dict[str, Any], overrides: list[str]) -> SweepInputs:
        """The inputs of `ddetr tune --preset P --data D --space S OVERRIDES...` (`space` as `load_space` read it)."""
        pairs = (o.partition("=") for o in overrides)
        # Through JSON once, so that the inputs compare equal to the ones read back from the sweep folder.
        return cls(preset, io.absolute(data), json.loads(_canonical(space)), {k.strip(): v for k, _, v in pairs})

    def digest(self) -> str:
        """A short hash of all four inputs (hex)."""
        return hashlib.sha256(_canonical(asdict(self)).encode()).hexdigest()[:DIGEST_CHARS]

    def default_name(self, space_file: str | Path) -> str:
        """`<preset>_<space file stem>_<digest>`: readable, and new whenever an input changes."""
        return f"{self.preset}_{Path(space_file).stem}_{self.digest()}"

    def differences(self, earlier: SweepInputs) -> list[str]:
        """What changed from `earlier` to these inputs, one entry per key, e.g.
        `override train.epochs: 3 then, 4 now`; [] when nothing did."""
        found = []
        for field in ("preset", "data"):
            then, now = getattr(earlier, field), getattr(self, field)
            if then != now:
                found.append(f"{field}: {then} then, {now} now")
        for kind, then_map, now_map in (
            ("override", earlier.overrides, self.overrides),
            ("space", earlier.space, self.space),
        ):
            for key in sorted(then_map.keys() | now_map.keys()):
                then, now = then_map.get(key), now_map.get(key)
                if then != now:
                    found.append(f"{kind} {key}: {_shown(then)} then, {_shown(now)} now")
        return found


def read_inputs(path: str) -> SweepInputs:
    """The inputs recorded in `path` (JSON).

    Raises:
        ConfigError: not JSON, or not the four inputs; naming the file.
    """
    try:
        record = json.loads(io.read_text(path))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not JSON ({e}); delete it to continue without comparing the inputs") from e
    fields = {"preset": str, "data": str, "space": dict, "overrides": dict}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        raise ConfigError(f"{path}: expected a JSON object with {', '.join(fields)}; delete it or fix it")
    return SweepInputs(**{k: record[k] for k in fields})


def check_inputs(folder: str, inputs: SweepInputs, has_sweep: bool) -> None:
    """Refuse to continue the sweep in `folder` with other inputs than it was started with; record `inputs` there
    when the folder holds no sweep yet (`has_sweep`: Tune's state is there), or holds one begun before inputs were
    recorded.

    Raises:
        ConfigError: naming the sweep folder and every input that differs.
    """
    path = io.join(folder, INPUTS_FILE)
    if has_sweep and io.exists(path):
        changed = inputs.differences(read_inputs(path))
        if changed:
            raise ConfigError(
                f"the sweep in {folder} was started with other inputs ({'; '.join(changed)}; see {path}): continue "
                "it with the inputs it was started with, or give another --name (the default name follows the inputs)"
            )
        return
    io.atomic_write(path, json.dumps(asdict(inputs), indent=1, sort_keys=True))


def _canonical(value: Any) -> str:
    # YAML may give values JSON cannot hold (dates): their text stands for them.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    return value if isinstance(value, str) else _canonical(value)
