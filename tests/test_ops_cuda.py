"""The CUDA kernel of the MSDA op against the CPU kernel and the float64 reference (all skipped without a GPU).

Covers the thread mapping (D from 1 to 256: group widths 1-32, every vector width, channel chunks), layouts
(non-contiguous, misaligned, expanded), points outside / on the boundary / NaN, empty inputs, both backward modes
(atomic, and deterministic fixed point), streams, CUDA graphs, torch.compile and the device-side level guard.
Random locations of the tests that compare fp32 (or fp32-coordinate) results with a float64 computation lie on a
2**-12 grid (`make_inputs(on_grid=True)`, see `on_dyadic_grid`): there h = y * H - 0.5 is exact in fp32, so the
kernel and the reference take the same bilinear cell even at pixel centres, where grad_loc's one-sided derivative
would otherwise depend on the last bit of h. Hand-placed locations are kept off pixel centres.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_ops import TOLERANCE, assert_close_scaled, cpp, forward_backward, make_inputs

from ddetr.ops import MSDeformAttn, build, ms_deform_attn_reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
NAMES = ("output", "grad_value", "grad_locations", "grad_weights")
LEVELS_512 = [(64, 96), (32, 48), (16, 24), (8, 12)]


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request, monkeypatch):
    """Both CUDA backward modes, chosen as users choose them (the environment variable)."""
    monkeypatch.setenv("DDETR_MSDA_DETERMINISTIC", "1" if request.param else "0")
    return request.param


def _cast(inputs, dtype=None, device=None):
    return [t.to(dtype=dtype if t.is_floating_point() else None, device=device) for t in inputs]


def _assert_matches_cpu(inputs, grad_output, dtype, tol=None):
    """CUDA results in `dtype` against the CPU kernel run in float64 on the same (rounded) numbers."""
    expected = forward_backward(cpp, _cast(inputs, torch.float64, "cpu"), grad_output.double().cpu())
    actual = forward_backward(cpp, _cast(inputs, device="cuda"), grad_output.cuda())
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.is_cuda, name
        assert_close_scaled(a, e, tol or TOLERANCE[dtype], name)
    return actual


def _direct(inputs, grad_output, deterministic):
    """The ops themselves (no Python checks, no autograd): output and the three gradients."""
    build.load_extension()
    out = torch.ops.ddetr.ms_deform_attn_forward(*inputs)
    grads = torch.ops.ddetr.ms_deform_attn_backward(grad_output, *inputs, deterministic)
    return (out, *grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 2, 8, 12, 16, 24, 30, 32, 64, 71, 256])
def test_cuda_kernel_matches_cpu_kernel(dtype, D, deterministic):
    inputs = _cast(make_inputs(2, [(6, 7), (3, 4), (2, 2)], 9, 3, 2, D, on_grid=True), dtype)
    grad_output = torch.randn(2, 9, 3 * D).to(dtype)
    actual = _assert_matches_cpu(inputs, grad_output, dtype)
    for name, a in zip(NAMES, actual, strict=True):
        assert a.dtype == dtype, name


@pytest.mark.parametrize("D", [1, 30, 32, 71])
def test_cuda_kernel_gradcheck(D, deterministic):
    inputs = [
        t.requires_grad_(t.is_floating_point()) for t in make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D, device="cuda")
    ]
    # fp64 atomics add in a varying order: allow their rounding between repeated backward calls.
    nondet_tol = 0.0 if deterministic else 1e-12
    assert torch.autograd.gradcheck(cpp, inputs, eps=1e-6, atol=1e-7, nondet_tol=nondet_tol)


def test_points_outside_read_zeros(deterministic):
    value, shapes, starts, locations, weights = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=4, device="cuda")
    far = torch.tensor([-3.0, 4.0, -1e9, 1e9, float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    locations = far[torch.randint(len(far), locations.shape)].cuda()
    actual = forward_backward(
        cpp, (value, shapes, starts, locations, weights), torch.ones(2, 5, 8, device="cuda").double()
    )
    for name, t in zip(NAMES, actual, strict=True):
        assert torch.equal(t, torch.zeros_like(t)), name


def test_exact_boundaries_match_the_cpu(deterministic):
    """w = -1 and w = W (and h likewise), exact in binary with H, W powers of two.

    Both kernels count h >= -1 as inside (grid_sample's convention): the output there is 0 but grad_loc is not. The
    official kernel's strict h > -1 gives a zero gradient instead; that difference is deliberate.
    """
    H, W = 8, 4
    value, shapes, starts, locations, weights = make_inputs(1, [(H, W)], 4, 1, 1, D=8)
    off = torch.tensor([0.3, 0.6, 0.35, 0.7], dtype=torch.float64)  # off pixel centres on the other axis
    x = torch.tensor([-0.5 / W, 1 + 0.5 / W, 0.0, 0.0], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, -0.5 / H, 1 + 0.5 / H], dtype=torch.float64)
    x[2:], y[:2] = off[2:], off[:2]
    locations = torch.stack([x, y], -1).view(1, 4, 1, 1, 1, 2)
    inputs = (value, shapes, starts, locations, weights)
    grad_output = torch.randn(1, 4, 8, dtype=torch.float64)
    expected = forward_backward(cpp, inputs, grad_output)
    actual = forward_backward(cpp, _cast(inputs, device="cuda"), grad_output.cuda())
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-12, atol=1e-12, msg=name)
    out, _, grad_loc, _ = actual
    assert torch.equal(out, torch.zeros_like(out))  # every corner read has weight 0 or lies outside
    assert (grad_loc[0, 0, 0, 0, 0].abs() > 0).any() and (grad_loc[0, 2, 0, 0, 0].abs() > 0).any()  # h or w = -1
    assert torch.equal(grad_loc[0, 1], torch.zeros_like(grad_loc[0, 1]))  # w = W: outside
    assert torch.equal(grad_loc[0, 3], torch.zeros_like(grad_loc[0, 3]))  # h = H: outside


@pytest.mark.parametrize(
    "N, shapes, Lq, P",
    [
        (0, [(4, 3), (2, 5)], 5, 2),
        (2, [(4, 3), (2, 5)], 0, 2),
        (2, [(4, 3), (2, 5)], 5, 0),
        (2, [(4, 3), (0, 5)], 5, 2),
    ],
    ids=["N=0", "Lq=0", "P=0", "empty level"],
)
def test_zero_sized_inputs(N, shapes, Lq, P, deterministic):
    inputs = make_inputs(N, shapes, Lq, 2, P, D=8)
    _assert_matches_cpu(inputs, torch.randn(N, Lq, 16, dtype=torch.float64), torch.float64)
    out, *grads = _direct(
        _cast(inputs, device="cuda"), torch.randn(N, Lq, 16, dtype=torch.float64, device="cuda"), deterministic
    )
    for g, t in zip(grads, (inputs[0], inputs[3], inputs[4]), strict=True):
        assert g.shape == t.shape and g.is_contiguous()


def _misaligned(t):
    """The same values in a contiguous tensor whose data pointer is one element past an aligned one (VEC = 1)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["permuted value", "misaligned value", "strided locations", "expanded grad"])
