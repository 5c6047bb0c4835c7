"""The official Deformable DETR CUDA kernel beside ours, on one GPU in one run: patch, build, time, parity.

The official sources (fundamentalvision/Deformable-DETR, `models/ops/src`) are never part of this repository: they
live in the git-ignored `.official/src/` of a checkout (see docs/benchmarks.md), copied there by `prepare`. This
module is ours: it patches a copy of them for torch 2.x (`PATCHES`, exact replacements that fail loudly when the
official text is not what they expect), builds them with the official setup.py's flags, and times both ops called
directly (no Python autograd) with CUDA events on the inputs of benchmarks/msda.py.

    python benchmarks/official_kernel.py prepare --official-repo /tmp/official-ddetr   # .official/src + bench.py
    python3 .official/bench.py build --build-dir build/official          # the shim runs this file's main()
    python3 .official/bench.py time --out results.json --build-dir build/official [--repeat N] [--dry-run]

`time` measures, per shape, forward, backward and both (median of --repeat after a warm-up) for the official fp32
kernel and ours in fp32, bf16, fp16 and fp32 with the deterministic backward, the ratios, and the parity of ours fp32
against official fp32 (`parity`). Without CUDA, or with --dry-run, `build` and `time` only check that the patches
apply, print a line starting "skip:" and exit 0."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / ".official"  # git-ignored (.git/info/exclude): the official sources never get committed
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "msda-vs-official.json"  # where benchmarks/msda.py looks
# The CUDA path only: ms_deform_attn.h calls nothing of cpu/ once its include of cpu/ is patched away.
SOURCES = (
    "vision.cpp",
    "ms_deform_attn.h",
    "cuda/ms_deform_attn_cuda.h",
    "cuda/ms_deform_attn_cuda.cu",
    "cuda/ms_deform_im2col_cuda.cuh",
)
# The official setup.py's nvcc flags (its CUDAExtension also defines WITH_CUDA for every translation unit).
CUDA_CFLAGS = [
    "-DWITH_CUDA",
    "-DCUDA_HAS_FP16=1",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
CFLAGS = ["-O3", "-DWITH_CUDA"]
IM2COL_STEP = 64  # the official model's default; with N = 2 every call is one chunk
SHIM = '''"""Runs benchmarks/official_kernel.py of this checkout (written by its `prepare`; never committed)."""
import runpy, sys
from pathlib import Path
sys.argv[0] = str(Path(__file__).resolve().parents[1] / "benchmarks" / "official_kernel.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


class BaselineError(RuntimeError):
    """The official baseline cannot be prepared, patched or built; the message says what to do."""


@dataclass(frozen=True)
class Patch:
    """Replace `old` by `new` in `file`, which must hold exactly `count` occurrences of `old`."""

    file: str
    old: str
    new: str
    count: int
    why: str


# fmt: off
PATCHES = (
    Patch("ms_deform_attn.h", '#include "cpu/ms_deform_attn_cpu.h"', "#include <torch/extension.h>", 1,
          "no CPU sources are built; the CPU header only brought torch/extension.h"),
    Patch("ms_deform_attn.h", "value.type().is_cuda()", "value.is_cuda()", 2, "Tensor::type() is gone"),
    Patch("ms_deform_attn.h", "AT_ERROR(", "TORCH_CHECK(false, ", 4, "AT_ERROR is gone"),
    Patch("cuda/ms_deform_attn_cuda.cu", ".type().is_cuda()", ".is_cuda()", 11, "Tensor::type() is gone"),
    Patch("cuda/ms_deform_attn_cuda.cu", "AT_DISPATCH_FLOATING_TYPES(value.type(),",
          "AT_DISPATCH_FLOATING_TYPES(value.scalar_type(),", 2, "dispatch takes a ScalarType"),
    Patch("cuda/ms_deform_attn_cuda.cu", ".data<", ".data_ptr<", 15, "Tensor::data<T>() is gone"),
    Patch("cuda/ms_deform_attn_cuda.cu", "AT_ASSERTM(", "TORCH_CHECK(", 24,
          "AT_ASSERTM is gone (the printf-style %d of one message is then printed as is)"),
    Patch("cuda/ms_deform_attn_cuda.cu", "#include <ATen/cuda/CUDAContext.h>", "#include <c10/cuda/CUDAStream.h>", 1,
          "only the current stream is used: no cuBLAS/cuSPARSE headers needed"),
    Patch("cuda/ms_deform_attn_cuda.cu", "at::cuda::getCurrentCUDAStream()", "c10::cuda::getCurrentCUDAStream()", 2,
          "declared by c10/cuda/CUDAStream.h"),
    Patch("cuda/ms_deform_im2col_cuda.cuh", "#include <THC/THCAtomics.cuh>\n", "", 1,
          "THC is gone; the native float/double atomicAdd is what the kernels use"),
    Patch("cuda/ms_deform_im2col_cuda.cuh", "#include <ATen/cuda/CUDAContext.h>", "#include <c10/cuda/CUDAStream.h>",
          1, "nothing of CUDAContext is used"),
)
# fmt: on
# What must be gone after patching: a patch table that misses one of these fails `patch_sources`.
STALE = ("THC", ".type()", ".data<", "AT_ASSERTM", "AT_ERROR", "ATen/cuda/CUDAContext.h", "cpu/")


def prepare(official_repo: Path, dest: Path = OFFICIAL) -> Path:
    """Copy the official `models/ops/src` CUDA sources into `dest/src` and write the `dest/bench.py` shim."""
    src = Path(official_repo) / "models" / "ops" / "src"
    missing = [name for name in SOURCES if not (src / name).is_file()]
    if missing:
        raise BaselineError(
            f"{src} lacks {missing}: pass --official-repo a checkout of fundamentalvision/Deformable-DETR"
        )
    for name in SOURCES:
        (dest / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dest / "src" / name)
    (dest / "bench.py").write_text(SHIM)
    return dest


def patch_sources(src: Path, dest: Path) -> list[dict[str, object]]:
    """Write the official sources of `src`, patched for torch 2.x, to `dest`; return one record per patch applied.

    A file is rewritten only when its text changes, so an up-to-date build is not redone.

    Raises:
        BaselineError: a source is missing, a patch's text occurs other than `count` times, or a stale API is left.
    """
    src, dest = Path(src), Path(dest)
    texts = {}
    for name in SOURCES:
        try:
            texts[name] = (src / name).read_text()
        except OSError as err:
            raise BaselineError(
                f"official source {src / name} unreadable ({err.strerror}): run "
                "`python benchmarks/official_kernel.py prepare --official-repo PATH` first"
            ) from None
    applied = []
    for p in PATCHES:
        found = texts[p.file].count(p.old)
        if found != p.count:
            raise BaselineError(
                f"patch of {p.file}: expected {p.count} x {p.old!r}, found {found}; the official sources differ "
                "from the ones the patch table was written for: update PATCHES in benchmarks/official_kernel.py"
            )
        texts[p.file] = texts[p.file].replace(p.old, p.new)
        applied.append({"file": p.file, "old": p.old, "new": p.new, "count": found})
    for name, text in texts.items():
        left = [s for s in STALE if s in text]
        if left:
            raise BaselineError(f"{name} still holds {left} after patching: add a patch to PATCHES")
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.is_file() or out.read_text() != text:
            out.write_text(text)
    return applied


def build(src: Path, build_dir: Path, verbose: bool = False):
    """Patch the sources into `build_dir/src` and build (or reuse) the official extension; return its module."""
    from torch.utils import cpp_extension

    patched = Path(build_dir) / "src"
    patch_sources(src, patched)
    try:
        return cpp_extension.load(
            name="MultiScaleDeformableAttention",
            sources=[str(patched / "vision.cpp"), str(patched / "cuda" / "ms_deform_attn_cuda.cu")],
            extra_include_paths=[str(patched)],
            extra_cflags=CFLAGS,
            extra_cuda_cflags=CUDA_CFLAGS,
            build_directory=str(build_dir),
            with_cuda=True,
            verbose=verbose,
        )
    except (RuntimeError, OSError) as err:
        raise BaselineError(f"building the official op in {build_dir} failed (CUDA_HOME, nvcc, ninja?): {err}") from err


# --- timing and parity ------------------------------------------------------------------------------------------

# (label, which op, value dtype, deterministic backward); the official op dispatches on fp32/fp64 only.
VARIANTS = (
    ("official fp32", "official", torch.float32, False),
    ("ours fp32", "ours", torch.float32, False),
    ("ours bf16", "ours", torch.bfloat16, False),
    ("ours fp16", "ours", torch.float16, False),
    ("ours fp32 deterministic", "ours", torch.float32, True),
)
LEVELS_320 = [(40, 60), (20, 30), (10, 15), (5, 8)]  # a 320 x 480 image at strides 8..64, as train_step.py uses


def shapes_table() -> dict[str, tuple[int, list[tuple[int, int]], int | None]]:
    """benchmarks/msda.py's shapes (encoder at 512 x 768, decoder, encoder-800), plus encoder-320."""
    import msda

    return {"encoder-320": (2, LEVELS_320, None), **msda.SHAPES}


