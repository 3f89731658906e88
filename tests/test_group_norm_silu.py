"""group_norm_silu: the Triton kernels (interpreter here, GPU when lent) against the fp64 reference, and the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, TOL, assert_close, strided
from op_contract import OpContract
from torch import nn
from vdm_fast.kernels._common import next_pow2

import vdm_fast
from vdm_fast import ops
from vdm_fast import reference as ref
from vdm_fast.layers import GroupNormSiLU
from vdm_fast.reference.group_norm_silu import memory_format

CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _kernels():
    from vdm_fast.kernels import group_norm_silu as k

    return k


def _inputs(shape, dtype, *, w=True, b=True, scale=True, shift=True, fmt=False, device=DEVICE, param_dtype=None):
    B, C = shape[:2]
    x = torch.randn(shape, device=device) * 2 + 0.5
    x = x.to(dtype)
    if fmt:
        x = x.contiguous(memory_format=CL[len(shape)])
    pd = param_dtype or dtype
    w = (torch.randn(C, device=device) * 0.5 + 1).to(pd) if w else None
    b = torch.randn(C, device=device).to(pd) if b else None
    scale = (torch.randn(B, C, device=device) * 0.5).to(pd) if scale else None
    shift = torch.randn(B, C, device=device).to(pd) if shift else None
    return x, w, b, scale, shift


def _run(inputs, G, per_frame=False, activation="silu", backend="triton"):
    """Output and gradients of every tensor input (None where absent), through ops.group_norm_silu."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    with vdm_fast.backend(backend):
        y = ops.group_norm_silu(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                                activation=activation, per_frame=per_frame)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), dy, [t.grad if t is not None else None for t in leaves]


def _reference(inputs, G, dy, per_frame=False, activation="silu"):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y = ref.group_norm_silu(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                            activation=activation, per_frame=per_frame)
    y.backward(dy.double())  # the reference takes the same (rounded) output gradient
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(inputs, G, per_frame=False, activation="silu", tol=None):
    x = inputs[0]
    tol = tol or max(TOL[x.dtype], 1e-5)
    y, dy, grads = _run(inputs, G, per_frame, activation)
    want, want_grads = _reference(inputs, G, dy, per_frame, activation)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == x.contiguous(memory_format=memory_format(x)).stride()
    assert_close(y, want, tol, "y")
    for name, g, wg, t in zip(("dx", "dweight", "dbias", "dscale", "dshift"), grads, want_grads, inputs):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, wg, tol, name)


# (shape, num_groups, per_frame): odd sizes, one group, C groups, a 64-channel group, 3-D / 4-D / 5-D; channels_last
# with 2, 3 and 4 channels per group (several groups per program), and a 4-channel bf16-aligned case.
SHAPES = [
    ((2, 8, 5, 6), 2, False),
    ((3, 6, 7), 3, False),
    ((2, 12, 3, 4, 5), 4, True),
    ((2, 12, 3, 4, 5), 3, False),
    ((2, 64, 3, 3), 1, False),
    ((1, 10, 5, 33, 17), 5, True),
    ((2, 16, 2, 4, 4), 4, True),
]


