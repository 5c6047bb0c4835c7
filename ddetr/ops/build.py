"""Build and load the compiled multi-scale deformable attention op (`csrc/`), on first use only.

`load_extension()` compiles `csrc/` with ninja through `torch.utils.cpp_extension.load` the first time it is called
in a process (later processes reuse the cached build), loads it as `torch.ops.ddetr.*`, and has
`ms_deform_attn.register_python_parts` register the op's autograd formula and its fake kernels (shape inference for
`torch.compile`). Nothing here runs at import time.

`build_extension()` does the same eagerly; `ddetr op build` calls it when a cluster node is set up.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("ddetr.ops")


def _sources_folder() -> Path:
    """The op's C++/CUDA sources: `ddetr/_csrc` in an installed wheel (setup.py copies them there), else the
    checkout's top-level `csrc/` (editable installs and a plain clone)."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "_csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


CSRC = _sources_folder()
_CPU_SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp")
_CUDA_SOURCE = "ms_deform_attn_cuda.cu"
_CFLAGS = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP inlined from the headers: without -fopenmp it is serial
_CUDA_CFLAGS = ["-O3"]  # torch adds its own -std (c++20) for nvcc

_lock = threading.Lock()
_loaded = False
_error: str | None = None


class ExtensionBuildError(RuntimeError):
    """The compiled op could not be built or loaded; the message holds the compiler's error."""


def nvcc_path() -> Path | None:
    """nvcc from $CUDA_HOME, else from PATH; None when there is none."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return Path(cuda_home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def with_cuda() -> bool:
    """Whether the build includes the CUDA kernel: torch must be a CUDA build and nvcc must be installed."""
    return torch.version.cuda is not None and nvcc_path() is not None


def cpu_flags() -> list[str]:
    """AVX2 + FMA code for the CPU kernel when this CPU has them (x86 Linux); none otherwise.

    The channel loops are written for the compiler's vectoriser; without these flags it may only use SSE2.
    The build folder is named after the flags, so nodes with different CPUs sharing a home do not share a build.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def build_directory(cuda: bool) -> Path:
    """Where the build is cached: $DDETR_MSDA_BUILD_DIR, else a folder per torch, Python, variant and CPU flags."""
    if os.environ.get("DDETR_MSDA_BUILD_DIR"):
        return Path(os.environ["DDETR_MSDA_BUILD_DIR"])
    variant = ("cuda" if cuda else "cpu") + ("-avx2" if cpu_flags() else "")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{variant}"
    return Path.home() / ".cache" / "ddetr" / f"msda-{tag}"


def build_extension(verbose: bool = False) -> Path:
    """Compile (or reuse the cached build of) `csrc/` and load it into this process.

    Args:
        verbose: print the compiler's commands and output.

    Returns:
        The path of the shared library.

    Raises:
        ExtensionBuildError: when compiling or loading fails; the message contains the compiler's output.
    """
    from torch.utils import cpp_extension

    cuda = with_cuda()
    name = "ddetr_msda_cuda" if cuda else "ddetr_msda_cpu"
    sources = [str(CSRC / s) for s in _CPU_SOURCES] + ([str(CSRC / _CUDA_SOURCE)] if cuda else [])
    directory = build_directory(cuda)
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=_CFLAGS + cpu_flags(),
            extra_cuda_cflags=_CUDA_CFLAGS if cuda else None,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        # Quote the compiler's output: torch puts it in the message, or only in the chained CalledProcessError.
        detail = getattr(err.__cause__, "output", None)
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else (detail or "")
        message = str(err) if detail.strip() in str(err) else f"{err}\n{detail}"
        raise ExtensionBuildError(f"building {name} from {CSRC} failed: {message}".strip()) from err
    logger.debug("ddetr.ops: %s ready in %.1f s (%s)", name, time.perf_counter() - start, directory)
    # The op's autograd formula and fake kernels live beside the op; imported here, when the library exists.
    from ddetr.ops.ms_deform_attn import register_python_parts

    register_python_parts()
    return directory / f"{name}.so"


def load_extension() -> None:
    """Build and load the op once per process; later calls return at once or re-raise the first failure.

    Raises:
        ExtensionBuildError: the build failed (now or in an earlier call of this process).
    """
    global _loaded, _error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _error is not None:
            raise ExtensionBuildError(_error)
        try:
            build_extension()
        except ExtensionBuildError as err:
            _error = str(err)
            raise
        _loaded = True


def extension_devices() -> set[str]:
    """Device types the compiled op has kernels for (call after `load_extension`)."""
    return {"cpu", "cuda"} if with_cuda() else {"cpu"}


def deterministic_backward() -> bool:
    """Bitwise-reproducible backward on CUDA: DDETR_MSDA_DETERMINISTIC=1 or torch.use_deterministic_algorithms."""
    flag = os.environ.get("DDETR_MSDA_DETERMINISTIC", "0").strip().lower() in ("1", "true", "yes", "on")
    return flag or torch.are_deterministic_algorithms_enabled()