def cuda_median_ms(fn, repeat: int, warmup: int) -> float:
    """Median over `repeat` calls of the device time between CUDA events around `fn()`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def rounding_points(locations: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(N, Lq, M, L, P) bool: points whose bilinear cell the two kernels may legitimately disagree on.

    The official kernel computes `loc * H - 0.5` as a fp32 product then a double subtraction stored as fp32; ours
    is one fp32 FFMA. Where the two round to different sides of an integer, `floor` differs and grad_loc takes the
    other one-sided slope. That needs h within an ulp of 0 or of a power of two (elsewhere fl32(p) - 0.5 is exact):
    rare, but counted. Points exactly on h == -1 count too: official samples `h > -1`, ours `h >= -1`.
    """
    size = spatial_shapes.flip(-1).to(locations.dtype)[None, None, None, :, None, :]  # (1, 1, 1, L, 1, 2) as (W, H)
    official = ((locations * size).double() - 0.5).float()
    ours = (locations.double() * size.double() - 0.5).float()
    differ = (official.floor() != ours.floor()) | (official == -1) | (ours == -1)
    return differ.any(-1)


def parity(official: tuple[torch.Tensor, ...], ours: tuple[torch.Tensor, ...], mask: torch.Tensor) -> dict:
    """Ours fp32 against official fp32: (out, grad_value, grad_loc, grad_attn) of each; `mask` from
    `rounding_points`. grad_loc gets percentiles and an outlier count (error over 1e-3 x max |official grad_loc|)."""
    out = {}
    for name, i in (("out", 0), ("grad_value", 1), ("grad_attn", 3)):
        out[f"{name}_max_abs_err"] = (official[i] - ours[i]).abs().max().item()
        out[f"{name}_max_abs"] = official[i].abs().max().item()
    err = (official[2] - ours[2]).abs()
    ranked = err.flatten().sort().values
    threshold = 1e-3 * official[2].abs().max().item()
    outside = err.masked_fill(mask[..., None], 0)
    n = ranked.numel()
    out.update({f"grad_loc_abs_err_p{q}": ranked[min(int(q / 100 * n), n - 1)].item() for q in (50, 99, 99.9)})
    out["grad_loc_max_abs_err"] = ranked[-1].item()
    out["grad_loc_max_abs"] = official[2].abs().max().item()
    out["grad_loc_outlier_threshold"] = threshold
    out["grad_loc_outliers"] = int((err > threshold).sum())
    out["rounding_points"] = int(mask.sum())
    out["grad_loc_outliers_outside_rounding_points"] = int((outside > threshold).sum())
    out["grad_loc_max_abs_err_outside_rounding_points"] = outside.max().item()
    return out


