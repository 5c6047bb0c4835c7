"""The configuration as text people read and keep: a resolved config as commented YAML, and the reference page.

Both come from the dataclasses of `ddetr.config` and the comments beside their fields, so they cannot drift from
the code: a field's meaning is the comment on its line, after the comment lines right above it.

    print(config_yaml(cfg))            # what `ddetr config` prints and `ddetr train` writes to RUN/config.yaml
    python -m ddetr.config_text > docs/config.md      # the reference (also `ddetr config --reference`)

The YAML holds every key, so reading it back (`ddetr train --config FILE`) gives the same config whatever preset it
names; `preset:` records the named preset nearest to the config (the fewest keys differ), for the reader.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import tokenize
from typing import Any

import yaml

from ddetr.config import PRESETS, Config, get_preset

COMMENT_WIDTH = 110  # a key's meaning goes beside it when the line stays this short, else above it, wrapped
REFERENCE_COMMAND = "ddetr config --reference > docs/config.md"


@functools.cache
def field_meanings(section: type) -> dict[str, str]:
    """{field: meaning} of a config dataclass, from the source comments of its fields ("" where there is none)."""
    source = inspect.getsource(section)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    own_line: set[int] = set()  # lines holding only a comment
    for token in tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            comments[row] = token.string.lstrip("#").strip()
            if not lines[row - 1][:column].strip():
                own_line.add(row)
    meanings = {}
    for node in ast.parse(source).body[0].body:  # the class's statements
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in own_line:
            above.insert(0, comments[row])
            row -= 1
        beside = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments and r not in own_line]
        meanings[node.target.id] = " ".join(above + beside)
    return meanings


def sections() -> dict[str, type]:
    """{section name: its dataclass}, in the order of `Config`."""
    return {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


def differences(cfg: Config, base: Config) -> dict[str, Any]:
    """{"section.key": value in cfg} for every key where `cfg` differs from `base`."""
    mine, theirs = _flat(cfg), _flat(base)
    return {k: v for k, v in mine.items() if theirs[k] != v}


def nearest_preset(cfg: Config) -> str:
    """The preset from which `cfg` differs in the fewest keys (deformable_detr, the defaults, on a tie)."""
    names = ["deformable_detr", *(n for n in PRESETS if n != "deformable_detr")]
    return min(names, key=lambda name: len(differences(cfg, get_preset(name))))


def _yaml_line(key: str, value: Any) -> str:
    return yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=10**9).rstrip("\n")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML with every key and its meaning as a comment; `--config` reads it back."""
    preset = nearest_preset(cfg)
    out = [
        "# The resolved ddetr config, every key: `ddetr train --config FILE` reads it back (the command line's",
        "# section.key=value overrides apply after it). Each key is explained in docs/config.md.",
        f"preset: {preset}  # the nearest named preset; every key is set below, so it only documents the base",
    ]
    for name, values in cfg.to_dict().items():
        out.append(f"{name}:")
        meanings = field_meanings(sections()[name])
        for key, value in values.items():
            line, meaning = "  " + _yaml_line(key, value), meanings.get(key, "")
            if meaning and len(line) + 4 + len(meaning) <= COMMENT_WIDTH:
                out.append(f"{line}  # {meaning}")
                continue
            if meaning:
                out += textwrap.wrap(meaning, COMMENT_WIDTH, initial_indent="  # ", subsequent_indent="  # ")
            out.append(line)
    return "\n".join(out) + "\n"


REFERENCE_HEAD = """\
# Configuration reference

<!-- Generated from the dataclasses of ddetr/config_sections.py and their comments by `{command}`.
     Edit the comments there and regenerate; tests/test_config_files.py checks that this page matches. -->

A run's configuration has four sections: `model`, `loss`, `data` and `train`. It is built in this order, each
step over the one before:

1. a **preset** (`--preset`, below), or the `preset:` a config file names; `deformable_detr` when neither does;
2. a **config file** (`--config FILE`): YAML (JSON when the name ends in `.json`) with only the keys that differ;
3. the **data folder** (`--data DIR`): `data.train`, `data.val`, and `model.num_classes` from its `dataset.json`;
4. **overrides** on the command line, `section.key=value` (e.g. `train.epochs=12 model.num_queries=100`).

```yaml
# my_run.yaml: ddetr train --config my_run.yaml --data DIR train.epochs=12
preset: two_stage
model:
  num_queries: 100
train:
  lr: 1.0e-4
  total_batch_size: 32
```

`ddetr config [--preset P] [--config FILE] [--data DIR] [section.key=value ...]` prints the resolved config as
YAML, every key with its meaning; saved and given back as `--config`, it gives the same config. `ddetr train` writes
the same text to `config.yaml` in the run folder (`train.storage_path/train.name`) when the run starts, beside
`log.txt`, the driver's console log of the run. A file without `preset:` that holds every section is read as a full
config: the JSON of `Config.to_json()`, a checkpoint's `config.json` or a sweep's `best_config.json`.

Each value is checked against its key's type, and text is parsed as that type (`lr: 2e-4`, which YAML reads as
text, is the number). YAML reads an unquoted `on`, `off`, `yes` or `no` as a boolean: quote text values such as
`amp: 'off'`.

## Presets

The paper's variants (Tables 1 and 2 of the paper) and a tiny model for CPU runs; each differs from the defaults
below only in these keys.

| preset | differs from the defaults in |
|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """docs/config.md: the presets, then every section's keys with type, default and meaning."""
    out = [REFERENCE_HEAD.format(command=REFERENCE_COMMAND)]
    for name in PRESETS:
        changed = differences(get_preset(name), Config())
        keys = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in changed.items()) or "(the defaults: the paper's)"
        out.append(f"| `{name}` | {_cell(keys)} |\n")
    for name, section in sections().items():
        out.append(f"\n## {name}\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
        meanings = field_meanings(section)
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            cells = [f"`{name}.{f.name}`", f"`{f.type}`", f"`{json.dumps(default)}`", meanings.get(f.name, "")]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |\n")
    return "".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
