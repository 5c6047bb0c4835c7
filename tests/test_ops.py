"""The MSDA op: the reference against the definition, every compiled kernel against the reference, gradients,
torch.compile, determinism and argument checks. Compiled-op tests build `csrc/` once per session (about 30 s)."""

from __future__ import annotations

import pytest
import torch

from ddetr.ops import MSDeformAttn, build, ms_deform_attn, ms_deform_attn_reference
from ddetr.ops.gather import ms_deform_attn_gather
from ddetr.ops.ms_deform_attn import select_backend
from ddetr.ops.reference import ms_deform_attn_naive

# (N, level shapes, Lq, M, P): 1-4 levels, non-square levels, Lq != S, batch 1-3.
CONFIGS = [
    (1, [(3, 5)], 4, 1, 1),
    (2, [(4, 3), (2, 5)], 5, 2, 2),
    (3, [(5, 4), (3, 2), (1, 3)], 2, 2, 3),
    (2, [(6, 7), (3, 4), (2, 2), (1, 1)], 7, 3, 2),
]
# Tolerance of each dtype against the float64 reference, relative to the largest magnitude of the result.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def on_dyadic_grid(locations):
    """`locations` rounded to the nearest multiple of 2**-12, in their own dtype (and exactly so).

    Why: a kernel computes the pixel coordinate h = y * H - 0.5 (and w) in its coordinate dtype, the float64
    reference exactly. Where the exact h lies within half an fp32 ulp below an integer, fp32 rounds it onto the
    integer, the kernel's floor(h) picks the next cell, and grad_loc takes the other one-sided slope of the bilinear
    interpolation: an error of about attn * H * |second difference of value|, far beyond any tolerance. Uniform
    random fp32 locations hit that tens of times at encoder sizes. For y = k * 2**-12, y * H = k * H * 2**-12 and h
    are exact in fp32 while |y| * H < 2**12 (every level up to 2048 pixels a side for y in [-0.25, 1.25]), with one
    rounding (FMA) or two, so the kernel and the reference take the same cell; points landing exactly on pixel
    centres or on h = -1 are then computed identically on both sides too.
    """
    return (locations * 2**12).round() / 2**12


def make_inputs(N, shapes, Lq, M, P, D, dtype=torch.float64, device="cpu", spread=0.25, on_grid=False):
    """Random op inputs; locations span [-spread, 1 + spread] so some points fall partly or wholly outside.

    on_grid: put the locations on the 2**-12 grid (`on_dyadic_grid`), for fp32 kernels compared with a float64
    reference (not for gradcheck: the grid puts points exactly on pixel centres, where grad_loc has a kink).
    """
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(shapes)
    value = torch.randn(N, S, M, D, dtype=dtype, device=device)
    locations = torch.rand(N, Lq, M, L, P, 2, dtype=dtype, device=device) * (1 + 2 * spread) - spread
    if on_grid:
        locations = on_dyadic_grid(locations)
    weights = torch.rand(N, Lq, M, L * P, dtype=dtype, device=device).softmax(-1).view(N, Lq, M, L, P)
    return value, spatial_shapes, level_start_index, locations, weights


def forward_backward(fn, inputs, grad_output):
    """Output and the gradients of (value, sampling_locations, attention_weights) for one backend."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_output)
    return out.detach(), leaves[0].grad, leaves[3].grad, leaves[4].grad


def assert_close_scaled(actual, expected, tol, name):
    """|actual - expected| <= tol * max(1, max|expected|), compared in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def cpp(*inputs):
    return ms_deform_attn(*inputs, backend="cpp")


@pytest.mark.parametrize("config", CONFIGS)
def test_reference_matches_definition(config):
    inputs = make_inputs(*config, D=3)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), ms_deform_attn_naive(*inputs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS)
def test_gather_formulation_matches_reference(config, dtype):
    # Forward and the three gradients: the exported graph computes this function, training may too.
    inputs = make_inputs(*config, D=5, dtype=dtype)
    grad_output = torch.randn(config[0], config[2], config[3] * 5, dtype=dtype)
    got = forward_backward(ms_deform_attn_gather, inputs, grad_output)
    expected = forward_backward(ms_deform_attn_reference, inputs, grad_output)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), got, expected, strict=True):
        assert_close_scaled(a, b, TOLERANCE[dtype], name)


