"""The public multi-scale deformable attention function, and the Python parts of the compiled op.

`ms_deform_attn` checks its arguments once, then runs one backend: the reference in `reference.py`, the gather
formulation in `gather.py` (what torch.export and ONNX see) or the compiled op (`csrc/`, built on first use by
`build.py`). The choice of backend is made in `select_backend`.
`register_python_parts` gives the compiled op its autograd formula and its fake kernels (shapes for torch.compile);
this module hands it to the loader (`build.when_loaded`), which calls it once the library is loaded, never at
import time. The loader imports nothing of this module.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from ddetr.ops import build
from ddetr.ops.gather import ms_deform_attn_gather
from ddetr.ops.reference import ms_deform_attn_reference

logger = logging.getLogger("ddetr.ops")

BACKENDS = ("auto", "cpp", "reference", "gather")
_logged: set[tuple[str, str, str]] = set()
_warned_fallback = False


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3), with the official op's shapes.

    Args:
        value: (N, S, M, D) floating values of all levels, flattened level after level.
        spatial_shapes: (L, 2) integer (H, W) of each level, with sum(H * W) == S.
        level_start_index: (L,) integer offset of each level's first value in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); (0, 0) is the top-left corner of the map,
            (1, 1) the bottom-right one; points outside read zeros.
        attention_weights: (N, Lq, M, L, P), usually softmax-normalised over (L, P).
        backend: "auto", "cpp", "reference" or "gather"; None reads the environment variable DDETR_MSDA
            (default "auto").
            See `select_backend`. The backward of the compiled op on CUDA is bitwise reproducible when
            DDETR_MSDA_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True); on CPU it always is.

    Returns:
        (N, Lq, M * D) tensor of value's dtype.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    resolved = select_backend(backend, value.device)
    if resolved == "cpp":
        return torch.ops.ddetr.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if resolved == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if spatial_shapes.device.type != "cpu" and not torch.compiler.is_compiling():
        # The reference reads the level shapes back to the host anyway, so checking them here costs nothing more.
        check_levels(spatial_shapes, level_start_index, value.shape[1])
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def select_backend(backend: str | None, device: torch.device) -> str:
    """The one place that decides which implementation runs; returns "cpp", "reference" or "gather".

    - "reference": the pure-PyTorch `ms_deform_attn_reference`.
    - "gather": the pure-PyTorch `ms_deform_attn_gather` (gathers and bilinear weights, no `grid_sample`).
    - "cpp": the compiled op; raises `build.ExtensionBuildError` when it cannot be built, and RuntimeError for a
      device it has no kernel for.
    - "auto" (default): the compiled op when it builds and covers `device`, else the reference. A failed build
      is reported once per process with a warning that quotes the compiler's error.

    While torch.export or torch.onnx.export traces the model the answer is "gather" whatever was asked: the
    compiled op has no ONNX translation, and the reference reads the level sizes back as Python numbers, which
    would fix the image size into the graph.

    Args:
        backend: one of BACKENDS, or None to read DDETR_MSDA (unset: "auto").
        device: the device of the inputs.
    """
    global _warned_fallback
    choice = (backend or os.environ.get("DDETR_MSDA") or "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"MSDA backend must be one of {BACKENDS} (argument or DDETR_MSDA), got {choice!r}")
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return "gather"
    resolved = "gather" if choice == "gather" else "reference"
    if choice not in ("reference", "gather"):
        try:
            build.load_extension()
        except build.ExtensionBuildError as err:
            if choice == "cpp":
                raise
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    "ddetr.ops: the compiled multi-scale deformable attention could not be built; using the slower "
                    f"PyTorch reference (set DDETR_MSDA=reference to silence this). Build error:\n{err}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            if device.type in build.extension_devices():
                resolved = "cpp"
            elif choice == "cpp":
                raise RuntimeError(
                    f"MSDA backend 'cpp' has no kernel for {device.type} tensors (it covers "
                    f"{sorted(build.extension_devices())}); use backend 'auto' or 'reference'"
                )
    key = (choice, device.type, resolved)
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.info("multi-scale deformable attention on %s uses %s (asked: %s)", device.type, resolved, choice)
    return resolved


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise a ValueError or TypeError naming the argument and the expected shape when the inputs disagree.

    Shapes, dtypes and devices are checked for every input. The level shapes' values (their sizes sum to S, the
    starts are their running sums) are checked here only when they are CPU tensors: reading CUDA tensors back
    would synchronise the host with the device on every call. On CUDA the compiled kernels check them on the
    device, and the reference path calls `check_levels` itself (it reads them to the host anyway).
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) as (H, W), got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(f"level_start_index must be (L,) = ({L},), got shape {tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    if sampling_locations.shape != (N, Lq, M, L, P, 2):
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2) to match value "
            f"and spatial_shapes, got shape {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != (N, Lq, M, L, P):
        raise ValueError(
            f"attention_weights must be (N, Lq, M, L, P) = {(N, Lq, M, L, P)}, "
            f"got shape {tuple(attention_weights.shape)}"
        )
    for name, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}: all inputs must share a device")
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        # Data-dependent checks; under torch.compile they would break the graph.
        check_levels(spatial_shapes, level_start_index, S)


def check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> None:
    """Raise a ValueError when the level sizes do not sum to S or level_start_index is not their running sum.

    Reads both tensors on the host: a device synchronisation for CUDA tensors (see `check_inputs`).
    """
    sizes = spatial_shapes.prod(1)
    total = int(sizes.sum())
    if total != S:
        raise ValueError(
            f"spatial_shapes {spatial_shapes.tolist()} cover {total} positions "
            f"but value has S = {S}: the level shapes must sum to S"
        )
    expected_starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    if not torch.equal(level_start_index.to(expected_starts.dtype), expected_starts):
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} does not match spatial_shapes "
            f"(expected {expected_starts.tolist()})"
        )


# --- The compiled op's autograd formula and fake kernels ---

_registered = False


def register_python_parts() -> None:
    """Register the autograd formula and the fake kernels of `torch.ops.ddetr.*`; once per process.

    Called by `build.build_extension` right after the library is loaded (the ops must exist to register on): this
    module asks for that at import (`build.when_loaded`, at the end of the module).
    """
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
    # The kernels return contiguous gradients whatever the inputs' strides are; empty_like would copy those strides.
    return tuple(
        torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (value, sampling_locations, attention_weights)
    )


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
        build.deterministic_backward(),
    )
    return grad_value, None, None, grad_locations, grad_weights


# The op registers itself once its library is loaded: the loader calls this back, without importing this module.
build.when_loaded(register_python_parts)