class TestGroupNormSiLUContract(OpContract):
    """The shared op contract (tests/op_contract.py) on every shape above, contiguous and channels_last(_3d): fp64
    reference agreement of y and every gradient within k x the same-precision baseline, strided views, opcheck,
    torch.compile (aot_eager and Inductor), bad input, bitwise-deterministic backward, device mix."""

    differentiable = ("x", "weight", "bias", "scale", "shift")
    # The interpreter casts fp32 to bf16/fp16 by truncation (up to one ulp, where the GPU rounds to nearest: half an
    # ulp), so the allowance beyond k x baseline is two unit roundoffs.
    tiny_factor = 2.0
    cases = [(f"{'x'.join(map(str, shape))}-G{G}{'-pf' if pf else ''}-{'cl' if cl else 'cf'}",
              dict(shape=shape, G=G, per_frame=pf, cl=cl))
             for shape, G, pf in SHAPES for cl in (False, True) if not (cl and len(shape) == 3)]
    bad_inputs = [
        (dict(x=torch.randn(2, 6)), ValueError, "x"),
        (dict(x=torch.randn(2, 6, 1, 1, 1, 1)), ValueError, "x"),
        (dict(x=torch.randint(0, 3, (2, 6, 4))), TypeError, "x"),
        (dict(x=[[0.0] * 4] * 6), TypeError, "x"),
        (dict(num_groups=4), ValueError, "num_groups"),
        (dict(num_groups=0), ValueError, "num_groups"),
        (dict(num_groups=2.0), TypeError, "num_groups"),
        (dict(num_groups=True), TypeError, "num_groups"),
        (dict(weight=torch.randn(5)), ValueError, "weight"),
        (dict(bias=torch.randn(6, 1)), ValueError, "bias"),
        (dict(scale=torch.randn(6)), ValueError, "scale"),
        (dict(scale=torch.randn(3, 6)), ValueError, "scale"),
        (dict(shift=torch.randn(2, 6, 1)), ValueError, "shift"),
        (dict(scale=torch.randint(0, 2, (2, 6))), TypeError, "scale"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="1e-5"), TypeError, "eps"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(per_frame=1), TypeError, "per_frame"),
        (dict(weight=[1.0] * 6), TypeError, "weight"),
    ]

    def make_inputs(self, params, dtype, device):
        shape = params["shape"]
        x, w, b, s, sh = _inputs(shape, dtype, fmt=params["cl"], device=device)
        return dict(x=x, num_groups=params["G"], weight=w, bias=b, eps=1e-5, scale=s, shift=sh,
                    activation="silu", per_frame=params["per_frame"])

    def bad_base(self):
        return dict(x=torch.randn(2, 6, 4), num_groups=3, weight=None, bias=None, eps=1e-5, scale=None, shift=None,
                    activation="silu", per_frame=False)

    def reference(self, x, num_groups, weight, bias, eps, scale, shift, activation, per_frame):
        return ref.group_norm_silu(x, num_groups, weight, bias, eps, scale=scale, shift=shift, activation=activation,
                                   per_frame=per_frame)

    def fast(self, x, num_groups, weight, bias, eps, scale, shift, activation, per_frame):
        y = ops.group_norm_silu(x, num_groups, weight, bias, eps, scale=scale, shift=shift, activation=activation,
                                per_frame=per_frame)
        if not torch.compiler.is_compiling():  # the output takes x's memory format
            assert y.stride() == torch.empty_like(x, memory_format=memory_format(x)).stride()
        return y

    def opcheck_cases(self):
        return [dict(shape=(1, 4, 2, 2, 2), G=2, per_frame=True, cl=True)]  # fp32: 2 groups per program

    def opcheck_calls(self, inputs):
        x, G, w, b, s, sh, pf = (inputs[k] for k in ("x", "num_groups", "weight", "bias", "scale", "shift",
                                                     "per_frame"))
        op = torch.ops.vdm_fast.group_norm_silu.default
        with vdm_fast.backend("triton"):
            y, stats = op(x.detach(), G, w.detach(), b.detach(), 1e-5, s.detach(), sh.detach(), True, pf, "triton")
        bwd = torch.ops.vdm_fast.group_norm_silu_backward.default
        return [(op, (x, G, w, b, 1e-5, s, sh, True, pf, "triton")),
                (op, (x.detach(), G, None, None, 1e-6, None, None, False, pf, "triton")),
                (bwd, (torch.randn_like(y), x.detach(), stats, G, w.detach(), b.detach(), s.detach(), sh.detach(),
                       True, pf, "triton")),
                (bwd, (torch.randn_like(y), x.detach(), stats, G, None, None, None, None, False, pf, "triton"))]


def _fresh_plans(k, monkeypatch, **constants):
    """Set launcher constants for one test (plans are cached per shape: the cache is emptied around it)."""
    for name, value in constants.items():
        monkeypatch.setattr(k, name, value)
    monkeypatch.setattr(k, "_PLANS", {})


@pytest.fixture
def small_tiles(monkeypatch):
    """Rows too long for a tile and many programs wanted: the chunked path (phases 1, 2), several tiles and a few
    chunks per row, in waves of rows (an L2 of a few hundred bytes)."""
    k = _kernels()
    _fresh_plans(k, monkeypatch, ONCHIP_MAX=8, ONCHIP_MAX_BWD=8, STREAM_TILE=32, TARGET_PROGRAMS=40, L2_BYTES=800)
    return k


@pytest.mark.parametrize("shape,G,per_frame,fmt,dtype", [((2, 6, 5, 7), 2, False, True, torch.bfloat16),
                                                         ((1, 12, 2, 3, 11), 1, False, False, torch.float32)])