def test_gather_backend_is_selected_by_argument_and_environment(monkeypatch):
    inputs = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=4)
    torch.testing.assert_close(
        ms_deform_attn(*inputs, backend="gather"), ms_deform_attn_gather(*inputs), rtol=0, atol=0
    )
    monkeypatch.setenv("DDETR_MSDA", "gather")
    assert select_backend(None, torch.device("cpu")) == "gather"


@pytest.mark.parametrize("backend", ["reference", "cpp", "gather"])
def test_points_outside_read_zeros(backend):
    value, shapes, starts, locations, weights = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=4)
    # Far outside on every side: nothing is read and no gradient flows. The compiled op also treats NaN locations
    # as outside (grid_sample returns NaN for them).
    far = [-3.0, 4.0, -1e9, 1e9] + ([float("nan")] if backend == "cpp" else [])
    locations = torch.tensor(far, dtype=torch.float64)[torch.randint(len(far), locations.shape)]
    out, grad_value, grad_loc, grad_weights = forward_backward(
        lambda *t: ms_deform_attn(*t, backend=backend),
        (value, shapes, starts, locations, weights),
        torch.ones(2, 5, 8, dtype=torch.float64),
    )
    for t in (out, grad_value, grad_loc, grad_weights):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS[1:])
def test_cpu_kernel_matches_reference(config, dtype):
    inputs64 = make_inputs(*config, D=16)
    # Round to the tested dtype first, so both sides see the same numbers and only the arithmetic differs.
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs64]
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    grad_output = torch.randn(config[0], config[2], config[3] * 16, dtype=torch.float64).to(dtype)
    expected = forward_backward(ms_deform_attn_reference, exact, grad_output.double())
    actual = forward_backward(cpp, inputs, grad_output)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected, strict=True):
        assert a.dtype == dtype, name
        assert_close_scaled(a, e, TOLERANCE[dtype], name)


@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_kernel_vectorised_path_matches_reference(config):
    """float32 with D = 32 (the paper's heads) takes the kernel's hand-vectorised channel loops (with AVX2)."""
    inputs = [t.float() if t.is_floating_point() else t for t in make_inputs(*config, D=32)]
    grad_output = torch.randn(config[0], config[2], config[3] * 32)
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    expected = forward_backward(ms_deform_attn_reference, exact, grad_output.double())
    actual = forward_backward(cpp, inputs, grad_output)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected, strict=True):
        assert a.dtype == torch.float32, name
        assert_close_scaled(a, e, TOLERANCE[torch.float32], name)


def test_dyadic_grid_makes_pixel_coordinates_exact_in_float32():
    """Every grid point in [-0.25, 1.25] on every level size up to 2048: h = y * H - 0.5 in fp32, rounded once
    (an FMA, as nvcc compiles it) or twice, equals the exact value; off the grid, fp32 moves some h into another
    cell (the premise of `on_dyadic_grid`)."""
    y = on_dyadic_grid(torch.arange(-0.25, 1.25 + 2**-12, 2**-12, dtype=torch.float64))
    assert y.unique().numel() == y.numel() == 3 * 2**11 + 1
    for H in torch.arange(1, 2049, dtype=torch.float64).split(256):
        exact = y[:, None] * H - 0.5  # float64: exact for 13 + 11 significant bits
        two_roundings = y.float()[:, None] * H.float() - 0.5  # torch's CPU elementwise ops do not fuse
        assert torch.equal(exact.float().double(), exact)  # representable, so the one rounding of an FMA is exact
        assert torch.equal(two_roundings.double(), exact)
    near_centres = ((torch.arange(167, dtype=torch.float64) + 0.5) / 167).float()  # nearest fp32 to pixel centres
    h32, h64 = near_centres * 167 - 0.5, near_centres.double() * 167 - 0.5
    assert (h32.floor().double() != h64.floor()).any()
    on_grid = on_dyadic_grid(near_centres)
    assert torch.equal((on_grid * 167 - 0.5).double(), on_grid.double() * 167 - 0.5)


def _cell_flip_inputs(H=100, W=100, D=8):
    """One level, one point per query, at the fp32 numbers nearest to pixel centres (in y) whose fp32 h falls in
    another cell than the exact h; x off pixel centres. float32, and the same numbers in float64."""
    y = ((torch.arange(H, dtype=torch.float64) + 0.5) / H).float()
    y = y[(y * H - 0.5).floor().double() != (y.double() * H - 0.5).floor()]
    Lq = len(y)
    value, shapes, starts, _, weights = make_inputs(1, [(H, W)], Lq, 1, 1, D, dtype=torch.float32)
    x = torch.full_like(y, 0.3137)
    locations = torch.stack([x, y], -1).view(1, Lq, 1, 1, 1, 2)
    return [value, shapes, starts, locations, weights]