def time_shape(spec, official_op, repeat: int, warmup: int, l2_bytes: int | None) -> dict:
    """Timings (ms), official / ours ratios and parity for one shape."""
    import msda

    N, levels, Lq = spec
    torch.manual_seed(0)
    value, shapes, starts, locations, weights = msda.make_inputs(N, levels, Lq, "cuda", torch.float32)
    grad = torch.randn(N, locations.shape[1], value.shape[2] * value.shape[3], device="cuda")
    calls, results = {}, {}
    for label, which, dtype, deterministic in VARIANTS:
        v, g = value.to(dtype), grad.to(dtype)
        if which == "official":  # argument orders differ: official (..., grad, im2col_step), ours (grad, ...)
            fwd = partial(official_op.ms_deform_attn_forward, v, shapes, starts, locations, weights, IM2COL_STEP)
            bwd = partial(official_op.ms_deform_attn_backward, v, shapes, starts, locations, weights, g, IM2COL_STEP)
        else:
            fwd = partial(torch.ops.ddetr.ms_deform_attn_forward, v, shapes, starts, locations, weights)
            bwd = partial(
                torch.ops.ddetr.ms_deform_attn_backward, g, v, shapes, starts, locations, weights, deterministic
            )
        calls[label] = (fwd, bwd)
        results[label] = {
            "forward": cuda_median_ms(fwd, repeat, warmup),
            "backward": cuda_median_ms(bwd, repeat, warmup),
            "forward_backward": cuda_median_ms(lambda f=fwd, b=bwd: (f(), b()), repeat, warmup),
        }
    base = results["official fp32"]
    ratios = {label: {k: base[k] / t[k] for k in t} for label, t in results.items() if label != "official fp32"}
    outputs = {label: (calls[label][0](), *calls[label][1]()) for label in ("official fp32", "ours fp32")}
    value_bytes = value.numel() * value.element_size()
    return {
        "N": N,
        "levels": levels,
        "S": value.shape[1],
        "Lq": locations.shape[1],
        "M": value.shape[2],
        "D": value.shape[3],
        "P": locations.shape[4],
        "value_fp32_mib": value_bytes / 2**20,
        "value_fits_l2": None if l2_bytes is None else value_bytes <= l2_bytes,
        "timings_ms": results,
        "official_over_ours": ratios,
        "parity_fp32": parity(outputs["official fp32"], outputs["ours fp32"], rounding_points(locations, shapes)),
    }