def test_chunked_path_matches_reference(small_tiles, shape, G, per_frame, fmt, dtype):
    x = _inputs(shape, dtype, fmt=fmt)
    for backward in (False, True):
        p = small_tiles.plan(x[0], G, per_frame, backward)
        assert p.phases == (1, 2) and p.n_chunks > 1 and not p.constexprs["ONCHIP"], "the test must cut rows"
        assert len(p.launches) > 1 or p.rows == 1, "and run them in waves"
    _check(x, G, per_frame)


@pytest.mark.parametrize("shape,G,per_frame,fmt,dtype", [((2, 16, 2, 3, 4), 4, True, True, torch.bfloat16),
                                                         ((4, 64, 3, 3), 1, False, False, torch.float16)])
def test_two_sweep_persistent_path_matches_reference(monkeypatch, shape, G, per_frame, fmt, dtype):
    """Rows too long for a tile, rows enough: a persistent grid smaller than the row count (L2-bounded), each
    program sweeping its rows twice; channel blocks narrower than a group (64 channels in blocks of 16)."""
    k = _kernels()
    x = _inputs(shape, dtype, fmt=fmt)
    _fresh_plans(k, monkeypatch, ONCHIP_MAX=8, ONCHIP_MAX_BWD=8, STREAM_TILE=32, TARGET_PROGRAMS=4, SMS=1,
                 MAX_BLOCK_C=16)
    row_bytes = x[0].numel() * x[0].element_size() // k.plan(x[0], G, per_frame).rows
    _fresh_plans(k, monkeypatch, L2_BYTES=4 * row_bytes)  # 2 rows resident forward, 1 backward (x and dy)
    assert k.plan(x[0], G, per_frame).constexprs["GPP"] == (2 if fmt else 1)  # bf16 4 channels: 2 groups a program
    for backward in (False, True):
        p = k.plan(x[0], G, per_frame, backward)
        assert p.phases == (0,) and not p.constexprs["ONCHIP"] and len(p.launches) == 1
        assert p.launches[0].grid[0] < p.rows, "fewer programs than rows: each program loops over rows"
    _check(x, G, per_frame)


def test_plan_for_the_unet_cases():
    """Every U-Net case (per-frame, 32 groups, T = 16, base widths 128 and 256) holds its rows on chip forward and
    reads x once; channels_last with 12 bf16 channels per group takes 2 groups per program (48 bytes per position:
    128-bit accesses); the kernels' constexprs say which path runs."""
    k = _kernels()
    for shape, G, per_frame, cl in k.UNET_CASES:
        x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        p = k.plan(x, G, per_frame)
        Cg = shape[1] // G
        padded = next_pow2(Cg) * next_pow2(shape[3] * shape[4])
        assert p.constexprs["ONCHIP"] or padded > k.ONCHIP_MAX // 2, (shape, cl)  # 28 channels: 32 x 1024
        assert p.phases == (0,) and len(p.launches) == 1, (shape, cl)
        assert p.constexprs["BLOCK_C"] * p.constexprs["BLOCK_S"] <= k.ONCHIP_MAX
        gpp = p.constexprs["GPP"]
        assert (gpp * Cg * 2) % 8 == 0, (shape, gpp)  # at least 64-bit runs per position in channels_last
        assert gpp == (2 if cl and Cg == 12 else 1), (shape, gpp)  # 4 channels: 64-bit, no spills (notes)
        pb = k.plan(x, G, per_frame, backward=True)
        assert pb.phases == (0,) and len(pb.launches) == 1, (shape, cl)  # one launch, whole rows
        assert p.rows == shape[0] * (G // gpp) * shape[2] and not p.copy_x and not p.constexprs["INT64"]
    few = k.plan(torch.empty(1, 64, 16, 128, 128, device="meta"), 1, False)  # one 16M-element row
    assert few.phases == (1, 2) and few.n_chunks == k.MAX_CHUNKS
    last = few.launches[-1]
    chunk = few.sizes[4]
    assert last.row_end == few.rows and chunk * (few.n_chunks - 1) < 16 * 128 * 128 <= chunk * few.n_chunks


@pytest.mark.parametrize("present", [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1),
                                     (1, 1, 0, 0), (0, 0, 1, 1), (1, 0, 1, 0)])