def test_dyadic_grid_keeps_the_cpu_kernel_in_the_reference_cell():
    """The failure `on_dyadic_grid` prevents, shown with the CPU kernel (which shares its coordinate math with the
    CUDA kernel): fp32 grad_loc is far off the float64 reference at points whose fp32 h changes cell, and within
    the GPU tests' fp32 tolerance once the same points are put on the grid."""
    inputs = _cell_flip_inputs()
    assert inputs[3].shape[1] > 10
    grad_output = torch.randn(1, inputs[3].shape[1], 8)
    for grid, should_match in ((False, False), (True, True)):
        if grid:
            inputs[3] = on_dyadic_grid(inputs[3])
        exact = [t.double() if t.is_floating_point() else t for t in inputs]
        expected = forward_backward(ms_deform_attn_reference, exact, grad_output.double())
        actual = forward_backward(cpp, inputs, grad_output)
        assert_close_scaled(actual[1], expected[1], 1e-4, "grad_value")  # the cell flip moves grad_loc only
        error = (actual[2].double() - expected[2]).abs().max().item()
        scale = max(1.0, expected[2].abs().max().item())
        assert (error <= 1e-4 * scale) == should_match, f"on grid: {grid}, grad_loc error {error:.3g}"


def test_cpu_kernel_matches_reference_on_the_grid_at_encoder_like_sizes():
    """fp32 with the GPU realistic-size test's inputs and tolerance, on fewer queries: locations on the grid, a few
    just outside, many exactly on pixel centres and on h or w = -1 (power-of-two levels)."""
    levels = [(32, 48), (16, 24), (25, 42), (13, 21)]
    inputs = make_inputs(1, levels, 600, 8, 4, 32, dtype=torch.float32, spread=0.02, on_grid=True)
    H = inputs[1][:, 0].view(1, 1, 1, 4, 1).double()
    h = inputs[3][..., 1].double() * H - 0.5
    assert (h == h.round()).sum() > 100 and (h == -1).any()
    grad_output = torch.randn(1, 600, 256)
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    expected = forward_backward(ms_deform_attn_reference, exact, grad_output.double())
    actual = forward_backward(cpp, inputs, grad_output)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected, strict=True):
        assert_close_scaled(a, e, 1e-4, name)


@pytest.mark.parametrize("D", [1, 30, 32, 64, 71])
@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_kernel_gradcheck(config, D):
    build.load_extension()
    inputs = [t.requires_grad_(t.is_floating_point()) for t in make_inputs(*config, D=D)]
    # The full Jacobian costs two forward calls per input element: on the larger inputs check random projections
    # of it instead (gradcheck's fast mode), which still fails for any wrong gradient entry with probability ~1.
    fast = inputs[0].numel() > 1000
    assert torch.autograd.gradcheck(torch.ops.ddetr.ms_deform_attn_forward, inputs, eps=1e-6, atol=1e-7, fast_mode=fast)


def test_opcheck():
    inputs = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=8)
    build.load_extension()
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_forward.default, inputs)
    leaves = [t.requires_grad_(t.is_floating_point()) for t in make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=8)]
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_forward.default, leaves)
    grad_output = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_backward.default, (grad_output, *inputs, True))


def _module_inputs(N=2, shapes=((6, 5), (3, 3)), C=32):
    shapes_t = torch.tensor(shapes)
    sizes = shapes_t.prod(1)
    S = int(sizes.sum())
    return (
        torch.randn(N, 7, C),
        torch.rand(N, 7, len(shapes), 2),
        torch.randn(N, S, C),
        shapes_t,
        torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]),
    )