def test_layouts(layout, dtype, deterministic):
    """Direct op calls (autograd would copy or make these contiguous first), against the CPU kernel."""
    inputs = _cast(make_inputs(2, [(6, 7), (3, 4)], 9, 4, 2, D=32, on_grid=True), dtype)
    grad_output = torch.randn(2, 9, 128).to(dtype)
    value, shapes, starts, locations, weights = _cast(inputs, device="cuda")
    grad = grad_output.cuda()
    if layout == "permuted value":
        value = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert not value.is_contiguous()
    elif layout == "misaligned value":
        value = _misaligned(value)
        assert value.data_ptr() % 16 != 0
    elif layout == "strided locations":
        locations = locations.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not locations.is_contiguous()
    else:
        grad_output = torch.ones(1, dtype=dtype).expand(2, 9, 128)
        grad = grad_output.cuda()
    expected = _direct(_cast(inputs, torch.float64), grad_output.double(), True)
    leaves = (value, shapes, starts, locations, weights)
    actual = _direct(leaves, grad, deterministic)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.is_contiguous(), name
        assert_close_scaled(a, e, TOLERANCE[dtype], name)
    # Real and fake kernels agree on shapes and strides with these layouts (the fake is what torch.compile sees).
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_backward.default, (grad, *leaves, deterministic))


@pytest.mark.parametrize(
    "value_dtype, coord_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64)],
)
def test_mixed_dtypes(value_dtype, coord_dtype, deterministic):
    value, shapes, starts, locations, weights = make_inputs(2, [(6, 7), (3, 4)], 9, 2, 2, D=16, on_grid=True)
    inputs = (value.to(value_dtype), shapes, starts, locations.to(coord_dtype), weights.to(coord_dtype))
    grad_output = torch.randn(2, 9, 32).to(value_dtype)
    actual = _assert_matches_cpu(inputs, grad_output, value_dtype)
    assert [t.dtype for t in actual] == [value_dtype, value_dtype, coord_dtype, coord_dtype]


