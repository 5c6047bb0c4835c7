"""The wheel: built from a copy of the project, installed into a fresh virtual environment, it imports ddetr from
the install (not from this checkout) and compiles the op from the sources it ships (`ddetr/_csrc`).

Offline: the wheel is built without build isolation (setuptools from .venv) and installed without dependencies;
the fresh environment sees .venv's packages (torch, ninja) through a .pth file, but not its editable ddetr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")

# Run inside the fresh environment, from a folder outside the checkout.
CHECK = """
import os, sys, torch, ddetr
from pathlib import Path
from ddetr.ops import build, ms_deform_attn, ms_deform_attn_reference
root = Path(sys.argv[1])
assert not Path(ddetr.__file__).resolve().is_relative_to(root), ddetr.__file__
assert build.CSRC == Path(ddetr.__file__).resolve().parent / "_csrc", build.CSRC
assert (Path(ddetr.__file__).parent / "py.typed").is_file()
shapes = torch.tensor([[4, 3], [2, 5]])
starts = torch.tensor([0, 12])
value = torch.randn(2, 22, 2, 32)
locations = torch.rand(2, 5, 2, 2, 2, 2)
weights = torch.rand(2, 5, 2, 2, 2).softmax(-1)
out = ms_deform_attn(value, shapes, starts, locations, weights)  # DDETR_MSDA=cpp: the compiled op or an error
torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, locations, weights))
assert build._loaded and (Path(os.environ["DDETR_MSDA_BUILD_DIR"]) / "ddetr_msda_cpu.so").is_file()
print("installed ddetr at", ddetr.__file__)
"""


def _copy_project(target: Path) -> None:
    """The files a build reads, without build/ or egg-info folders and caches that the checkout may hold."""
    target.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, target / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o")
    shutil.copytree(ROOT / "ddetr", target / "ddetr", ignore=ignore)
    shutil.copytree(ROOT / "csrc", target / "csrc", ignore=ignore)


@pytest.mark.slow
def test_wheel_installs_and_builds_the_op_from_its_own_sources(tmp_path):
    source = tmp_path / "project"
    _copy_project(source)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("ddetr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"ddetr/_csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "ddetr/py.typed" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A path line, not site.addsitedir: .venv's own .pth files (its editable ddetr) stay unprocessed.
    (Path(site) / "ddetr_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        DDETR_MSDA="cpp",
        DDETR_MSDA_BUILD_DIR=str(tmp_path / "op-build"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # ninja from .venv
    )
    result = subprocess.run(
        [python, "-c", CHECK, str(ROOT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(venv) in result.stdout