@pytest.mark.parametrize("activation", ["silu", None])
def test_optional_inputs(present, activation):
    w, b, s, sh = (bool(p) for p in present)
    _check(_inputs((2, 6, 4, 3), torch.float32, w=w, b=b, scale=s, shift=sh), 3, activation=activation)


def test_mixed_parameter_dtypes():
    """bf16 activations with fp32 weights (autocast-style): each gradient comes back in its parameter's dtype."""
    _check(_inputs((2, 8, 3, 5), torch.bfloat16, param_dtype=torch.float32), 4)
    x, w, b, s, sh = _inputs((2, 8, 3, 5), torch.float16)
    _check((x, w.float(), b, s.float(), sh), 2, tol=TOL[torch.float16])


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("path", ["onchip", "chunked"])
def test_fp16_large_magnitude(offset, path, monkeypatch):
    """fp16 x of magnitude 1e3 (spread 1e3, or mean 1e3 with spread 1): fp32 statistics, finite and accurate, on the
    on-chip path and on the chunked one (Chan's merge of tiles and chunks)."""
    if path == "chunked":
        _fresh_plans(_kernels(), monkeypatch, ONCHIP_MAX=8, ONCHIP_MAX_BWD=8, STREAM_TILE=32, TARGET_PROGRAMS=12)
    x = (torch.randn(1, 4, 6, 7, device=DEVICE) * (1e3 if offset == 0 else 1.0) + offset).half()
    inputs = (x, None, None, torch.randn(1, 4, device=DEVICE).half(), None)
    assert _kernels().plan(x, 2, False).constexprs["ONCHIP"] == (path == "onchip")
    _check(inputs, 2, tol=TOL[torch.float16])


def test_statistics_are_saved_in_fp32():
    x, w, b, s, sh = _inputs((2, 6, 3, 4, 5), torch.bfloat16)
    with vdm_fast.backend("triton"):
        y, stats = torch.ops.vdm_fast.group_norm_silu(x, 3, w, b, 1e-5, s, sh, True, True, "triton")
    assert stats.dtype == torch.float32 and stats.shape == (2, 3, 3, 2)
    xg = x.double().unflatten(1, (3, 2))
    want_mean = xg.mean(dim=(2, 4, 5))
    want_rstd = torch.rsqrt(xg.var(dim=(2, 4, 5), unbiased=False) + 1e-5)
    assert_close(stats[..., 0], want_mean, 1e-6, "mean")
    assert_close(stats[..., 1], want_rstd, 1e-6, "rstd")


