"""rms_norm_silu: the Triton kernels (interpreter here, GPU when lent) against the fp64 reference, and the layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, TOL, assert_close
from op_contract import OpContract

import vdm_fast
from vdm_fast import ops
from vdm_fast import reference as ref
from vdm_fast.layers import RMSNormSiLU
from vdm_fast.reference.group_norm_silu import memory_format

CL = {4: torch.channels_last, 5: torch.channels_last_3d}
NAMES = ("dx", "dweight", "dscale", "dshift")


def _kernels():
    from vdm_fast.kernels import rms_norm_silu as k

    return k


def _inputs(shape, dtype, *, w=True, film=True, fmt=False, device=DEVICE, param_dtype=None):
    B, C = shape[:2]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    if fmt:
        x = x.contiguous(memory_format=CL[len(shape)])
    pd = param_dtype or dtype
    w = (torch.randn(C, device=device) * 0.5 + 1).to(pd) if w else None
    scale = (torch.randn(B, C, device=device) * 0.5).to(pd) if film else None
    shift = torch.randn(B, C, device=device).to(pd) if film else None
    return x, w, scale, shift


def _run(inputs, eps=1e-12, activation="silu", backend="triton"):
    """Output and gradients of every tensor input (None where absent), through ops.rms_norm_silu."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    with vdm_fast.backend(backend):
        y = ops.rms_norm_silu(leaves[0], leaves[1], eps, scale=leaves[2], shift=leaves[3], activation=activation)
    dy = torch.randn_like(y)
    y.backward(dy)
    return y.detach(), dy, [t.grad if t is not None else None for t in leaves]


def _reference(inputs, dy, eps=1e-12, activation="silu"):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y = ref.rms_norm_silu(leaves[0], leaves[1], eps, scale=leaves[2], shift=leaves[3], activation=activation)
    y.backward(dy.double())  # the reference takes the same (rounded) output gradient
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(inputs, eps=1e-12, activation="silu", tol=None):
    x = inputs[0]
    tol = tol or max(TOL[x.dtype], 1e-5)
    y, dy, grads = _run(inputs, eps, activation)
    want, want_grads = _reference(inputs, dy, eps, activation)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == x.contiguous(memory_format=memory_format(x)).stride()
    assert_close(y, want, tol, "y")
    for name, g, wg, t in zip(NAMES, grads, want_grads, inputs):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, wg, tol, name)
    return y, grads


def _fresh_plans(k, monkeypatch, **constants):
    """Set launcher constants for one test (plans are cached per shape: the cache is emptied around it)."""
    for name, value in constants.items():
        monkeypatch.setattr(k, name, value)
    monkeypatch.setattr(k, "_PLANS", {})


# (shape, weight, film): odd C (5, 37), odd T/H/W, 3-D / 4-D / 5-D, with and without gamma and FiLM.
SHAPES = [
    ((2, 5, 3, 3, 5), True, True),
    ((1, 37, 2, 3, 3), False, True),
    ((2, 12, 5, 6), True, False),
    ((3, 6, 7), True, True),
]