def test_module_under_torch_compile_matches_eager():
    module = MSDeformAttn(d_model=32, n_levels=2, nheads=4, n_points=2, backend="cpp")
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)  # non-trivial offsets and weights
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    inputs = _module_inputs()
    eager = module(*inputs)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(*inputs)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for p, g in zip(module.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_module_matches_reference_backend():
    module = MSDeformAttn(d_model=32, n_levels=2, nheads=4, n_points=2)
    inputs = _module_inputs()
    module.backend = "reference"
    expected = module(*inputs)
    module.backend = "cpp"
    torch.testing.assert_close(module(*inputs), expected, rtol=1e-5, atol=1e-6)


def test_cpu_backward_is_deterministic():
    inputs = make_inputs(2, [(8, 6), (4, 3)], 40, 2, 4, D=32, dtype=torch.float32, spread=0.0)
    grad_output = torch.randn(2, 40, 64)
    first = forward_backward(cpp, inputs, grad_output)
    second = forward_backward(cpp, inputs, grad_output)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _replace(inputs, index, tensor):
    return tuple(tensor if i == index else t for i, t in enumerate(inputs))


BAD_INPUTS = [
    # (what, index of the argument to replace, function of the good inputs giving the bad one, error, message)
    ("value rank", 0, lambda t: t[0][0], ValueError, r"value must be \(N, S, M, D\)"),
    ("shapes rank", 1, lambda t: t[1][:, :1], ValueError, r"spatial_shapes must be \(L, 2\)"),
    ("start length", 2, lambda t: t[2][:1], ValueError, r"level_start_index must be \(L,\) = \(2,\)"),
    ("locations rank", 3, lambda t: t[3][..., 0, :], ValueError, r"sampling_locations must be \(N, Lq, M, L, P, 2\)"),
    ("locations heads", 3, lambda t: t[3][:, :, :1], ValueError, r"sampling_locations must be .* = \(2, Lq, 2, 2"),
    ("weights shape", 4, lambda t: t[4][..., :1], ValueError, r"attention_weights must be \(N, Lq, M, L, P\)"),
    ("levels sum", 1, lambda t: t[1] + 1, ValueError, r"must sum to S"),
    ("start values", 2, lambda t: t[2] + 1, ValueError, r"level_start_index .* does not match"),
    ("integer value", 0, lambda t: t[0].long(), TypeError, r"value must be a floating-point tensor"),
    ("float shapes", 1, lambda t: t[1].float(), TypeError, r"spatial_shapes must be an integer tensor"),
    ("integer weights", 4, lambda t: t[4].int(), TypeError, r"attention_weights must be a floating-point tensor"),
    ("device", 3, lambda t: t[3].to("meta"), ValueError, r"sampling_locations is on meta but value is on cpu"),
]


@pytest.mark.parametrize("what, index, make_bad, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs_name_the_argument(backend, what, index, make_bad, error, message):
    good = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=4)
    with pytest.raises(error, match=message):
        ms_deform_attn(*_replace(good, index, make_bad(good)), backend=backend)


def test_compiled_op_checks_its_inputs_too():
    good = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=4)
    build.load_extension()
    with pytest.raises(RuntimeError, match="attention_weights must be"):
        torch.ops.ddetr.ms_deform_attn_forward(*_replace(good, 4, good[4][..., :1]))
    # A level table that does not fit value's S, as only a direct call can pass: an error, not a wild read or write.
    too_big = torch.tensor([[4, 3], [3, 5]])
    with pytest.raises(RuntimeError, match="level 1 of spatial_shapes .* does not fit in value's S = 22"):
        torch.ops.ddetr.ms_deform_attn_forward(*_replace(good, 1, too_big))
    grad = torch.ones(2, 5, 2 * 4)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.ddetr.ms_deform_attn_backward(grad, *_replace(good, 1, too_big), False)


def test_fake_backward_is_contiguous_like_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    build.load_extension()
    value, shapes, starts, locations, weights = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=8)
    # Non-contiguous views of every floating input: the kernel's gradients are contiguous all the same.
    value = value.transpose(2, 3).contiguous().transpose(2, 3)
    locations = locations.transpose(0, 1).contiguous().transpose(0, 1)
    weights = weights.transpose(0, 1).contiguous().transpose(0, 1)
    grad_output = torch.randn(2, 5, 16, dtype=torch.float64)
    args = (grad_output, value, shapes, starts, locations, weights, True)
    real = torch.ops.ddetr.ms_deform_attn_backward(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.ddetr.ms_deform_attn_backward(
            *[mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
        )
    for r, f, t in zip(real, fake, (value, locations, weights), strict=True):
        assert r.is_contiguous() and not t.is_contiguous()
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype)


@pytest.mark.gpu
def test_public_function_does_not_synchronise_on_cuda():
    """`ms_deform_attn` on CUDA inputs (spatial_shapes included) never reads a device tensor back to the host."""
    inputs = make_inputs(2, [(8, 6), (4, 3)], 40, 2, 4, D=32, dtype=torch.float32, device="cuda")
    inputs = [t.requires_grad_(t.is_floating_point()) for t in inputs]
    grad_output = torch.randn(2, 40, 64, device="cuda")
    cpp(*inputs).backward(grad_output)  # first call: builds, loads and logs outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cpp(*inputs).backward(grad_output)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