@pytest.mark.parametrize("path", ["two_sweep", "chunked"])  # on chip: the contract's test
def test_backward_is_deterministic(path, monkeypatch):
    k = _kernels()
    if path == "two_sweep":
        _fresh_plans(k, monkeypatch, ONCHIP_MAX=8, ONCHIP_MAX_BWD=8, STREAM_TILE=32, TARGET_PROGRAMS=4, SMS=2)
    if path == "chunked":
        _fresh_plans(k, monkeypatch, ONCHIP_MAX=8, ONCHIP_MAX_BWD=8, STREAM_TILE=32, TARGET_PROGRAMS=12)
    inputs = _inputs((2, 4, 2, 3, 5), torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(inputs[0].shape, device=DEVICE)
    runs = []
    for _ in range(2):
        for t in leaves:
            t.grad = None
        with vdm_fast.backend("triton"):
            y = ops.group_norm_silu(leaves[0], 2, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                                    per_frame=True)
        y.backward(dy)
        runs.append([y.detach()] + [t.grad.clone() for t in leaves])
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


def test_strided_input_and_gradient():
    x = strided(torch.randn(2, 6, 5, 4, device=DEVICE), dim=2)
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    dy = strided(torch.randn(2, 6, 5, 4, device=DEVICE), dim=3)
    xs = x.clone().requires_grad_()
    with vdm_fast.backend("triton"):
        y = ops.group_norm_silu(x.requires_grad_(), 3, w, b)
    y.backward(dy)
    want = ref.group_norm_silu(xs, 3, w, b)
    want.backward(dy)
    assert y.is_contiguous()
    assert_close(y, want, 1e-5, "y")
    assert_close(x.grad, xs.grad, 1e-5, "dx")
    # An expanded (stride-0) output gradient, as sum() gives.
    x2 = x.detach().clone().requires_grad_()
    with vdm_fast.backend("triton"):
        ops.group_norm_silu(x2, 3, w, b).sum().backward()
    xs2 = x.detach().clone().requires_grad_()
    ref.group_norm_silu(xs2, 3, w, b).sum().backward()
    assert_close(x2.grad, xs2.grad, 1e-5, "dx (expanded dy)")


def test_reference_is_group_norm_film_silu():
    """The reference against torch's own modules, in fp64: whole-video and per-frame statistics."""
    x = torch.randn(2, 12, 3, 5, 7, dtype=torch.float64)
    gn = nn.GroupNorm(4, 12).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    s, sh = torch.randn(2, 12, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    film = (1 + s[:, :, None, None, None], sh[:, :, None, None, None])
    want = F.silu(gn(x) * film[0] + film[1])
    got = ref.group_norm_silu(x, 4, gn.weight, gn.bias, scale=s, shift=sh)
    assert torch.allclose(got, want, atol=1e-12)
    frames = x.transpose(1, 2).reshape(6, 12, 5, 7)  # frames as a batch of images
    per_frame = gn(frames).reshape(2, 3, 12, 5, 7).transpose(1, 2)
    got = ref.group_norm_silu(x, 4, gn.weight, gn.bias, scale=s, shift=sh, per_frame=True)
    assert torch.allclose(got, F.silu(per_frame * film[0] + film[1]), atol=1e-12)
    assert torch.allclose(ref.group_norm_silu(x, 4, activation=None), F.group_norm(x, 4), atol=1e-12)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_layer_torch_compile_fullgraph(compile_backend, fmt):
    """torch.compile(layers.GroupNormSiLU, fullgraph=True), the default Inductor backend included: no graph break
    (fullgraph raises on one), output and every gradient equal to eager's."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = GroupNormSiLU(2, 6, per_frame=True).to(DEVICE)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 6, 3, 4, 5, device=DEVICE)
    if fmt:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    s = torch.randn(2, 6, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    dy = torch.randn(x.shape, device=DEVICE)
    results = []
    for fn in (compiled, layer):
        with vdm_fast.backend("triton"):
            y = fn(x, s, None)
        grads = torch.autograd.grad(y, (x, s, layer.weight, layer.bias), dy)
        results.append((y, *grads))
    for name, got, want in zip(("y", "dx", "dscale", "dweight", "dbias"), *results):
        assert_close(got, want, 1e-6, f"compiled {name}")
    with vdm_fast.backend("reference"):
        assert_close(results[0][0], layer(x, s), 1e-5, "against the reference")


def test_layer_replaces_group_norm_and_silu():
    seq = nn.Sequential(nn.GroupNorm(4, 12), nn.SiLU())
    with torch.no_grad():
        seq[0].weight.normal_()
        seq[0].bias.normal_()
    x = torch.randn(2, 12, 3, 5, 7)
    for state in (seq.state_dict(), seq[0].state_dict()):
        layer = GroupNormSiLU(4, 12)
        layer.load_state_dict(state)
        assert list(layer.state_dict()) == ["weight", "bias"]
        for backend in ("reference", "triton"):
            with vdm_fast.backend(backend):
                assert_close(layer(x), seq(x), 1e-5, f"{backend} layer")
    assert list(GroupNormSiLU(2, 4, affine=False).state_dict()) == []
    names = [n for n, _ in nn.GroupNorm(2, 4).named_parameters()]
    assert [n for n, _ in GroupNormSiLU(2, 4).named_parameters()] == names
    with pytest.raises(ValueError, match="channels"):
        GroupNormSiLU(4, 12)(torch.randn(2, 8, 5))


def test_auto_dispatch_on_cpu_is_the_reference():
    from vdm_fast import _dispatch
    from vdm_fast.ops.group_norm_silu import SPEC

    assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "reference"
    with vdm_fast.backend("triton"):
        assert _dispatch.select(SPEC, torch.device("cpu"), torch.bfloat16) == "triton"
        with pytest.raises(TypeError, match="float32"):
            _dispatch.select(SPEC, torch.device("cpu"), torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)  # fp64: the reference, in auto mode
    torch.autograd.gradcheck(lambda x: ops.group_norm_silu(x, 2, scale=torch.ones(2, 4, dtype=torch.float64)), (x,))


def test_custom_op_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        torch.ops.vdm_fast.group_norm_silu(torch.randn(2, 4, 3), 2, None, None, 1e-5, None, None, True, False,
                                           "reference")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,G,per_frame,fmt", [
    ((2, 256, 16, 64, 64), 32, True, False), ((2, 512, 16, 32, 32), 32, True, True),
    ((8, 320, 64, 64), 32, False, False), ((1, 64, 16, 128, 128), 1, False, False),
    ((2, 256, 16, 64, 64), 32, False, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shapes_on_gpu(shape, G, per_frame, fmt, dtype):
    _check(_inputs(shape, dtype, fmt=fmt, device="cuda"), G, per_frame)


def _sparse_view(path, shape, strides, dtype):
    """A view with the given (huge) strides on a sparse file mapped into memory: its span may pass 2^31 elements
    while only the elements it holds ever get pages."""
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    with open(path, "wb") as f:
        f.truncate(span * torch.empty(0, dtype=dtype).element_size())
    return torch.from_file(str(path), shared=True, size=span, dtype=dtype).as_strided(shape, strides)


@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_int64_offsets_past_2_31(tmp_path, monkeypatch, fmt):
    """One sample spanning more than 2^31 elements (channel or position stride 2^30 + 8): the plan turns on 64-bit
    offsets and forward and every gradient match the reference. No 8 GB tensor exists: x, dy, y and dx are views of
    sparse memory-mapped files; only the launcher's output allocation is substituted (y and dx share x's layout)."""
    k = _kernels()
    big = 2**30 + 8
    shape, G = (2, 4, 2, 3), 2
    strides = (8, big, 3, 1) if not fmt else (8 * big, 1, 3 * big, big)
    x0, w, b, s, sh = _inputs(shape, torch.float16)
    views = iter(range(4))

    def sparse_like(t=None):
        v = _sparse_view(tmp_path / f"t{next(views)}", shape, strides, torch.float16)
        if t is not None:
            v.copy_(t)
        return v

    monkeypatch.setattr(k, "_PLANS", {})
    monkeypatch.setattr(k, "out_layout", lambda shape_, strides_, fmt_: strides)
    monkeypatch.setattr(k, "empty_out", lambda x, fmt_: sparse_like())
    x = sparse_like(x0)
    assert k.plan(x, G, False).constexprs["INT64"] and not k.plan(x, G, False).copy_x
    leaves = [t.detach().requires_grad_() for t in (x, w, b, s, sh)]
    with vdm_fast.backend("triton"):
        y = ops.group_norm_silu(leaves[0], G, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4])
    assert y.stride() == strides
    dy = sparse_like(torch.randn(shape).half())
    y.backward(dy)
    want, want_grads = _reference((x0, w, b, s, sh), G, dy.clone())
    assert_close(y, want, TOL[torch.float16], "y")
    for name, g, wg in zip(("dx", "dweight", "dbias", "dscale", "dshift"), [t.grad for t in leaves], want_grads):
        assert_close(g, wg, TOL[torch.float16], name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_double_backward(backend, per_frame):
    """create_graph=True through the op (a gradient penalty): the fast path's first-order gradients are the
    reference's autograd graph on the saved inputs, so the second derivative matches the reference's, both through
    the eager autograd.Function and through the custom op (torch.compile's path)."""
    inputs = _inputs((2, 6, 2, 3, 4), torch.float32)

    def penalty(fn_backend, via_custom_op=False):
        leaves = [t.detach().double().float().requires_grad_() for t in inputs]
        with vdm_fast.backend(fn_backend):
            if via_custom_op:
                y = torch.ops.vdm_fast.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], 1e-5, leaves[3],
                                                       leaves[4], True, per_frame, "triton")[0]
            else:
                y = ops.group_norm_silu(leaves[0], 3, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                                        per_frame=per_frame)
            grads = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return [t.grad for t in leaves]

    want = penalty("reference")
    for got in [penalty(backend)] + ([penalty(backend, True)] if backend == "triton" else []):
        for name, g, wg in zip(("x", "weight", "bias", "scale", "shift"), got, want):
            assert_close(g, wg, 1e-5, f"second derivative wrt {name}")