class TestRMSNormSiLUContract(OpContract):
    """The shared op contract (tests/op_contract.py) on every shape above, contiguous and channels_last(_3d): fp64
    reference agreement of y and every gradient within k x the same-precision baseline, strided views, opcheck,
    torch.compile (aot_eager and Inductor), bad input, bitwise-deterministic backward, device mix."""

    differentiable = ("x", "weight", "scale", "shift")
    # The interpreter casts fp32 to bf16/fp16 by truncation (up to one ulp, where the GPU rounds to nearest: half an
    # ulp), so the allowance beyond k x baseline is two unit roundoffs.
    tiny_factor = 2.0
    cases = [(f"{'x'.join(map(str, shape))}{'-w' if w else ''}{'-film' if film else ''}-{'cl' if cl else 'cf'}",
              dict(shape=shape, w=w, film=film, cl=cl))
             for shape, w, film in SHAPES for cl in (False, True) if not (cl and len(shape) == 3)]
    bad_inputs = [
        (dict(x=torch.randn(2, 6)), ValueError, "x"),
        (dict(x=torch.randn(2, 6, 1, 1, 1, 1)), ValueError, "x"),
        (dict(x=torch.randint(0, 3, (2, 6, 4))), TypeError, "x"),
        (dict(x=[[0.0] * 4] * 6), TypeError, "x"),
        (dict(weight=torch.randn(5)), ValueError, "weight"),
        (dict(weight=torch.randn(6, 1, 1, 1)), ValueError, "weight"),
        (dict(weight=[1.0] * 6), TypeError, "weight"),
        (dict(scale=torch.randn(6)), ValueError, "scale"),
        (dict(scale=torch.randn(3, 6)), ValueError, "scale"),
        (dict(shift=torch.randn(2, 6, 1)), ValueError, "shift"),
        (dict(scale=torch.randint(0, 2, (2, 6))), TypeError, "scale"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="1e-12"), TypeError, "eps"),
        (dict(eps=True), TypeError, "eps"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(activation=1), ValueError, "activation"),
    ]

    def make_inputs(self, params, dtype, device):
        x, w, s, sh = _inputs(params["shape"], dtype, w=params["w"], film=params["film"], fmt=params["cl"],
                              device=device)
        return dict(x=x, weight=w, eps=1e-12, scale=s, shift=sh, activation="silu")

    def bad_base(self):
        return dict(x=torch.randn(2, 6, 4), weight=None, eps=1e-12, scale=None, shift=None, activation="silu")

    def reference(self, x, weight, eps, scale, shift, activation):
        return ref.rms_norm_silu(x, weight, eps, scale=scale, shift=shift, activation=activation)

    def fast(self, x, weight, eps, scale, shift, activation):
        y = ops.rms_norm_silu(x, weight, eps, scale=scale, shift=shift, activation=activation)
        if not torch.compiler.is_compiling():  # the output takes x's memory format
            assert y.stride() == torch.empty_like(x, memory_format=memory_format(x)).stride()
        return y

    def opcheck_cases(self):
        return [dict(shape=(2, 5, 2, 3, 2), w=True, film=True, cl=True)]

    def opcheck_calls(self, inputs):
        x, w, s, sh = (inputs[k] for k in ("x", "weight", "scale", "shift"))
        op = torch.ops.vdm_fast.rms_norm_silu.default
        with vdm_fast.backend("triton"):
            y, rstd = op(x.detach(), w.detach(), 1e-12, s.detach(), sh.detach(), True, "triton")
        bwd = torch.ops.vdm_fast.rms_norm_silu_backward.default
        return [(op, (x, w, 1e-12, s, sh, True, "triton")),
                (op, (x.detach(), None, 1e-6, None, None, False, "triton")),
                (bwd, (torch.randn_like(y), x.detach(), rstd, w.detach(), s.detach(), sh.detach(), 1e-12, True,
                       "triton")),
                (bwd, (torch.randn_like(y), x.detach(), rstd, None, None, None, 1e-12, False, "triton"))]


@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_chunked_channels_match_reference(monkeypatch, fmt):
    """C wider than a tile: channel chunks, two sweeps forward and backward (`dot` between them), several programs
    per sample in the backward, each over several position blocks; bitwise the same on a second run."""
    k = _kernels()
    _fresh_plans(k, monkeypatch, TILE=32, TILE_BWD=32, TARGET_PROGRAMS=4, MIN_BLOCK_S_CONTIGUOUS=2)
    inputs = _inputs((2, 37, 3, 2, 3), torch.float32, fmt=fmt)
    for backward in (False, True):
        p = k.plan(inputs[0], backward)
        assert not p.constexprs["ONCHIP"] and p.constexprs["BLOCK_C"] < 37, "the test must chunk the channels"
    pb = k.plan(inputs[0], True)
    assert 1 < pb.progs < pb.s_blocks and pb.blocks_per_prog > 1, (pb.progs, pb.s_blocks)
    y, grads = _check(inputs)
    torch.manual_seed(0)
    first = _run(inputs)
    torch.manual_seed(0)
    again = _run(inputs)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[2], again[2]))


