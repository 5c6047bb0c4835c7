"""Build and load the compiled multi-scale deformable attention op (`csrc/`), on first use only.

`load_extension()` compiles `csrc/` with ninja through `torch.utils.cpp_extension.load` the first time it is called
in a process (later processes reuse the cached build), loads it as `torch.ops.ddetr.*`, and registers the op's
autograd formula and its fake kernel (shape inference for `torch.compile`). Nothing here runs at import time.

`build_extension()` does the same eagerly; `ddetr op build` calls it when a cluster node is set up.
`compile_cuda_check()` compiles the CUDA kernel with nvcc without loading it, so the CUDA sources are checked on
machines that have nvcc but no GPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("ddetr.ops")

CSRC = Path(__file__).resolve().parents[2] / "csrc"
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
    _register_python_parts()
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


_registered = False


def _register_python_parts() -> None:
    """Autograd formula and fake kernels of the ops; once per process, after the library is loaded."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("ddetr::ms_deform_attn_forward")(_forward_fake)
    torch.library.register_fake("ddetr::ms_deform_attn_backward")(_backward_fake)
    torch.library.register_autograd("ddetr::ms_deform_attn_forward", _backward, setup_context=_setup_context)
    _registered = True


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


def _backward_fake(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic
):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.ddetr.ms_deform_attn_backward(
        grad_output.contiguous(),
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        deterministic_backward(),
    )
    return grad_value, None, None, grad_locations, grad_weights


def compile_cuda_check(out_dir: str | os.PathLike, arch_list: str | None = None, verbose: bool = False) -> Path:
    """Compile the CUDA kernel to an object file with nvcc, with torch's headers and flags; nothing is loaded.

    The CPU wheel of torch ships the CUDA headers of ATen and c10, so this checks the .cu on a machine without a GPU.

    Args:
        out_dir: folder for the object file.
        arch_list: e.g. "8.0;9.0"; default $TORCH_CUDA_ARCH_LIST, else "9.0" (one target keeps it quick).
        verbose: print the nvcc command.

    Returns:
        The path of the object file.

    Raises:
        FileNotFoundError: no nvcc. ExtensionBuildError: nvcc failed; the message holds its output.
    """
    from torch.utils import cpp_extension

    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "ms_deform_attn_cuda.o"
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"
    gencode = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if arch:
            num = arch.removesuffix("+PTX").replace(".", "")
            gencode.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    # nvcc adds the toolkit's own include folder itself.
    includes = [*cpp_extension.include_paths("cpu"), str(CSRC), sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # A CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated by CUDA builds; it only sets Windows export
    # macros), so skip it when the wheel has no CUDA.
    macros = [] if torch.version.cuda else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    cmd = [
        str(nvcc),
        "-c",
        str(CSRC / _CUDA_SOURCE),
        "-o",
        str(obj),
        *(f"-I{p}" for p in includes),
        *cpp_extension.COMMON_NVCC_FLAGS,
        *_CUDA_CFLAGS,
        "-std=c++20",  # as torch.utils.cpp_extension passes it to nvcc
        *gencode,
        "--compiler-options",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *macros,
        "-DTORCH_EXTENSION_NAME=ddetr_msda_cuda",
    ]
    if verbose:
        print(" ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExtensionBuildError(f"nvcc failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return obj