@pytest.mark.parametrize("shape,per_frame", [((0, 4, 3, 2, 2), True), ((2, 4, 0, 2, 2), True),
                                             ((2, 4, 0, 2, 2), False), ((2, 4, 3, 0, 2), True), ((0, 4, 5), False)])
def test_empty_shapes_alike_on_every_path(shape, per_frame):
    """B = 0, T = 0, H = 0: an empty output of x's layout and zero parameter gradients, the same on the reference and
    the fast path, eager and through the custom op."""
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().requires_grad_() for t in _inputs(shape, torch.float32)]
        with vdm_fast.backend(backend):
            y = ops.group_norm_silu(leaves[0], 2, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4],
                                    per_frame=per_frame)
        y.backward(torch.ones_like(y))
        results[backend] = [y] + [t.grad for t in leaves]
    for a, b in zip(results["reference"], results["triton"]):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(shape)
    with vdm_fast.backend("triton"):
        y, stats = torch.ops.vdm_fast.group_norm_silu(x, 2, None, None, 1e-5, None, None, True, per_frame, "triton")
    assert y.shape == x.shape and stats.shape == (shape[0], 2, shape[2] if per_frame and len(shape) == 5 else 1, 2)


class _CountedLaunch:
    """Wraps a JITFunction: each launch runs inside a profiler range named after the kernel, and is counted."""

    def __init__(self, fn, name, counts):
        self.fn, self.name, self.counts = fn, name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            with torch.profiler.record_function(f"launch::{self.name}"):
                return self.fn[grid](*args, **kwargs)

        return launch


