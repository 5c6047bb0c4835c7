"""benchmarks/official_kernel.py without a GPU: the torch 2.x patches of the official sources, the dry run, and the
rounding cases its parity report sets apart.

The official sources are never in this repository: the patch tests read a checkout named by DDETR_OFFICIAL_REPO, or
/tmp/official-ddetr, and skip without one. The nvcc compile of the patched sources (about 2 minutes) runs only when
DDETR_OFFICIAL_REPO is set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from ddetr.ops import build

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "official_kernel.py"
OFFICIAL_REPO = Path(os.environ.get("DDETR_OFFICIAL_REPO") or "/tmp/official-ddetr")
needs_official = pytest.mark.skipif(
    not (OFFICIAL_REPO / "models" / "ops" / "src").is_dir(),
    reason="needs a checkout of fundamentalvision/Deformable-DETR (DDETR_OFFICIAL_REPO or /tmp/official-ddetr)",
)


@pytest.fixture(scope="module")
def official_kernel():
    spec = importlib.util.spec_from_file_location("official_kernel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["official_kernel"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("official_kernel", None)


@pytest.fixture
def official_src(official_kernel, tmp_path):
    """A prepared `.official` folder (sources and shim) inside a copy of the benchmark's folder layout."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "benchmarks" / "official_kernel.py").write_text(SCRIPT.read_text())
    official_kernel.prepare(OFFICIAL_REPO, repo / ".official")
    return repo / ".official" / "src"


@needs_official
def test_every_patch_applies_and_no_stale_torch_api_is_left(official_kernel, official_src, tmp_path):
    before = {name: (official_src / name).read_text() for name in official_kernel.SOURCES}
    applied = official_kernel.patch_sources(official_src, tmp_path / "patched")

    assert [(a["file"], a["old"], a["count"]) for a in applied] == [
        (p.file, p.old, p.count) for p in official_kernel.PATCHES
    ]
    patched = {name: (tmp_path / "patched" / name).read_text() for name in official_kernel.SOURCES}
    for name, text in patched.items():
        for stale in ("THC", ".type()", ".data<", "AT_ASSERTM", "AT_ERROR", "CUDAContext", "cpu/"):
            assert stale not in text, f"{name} still holds {stale!r}"
    cu = patched["cuda/ms_deform_attn_cuda.cu"]
    assert cu.count(".data_ptr<") == 15 and cu.count("c10::cuda::getCurrentCUDAStream()") == 2
    assert "AT_DISPATCH_FLOATING_TYPES(value.scalar_type()," in cu
    assert patched["ms_deform_attn.h"].count("TORCH_CHECK(false, ") == 4
    # The copies in .official/src stay as the official repository has them.
    assert before == {name: (official_src / name).read_text() for name in official_kernel.SOURCES}
    assert not (official_src / "cpu").exists()


@needs_official
def test_patching_again_rewrites_nothing(official_kernel, official_src, tmp_path):
    official_kernel.patch_sources(official_src, tmp_path / "patched")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "patched").rglob("*") if p.is_file()}
    os.utime(official_src / "vision.cpp")  # a newer source with the same text
    official_kernel.patch_sources(official_src, tmp_path / "patched")
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "patched").rglob("*") if p.is_file()}


@needs_official
def test_a_patch_that_no_longer_matches_names_the_file_and_the_text(official_kernel, official_src, tmp_path):
    cu = official_src / "cuda" / "ms_deform_attn_cuda.cu"
    cu.write_text(cu.read_text().replace(".data<", ".data_ptr<", 1))  # as if upstream had fixed one call

    with pytest.raises(
        official_kernel.BaselineError, match=r"ms_deform_attn_cuda\.cu: expected 15 x '\.data<', found 14"
    ):
        official_kernel.patch_sources(official_src, tmp_path / "patched")


