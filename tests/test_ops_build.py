"""Choosing the MSDA backend, the build-failure fallback, import-time laziness and the CUDA compile check."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
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
        "ddetr.ops: multi-scale deformable attention on cpu uses cpp (asked: auto)"
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
