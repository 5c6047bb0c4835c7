"""Choosing the MSDA backend, the build-failure fallback, import-time laziness and the CUDA compile check."""

from __future__ import annotations

import ast
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from ddetr.ops import build, ms_deform_attn, ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _inputs():
    shapes = torch.tensor([[4, 3], [2, 5]])
    starts = torch.tensor([0, 12])
    return (
        torch.randn(2, 22, 2, 4),
        shapes,
        starts,
        torch.rand(2, 5, 2, 2, 2, 2),
        torch.rand(2, 5, 2, 2, 2).softmax(-1),
    )


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A dispatcher that has not logged or warned yet, and no DDETR_MSDA* variables from the caller."""
    import importlib

    dispatch = importlib.import_module("ddetr.ops.ms_deform_attn")
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_warned_fallback", False)
    monkeypatch.delenv("DDETR_MSDA", raising=False)
    monkeypatch.delenv("DDETR_MSDA_DETERMINISTIC", raising=False)
    return dispatch


@pytest.fixture
def broken_build(monkeypatch):
    """Make loading the extension fail as a compiler error would."""

    def fail() -> None:
        raise build.ExtensionBuildError(
            "building ddetr_msda_cpu failed\nms_deform_attn_cpu.cpp:12: error: expected ';'"
        )

    monkeypatch.setattr(build, "load_extension", fail)


def test_default_is_auto_and_picks_the_compiled_op(fresh_dispatch):
    assert fresh_dispatch.select_backend(None, CPU) == "cpp"


def test_environment_variable_and_argument(fresh_dispatch, monkeypatch):
    monkeypatch.setenv("DDETR_MSDA", "reference")
    assert fresh_dispatch.select_backend(None, CPU) == "reference"
    assert fresh_dispatch.select_backend("cpp", CPU) == "cpp"  # the argument wins over the environment
    monkeypatch.setenv("DDETR_MSDA", "fast")
    with pytest.raises(ValueError, match=r"one of \('auto', 'cpp', 'reference', 'gather'\).*'fast'"):
        fresh_dispatch.select_backend(None, CPU)


def test_choice_is_logged_once(fresh_dispatch, caplog):
    with caplog.at_level(logging.INFO, logger="ddetr.ops"):
        for _ in range(3):
            fresh_dispatch.select_backend("auto", CPU)
    assert [r.getMessage() for r in caplog.records].count(
        "multi-scale deformable attention on cpu uses cpp (asked: auto)"
    ) == 1


def test_auto_falls_back_with_one_warning_quoting_the_error(fresh_dispatch, broken_build):
    inputs = _inputs()
    with pytest.warns(RuntimeWarning, match="expected ';'"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        assert fresh_dispatch.select_backend("auto", CPU) == "reference"


def test_cpp_raises_when_the_build_fails(fresh_dispatch, broken_build):
    with pytest.raises(build.ExtensionBuildError, match="expected ';'"):
        ms_deform_attn(*_inputs(), backend="cpp")


def test_devices_without_a_kernel(fresh_dispatch):
    meta = torch.device("meta")
    assert fresh_dispatch.select_backend("auto", meta) == "reference"
    with pytest.raises(RuntimeError, match="no kernel for meta tensors"):
        fresh_dispatch.select_backend("cpp", meta)


def test_backends_agree_through_the_public_function(fresh_dispatch):
    inputs = _inputs()
    torch.testing.assert_close(
        ms_deform_attn(*inputs, backend="cpp"), ms_deform_attn(*inputs, backend="reference"), rtol=1e-5, atol=1e-6
    )


def test_deterministic_switch(monkeypatch):
    monkeypatch.delenv("DDETR_MSDA_DETERMINISTIC", raising=False)
    assert not build.deterministic_backward()
    monkeypatch.setenv("DDETR_MSDA_DETERMINISTIC", "1")
    assert build.deterministic_backward()
    monkeypatch.setenv("DDETR_MSDA_DETERMINISTIC", "0")
    torch.use_deterministic_algorithms(True)
    try:
        assert build.deterministic_backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_build_extension_returns_the_cached_library():
    library = build.build_extension()
    assert library.is_file() and library.suffix == ".so"
    assert hasattr(torch.ops.ddetr, "ms_deform_attn_forward")


def test_importing_ddetr_builds_and_loads_nothing():
    code = (
        "import sys, torch, ddetr, ddetr.ops\n"
        "from ddetr.ops import build\n"
        "assert not build._loaded\n"
        "assert 'ddetr::ms_deform_attn_forward' not in torch._C._dispatch_get_all_op_names()\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(build.nvcc_path() is None, reason="needs nvcc")
def test_cuda_sources_compile(tmp_path):
    """The CUDA kernel compiles for sm_90, and every backward instantiation meets its register budget.

    The table of kernels x dtypes x registers is written to build/ptxas-registers.txt and printed (pytest -s).
    """
    import nvcc  # tests/nvcc.py: pytest puts tests/ on sys.path

    obj, report = nvcc.compile_cuda(tmp_path, arch_list="9.0")
    assert obj.is_file() and obj.stat().st_size > 0
    rows = nvcc.register_table(report)
    table = nvcc.format_table(rows)
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "ptxas-registers.txt").write_text(table + "\n")
    print(table)
    over = nvcc.over_budget(rows)
    assert not over, (
        f"backward kernels over the budget of {nvcc.BACKWARD_REGISTER_BUDGET} registers and no spills "
        f"(fp32, bf16, fp16):\n{nvcc.format_table(over)}\n\nfull table:\n{table}"
    )


# --- the build lock: every wait has an end ---------------------------------------------------------------------

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from ddetr.ops import build
with build.build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_stale_torch_lock_left_by_a_killed_build_is_removed(tmp_path):
    """A build killed mid-way leaves torch's `lock` file in the build folder; the next process used to wait for it
    forever. Now it removes it with one warning and loads the op (from a copy of the cached build: no compiling)."""
    library = build.build_extension()
    folder = tmp_path / "build"
    shutil.copytree(library.parent, folder, ignore=shutil.ignore_patterns(build.LOCK_FILE, build.TORCH_BATON))
    (folder / build.TORCH_BATON).touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDETR_MSDA_BUILD_DIR": str(folder)}
    code = "from ddetr.ops import build; print(build.build_extension())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (folder / build.TORCH_BATON).exists()
    warned = [line for line in result.stderr.splitlines() if str(folder / build.TORCH_BATON) in line]
    assert len(warned) == 1 and "left by a build that was killed" in warned[0], result.stderr


def test_a_live_builder_is_waited_for_until_the_timeout_and_its_death_frees_the_lock(tmp_path, monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("DDETR_MSDA_BUILD_DIR", str(tmp_path))
        monkeypatch.setenv(build.LOCK_TIMEOUT_ENV, "0.5")
        tick = time.monotonic()
        with pytest.raises(build.ExtensionBuildError) as caught:
            build.build_extension()
        assert time.monotonic() - tick < 5
        message = str(caught.value)
        assert "\n" not in message
        assert str(tmp_path / build.LOCK_FILE) in message and f"pid {holder.pid} " in message
        assert build.LOCK_TIMEOUT_ENV in message
    finally:
        holder.kill()  # as a build killed mid-way: its flock goes with it
        holder.wait()
    tick = time.monotonic()
    with build.build_lock(tmp_path, timeout_s=5):
        assert time.monotonic() - tick < 1


def test_a_lock_timeout_that_is_not_a_number_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(build.LOCK_TIMEOUT_ENV, "ten minutes")
    with pytest.raises(build.ExtensionBuildError, match=rf"{build.LOCK_TIMEOUT_ENV} must be a number.*'ten minutes'"):
        with build.build_lock(tmp_path):
            pass


def test_the_loader_imports_nothing_of_the_op():
    """The op registers its Python parts with the loader (`build.when_loaded`); the loader imports no ddetr module,
    so the two do not import each other."""
    tree = ast.parse(Path(build.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("ddetr")], imported
    build.load_extension()
    # Registered through the hook: the op's autograd formula is there.
    value, *rest = [t.double() if t.is_floating_point() else t for t in _inputs()]
    value.requires_grad_()
    torch.ops.ddetr.ms_deform_attn_forward(value, *rest).sum().backward()
    assert value.grad is not None and value.grad.shape == value.shape