def test_several_blocks_per_backward_program(monkeypatch):
    """On chip, fewer backward programs than position blocks: each accumulates its parameter sums over a run of
    blocks (the last one partial) before writing its partials once."""
    k = _kernels()
    _fresh_plans(k, monkeypatch, TILE=64, TILE_BWD=64, TARGET_PROGRAMS=6)
    inputs = _inputs((2, 8, 3, 5, 5), torch.bfloat16, fmt=True)
    p = k.plan(inputs[0], True)
    assert p.constexprs["ONCHIP"] and p.blocks_per_prog > 1 and p.progs * p.blocks_per_prog >= p.s_blocks
    _check(inputs)


def test_plan_for_the_unet_cases():
    """The U-Net's Block widths (128 to 1024 channels) hold the channel vector on chip in channels_last_3d (one
    read of x); contiguous, up to 256 channels forward and 128 backward with 16 positions a channel row, chunked
    beyond; the backward writes at most a few partial rows per program."""
    k = _kernels()
    for shape, cl in k.UNET_CASES:
        x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        C = shape[1]
        for backward in (False, True):
            p = k.plan(x, backward)
            c = p.constexprs
            assert c["CL"] == cl and not c["INT64"] and not p.copy_x
            assert c["BLOCK_C"] * c["BLOCK_S"] <= (k.TILE_BWD if backward else k.TILE)
            assert c["ONCHIP"] == (cl or C * k.MIN_BLOCK_S_CONTIGUOUS <= (k.TILE_BWD if backward else k.TILE)), shape
            assert cl or c["BLOCK_S"] >= k.MIN_BLOCK_S_CONTIGUOUS
            if backward:
                assert p.grid[0] <= k.TARGET_PROGRAMS + shape[0] and p.progs * p.blocks_per_prog >= p.s_blocks
    wide = k.plan(torch.empty(2, 8192, 4, 8, 8, device="meta").contiguous(memory_format=torch.channels_last_3d))
    assert not wide.constexprs["ONCHIP"] and wide.constexprs["BLOCK_C"] == k.TILE


@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_eps_clamp_matches_f_normalize(fmt):
    """Positions whose norm is below eps (zero vectors and small ones) are divided by eps, as F.normalize does, and
    their gradient has no norm term; the others are normalized. eps = 0.5 puts both kinds in one tensor."""
    _, w, s, sh = _inputs((2, 6, 2, 3, 4), torch.float32)
    x = torch.randn(2, 6, 2, 3, 4, device=DEVICE) * 0.05  # norms about 0.12: clamped
    x = x * (torch.arange(4, device=DEVICE) != 1)  # w = 1: zero vectors
    x[:, :, 0] = torch.randn(2, 6, 3, 4, device=DEVICE) * 2  # frame 0: norms about 5
    x = x.contiguous(memory_format=CL[5] if fmt else torch.contiguous_format)
    norms = x.double().norm(dim=1)
    assert (norms < 0.5).any() and (norms > 0.5).any() and (norms == 0).any()
    _check((x, w, s, sh), eps=0.5)
    # the saved statistic is 1 / max(||x||, eps)
    with vdm_fast.backend("triton"):
        _, rstd = torch.ops.vdm_fast.rms_norm_silu(x, w, 0.5, s, sh, True, "triton")
    assert rstd.dtype == torch.float32 and rstd.shape == (2, 2, 3, 4)
    assert_close(rstd, 1 / norms.clamp_min(0.5), 1e-6, "rstd")


