"""temporal_attention (Triton): forward and all four gradients against the fp64 reference, through the interpreter
on CPU (a GPU where one is lent), plus layouts, masks, determinism, registration and the TemporalAttention layer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, GPU, TOL, assert_close, strided
from op_contract import OpContract

import vdm_fast
from vdm_fast import ops
from vdm_fast import reference as ref

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


def eager_lowprec(q, k, v, bias=None, mask=None, scale=None):
    """Attention as plain PyTorch code runs it in the inputs' own precision (every intermediate in q's dtype): the
    same-precision baseline whose error bounds ours (tests/op_contract.py)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    n = q.shape[0]
    if bias is not None:
        b = bias.to(q.dtype)
        s = s + (b if b.dim() == 3 else b.repeat_interleave(n // b.shape[0], 0))
    if mask is not None:
        m = mask if mask.dim() == 2 else mask.repeat_interleave(n // mask.shape[0], 0)[:, None]
        s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1)
    return torch.where(torch.isnan(p), torch.zeros_like(p), p) @ v


CASES = [  # (N sequences, heads, T, d, bias, mask, per-sample B)
    (5, 2, 1, 32, "shared", None, 1),
    (6, 2, 7, 24, "per_sample", "shared", 3),
    (8, 3, 16, 64, "shared", "joint", 1),
    (12, 1, 16, 32, "per_sample", "per_sample", 2),
    (4, 2, 24, 40, None, "per_sample", 2),
    (3, 1, 33, 16, "per_sample", "shared", 3),
    (4, 2, 16, 128, "shared", None, 1),
    (9, 2, 5, 8, None, None, 1),
    (6, 2, 6, 16, "per_sample", "per_sample", 2),  # bias per sample (B=2) with a mask per sample (B=3): lcm split
]
_NAMES = ("n", "heads", "frames", "d", "bias", "mask", "batch")


def _make(params, dtype, device):
    n, heads, frames, d, bias, mask, batch = (params[k] for k in _NAMES)
    q, k, v = (torch.randn(n, heads, frames, d, device=device, dtype=dtype) for _ in range(3))
    mask_batch = 3 if params.get("mask_batch") else batch
    bias_dtype = dtype if params.get("bias_lowp") else torch.float32
    return dict(q=q, k=k, v=v, bias=_bias(bias, batch, heads, frames, bias_dtype), mask=_mask(mask, mask_batch, frames),
                scale=params.get("scale"))


class TestTemporalAttentionContract(OpContract):
    """The shared op contract: fp64 reference agreement within k x the eager same-precision error (forward, dq, dk,
    dv, dbias), strided views, opcheck, torch.compile (aot_eager and Inductor), bad input, determinism, device mix."""

    differentiable = ("q", "k", "v", "bias")
    cases = [(f"N{c[0]}-h{c[1]}-T{c[2]}-d{c[3]}-{c[4]}-{c[5]}-B{c[6]}", dict(zip(_NAMES, c))) for c in CASES[:-1]] + [
        ("lcm-split", dict(zip(_NAMES, CASES[-1]), mask_batch=True)),
        ("scale-lowp-bias", dict(zip(_NAMES, (6, 2, 9, 16, "per_sample", None, 2)), scale=0.37, bias_lowp=True))]
    bad_inputs = [
        (dict(k=torch.randn(4, 2, 6, 16)), ValueError, "k"),
        (dict(v=torch.randn(4, 2, 5, 8)), ValueError, "v"),
        (dict(q=torch.randn(2, 5, 16)), ValueError, "q"),
        (dict(k=torch.randn(4, 2, 5, 16, dtype=torch.float16)), TypeError, "k"),
        (dict(q=torch.randint(0, 3, (4, 2, 5, 16))), TypeError, "q"),
        (dict(q=[[0.0]]), TypeError, "q"),
        (dict(bias=torch.randn(2, 5, 6)), ValueError, "bias"),
        (dict(bias=torch.randn(3, 5, 5)), ValueError, "bias"),
        (dict(bias=torch.randn(3, 2, 5, 5)), ValueError, "bias.*B=3"),
        (dict(bias=torch.randn(5, 5)), ValueError, "bias"),
        (dict(mask=torch.ones(5, 5)), TypeError, "mask"),
        (dict(mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.ones(3, 5, 5, dtype=torch.bool)), ValueError, "mask"),
        (dict(scale="x"), TypeError, "scale"),
        (dict(scale=math.inf), TypeError, "scale"),
        (dict(scale=math.nan), TypeError, "scale"),
        (dict(scale=True), TypeError, "scale"),
        (dict(q=torch.randn(4, 2, 129, 8), k=torch.randn(4, 2, 129, 8), v=torch.randn(4, 2, 129, 8)), ValueError,
         "T=129"),
        (dict(q=torch.randn(4, 2, 5, 160), k=torch.randn(4, 2, 5, 160), v=torch.randn(4, 2, 5, 160)), ValueError,
         "d=160"),
    ]

    def make_inputs(self, params, dtype, device):
        return _make(params, dtype, device)

    def bad_base(self):
        return dict(q=torch.randn(4, 2, 5, 16), k=torch.randn(4, 2, 5, 16), v=torch.randn(4, 2, 5, 16), bias=None,
                    mask=None, scale=None)

    def reference(self, q, k, v, bias, mask, scale):
        return ref.temporal_attention(q, k, v, bias, mask, scale=scale)

    def baseline(self, q, k, v, bias, mask, scale):
        return eager_lowprec(q, k, v, bias, mask, scale)

    def fast(self, q, k, v, bias, mask, scale):
        return ops.temporal_attention(q, k, v, bias, mask, scale=scale)

    def opcheck_cases(self):  # opcheck runs the op a dozen ways: small cases
        return [dict(zip(_NAMES, (6, 1, 3, 8, "per_sample", "per_sample", 2)), mask_batch=True)]

    def opcheck_calls(self, inputs):
        scale = inputs["scale"] or 1.0 / math.sqrt(inputs["q"].shape[-1])
        args = (inputs["q"], inputs["k"], inputs["v"], inputs["bias"], inputs["mask"], scale, "triton")
        return [(torch.ops.vdm_fast.temporal_attention.default, args),
                (torch.ops.vdm_fast.temporal_attention.default, (*args[:3], None, None, 1.0, "triton"))]

    def compile_case(self):
        return self.cases[1][1]


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


@pytest.mark.parametrize("shared", [False, True])
def test_bias_partials_span_several_programs_and_launches(monkeypatch, shared):
    """S = 5 sequences a sample, 2 samples: several backward programs per sample, the last one partial; then a
    partials cap so small that one sample goes to each launch, and then one so small that parts of one sample go
    to separate launches (each summed in launch order). Per-sample bias (4-D op) and a shared bias over several
    samples (packed op, B = 2), whose launches all add to one gradient."""
    from vdm_fast.kernels import temporal_attention as kern

    heads, frames, d = 2, 11, 16
    qkv = torch.randn(2, frames, 5, 3 * heads * d, device=DEVICE)
    bias = _bias("shared" if shared else "per_sample", 2, heads, frames)
    grad = torch.randn(2, frames, 5, heads * d, device=DEVICE)

    def grads(fn, x, b):
        x, b = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        fn(x, b).backward(grad.to(x.dtype))
        return x.grad, b.grad

    if shared:
        def fast(x, b):
            return ops.temporal_attention_packed(x, heads, b)
    else:
        def fast(x, b):  # the 4-D op on the packed views (its per-sample grouping: N = B * S)
            q, k, v = (t.reshape(2, frames, 5, heads, d).permute(0, 2, 3, 1, 4).reshape(10, heads, frames, d)
                       for t in x.chunk(3, -1))
            out = ops.temporal_attention(q, k, v, b)
            return out.reshape(2, 5, heads, frames, d).permute(0, 3, 1, 2, 4).reshape(grad.shape)

    want = grads(lambda x, b: ref.temporal_attention_packed(x, heads, b), qkv.double(), bias.double())
    per_sample = heads * 5  # backward programs of one sample (BN = 1 at fp32, T = 11, d = 16)
    for cap in (None, per_sample, 4):
        if cap is not None:
            monkeypatch.setattr(kern, "MAX_PARTIAL_ELEMENTS", cap * frames * frames)
        with vdm_fast.backend("triton"):
            got = grads(fast, qkv, bias)
        for name, g, w in zip(("dqkv", "dbias"), got, want):
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


def test_output_layout():
    q = torch.randn(3, 2, 5, 8, device=DEVICE)
    with vdm_fast.backend("triton"):
        out = ops.temporal_attention(q, q, q)
    # Stored (N, T, heads, d): the output projection reads out.transpose(1, 2) without a copy.
    assert out.transpose(1, 2).is_contiguous()


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


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2**17, 2**20])
def test_large_n_on_gpu(n):
    """N past CUDA's 65,535 grid-axis limit (where SDPA's fused backends fail), T = 16."""
    heads, frames, d = 1, 16, 32
    q, k, v = (torch.randn(n, heads, frames, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(8, heads, frames, frames, device="cuda")
    _check(q, k, v, bias, ops.joint_video_image_mask(frames, 12, device="cuda"))