NOTES = {
    "timings_ms": "CUDA events around each direct call (no autograd), median of --repeat after --warmup calls; "
    "forward_backward times one forward then one backward; bf16/fp16 cast value and grad_output only",
    "official_over_ours": "official fp32 time / ours time: above 1 means ours is faster",
    "official_build": "fundamentalvision/Deformable-DETR models/ops/src, patched for torch 2.x by "
    "benchmarks/official_kernel.py (PATCHES), official setup.py flags; im2col_step 64",
    "parity_fp32": "ours fp32 against official fp32 on the same inputs. The official kernel computes loc*H - 0.5 "
    "as a fp32 product then a double subtraction, ours as one fp32 FFMA: where the two round to different sides of "
    "an integer (only within an ulp of h = 0 or a power of two, since fl32(p) - 0.5 is exact otherwise) floor() "
    "differs and grad_loc legitimately takes the other one-sided slope; so does h == -1 exactly (official samples "
    "h > -1, ours h >= -1). rounding_points counts such points in these very inputs (0 for msda.py's inputs with "
    "seed 0, on CPU); other grad_loc differences are fp32 rounding and atomic summation order. Outliers: error "
    "over grad_loc_outlier_threshold = 1e-3 x max |official grad_loc|",
    "value_fits_l2": "the fp32 value tensor fits the GPU's L2 cache, so repeated calls read it from L2 "
    "(H100: 50 MB; encoder-800's 45 MB fits): both kernels get the same advantage",
}


