"""group_norm_silu: the Triton kernels (interpreter here, GPU when lent) against the fp64 reference, and the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, DTYPES, GPU, TOL, assert_close, strided
from torch import nn

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


# (shape, num_groups, per_frame): odd sizes, one group, C groups, a 64-channel group, 3-D / 4-D / 5-D.
SHAPES = [
    ((2, 8, 5, 6), 2, False),
    ((3, 6, 7), 3, False),
    ((2, 12, 3, 4, 5), 4, True),
    ((2, 12, 3, 4, 5), 3, False),
    ((1, 5, 9, 3), 1, False),
    ((2, 6, 4, 5), 6, False),
    ((2, 64, 3, 3), 1, False),
    ((1, 10, 5, 33, 17), 5, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G,per_frame", SHAPES)
def test_matches_reference(shape, G, per_frame, fmt, dtype):
    if fmt and len(shape) == 3:
        pytest.skip("no channels_last format for 3-D input")
    _check(_inputs(shape, dtype, fmt=fmt), G, per_frame)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few elements and many programs wanted: several tiles and several chunks per row (phases 1, 2)."""
    k = _kernels()
    monkeypatch.setattr(k, "TILES", {False: ((1, 8), (2, 4)), True: ((2, 4),)})
    monkeypatch.setattr(k, "TARGET_PROGRAMS", 10**6)
    return k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G,per_frame", [((2, 6, 5, 7), 2, False), ((2, 9, 3, 4, 5), 3, True),
                                               ((1, 12, 2, 3, 11), 1, False)])
def test_chunked_path_matches_reference(small_tiles, shape, G, per_frame, fmt, dtype):
    x = _inputs(shape, dtype, fmt=fmt)
    S = shape[-1] * shape[-2] * (shape[2] if len(shape) == 5 and not per_frame else 1)
    plan = small_tiles._plan(shape[1] // G, S, 1, fmt)
    assert plan["n_chunks"] > 1 and plan["BLOCK_C"] < shape[1] // G, "the test must cut rows into chunks and tiles"
    _check(x, G, per_frame)


def test_plan_chunks_few_rows_and_keeps_many_rows_whole():
    k = _kernels()
    many = k._plan(8, 4096, 1024, False)  # (2, 256, 16, 64, 64) per frame: one program per row
    assert many["n_chunks"] == 1 and many["BLOCK_C"] * many["BLOCK_S"] == 2048
    few = k._plan(64, 16 * 128 * 128, 32, False)  # 64 channels x 16 x 128 x 128 in a group, 32 rows
    assert few["n_chunks"] > 1 and few["n_chunks"] * 32 >= k.TARGET_PROGRAMS
    assert few["S_CHUNK"] * (few["n_chunks"] - 1) < 16 * 128 * 128 <= few["S_CHUNK"] * few["n_chunks"]
    cl = k._plan(8, 4096, 1024, True)
    assert cl["BLOCK_C"] == 8  # channels are the unit-stride axis: a whole group's channels in a tile row


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
def test_fp16_large_magnitude(offset, small_tiles):
    """fp16 x of magnitude 1e3 (spread 1e3, or mean 1e3 with spread 1): fp32 statistics, finite and accurate."""
    x = (torch.randn(2, 8, 6, 7, device=DEVICE) * (1e3 if offset == 0 else 1.0) + offset).half()
    inputs = (x, None, None, torch.randn(2, 8, device=DEVICE).half(), None)
    _check(inputs, 2, tol=TOL[torch.float16])
    small_tiles.TILES = {False: ((1, 2048), (8, 256)), True: ((8, 256),)}  # and the one-program-per-row path
    small_tiles.TARGET_PROGRAMS = 1
    _check(inputs, 2, tol=TOL[torch.float16])


def test_statistics_are_saved_in_fp32():
    x, w, b, s, sh = _inputs((2, 6, 3, 4, 5), torch.bfloat16)
    impl = "triton"
    with vdm_fast.backend("triton"):
        y, mean, rstd = torch.ops.vdm_fast.group_norm_silu(x, 3, w, b, 1e-5, s, sh, True, True, impl)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 3, 3)
    xg = x.double().unflatten(1, (3, 2))
    want_mean = xg.mean(dim=(2, 4, 5))
    want_rstd = torch.rsqrt(xg.var(dim=(2, 4, 5), unbiased=False) + 1e-5)
    assert_close(mean, want_mean, 1e-6, "mean")
    assert_close(rstd, want_rstd, 1e-6, "rstd")


