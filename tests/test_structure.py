"""Which way the doors of the house open: the config is the ground floor, one module starts Ray, serving needs no
training.

Two checks each: the source (every import statement, also those inside functions, which a lazy import would hide
from the second) and a fresh interpreter's `sys.modules` after the import (what a module pulls in through others).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddetr"
CONFIG_MODULES = sorted(PACKAGE.glob("config*.py"))
HEAVY = ("ddetr.data", "ddetr.train", "ddetr.models", "ddetr.ops", "ray", "torch")


def imported_names(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module == "ddetr":  # `from ddetr import io` imports the module ddetr.io
                names.update(f"ddetr.{alias.name}" for alias in node.names)
    return names


def loaded_after_import(module: str) -> list[str]:
    """The modules a fresh interpreter holds after importing `module`."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_config_modules_import_only_the_standard_library_yaml_and_each_other():
    assert len(CONFIG_MODULES) >= 5, CONFIG_MODULES  # config.py, its sections, presets, parsing, data, text
    for path in CONFIG_MODULES:
        for name in imported_names(path):
            top = name.partition(".")[0]
            allowed = top in sys.stdlib_module_names or top == "yaml" or name in ("ddetr", "ddetr.io")
            allowed = allowed or name.startswith("ddetr.config")
            assert allowed, f"{path.relative_to(ROOT)} imports {name}: the config imports only ddetr.io and itself"


@pytest.mark.parametrize("module", ["ddetr.config", "ddetr.config_text"])
def test_importing_the_config_loads_no_data_training_model_torch_or_ray(module):
    heavy = [m for m in loaded_after_import(module) if within(m, HEAVY)]
    assert not heavy, f"import {module} loaded {heavy}"


def test_only_ray_session_starts_or_joins_ray():
    """Every `ray.init(...)` of the package is in ddetr/ray_session.py, and that module needs nothing of ddetr."""
    callers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "init" and ast.unparse(func.value) == "ray":
                callers.append(str(path.relative_to(ROOT)))
    assert callers and set(callers) == {"ddetr/ray_session.py"}, callers
    assert not [n for n in imported_names(PACKAGE / "ray_session.py") if n.startswith("ddetr")]


@pytest.mark.parametrize("path", ["deploy/serve.py", "batch_inference.py"])
def test_serving_and_batch_inference_get_ray_without_the_train_adapter(path):
    names = imported_names(PACKAGE / path)
    assert "ddetr.ray_session" in names
    assert not [n for n in names if within(n, ("ddetr.train.ray_train", "ddetr.train.ray_worker"))], names


def test_importing_serve_loads_nothing_of_training():
    training = [m for m in loaded_after_import("ddetr.deploy.serve") if within(m, ("ddetr.train", "torch"))]
    assert not training, training