def test_reference_is_video_diffusion_pytorch_rmsnorm_film_silu():
    """The reference against video-diffusion-pytorch 0.7's RMSNorm and Block arithmetic, written out here from its
    source (`F.normalize(x, dim=1) * dim ** 0.5 * gamma`, then `x * (scale + 1) + shift`, then SiLU), in fp64, zero
    vectors included, forward and gradients."""
    C = 12
    x = torch.randn(2, C, 3, 5, 7, dtype=torch.float64)
    x[0, :, 1] = 0
    gamma = torch.randn(C, 1, 1, 1, dtype=torch.float64)
    s, sh = torch.randn(2, C, 1, 1, 1, dtype=torch.float64), torch.randn(2, C, 1, 1, 1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, s, sh)]
    want = F.silu((F.normalize(leaves[0], dim=1) * C ** 0.5 * leaves[1]) * (leaves[2] + 1) + leaves[3])
    mine = [t.clone().requires_grad_() for t in (x, gamma, s, sh)]
    got = ref.rms_norm_silu(mine[0], mine[1].view(C), scale=mine[2].flatten(1), shift=mine[3].flatten(1))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    dy = torch.randn_like(want)
    want.backward(dy)
    got.backward(dy)
    for a, b in zip(mine, leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-10, rtol=0)
    plain = F.normalize(x, dim=1) * math.sqrt(C)
    assert torch.allclose(ref.rms_norm_silu(x, activation=None), plain, atol=1e-12, rtol=0)


@pytest.mark.parametrize("present", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("activation", ["silu", None])
def test_optional_inputs(present, activation):
    w, film = (bool(p) for p in present)
    _check(_inputs((2, 6, 4, 3), torch.float32, w=w, film=film), activation=activation)
    if film:  # scale alone, shift alone
        x, w_, s, sh = _inputs((2, 6, 4, 3), torch.float32, w=w)
        _check((x, w_, s, None), activation=activation)
        _check((x, w_, None, sh), activation=activation)


def test_mixed_parameter_dtypes():
    """bf16 activations with fp32 parameters (autocast-style): each gradient comes back in its parameter's dtype."""
    _check(_inputs((2, 8, 3, 5), torch.bfloat16, param_dtype=torch.float32))


def test_fp16_large_magnitude():
    """fp16 x of magnitude 1e4 over 64 channels: the sum of squares (1e10) overflows fp16, not the fp32 kernels."""
    x = (torch.randn(2, 64, 3, 5, device=DEVICE) * 1e4).half()
    inputs = (x, None, torch.randn(2, 64, device=DEVICE).half(), None)
    y, _ = _check(inputs, tol=TOL[torch.float16])
    assert torch.isfinite(y).all()


def test_strided_input_and_expanded_gradient():
    x = torch.randn(2, 6, 5, 8, device=DEVICE)[..., ::2]
    w = torch.randn(6, device=DEVICE)
    leaves = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with vdm_fast.backend("triton"):
        ops.rms_norm_silu(leaves[0], w).sum().backward()  # an expanded (stride-0) output gradient
    ref.rms_norm_silu(leaves[1], w).sum().backward()
    assert_close(leaves[0].grad, leaves[1].grad, 1e-5, "dx (expanded dy)")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_double_backward(backend):
    """create_graph=True through the op (a gradient penalty): the fast path's first-order gradients are the
    reference's autograd graph on the saved inputs, so the second derivative matches the reference's, both through
    the eager autograd.Function and through the custom op (torch.compile's path)."""
    inputs = _inputs((2, 6, 2, 3, 4), torch.float32)

    def penalty(fn_backend, via_custom_op=False):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with vdm_fast.backend(fn_backend):
            if via_custom_op:
                y = torch.ops.vdm_fast.rms_norm_silu(leaves[0], leaves[1], 1e-12, leaves[2], leaves[3], True,
                                                     "triton")[0]
            else:
                y = ops.rms_norm_silu(leaves[0], leaves[1], scale=leaves[2], shift=leaves[3])
            grads = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return [t.grad for t in leaves]

    want = penalty("reference")
    for got in [penalty(backend)] + ([penalty(backend, True)] if backend == "triton" else []):
        for name, g, wg in zip(("x", "weight", "scale", "shift"), got, want):
            assert_close(g, wg, 1e-5, f"second derivative wrt {name}")


@pytest.mark.parametrize("shape", [(0, 4, 3, 2, 2), (2, 4, 0, 2, 2), (2, 4, 3, 0, 2), (0, 4, 5)])
def test_empty_shapes_alike_on_every_path(shape):
    """B = 0, T = 0, H = 0: an empty output of x's layout and zero parameter gradients, the same on the reference and
    the fast path."""
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().requires_grad_() for t in _inputs(shape, torch.float32)]
        with vdm_fast.backend(backend):
            y = ops.rms_norm_silu(leaves[0], leaves[1], scale=leaves[2], shift=leaves[3])
        y.backward(torch.ones_like(y))
        results[backend] = [y] + [t.grad for t in leaves]
    for a, b in zip(results["reference"], results["triton"]):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_auto_dispatch_on_cpu_is_the_reference():
    from vdm_fast import _dispatch
    from vdm_fast.ops.rms_norm_silu import SPEC

    assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "reference"
    with vdm_fast.backend("triton"):
        assert _dispatch.select(SPEC, torch.device("cpu"), torch.bfloat16) == "triton"
        with pytest.raises(TypeError, match="float32"):
            _dispatch.select(SPEC, torch.device("cpu"), torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)  # fp64: the reference, in auto mode
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: ops.rms_norm_silu(x, w, scale=torch.ones(2, 4, dtype=torch.float64)),
                             (x, w))


