"""temporal_attention (Triton): forward and all four gradients against the fp64 reference, through the interpreter
on CPU (a GPU where one is lent), plus layouts, masks, determinism, registration and the TemporalAttention layer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, GPU, TOL, assert_close, rel_err, strided

import vdm_fast
from vdm_fast import ops
from vdm_fast import reference as ref
from vdm_fast.layers import TemporalAttention

# fp32: the spec's 1e-4 (the GPU computes fp32 products as three tf32 MMAs); fp16 / bf16 as tests/helpers.py says.
ATOL = {torch.float32: 1e-4, torch.float16: TOL[torch.float16], torch.bfloat16: TOL[torch.bfloat16]}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bias(kind, batch, heads, frames, dtype=torch.float32):
    if kind is None:
        return None
    shape = (heads, frames, frames) if kind == "shared" else (batch, heads, frames, frames)
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def _mask(kind, batch, frames):
    if kind is None:
        return None
    if kind == "joint":
        return ops.joint_video_image_mask(frames, max(1, frames // 2), device=DEVICE)
    m = torch.rand((frames, frames) if kind == "shared" else (batch, frames, frames), device=DEVICE) > 0.3
    m[..., frames // 2, :] = False  # a row with nothing allowed: zeros, never NaN
    return m


def _reference_grads(q, k, v, bias, mask, grad, scale=None):
    """The fp64 reference on the same (rounded) inputs and the same (rounded) output gradient."""
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    out = ref.temporal_attention(*ins, b, mask, scale=scale)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in ins] + ([b.grad] if b is not None else [])


def _run(q, k, v, bias, mask, grad, scale=None):
    for t in (q, k, v, bias):
        if t is not None:
            t.requires_grad_()
    with vdm_fast.backend("triton"):
        out = ops.temporal_attention(q, k, v, bias, mask, scale=scale)
    out.backward(grad)
    return out, [q.grad, k.grad, v.grad] + ([bias.grad] if bias is not None else [])


def _check(q, k, v, bias, mask, scale=None, grad=None):
    n, heads, frames, d = q.shape
    grad = torch.randn(n, heads, frames, d, device=DEVICE, dtype=q.dtype) if grad is None else grad
    want, want_grads = _reference_grads(q, k, v, bias, mask, grad, scale)
    out, grads = _run(q, k, v, bias, mask, grad, scale)
    tol = ATOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == want.shape
    assert_close(out, want, tol, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
        assert g.dtype == (bias.dtype if name == "dbias" else q.dtype) and g.shape == w.shape
        # dq is 0 for T = 1 (softmax over one key), up to the rounding of out: compare at dv's scale there.
        if w.norm() == 0:
            assert g.norm() <= tol * want_grads[2].norm(), name
        else:
            assert_close(g, w, tol, name)
    return out


CASES = [  # (N sequences, heads, T, d, bias, mask, per-sample B)
    (5, 2, 1, 32, "shared", None, 1),
    (6, 2, 7, 24, "per_sample", "shared", 3),
    (8, 3, 16, 64, "shared", "joint", 1),
    (12, 1, 16, 32, "per_sample", "per_sample", 2),
    (4, 2, 24, 40, None, "per_sample", 2),
    (3, 1, 33, 16, "per_sample", "shared", 3),
    (4, 2, 16, 128, "shared", None, 1),
    (9, 2, 5, 8, None, None, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,heads,frames,d,bias,mask,batch", CASES)
def test_matches_reference(n, heads, frames, d, bias, mask, batch, dtype):
    q, k, v = (torch.randn(n, heads, frames, d, device=DEVICE, dtype=dtype) for _ in range(3))
    _check(q, k, v, _bias(bias, batch, heads, frames), _mask(mask, batch, frames))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_in_low_precision_and_custom_scale(dtype):
    q, k, v = (torch.randn(6, 2, 9, 16, device=DEVICE, dtype=dtype) for _ in range(3))
    _check(q, k, v, _bias("per_sample", 2, 2, 9, dtype=dtype), None, scale=0.37)


def test_large_t_blocked_path():
    """T = 100: the blocked forward (online softmax over key blocks) and the two-pass backward."""
    q, k, v = (torch.randn(2, 1, 100, 24, device=DEVICE) for _ in range(3))
    _check(q, k, v, _bias("per_sample", 2, 1, 100), _mask("shared", 2, 100))


def test_strided_views_read_in_place():
    """q, k, v as a model's rearrange leaves them (views of one qkv projection), a non-unit head-dim stride, a
    strided bias, mask and output gradient."""
    b, h, w, frames, heads, d = 2, 2, 3, 7, 2, 16
    qkv = torch.randn(b, h, w, frames, 3 * heads * d, device=DEVICE)
    q, k, v = (t.reshape(b * h * w, frames, heads, d).transpose(1, 2) for t in qkv.chunk(3, -1))
    assert q.data_ptr() == qkv.data_ptr() and not q.is_contiguous()
    v = strided(v.contiguous(), dim=3)  # head dim stride 2
    bias = strided(torch.randn(b, heads, frames, frames, device=DEVICE), dim=1)
    mask = torch.ones(2 * frames, frames, dtype=torch.bool, device=DEVICE)[::2]  # helpers.strided takes no bool
    mask.copy_(torch.rand(frames, frames, device=DEVICE) > 0.2)
    assert not mask.is_contiguous()
    grad = strided(torch.randn(b * h * w, heads, frames, d, device=DEVICE), dim=2)
    _check(q.detach(), k.detach(), v, bias, mask, grad=grad)


def test_per_sample_bias_spans_several_programs_and_launches(monkeypatch):
    """S = 13 sequences a sample: several backward programs per sample, the last one partial; then a partials cap
    so small that whole samples, and then parts of one sample, go to separate launches."""
    from vdm_fast.kernels import temporal_attention as kern

    q, k, v = (torch.randn(39, 2, 11, 16, device=DEVICE) for _ in range(3))
    bias = _bias("per_sample", 3, 2, 11)
    grad = torch.randn_like(q)
    _, want = _reference_grads(q, k, v, bias, None, grad)
    for cap in (None, 2 * 11 * 11 * 8, 2 * 11 * 11 * 2):
        if cap is not None:
            monkeypatch.setattr(kern, "MAX_PARTIAL_ELEMENTS", cap)
        _, grads = _run(q.clone(), k.clone(), v.clone(), bias.clone(), None, grad)
        for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want):
            assert_close(g, w, 1e-4, f"{name} (cap {cap})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zeros(dtype):
    q, k, v = (torch.randn(4, 2, 6, 16, device=DEVICE, dtype=dtype) for _ in range(3))
    mask = torch.rand(2, 6, 6, device=DEVICE) > 0.5
    mask[0, 2] = False
    mask[1] = False  # every row of sample 1
    bias = _bias("per_sample", 2, 2, 6)
    out = _check(q, k, v, bias, mask)
    assert torch.isfinite(out).all()
    assert (out[0:2, :, 2] == 0).all() and (out[2:4] == 0).all()
    assert (q.grad[2:4] == 0).all() and (bias.grad[1] == 0).all()


def test_backward_is_deterministic():
    q, k, v = (torch.randn(24, 2, 16, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    bias = _bias("per_sample", 3, 2, 16)
    grad = torch.randn_like(q)
    runs = [_run(q.clone(), k.clone(), v.clone(), bias.clone(), None, grad) for _ in range(3)]
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_output_layout_and_empty_input():
    q = torch.randn(3, 2, 5, 8, device=DEVICE)
    with vdm_fast.backend("triton"):
        out = ops.temporal_attention(q, q, q)
        # Stored (N, T, heads, d): the output projection reads out.transpose(1, 2) without a copy.
        assert out.transpose(1, 2).is_contiguous()
        empty = torch.randn(0, 2, 5, 8, device=DEVICE, requires_grad=True)
        e = ops.temporal_attention(empty, empty, empty)
        e.sum().backward()
    assert e.shape == (0, 2, 5, 8) and empty.grad.shape == empty.shape


def test_dispatch():
    from vdm_fast import _dispatch
    from vdm_fast.ops.temporal_attention import SPEC

    if not GPU:
        assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "reference"  # auto: no CPU kernel
    with vdm_fast.backend("reference"):
        assert _dispatch.select(SPEC, torch.device(DEVICE), torch.float32) == "reference"
    with vdm_fast.backend("triton"):
        assert _dispatch.select(SPEC, torch.device(DEVICE), torch.bfloat16) == "triton"
        with pytest.raises(TypeError, match="float32"):
            _dispatch.select(SPEC, torch.device(DEVICE), torch.float64)
    # fp64 in auto mode takes the reference, and is the definition itself.
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64, device=DEVICE)
    assert torch.equal(ops.temporal_attention(q, q, q), ref.temporal_attention(q, q, q))


def test_opcheck():
    q, k, v = (torch.randn(6, 2, 7, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(3, 2, 7, 7, device=DEVICE, requires_grad=True)
    mask = _mask("shared", 1, 7)
    op = torch.ops.vdm_fast.temporal_attention.default
    torch.library.opcheck(op, (q, k, v, bias, mask, 0.25, "triton"))
    torch.library.opcheck(op, (q, k, v, None, None, 0.25, "triton"))
    torch.library.opcheck(op, (q, k, v, bias[0], mask[None].expand(2, 7, 7).contiguous(), 0.25, "triton"))


def test_torch_compile_fullgraph():
    layer = TemporalAttention(16, heads=2, dim_head=8).to(DEVICE)
    x = torch.randn(2, 16, 5, 2, 3, device=DEVICE, requires_grad=True)

    def f(x):
        return layer(x, num_video_frames=3).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with vdm_fast.backend("triton"):
        got = compiled(x)
        got.backward()
    want = f(x.detach())  # the reference path (auto on CPU) or the kernels (auto on CUDA)
    assert rel_err(got.detach(), want.detach()) < 1e-5
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad,err,match", [
    (dict(k=torch.randn(4, 2, 6, 16)), ValueError, "k"),
    (dict(v=torch.randn(4, 2, 5, 8)), ValueError, "v"),
    (dict(q=torch.randn(2, 5, 16)), ValueError, "q"),
    (dict(k=torch.randn(4, 2, 5, 16, dtype=torch.float16)), TypeError, "k"),
    (dict(q=torch.randint(0, 3, (4, 2, 5, 16))), TypeError, "q"),
    (dict(bias=torch.randn(2, 5, 6)), ValueError, "bias"),
    (dict(bias=torch.randn(3, 5, 5)), ValueError, "bias"),
    (dict(bias=torch.randn(3, 2, 5, 5)), ValueError, "bias.*B=3"),
    (dict(bias=torch.randn(5, 5)), ValueError, "bias"),
    (dict(mask=torch.ones(5, 5)), TypeError, "mask"),
    (dict(mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(3, 5, 5, dtype=torch.bool)), ValueError, "mask"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(scale=math.inf), TypeError, "scale"),
])
def test_bad_input_raises(bad, err, match):
    args = dict(q=torch.randn(4, 2, 5, 16), k=torch.randn(4, 2, 5, 16), v=torch.randn(4, 2, 5, 16), bias=None,
                mask=None, scale=None)
    args.update(bad)
    with pytest.raises(err, match=match):
        ops.temporal_attention(args["q"], args["k"], args["v"], args["bias"], args["mask"], scale=args["scale"])


def test_limits_raise():
    with pytest.raises(ValueError, match="d=160"):
        x = torch.randn(2, 1, 4, 160)
        ops.temporal_attention(x, x, x)
    with pytest.raises(ValueError, match="T=129"):
        x = torch.randn(2, 1, 129, 8)
        ops.temporal_attention(x, x, x)
    with pytest.raises(ValueError, match="num_video_frames"):
        ops.joint_video_image_mask(4, 5)


def test_joint_video_image_mask():
    m = ops.joint_video_image_mask(6, 4, device=DEVICE)
    assert m.dtype == torch.bool and m.shape == (6, 6)
    assert m[:4, :4].all() and not m[:4, 4:].any() and not m[4:, :4].any()
    assert torch.equal(m[4:, 4:], torch.eye(2, dtype=torch.bool, device=DEVICE))
    assert ops.joint_video_image_mask(3, 0).equal(torch.eye(3, dtype=torch.bool))
    assert ops.joint_video_image_mask(3, 3).all()


def test_layer_matches_manual_attention_and_reads_views(monkeypatch):
    """The layer is qkv projection + attention with the relative position bias + output projection, over every
    spatial position; it hands the op strided views of the projection output (no permute copies)."""
    import vdm_fast.layers.temporal_attention as layer_mod

    b, c, frames, h, w, heads, dh = 2, 12, 6, 3, 2, 3, 8
    layer = TemporalAttention(c, heads=heads, dim_head=dh).to(DEVICE)
    x = torch.randn(b, c, frames, h, w, device=DEVICE)
    pos = torch.randint(0, 20, (b, frames), device=DEVICE)
    seen = []

    def spy(q, k, v, bias, mask):
        seen.append((q, k, v, bias, mask))
        return ops.temporal_attention(q, k, v, bias, mask)

    monkeypatch.setattr(layer_mod, "temporal_attention", spy)
    with vdm_fast.backend("triton"):
        y = layer(x, positions=pos, num_video_frames=4)
    q, k, v, bias, mask = seen[0]
    assert not q.is_contiguous() and q.data_ptr() + heads * dh * q.element_size() == k.data_ptr()
    assert bias.shape == (b, heads, frames, frames) and mask.shape == (frames, frames)

    xs = x.permute(0, 3, 4, 2, 1).reshape(-1, frames, c)
    qkv = xs @ layer.to_qkv.weight.t()
    q2, k2, v2 = (t.reshape(-1, frames, heads, dh).transpose(1, 2) for t in qkv.chunk(3, -1))
    s = q2 @ k2.transpose(-1, -2) / math.sqrt(dh)
    s = s + layer.rel_pos_bias(pos).repeat_interleave(h * w, 0)
    s = s.masked_fill(~ops.joint_video_image_mask(frames, 4, device=DEVICE), float("-inf"))
    o = (s.softmax(-1) @ v2).transpose(1, 2).reshape(-1, frames, heads * dh) @ layer.to_out.weight.t()
    want = o.reshape(b, h, w, frames, c).permute(0, 4, 3, 1, 2)
    assert y.shape == x.shape
    assert_close(y, want, 1e-5, "layer output")


def test_layer_joint_mask_isolates_images():
    layer = TemporalAttention(8, heads=2, dim_head=4).to(DEVICE)
    x = torch.randn(1, 8, 5, 2, 2, device=DEVICE)
    x2 = x.clone()
    x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])  # change the appended images only
    with vdm_fast.backend("triton"):
        y, y2 = layer(x, num_video_frames=3), layer(x2, num_video_frames=3)
        assert torch.equal(y[:, :, :3], y2[:, :, :3])
        y.sum().backward()
    assert layer.rel_pos_bias.relative_attention_bias.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2**17, 2**20])
def test_large_n_on_gpu(n):
    """N past CUDA's 65,535 grid-axis limit (where SDPA's fused backends fail), T = 16."""
    heads, frames, d = 1, 16, 32
    q, k, v = (torch.randn(n, heads, frames, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(8, heads, frames, frames, device="cuda")
    _check(q, k, v, bias, ops.joint_video_image_mask(frames, 12, device="cuda"))
