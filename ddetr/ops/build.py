"""Build and load the compiled multi-scale deformable attention op (`csrc/`), on first use only.

`load_extension()` compiles `csrc/` with ninja through `torch.utils.cpp_extension.load` the first time it is called
in a process (later processes reuse the cached build), loads it as `torch.ops.ddetr.*`, and calls what asked to be
called once the library is loaded (`when_loaded`): the op module registers its autograd formula and its fake kernels
(shape inference for `torch.compile`) that way, so this loader imports nothing of the op. Nothing here runs at import
time.

Builds of one build folder take turns under `build_lock`, a lock that dies with its holder; the wait for it has an
end ($DDETR_MSDA_BUILD_LOCK_TIMEOUT_S).

`build_extension()` does the same eagerly; `ddetr op build` calls it when a cluster node is set up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
_on_load: list[Callable[[], None]] = []

LOCK_FILE = "ddetr-build.lock"  # ours, in the build folder: held with flock while a process builds there
TORCH_BATON = "lock"  # torch.utils.cpp_extension's own lock (a FileBaton) in the build folder
LOCK_TIMEOUT_ENV = "DDETR_MSDA_BUILD_LOCK_TIMEOUT_S"
# A CUDA build of every kernel variant takes minutes on a small node: wait that long for a live builder, not forever.
LOCK_TIMEOUT_S = 1800.0


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
    """Whether the build includes the CUDA kernel: torch must be a CUDA build and nvcc must be installed, and the
    architectures to build for known: a visible GPU's, or $TORCH_CUDA_ARCH_LIST (torch cannot pick them without
    either, and a GPU-less build host with a CUDA torch then builds the CPU kernel only)."""
    if torch.version.cuda is None or nvcc_path() is None:
        return False
    return torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


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
        with build_lock(directory):
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
    except ExtensionBuildError:  # the build lock's: its message is whole already
        raise
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        # Quote the compiler's output: torch puts it in the message, or only in the chained CalledProcessError.
        detail = getattr(err.__cause__, "output", None)
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else (detail or "")
        message = str(err) if detail.strip() in str(err) else f"{err}\n{detail}"
        raise ExtensionBuildError(f"building {name} from {CSRC} failed: {message}".strip()) from err
    logger.debug("ddetr.ops: %s ready in %.1f s (%s)", name, time.perf_counter() - start, directory)
    for register in _on_load:  # the ops exist now: their Python parts can be registered on them
        register()
    return directory / f"{name}.so"


def when_loaded(register: Callable[[], None]) -> None:
    """Have `register` called each time the compiled library has been loaded in this process, at once when it has
    been already. `register` must be idempotent.

    The op module registers its autograd formula and fake kernels this way: it imports this loader, never the
    other way round.
    """
    _on_load.append(register)
    if _loaded:
        register()


def lock_timeout_s() -> float:
    """Seconds to wait for another process's build of the same folder: $DDETR_MSDA_BUILD_LOCK_TIMEOUT_S, else 1800."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return LOCK_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise ExtensionBuildError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None


@contextlib.contextmanager
def build_lock(directory: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the build folder's lock for the length of the block: `flock` on `ddetr-build.lock` in it.

    The kernel lets go of a flock when its holder dies, however it dies, so a killed build never blocks the next
    one. Inside the lock no other ddetr process builds in this folder: torch's own lock there (`lock`, a plain
    file that a killed build leaves behind and that every later build would wait on forever) is then stale, and is
    removed with a warning.

    Args:
        directory: the build folder.
        timeout_s: how long to wait for a live holder; None reads $DDETR_MSDA_BUILD_LOCK_TIMEOUT_S (default 1800).

    Raises:
        ExtensionBuildError: the lock was not free within the timeout (the message names the lock file, its holder
            and what to do), or the lock file cannot be opened.
    """
    timeout = lock_timeout_s() if timeout_s is None else timeout_s
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ExtensionBuildError(
            f"cannot open the op's build lock {path} ({err.strerror}): make the folder writable or set "
            "DDETR_MSDA_BUILD_DIR to a writable one"
        ) from None
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ExtensionBuildError(
                        f"waited {timeout:g} s for the op's build lock {path}, held by {_holder(fd)} that is still "
                        f"building in {directory}: let it finish, or end that process (a lock of a process that is "
                        f"gone frees itself), or raise {LOCK_TIMEOUT_ENV}"
                    ) from None
                if not waiting:
                    waiting = True
                    logger.info("ddetr.ops: waiting for %s, building the op in %s", _holder(fd), directory)
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        baton = directory / TORCH_BATON
        if baton.exists():
            logger.warning(
                "ddetr.ops: removing %s, torch's build lock left by a build that was killed (no process holds %s)",
                baton,
                path,
            )
            baton.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # lets go of the flock


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file ("pid N on HOST")."""
    try:
        written = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        written = ""
    return written or "another process"


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
