"""Search spaces: a YAML file of flat config keys, each mapped to one distribution, turned into Tune's param space.

    # ddetr/sweep/spaces/default.yaml, the packaged default of `ddetr tune` (paper scale)
    loss.cls_loss_coef: {loguniform: [0.5, 8.0]}
    loss.focal_alpha: {uniform: [0.1, 0.5]}
    model.num_queries: {choice: [100, 300]}
    refinement: {choice: [none, box_refine, two_stage]}
    train.lr: {loguniform: [5.0e-5, 5.0e-4]}

Distributions: `choice: [v, ...]`, `grid: [v, ...]` (every value, times `--samples`), `uniform: [low, high]`,
`loguniform: [low, high]`, `randint: [low, high]` (high excluded, as in Tune), `quniform: [low, high, q]`.

`refinement` is the one key that is not a config field: two-stage Deformable DETR always refines boxes
iteratively, so the two flags `model.with_box_refine` / `model.two_stage` are searched as one choice
(`none`, `box_refine`, `two_stage`) and never meet in the invalid combination (two-stage without refinement).

The param space is `Config.to_dict()` with the searched fields replaced by distributions, plus the top-level
"refinement" when searched: a trial's config is therefore the Ray Train `train_loop_config` of its run once
`trial_config` has mapped "refinement" onto the two flags.
"""

from __future__ import annotations

import copy
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ddetr.config import Config

REFINEMENT = "refinement"
# refinement value -> (model.with_box_refine, model.two_stage)
REFINEMENTS: dict[str, tuple[bool, bool]] = {
    "none": (False, False),
    "box_refine": (True, False),
    "two_stage": (True, True),
}

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
DEFAULT_SPACE = "default"  # ddetr/sweep/spaces/default.yaml, shipped in the wheel (pyproject's package-data)


def packaged_space(name: str = DEFAULT_SPACE) -> Path:
    """The search-space file `name` shipped inside the ddetr package (ddetr/sweep/spaces/NAME.yaml).

    Raises:
        FileNotFoundError: no such packaged space (naming the ones there are).
    """
    spaces = resources.files("ddetr.sweep").joinpath("spaces")
    path = Path(str(spaces.joinpath(f"{name}.yaml")))  # a package installed as files: a real path
    if not path.is_file():
        known = sorted(Path(str(p)).stem for p in spaces.iterdir() if str(p).endswith(".yaml"))
        raise FileNotFoundError(f"no packaged search space {name!r} in {spaces} (there are: {', '.join(known)})")
    return path


def load_space(path: str | Path | None = None) -> dict[str, dict[str, list]]:
    """Read and check a search-space file (default: the packaged `packaged_space()`): {flat key: {distribution:
    arguments}}.

    Raises:
        ValueError: a key that is not a config field (nor "refinement"), an unknown distribution, bad arguments;
            the message names the file and the key.
    """
    path = packaged_space() if path is None else Path(path)
    space = yaml.safe_load(path.read_text()) or {}
    if not isinstance(space, dict):
        raise ValueError(f"{path}: a search space maps flat config keys to distributions, got {type(space).__name__}")
    fields = _config_fields()
    for key, spec in space.items():
        where = f"{path}: key {key!r}"
        if key != REFINEMENT and key not in fields:
            raise ValueError(f"{where} is not a config field: use section.field (e.g. loss.focal_alpha) or refinement")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ValueError(f"{where}: expected one of {{{': [...], '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        ((kind, args),) = spec.items()
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: {kind} takes a non-empty list, got {args!r}")
        if kind in ("uniform", "loguniform", "randint") and len(args) != 2:
            raise ValueError(f"{where}: {kind} takes [low, high], got {args!r}")
        if kind == "quniform" and len(args) != 3:
            raise ValueError(f"{where}: quniform takes [low, high, q], got {args!r}")
        if key == REFINEMENT and (kind not in ("choice", "grid") or not set(args) <= set(REFINEMENTS)):
            raise ValueError(f"{where}: refinement takes choice or grid over {sorted(REFINEMENTS)}, got {spec!r}")
    if REFINEMENT in space and {"model.with_box_refine", "model.two_stage"} & set(space):
        raise ValueError(f"{path}: search either {REFINEMENT!r} or the model flags it sets, not both")
    return space


def param_space(base: Config, space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """Tune's param space: `base.to_dict()` with every searched key replaced by its Tune distribution."""
    params = base.to_dict()
    for key, spec in space.items():
        ((kind, args),) = spec.items()
        sampler = _sampler(kind, args)
        if key == REFINEMENT:
            params[REFINEMENT] = sampler
        else:
            section, name = key.split(".")
            params[section][name] = sampler
    return params


def trial_config(config: dict[str, Any]) -> Config:
    """The `Config` of one trial's sampled config, "refinement" mapped onto the model flags (`ModelConfig` refuses
    two-stage without box refinement, so a space that searches the flags directly must pair them itself)."""
    config = copy.deepcopy(config)
    refinement = config.pop(REFINEMENT, None)
    if refinement is not None:
        config["model"]["with_box_refine"], config["model"]["two_stage"] = REFINEMENTS[refinement]
    return Config.from_dict(config)


def searched_values(config: dict[str, Any], space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """{flat key: value} of the searched keys in a trial's config ("refinement" as its name)."""
    values = {}
    for key in space:
        if key == REFINEMENT:
            values[key] = config.get(REFINEMENT)
        else:
            section, name = key.split(".")
            values[key] = config[section][name]
    return values


def to_overrides(cfg: Config, base: Config) -> list[str]:
    """Flat `section.field=value` overrides that turn `base` into `cfg` (what a sweep changed)."""
    out = []
    for section in dataclasses.fields(cfg):
        new, old = dataclasses.asdict(getattr(cfg, section.name)), dataclasses.asdict(getattr(base, section.name))
        out += [f"{section.name}.{k}={v}" for k, v in new.items() if v != old[k]]
    return out


def _config_fields() -> set[str]:
    cfg = Config()
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}


def _sampler(kind: str, args: list) -> Any:
    if kind == "choice":
        return tune.choice(args)
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "randint":
        return tune.randint(*args)
    return tune.quniform(*args)