def test_custom_op_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        torch.ops.vdm_fast.rms_norm_silu(torch.randn(2, 4, 3), None, 1e-12, None, None, True, "reference")


@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_int64_offsets_past_2_31(tmp_path, monkeypatch, fmt):
    """One sample spanning more than 2^31 elements (channel or position stride 2^30 + 8): the plan turns on 64-bit
    offsets and forward and every gradient match the reference. No 8 GB tensor exists: x, dy, y and dx are views of
    sparse memory-mapped files (test_group_norm_silu's `_sparse_view`); only the launcher's output allocation is
    substituted (y and dx share x's layout)."""
    from test_group_norm_silu import _sparse_view  # the one definition of the sparse-file view

    k = _kernels()
    big = 2**30 + 8
    shape = (2, 4, 2, 3)
    strides = (8, big, 3, 1) if not fmt else (8 * big, 1, 3 * big, big)
    x0, w, s, sh = _inputs(shape, torch.float16)
    views = iter(range(4))

    def sparse_like(t=None):
        v = _sparse_view(tmp_path / f"t{next(views)}", shape, strides, torch.float16)
        if t is not None:
            v.copy_(t)
        return v

    monkeypatch.setattr(k, "_PLANS", {})
    monkeypatch.setattr(k, "out_layout", lambda shape_, fmt_: strides)
    monkeypatch.setattr(k, "empty_out", lambda x, fmt_: sparse_like())
    x = sparse_like(x0)
    assert k.plan(x).constexprs["INT64"] and not k.plan(x).copy_x and k.plan(x).constexprs["CL"] == fmt
    leaves = [t.detach().requires_grad_() for t in (x, w, s, sh)]
    with vdm_fast.backend("triton"):
        y = ops.rms_norm_silu(leaves[0], leaves[1], scale=leaves[2], shift=leaves[3])
    assert y.stride() == strides
    dy = sparse_like(torch.randn(shape).half())
    y.backward(dy)
    want, want_grads = _reference((x0, w, s, sh), dy.clone())
    assert_close(y, want, TOL[torch.float16], "y")
    for name, g, wg in zip(NAMES, [t.grad for t in leaves], want_grads):
        assert_close(g, wg, TOL[torch.float16], name)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_forward_runs_only_its_kernel_and_two_allocations(monkeypatch, requires_grad, fmt):
    """A forward call (the patched Block's: bf16 x, an fp32 gamma view, FiLM views of one projection) launches
    exactly its one kernel and, besides, only allocates y and rstd: no fills, casts or copies (counted with
    torch.profiler, as test_group_norm_silu's host-path test)."""
    from test_group_norm_silu import _aten_ops_outside_launches, _CountedLaunch  # defined once, there

    k = _kernels()
    counts = {}
    monkeypatch.setattr(k, "_fwd_kernel", _CountedLaunch(k._fwd_kernel, "fwd", counts))
    x, _, _, _ = _inputs((2, 8, 2, 3, 4), torch.bfloat16, fmt=fmt)
    gamma = torch.randn(8, 1, 1, 1)
    emb = torch.randn(2, 16)
    leaves = [t.requires_grad_(requires_grad) for t in (x, gamma, emb)]
    scale, shift = leaves[2].chunk(2, dim=1)

    def call():
        with vdm_fast.backend("triton"):
            return ops.rms_norm_silu(leaves[0], leaves[1].view(8), scale=scale, shift=shift)

    call()  # plan cached
    counts.clear()
    names = _aten_ops_outside_launches(call)
    assert counts == {"fwd": 1}
    assert sorted(n for n in names if n != "aten::view") == ["aten::empty", "aten::empty_like"], names