def test_time_dry_run_exits_zero_with_a_skip_message(tmp_path):
    out, build_dir = tmp_path / "official.json", tmp_path / "build"
    cmd = [sys.executable, str(SCRIPT), "time", "--dry-run", "--out", str(out), "--build-dir", str(build_dir)]
    result = subprocess.run([*cmd, "--src", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("skip: official kernel time not run (--dry-run)")
    assert "official sources not in" in result.stdout
    assert not out.exists() and not build_dir.exists()


@needs_official
def test_the_shim_runs_the_dry_run_and_checks_the_patches(official_src, tmp_path):
    """`.official/bench.py` as the GPU script calls it: it runs this checkout's benchmarks/official_kernel.py."""
    shim = official_src.parent / "bench.py"
    cmd = [sys.executable, str(shim), "build", "--dry-run", "--build-dir", str(tmp_path / "build")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "skip: official kernel build not run (--dry-run)" in result.stdout
    assert f"11 patches apply to {official_src}" in result.stdout
    assert not (tmp_path / "build").exists()


def _fp32(x: Fraction) -> float:
    return float(np.float32(float(x)))  # exact rationals here fit a double, so this rounds once


def test_rounding_points_are_where_the_two_kernels_floor_differently(official_kernel):
    """Around h = k for a few k, every fp32 y within 40 ulps: the mask agrees with exact arithmetic, and finds some."""
    H = 100
    ys = []
    for k in (0, 1, 5, 16, 32):
        y = np.float32((k + 0.5) / H)
        for direction in (-1.0, 1.0):
            for _ in range(40):
                y = np.nextafter(y, np.float32(direction))
                ys.append(float(y))
    expected = []
    for y in ys:
        exact = Fraction(y) * H
        official = _fp32(Fraction(_fp32(exact)) - Fraction(1, 2))  # fp32 product, then a double subtraction
        ours = _fp32(exact - Fraction(1, 2))  # one rounding, as the FFMA
        expected.append(np.floor(official) != np.floor(ours) or -1 in (official, ours))
    loc = torch.tensor(ys, dtype=torch.float32).view(1, -1, 1, 1, 1, 1).expand(-1, -1, -1, -1, -1, 2).contiguous()
    shapes = torch.tensor([[H, H]])

    mask = official_kernel.rounding_points(loc, shapes).flatten().tolist()
    assert mask == expected
    assert 2 <= sum(expected) < len(ys) // 10
    on_minus_one = torch.full((1, 1, 1, 1, 1, 2), -0.5 / 64)  # h == -1 exactly: sampled by ours, not by official
    assert official_kernel.rounding_points(on_minus_one, torch.tensor([[64, 64]])).item()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DDETR_OFFICIAL_REPO") or build.nvcc_path() is None,
    reason="needs DDETR_OFFICIAL_REPO (a Deformable-DETR checkout) and nvcc",
)
def test_the_patched_official_sources_compile_against_this_torch(official_kernel, official_src, tmp_path):
    """nvcc (sm_90) for the .cu and g++ for vision.cpp, with torch's headers and the official setup.py flags."""
    import nvcc  # tests/nvcc.py: pytest puts tests/ on sys.path
    from torch.utils import cpp_extension

    patched = tmp_path / "patched"
    official_kernel.patch_sources(official_src, patched)
    obj, _ = nvcc.compile_cuda(
        tmp_path / "obj",
        arch_list="9.0",
        source=patched / "cuda" / "ms_deform_attn_cuda.cu",
        extra_flags=(f"-I{patched}", *official_kernel.CUDA_CFLAGS),
    )
    assert obj.stat().st_size > 0
    includes = [*cpp_extension.include_paths("cpu"), sysconfig.get_paths()["include"], str(patched)]
    cmd = ["g++", "-c", str(patched / "vision.cpp"), "-o", str(tmp_path / "vision.o"), "-std=c++20", "-fPIC"]
    cmd += [f"-I{p}" for p in includes] + official_kernel.CFLAGS
    cmd += ["-DTORCH_EXTENSION_NAME=MultiScaleDeformableAttention", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