def _model_inputs(N, levels, Lq, dtype, M=8, D=32, P=4):
    """Inputs of the model's sizes; uniform random locations on the 2**-12 grid, a few just outside the map.

    Off the grid, fp32 moves tens of points into another cell than the float64 reference at encoder sizes.
    """
    inputs = make_inputs(N, levels, Lq, M, P, D, dtype=torch.float32, device="cuda", spread=0.02, on_grid=True)
    return _cast(inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["encoder-512", "decoder", "encoder-800"])
def test_realistic_sizes_match_the_reference(shape, dtype, deterministic):
    levels = [(100, 167), (50, 84), (25, 42), (13, 21)] if shape == "encoder-800" else LEVELS_512
    S = sum(h * w for h, w in levels)
    Lq = 300 if shape == "decoder" else S
    inputs = _model_inputs(2, levels, Lq, dtype)
    grad_output = torch.randn(2, Lq, 256, device="cuda").to(dtype)
    expected = forward_backward(ms_deform_attn_reference, _cast(inputs, torch.float64), grad_output.double())
    actual = forward_backward(cpp, inputs, grad_output)
    # Thousands of atomics per value row at these sizes: fp32 sums lose a few more bits than on the small tests.
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert_close_scaled(a, e, tol, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_is_bitwise_reproducible(dtype, monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_DETERMINISTIC", "1")
    inputs = _cast(make_inputs(2, [(16, 12), (8, 6)], 200, 4, 4, 32, device="cuda"), dtype)
    grad_output = torch.randn(2, 200, 128, device="cuda").to(dtype)
    first = forward_backward(cpp, inputs, grad_output)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second = forward_backward(cpp, inputs, grad_output)
    torch.cuda.current_stream().wait_stream(side)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name
    monkeypatch.setenv("DDETR_MSDA_DETERMINISTIC", "0")
    atomic = forward_backward(cpp, inputs, grad_output)
    for name, a, b in zip(NAMES, atomic, first, strict=True):
        assert_close_scaled(a, b, TOLERANCE[dtype], name)
    # grad_loc and grad_attn never use atomics (a fixed shuffle order): bitwise reproducible in the atomic mode too.
    again = forward_backward(cpp, inputs, grad_output)
    for name, a, b in zip(NAMES[2:], atomic[2:], again[2:], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_hot_spot(dtype, deterministic):
    """Every query of every head samples the same point: maximal contention on 4 value rows per (image, level)."""
    value, shapes, starts, locations, weights = make_inputs(2, LEVELS_512, 4000, 8, 4, 32, device="cuda")
    locations = torch.full_like(locations, 0.4321)  # off every level's pixel centres
    inputs = _cast((value, shapes, starts, locations, weights), dtype)
    grad_output = torch.randn(2, 4000, 256, device="cuda").to(dtype)
    forward_backward(cpp, inputs, grad_output)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    actual = forward_backward(cpp, inputs, grad_output)
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 2.0
    expected = forward_backward(ms_deform_attn_reference, _cast(inputs, torch.float64), grad_output.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert_close_scaled(a, e, tol, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_output_element_is_written(dtype, deterministic):
    """at::empty outputs are NaN-filled under fill_uninitialized_memory: any element a kernel skips shows up."""
    inputs = _cast(make_inputs(2, [(6, 7), (3, 4), (0, 3)], 9, 3, 2, 71, device="cuda", spread=1.0), dtype)
    grad_output = torch.randn(2, 9, 3 * 71, device="cuda").to(dtype)
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        results = _direct(inputs, grad_output, deterministic)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = previous
    for name, t in zip(NAMES, results, strict=True):
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_grad_output_gives_non_finite_grad_value(bad, deterministic):
    """What a GradScaler relies on: an Inf or NaN in grad_output shows up in grad_value (in deterministic mode the
    fixed-point bound is then not finite, and the whole of grad_value is NaN)."""
    inputs = make_inputs(2, [(6, 7), (3, 4)], 9, 2, 2, D=16, dtype=torch.float32, device="cuda", spread=0.0)
    grad_output = torch.randn(2, 9, 32, device="cuda")
    grad_output[1, 3, 5] = bad
    _, grad_value, _, _ = _direct(inputs, grad_output, deterministic)
    assert not torch.isfinite(grad_value).all()
    if deterministic:
        assert torch.isnan(grad_value).all()


def test_inconsistent_levels_are_read_as_empty(deterministic):
    """spatial_shapes claiming more rows than value has (only a direct call can pass that): the device-side guard
    skips the level (zero contribution, zero gradients) instead of reading or adding out of bounds."""
    value, shapes, starts, locations, weights = make_inputs(2, [(6, 7), (3, 4)], 9, 2, 2, D=16, device="cuda")
    grad_output = torch.randn(2, 9, 32, dtype=torch.float64, device="cuda")
    bad_shapes = shapes.clone()
    bad_shapes[1] = torch.tensor([300, 400])
    out, grad_value, grad_loc, grad_attn = _direct(
        (value, bad_shapes, starts, locations, weights), grad_output, deterministic
    )
    torch.cuda.synchronize()
    only_first = weights.clone()
    only_first[:, :, :, 1] = 0
    expected = _direct((value, shapes, starts, locations, only_first), grad_output, deterministic)
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(grad_value, expected[1])
    assert torch.equal(grad_loc[:, :, :, 1], torch.zeros_like(grad_loc[:, :, :, 1]))
    assert torch.equal(grad_attn[:, :, :, 1], torch.zeros_like(grad_attn[:, :, :, 1]))
    torch.testing.assert_close(grad_loc[:, :, :, 0], expected[2][:, :, :, 0])


def test_grad_output_on_another_device_is_an_error():
    inputs = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=8, device="cuda")
    build.load_extension()
    with pytest.raises(RuntimeError, match="grad_output must be on value's device"):
        torch.ops.ddetr.ms_deform_attn_backward(torch.randn(2, 5, 16, dtype=torch.float64), *inputs, False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_inputs_on_a_second_gpu(deterministic):
    inputs = make_inputs(2, [(6, 7), (3, 4)], 9, 2, 2, D=16)
    grad_output = torch.randn(2, 9, 32, dtype=torch.float64)
    expected = forward_backward(cpp, inputs, grad_output)
    with torch.cuda.device(0):
        actual = forward_backward(cpp, _cast(inputs, device="cuda:1"), grad_output.to("cuda:1"))
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.device == torch.device("cuda:1"), name
        assert_close_scaled(a, e, TOLERANCE[torch.float64], name)


def test_side_stream_without_synchronisation(deterministic):
    """Inputs made on a side stream and used there: the kernels run on the current stream, not the default one."""
    build.load_extension()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        inputs = make_inputs(2, [(16, 12), (8, 6)], 200, 4, 4, 32, dtype=torch.float32, device="cuda")
        grad_output = torch.randn(2, 200, 128, device="cuda")
        actual = _direct(inputs, grad_output, deterministic)
    side.synchronize()
    expected = _direct(inputs, grad_output, deterministic)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert_close_scaled(a, e, TOLERANCE[torch.float32], name)


def test_cuda_graph_capture(deterministic):
    inputs = make_inputs(2, [(16, 12), (8, 6)], 200, 4, 4, 32, dtype=torch.float32, device="cuda")
    grad_output = torch.randn(2, 200, 128, device="cuda")
    build.load_extension()
    expected = _direct(inputs, grad_output, deterministic)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
        _direct(inputs, grad_output, deterministic)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _direct(inputs, grad_output, deterministic)
    graph.replay()
    torch.cuda.synchronize()
    for name, a, e in zip(NAMES, captured, expected, strict=True):
        assert_close_scaled(a, e, TOLERANCE[torch.float32], name)


def test_no_host_synchronisation(deterministic):
    inputs = make_inputs(2, [(16, 12), (8, 6)], 200, 4, 4, 32, dtype=torch.float32, device="cuda")
    grad_output = torch.randn(2, 200, 128, device="cuda")
    build.load_extension()
    _direct(inputs, grad_output, deterministic)  # first call: nothing lazily initialised inside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        _direct(inputs, grad_output, deterministic)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_module_under_inductor(deterministic):
    module = MSDeformAttn(d_model=64, n_levels=2, nheads=4, n_points=2, backend="cpp").cuda()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    shapes = torch.tensor([(12, 10), (6, 5)], device="cuda")
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    query, value = torch.randn(2, 30, 64, device="cuda"), torch.randn(2, S, 64, device="cuda")
    reference_points = torch.rand(2, 30, 2, 2, device="cuda") * 0.9 + 0.05
    eager = module(query, reference_points, value, shapes, starts)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    compiled = torch.compile(module, backend="inductor", fullgraph=True)(query, reference_points, value, shapes, starts)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(module.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_cuda_opcheck():
    inputs = make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=8, device="cuda")
    build.load_extension()
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_forward.default, inputs)
    leaves = [
        t.requires_grad_(t.is_floating_point()) for t in make_inputs(2, [(4, 3), (2, 5)], 5, 2, 2, D=8, device="cuda")
    ]
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_forward.default, leaves)
    grad_output = torch.randn(2, 5, 16, dtype=torch.float64, device="cuda")
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_backward.default, (grad_output, *inputs, deterministic))