# ------------------------------------------------------------------------------------------------------- layer


class _VdpRMSNorm(torch.nn.Module):
    """video-diffusion-pytorch 0.7's RMSNorm, as its source reads (the real class is tested in test_patch.py)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = torch.nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
def test_layer_replaces_rmsnorm_film_and_silu(fmt):
    """RMSNormSiLU loads the RMSNorm's state_dict as is and computes norm -> FiLM -> SiLU (and the norm alone with
    activation=None), forward and every gradient, on the reference and the kernels."""
    norm = _VdpRMSNorm(6)
    with torch.no_grad():
        norm.gamma.normal_()
    layer = RMSNormSiLU(6)
    layer.load_state_dict(norm.state_dict())
    assert list(layer.state_dict()) == ["gamma"] and layer.gamma.shape == (6, 1, 1, 1)
    x = torch.randn(2, 6, 3, 4, 5, device=DEVICE)
    if fmt:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    s, sh = torch.randn(2, 6, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    for backend in ("reference", "triton"):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        want = F.silu(norm(xs[0]) * (s[:, :, None, None, None] + 1) + sh[:, :, None, None, None])
        with vdm_fast.backend(backend):
            got = layer(xs[1], s, sh)
        assert_close(got, want, 1e-5, f"{backend} layer")
        dy = torch.randn_like(want)
        want.backward(dy)
        got.backward(dy)
        assert_close(xs[1].grad, xs[0].grad, 1e-5, f"{backend} dx")
        assert_close(layer.gamma.grad, norm.gamma.grad, 1e-5, f"{backend} dgamma")
        layer.gamma.grad = norm.gamma.grad = None
        with vdm_fast.backend(backend):
            assert_close(RMSNormSiLU(6, activation=None).to(DEVICE)(x), F.normalize(x, dim=1) * 6 ** 0.5, 1e-5,
                         "activation=None")
    assert list(RMSNormSiLU(4, affine=False).state_dict()) == []
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="dim"):
        RMSNormSiLU(0)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_layer_torch_compile_fullgraph(compile_backend):
    """torch.compile(layers.RMSNormSiLU, fullgraph=True): no graph break, output and every gradient equal to eager's
    (channels_last_3d, FiLM)."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = RMSNormSiLU(6).to(DEVICE)
    with torch.no_grad():
        layer.gamma.normal_()
    x = torch.randn(2, 6, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    s = torch.randn(2, 6, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    dy = torch.randn(x.shape, device=DEVICE)
    results = []
    for fn in (compiled, layer):
        with vdm_fast.backend("triton"):
            y = fn(x, s, None)
        results.append((y, *torch.autograd.grad(y, (x, s, layer.gamma), dy)))
    for name, got, want in zip(("y", "dx", "dscale", "dgamma"), *results):
        assert_close(got, want, 1e-6, f"compiled {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,fmt", [((2, 128, 16, 64, 64), True), ((2, 256, 16, 64, 64), False),
                                       ((2, 1024, 16, 16, 16), True), ((2, 1024, 16, 16, 16), False),
                                       ((2, 8192, 4, 16, 16), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shapes_on_gpu(shape, fmt, dtype):
    _check(_inputs(shape, dtype, fmt=fmt, device="cuda"))