@pytest.mark.parametrize("chunked", [False, True])
def test_backward_is_deterministic(chunked, monkeypatch):
    if chunked:
        k = _kernels()
        monkeypatch.setattr(k, "TILES", {False: ((2, 4),), True: ((2, 4),)})
        monkeypatch.setattr(k, "TARGET_PROGRAMS", 10**6)
    inputs = _inputs((3, 8, 2, 5, 6), torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(inputs[0].shape, device=DEVICE)
    runs = []
    for _ in range(3):
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


def test_opcheck():
    x, w, b, s, sh = _inputs((2, 6, 3, 4), torch.float32)
    op = torch.ops.vdm_fast.group_norm_silu.default
    with vdm_fast.backend("triton"):
        torch.library.opcheck(op, (x.requires_grad_(), 3, w.requires_grad_(), b, 1e-5, s.requires_grad_(), sh,
                                   True, False, "triton"))
        torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), 2, None, None, 1e-6, None, None,
                                   False, False, "triton"))
        x5 = torch.randn(2, 6, 3, 2, 5).contiguous(memory_format=torch.channels_last_3d)
        torch.library.opcheck(op, (x5, 3, w, None, 1e-5, None, sh, True, True, "triton"))
        x, w, s = x.detach(), w.detach(), s.detach()
        y, mean, rstd = op(x, 3, w, b, 1e-5, s, sh, True, False, "triton")
        torch.library.opcheck(torch.ops.vdm_fast.group_norm_silu_backward.default,
                              (torch.randn_like(y), x, mean, rstd, 3, w, b, s, sh, True, False, "triton"))
        torch.library.opcheck(torch.ops.vdm_fast.group_norm_silu_backward.default,
                              (torch.randn_like(y), x.detach(), mean, rstd, 3, None, None, None, None, False, False,
                               "triton"))


def test_torch_compile_fullgraph():
    layer = GroupNormSiLU(2, 6, per_frame=True).to(DEVICE)
    x = torch.randn(2, 6, 3, 4, 5, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 6, device=DEVICE, requires_grad=True)

    def f(x, s):
        return layer(x, s).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with vdm_fast.backend("triton"):
        got = compiled(x, s)
        got.backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    with vdm_fast.backend("reference"):
        want = f(x, s)
        want.backward()
    assert torch.allclose(got, want, rtol=1e-5)
    assert_close(gx, x.grad, 1e-5, "dx")
    assert_close(gs, s.grad, 1e-5, "dscale")


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


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.randn(2, 6)), ValueError, "x"),
    (dict(x=torch.randn(2, 6, 1, 1, 1, 1)), ValueError, "x"),
    (dict(x=torch.randint(0, 3, (2, 6, 4))), TypeError, "x"),
    (dict(num_groups=4), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=2.0), TypeError, "num_groups"),
    (dict(weight=torch.randn(5)), ValueError, "weight"),
    (dict(bias=torch.randn(6, 1)), ValueError, "bias"),
    (dict(scale=torch.randn(6)), ValueError, "scale"),
    (dict(scale=torch.randn(3, 6)), ValueError, "scale"),
    (dict(shift=torch.randn(2, 6, 1)), ValueError, "shift"),
    (dict(scale=torch.randint(0, 2, (2, 6))), TypeError, "scale"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(per_frame=1), TypeError, "per_frame"),
    (dict(weight=[1.0] * 6), TypeError, "weight"),
])
def test_bad_input_raises(kwargs, err, match):
    args = dict(x=torch.randn(2, 6, 4), num_groups=3)
    args.update(kwargs)
    x, G = args.pop("x"), args.pop("num_groups")
    with pytest.raises(err, match=match):
        ops.group_norm_silu(x, G, **args)


def test_custom_op_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        torch.ops.vdm_fast.group_norm_silu(torch.randn(2, 4, 3), 2, None, None, 1e-5, None, None, True, False,
                                           "reference")


def test_device_mix_raises():
    if not GPU:
        pytest.skip("needs a CUDA GPU")
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm_silu(torch.randn(2, 4, 3, device="cuda"), 2, torch.ones(4))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,G,per_frame,fmt", [
    ((2, 256, 16, 64, 64), 32, True, False), ((2, 512, 16, 32, 32), 32, True, True),
    ((8, 320, 64, 64), 32, False, False), ((1, 64, 16, 128, 128), 1, False, False),
    ((2, 256, 16, 64, 64), 32, False, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shapes_on_gpu(shape, G, per_frame, fmt, dtype):
    _check(_inputs(shape, dtype, fmt=fmt, device="cuda"), G, per_frame)