def time_all(args: argparse.Namespace) -> dict:
    """Build both ops, time every shape; the report is rewritten to args.out after each shape and returned."""
    import msda

    from ddetr.ops import build as ours

    official_op = build(args.src, args.build_dir)
    ours.load_extension()
    if "cuda" not in ours.extension_devices():
        raise BaselineError("ddetr's op was built without its CUDA kernel: set CUDA_HOME (nvcc) and rebuild")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", None)
    table = shapes_table()
    host = msda.machine()
    report = {
        "machine": {
            **host,
            "gpu": torch.cuda.get_device_name(),
            "l2_cache_bytes": l2,
            "torch_cuda": torch.version.cuda,
            "git_commit": os.environ.get("GIT_COMMIT") or host["git_commit"],  # the GPU machine may have no git
        },
        "repeat": args.repeat,
        "warmup": args.warmup,
        "notes": NOTES,
        "shapes": {},
    }
    for name in args.shapes:
        report["shapes"][name] = time_shape(table[name], official_op, args.repeat, args.warmup, l2)
        print_shape(name, report["shapes"][name])
        write_json(args.out, report)  # a run killed at its time limit keeps the shapes it finished
    return report


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def print_shape(name: str, row: dict) -> None:
    print(
        f"\n{name}: N={row['N']} S={row['S']} Lq={row['Lq']} value {row['value_fp32_mib']:.1f} MiB "
        f"(fits L2: {row['value_fits_l2']})"
    )
    print(f"{'variant':<24} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'off/ours fwd':>13} {'bwd':>6} {'f+b':>6}")
    for label, t in row["timings_ms"].items():
        r = row["official_over_ours"].get(label)
        ratio = f"{r['forward']:12.2f}x {r['backward']:5.2f}x {r['forward_backward']:5.2f}x" if r else ""
        print(f"{label:<24} {t['forward']:8.3f} {t['backward']:8.3f} {t['forward_backward']:8.3f} {ratio}")
    p = row["parity_fp32"]
    print(
        f"parity fp32: out {p['out_max_abs_err']:.2e}, grad_value {p['grad_value_max_abs_err']:.2e}, "
        f"grad_attn {p['grad_attn_max_abs_err']:.2e}; grad_loc p50/p99/p99.9 {p['grad_loc_abs_err_p50']:.1e}/"
        f"{p['grad_loc_abs_err_p99']:.1e}/{p['grad_loc_abs_err_p99.9']:.1e}, {p['grad_loc_outliers']} outliers "
        f"over {p['grad_loc_outlier_threshold']:.1e} ({p['grad_loc_outliers_outside_rounding_points']} outside "
        f"the {p['rounding_points']} rounding points)"
    )


def skip_reason(command: str, dry_run: bool) -> str | None:
    """Why `command` cannot run here, or None. A build needs no GPU when $TORCH_CUDA_ARCH_LIST names the target."""
    if dry_run:
        return "--dry-run"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available() and not (command == "build" and os.environ.get("TORCH_CUDA_ARCH_LIST")):
        return "no CUDA device visible"
    return None


def dry_check(src: Path) -> str:
    """Apply the patches to a scratch copy when the sources are there; say what was checked."""
    if not all((src / name).is_file() for name in SOURCES):
        return f"official sources not in {src} (run `prepare --official-repo PATH`)"
    with tempfile.TemporaryDirectory() as scratch:
        applied = patch_sources(src, Path(scratch))
    return f"{len(applied)} patches apply to {src}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="copy the official sources into .official/src and write .official/bench.py")
    p.add_argument("--official-repo", type=Path, required=True, help="a checkout of fundamentalvision/Deformable-DETR")
    p.add_argument("--dest", type=Path, default=OFFICIAL)
    for name in ("build", "time"):
        p = sub.add_parser(name)
        p.add_argument("--build-dir", type=Path, default=ROOT / "build" / "official")
        p.add_argument("--src", type=Path, default=OFFICIAL / "src", help="the unpatched official sources")
        p.add_argument("--dry-run", action="store_true", help="check the patches only; print skip and exit 0")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--shapes",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=["encoder-800", "decoder", "encoder", "encoder-320"],  # the ones that matter most first
        help="comma-separated subset of encoder-800, decoder, encoder (512 x 768), encoder-320",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # msda.py's input maker and machine()
    sys.path.insert(0, str(ROOT))  # ddetr, not installed on the GPU machine
    try:
        if args.command == "prepare":
            print(f"wrote {prepare(args.official_repo, args.dest)}/src and bench.py")
            return 0
        reason = skip_reason(args.command, args.dry_run)
        if reason:
            print(
                f"skip: official kernel {args.command} not run ({reason}); "
                f"{dry_check(args.src)}; nothing built or written"
            )
            return 0
        from torch.utils import cpp_extension

        # The toolkit torch found (PATH, else /usr/local/cuda): ddetr's own build looks only at $CUDA_HOME and PATH.
        if cpp_extension.CUDA_HOME and not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME
        if args.command == "build":
            start = time.perf_counter()
            module = build(args.src, args.build_dir, verbose=True)
            print(f"built {module.__file__} in {time.perf_counter() - start:.0f} s")
            return 0
        unknown = sorted(set(args.shapes) - set(shapes_table()))
        if unknown:
            raise BaselineError(f"unknown shapes {unknown}; choose from {list(shapes_table())}")
        time_all(args)
    except BaselineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
