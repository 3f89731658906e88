"""temporal_attention: attention along the frame axis at every spatial position of a video, fused in Triton.

Reference: vdm_fast/reference/temporal_attention.py. Fast code: kernels/temporal_attention.py (vdm_fast.kernels).
Tests: tests/test_temporal_attention.py. Notes: kernels/notes/temporal_attention.md.
"""

from __future__ import annotations

import math
import numbers

import torch

from vdm_fast import _checks, _dispatch
from vdm_fast.reference.temporal_attention import joint_video_image_mask as _ref_joint_mask
from vdm_fast.reference.temporal_attention import temporal_attention as _reference

# Triton 3.2 and 3.3 abort compiling the batched 3-D dots for the GPU (seen 2026-11-25; 3.4, 3.5, 3.6, 3.9 build
# them): on those versions "auto" runs the reference and "triton" raises, saying why.
SPEC = _dispatch.OpSpec("temporal_attention", triton=True, min_triton=(3, 4))
MAX_T = 128  # the whole T x T score tile of a sequence lives in one program's registers
MAX_D = 128


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v for N independent sequences of T frames.

    q, k, v: (N, heads, T, d), the layout of F.scaled_dot_product_attention, any strides (read in place).
    bias: float (heads, T, T) shared by all sequences, or (B, heads, T, T) per sample with N = B * S and sequences
        n*S .. n*S+S-1 belonging to sample n (rearrange 'b c t h w -> (b h w) ...'); it gets a gradient.
    mask: bool (T, T) or (B, T, T), True = may attend; a row with nothing allowed gives zeros.
    scale: default 1/sqrt(d). T <= 128, d <= 128. Softmax statistics in fp32.
    Returns (N, heads, T, d) in q's dtype (on the fast path stored as (N, T, heads, d) memory, a transposed view,
    so that the output projection reads it without a copy). The backward is deterministic (no atomics).
    """
    scale = _check(q, k, v, bias, mask, scale)
    impl = _dispatch.select(SPEC, q.device, q.dtype)
    if impl == "reference":
        return _reference(q, k, v, bias, mask, scale=scale)
    return torch.ops.vdm_fast.temporal_attention(q, k, v, bias, mask, scale, impl)[0]


def joint_video_image_mask(num_frames: int, num_video_frames: int, *, device=None) -> torch.Tensor:
    """(T, T) bool mask for joint image-video training: the first `num_video_frames` frames (the video) attend to
    each other, every later frame (an independent image) only to itself."""
    _checks.positive_int(num_frames, "num_frames")
    _checks.positive_int(num_video_frames, "num_video_frames", minimum=0)
    if num_video_frames > num_frames:
        raise ValueError(f"num_video_frames must be <= num_frames={num_frames}, got {num_video_frames}")
    return _ref_joint_mask(num_frames, num_video_frames, device=device)


def _check(q, k, v, bias, mask, scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(t, name, ndim=4, floating=True)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _checks.shape(t, name, q.shape, "q's (N, heads, T, d)")
    n, heads, frames, d = q.shape
    if frames > MAX_T:
        raise ValueError(f"q has T={frames} frames: temporal_attention takes T <= {MAX_T}")
    if d > MAX_D:
        raise ValueError(f"q has head dim d={d}: temporal_attention takes d <= {MAX_D}")
    if bias is not None:
        _checks.tensor(bias, "bias", ndim=(3, 4), floating=True)
        _check_groups(bias, "bias", (heads, frames, frames), n, "heads, T, T")
    if mask is not None:
        _checks.tensor(mask, "mask", ndim=(2, 3), dtypes=(torch.bool,))
        _check_groups(mask, "mask", (frames, frames), n, "T, T")
    _checks.same_device(q=q, k=k, v=v, bias=bias, mask=mask)
    if scale is None:
        return 1.0 / math.sqrt(d) if d else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_groups(t: torch.Tensor, name: str, tail: tuple[int, ...], n: int, what: str) -> None:
    """t is shared (*tail) or per sample (B, *tail) with B dividing the N sequences."""
    if tuple(t.shape[-len(tail):]) != tail or t.dim() not in (len(tail), len(tail) + 1):
        raise ValueError(f"{name} must have shape ({what}) = {tail} or (B, {what}), got {tuple(t.shape)}")
    if t.dim() == len(tail) + 1:
        b = t.shape[0]
        if b == 0 or n % b:
            raise ValueError(f"{name} is per sample with B={b}, which must divide the N={n} sequences of q")


def _bthd(n: int, heads: int, frames: int, d: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An (N, heads, T, d) tensor stored as (N, T, heads, d): what the output projection reads without a copy."""
    return torch.empty(n, frames, heads, d, dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


@torch.library.custom_op("vdm_fast::temporal_attention", mutates_args=())
def _temporal_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
    scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _dispatch.check_impl(SPEC, impl)
    from vdm_fast.kernels import temporal_attention as kern

    n, heads, frames, d = q.shape
    out = _bthd(n, heads, frames, d, q)
    lse = torch.empty(n, heads, frames, dtype=torch.float32, device=q.device)
    if out.numel():
        kern.forward(q, k, v, bias, mask, scale, out, lse)
    else:
        lse.fill_(float("-inf"))
    return out, lse


@_temporal_attention_op.register_fake
def _(q, k, v, bias, mask, scale, impl):
    n, heads, frames, d = q.shape
    return _bthd(n, heads, frames, d, q), q.new_empty(n, heads, frames, dtype=torch.float32)


@torch.library.custom_op("vdm_fast::temporal_attention_backward", mutates_args=())
def _temporal_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    bias: torch.Tensor | None, mask: torch.Tensor | None, scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, and dbias (bias's shape and dtype; an empty tensor when there is no bias)."""
    _dispatch.check_impl(SPEC, impl)
    from vdm_fast.kernels import temporal_attention as kern

    n, heads, frames, d = q.shape
    dq, dk, dv = (_bthd(n, heads, frames, d, q) for _ in range(3))
    dbias = torch.zeros(bias.shape if bias is not None else (0,), dtype=torch.float32, device=q.device)
    if dq.numel():
        kern.backward(grad_out, q, k, v, out, lse, bias, mask, scale, dq, dk, dv, dbias)
    return dq, dk, dv, dbias.to(bias.dtype if bias is not None else q.dtype)


@_temporal_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, bias, mask, scale, impl):
    n, heads, frames, d = q.shape
    dbias = q.new_empty(bias.shape if bias is not None else (0,), dtype=bias.dtype if bias is not None else q.dtype)
    return (*(_bthd(n, heads, frames, d, q) for _ in range(3)), dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask)
    ctx.scale, ctx.impl = scale, impl
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, bias, mask = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.vdm_fast.temporal_attention_backward(
        grad_out, q, k, v, out, lse, bias, mask, ctx.scale, ctx.impl)
    return dq, dk, dv, (dbias if bias is not None and ctx.needs_input_grad[3] else None), None, None, None


_temporal_attention_op.register_autograd(_backward, setup_context=_setup_context)