def _aten_ops_outside_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, inside = e.cpu_parent, False
        while parent is not None:
            inside = inside or parent.name.startswith("launch::") or parent.name.startswith("aten::")
            parent = parent.cpu_parent
        if not inside:
            names.append(e.name)  # a top-level aten op of the host path (the interpreter's own copies excluded)
    return names


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_forward_runs_only_its_kernel_and_two_allocations(monkeypatch, requires_grad, fmt):
    """A forward call (the U-Net's: channels_last_3d or contiguous, weight, bias, FiLM views of one projection,
    per_frame) launches exactly its one kernel and, besides, only allocates y and the statistics: no fills, casts or
    copies (counted with torch.profiler; the interpreter's own tensor traffic inside the launch is not counted)."""
    k = _kernels()
    counts = {}
    monkeypatch.setattr(k, "_fwd_kernel", _CountedLaunch(k._fwd_kernel, "fwd", counts))
    x, w, b, _, _ = _inputs((2, 8, 2, 3, 4), torch.bfloat16, fmt=fmt)
    emb = torch.randn(2, 16, dtype=torch.float32)  # fp32 FiLM on bf16 activations: no cast either
    leaves = [t.requires_grad_(requires_grad) for t in (x, w, b, emb)]
    scale, shift = leaves[3].chunk(2, dim=1)

    def call():
        with vdm_fast.backend("triton"):
            return ops.group_norm_silu(leaves[0], 4, leaves[1], leaves[2], scale=scale, shift=shift, per_frame=True)

    call()  # plan cached
    counts.clear()
    names = _aten_ops_outside_launches(call)
    assert counts == {"fwd": 1}
    assert sorted(names) == ["aten::empty", "aten::empty_like"], names


def test_layer_copies_nothing():
    """layers.GroupNormSiLU forward + backward on a channels_last_3d activation with FiLM views copies no bytes
    outside the kernels; the one copy bench_host_path counts is autograd's, the backward of the caller's own chunk
    (it concatenates dscale and dshift into the projection's gradient)."""
    from vdm_fast.testing import CopyCounter

    layer = GroupNormSiLU(4, 8, per_frame=True)
    x = torch.randn(2, 8, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    emb = torch.randn(2, 16, requires_grad=True)
    scale, shift = emb.chunk(2, dim=1)

    def step():
        with vdm_fast.backend("triton"):
            y = layer(x, scale, shift)
        y.backward(torch.ones_like(y))

    step()
    k = _kernels()
    names = ("_fwd_kernel", "_bwd_kernel", "_bwd_params_kernel")
    real = {n: getattr(k, n) for n in names}
    try:
        from vdm_fast.benchmarks.bench_host_path import _NoLaunch

        for n in names:
            setattr(k, n, _NoLaunch())
        with CopyCounter() as counter:
            step()
        ours = {key: n for key, n in counter.by_origin.items() if key[:2] != ("backward", "SplitBackward0")}
        assert ours == {} and counter.bytes == emb.numel() * emb.element_size(), counter.by_origin
    finally:
        for n, v in real.items():
            setattr(k, n, v)
