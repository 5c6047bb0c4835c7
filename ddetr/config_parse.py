"""Values from text onto a Config: flat overrides (`section.field=value`) and config files (YAML or JSON).

    cfg = apply_overrides(get_preset("box_refine"), ["model.num_queries=100", "loss.cls_loss_coef=3"])
    cfg, preset = read_config_file("exp.yaml")   # a `preset:` and the keys that differ from it

Each value is converted to its field's type (text is parsed: "2e-4", "true"; a YAML scalar is checked), and the
sections are rebuilt with `dataclasses.replace`, which re-runs their checks: a bad value or combination is a
`ConfigError` naming the key (and the file), an unknown name an `UnknownNameError` naming the closest known one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from ddetr import io
from ddetr.config_presets import PRESETS, get_preset
from ddetr.config_sections import Config, ConfigError, UnknownNameError, did_you_mean, field_types


def _value_of(value: Any, annotation: Any) -> Any:
    """`value` as a field of type `annotation` (bool, int, float, str, or Optional of one).

    Text (an override, or what YAML reads as text) is parsed: "2e-4", "true". A scalar read from YAML or JSON is
    checked: an int is a float too, a bool or a number is text ("use_gpu: true"). Raises ValueError naming the type
    expected.
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation not in (bool, int, float, str):
        raise ConfigError(f"fields of type {annotation} cannot be set from text")
    if isinstance(value, str):
        if annotation is not bool:
            with contextlib.suppress(ValueError):
                return annotation(value)
        elif value.lower() in ("true", "1", "yes", "on"):
            return True
        elif value.lower() in ("false", "0", "no", "off"):
            return False
    elif isinstance(value, bool):
        if annotation in (bool, str):
            return value if annotation is bool else str(value).lower()
    elif isinstance(value, (int, float)) and annotation is not bool:
        if annotation is not int or isinstance(value, int):  # 2.5 is no int
            return annotation(value)
    raise ValueError(f"expected a value of type {annotation.__name__}")


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Parse an override's text into the field's type (bool, int, float, str, or Optional of one)."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )
    try:
        return _value_of(None if optional and text.lower() in ("none", "null") else text, annotation)
    except ValueError as e:
        raise ConfigError(f"override {key}={text!r}: {e}") from None


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a copy of `cfg` with flat `section.field=value` overrides applied, values converted to the field type.

    Raises:
        UnknownNameError: an unknown section or field, named with the closest known one.
        ConfigError: a malformed override, a value that does not parse as the field's type, or a bad combination.
    """
    sections = {name: getattr(cfg, name) for name in (f.name for f in dataclasses.fields(cfg))}
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. model.num_queries=100")
        if section not in sections:
            raise UnknownNameError(f"override {item!r}: unknown section {section!r}{did_you_mean(section, sections)}")
        hints = field_types(type(sections[section]))
        if name not in hints:
            suggestion = did_you_mean(key, [f"{section}.{k}" for k in hints])
            raise UnknownNameError(f"override {item!r}: unknown key {key}{suggestion}")
        changes[section][name] = _convert(text.strip(), hints[name], key)
    # dataclasses.replace re-runs __post_init__, so a bad combination is reported here.
    return dataclasses.replace(cfg, **{s: dataclasses.replace(sections[s], **c) for s, c in changes.items() if c})


def read_config_file(path: str, preset: str | None = None) -> tuple[Config, str]:
    """A config file read onto its base: (the config, the name a new run is named after: the base preset's; for a
    full config `preset`, else "run").

    The file (YAML, or JSON when it ends in .json) is a mapping of sections to the keys that differ from a base:

        preset: two_stage          # the base (default: `preset`, else deformable_detr)
        model: {num_queries: 100}

    A file without `preset:` that holds every section is a full config (`Config.to_json()`, a checkpoint's
    config.json, a sweep's best_config.json): its keys go onto the dataclass defaults.

    Raises:
        ConfigError: the file cannot be read or parsed, an unknown or ill-typed key, a bad combination, or a preset
            other than `preset`; the message names the file and the key.
    """
    where = f"config file {path}"
    values = _read_mapping(path, where)
    named_preset = values.pop("preset", None)
    if named_preset is not None and not isinstance(named_preset, str):
        raise ConfigError(f"{where}: preset must be a preset's name ({', '.join(PRESETS)}), got {named_preset!r}")
    if named_preset and preset and named_preset != preset:
        raise ConfigError(f"{where} names preset {named_preset} but --preset {preset} was given: keep one of them")
    sections = [f.name for f in dataclasses.fields(Config)]
    if named_preset is None and set(sections) <= set(values):
        base, base_name = Config(), preset or "run"
    else:
        base_name = named_preset or preset or "deformable_detr"
        try:
            base = get_preset(base_name)
        except UnknownNameError as e:
            raise UnknownNameError(f"{where}: {e}") from None
    return _merge(base, values, where), base_name


def _read_mapping(path: str, where: str) -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file); unreadable or malformed text is a ConfigError."""
    import yaml

    try:
        text = io.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"cannot read config file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot read config file {path}: not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"cannot read config file {path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, train:, ...), got {type(values).__name__}")
    return {str(k): v for k, v in values.items()}


def _merge(base: Config, values: dict[str, Any], where: str) -> Config:
    """`base` with a file's `{section: {key: value}}` set on it, each value checked against its field's type."""
    sections = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    merged: dict[str, Any] = {}
    yaml_booleans = []  # text fields given an unquoted on/off/yes/no, which YAML reads as a boolean
    for name, items in values.items():
        if name not in sections:
            owner = [s for s in sections if name in field_types(type(sections[s]))]
            hint = f" (put it under {owner[0]}:)" if owner else did_you_mean(name, sections)
            raise UnknownNameError(f"{where}: unknown section {name!r}{hint}")
        if not isinstance(items, dict):
            raise ConfigError(f"{where}: section {name} must be a mapping of keys to values, got {items!r}")
        hints = field_types(type(sections[name]))
        changes = {}
        for key, value in items.items():
            full = f"{name}.{key}"
            if key not in hints:
                suggestion = did_you_mean(full, [f"{name}.{k}" for k in hints])
                raise UnknownNameError(f"{where}: unknown key {full}{suggestion}")
            try:
                changes[key] = _value_of(value, hints[key])
            except ValueError as e:
                raise ConfigError(f"{where}: {full}: {e}, got {value!r}") from None
            if isinstance(value, bool) and hints[key] is str:
                yaml_booleans.append(full)
        try:  # dataclasses.replace re-runs __post_init__: a bad value or combination is found here
            merged[name] = dataclasses.replace(sections[name], **changes)
        except ConfigError as e:
            hint = f" ({', '.join(yaml_booleans)}: YAML reads unquoted on/off/yes/no as booleans; quote them)"
            raise ConfigError(f"{where}: {e}{hint if yaml_booleans else ''}") from None
    return dataclasses.replace(base, **merged)
