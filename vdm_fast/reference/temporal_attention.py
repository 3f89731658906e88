"""Reference temporal attention: softmax(q k^T * scale + bias, masked) v over the frame axis, plain PyTorch.

The definition of correct for vdm_fast.ops.temporal_attention and temporal_attention_packed. Empty inputs (N = 0,
T = 0, d = 0) give empty outputs, as SDPA does.
"""

from __future__ import annotations

import math

import torch


def _per_sample(s: torch.Tensor, t: torch.Tensor, op, shared_dims: int) -> torch.Tensor:
    """op(s, t) with t shared (`shared_dims` dims, broadcast) or per sample (B, ...): s (N, heads, T, T) is viewed as
    (B, S, heads, T, T), sequences n*S .. n*S+S-1 belonging to sample n (rearrange 'b c t h w -> (b h w) ...')."""
    if t.dim() == shared_dims:
        return op(s, t)
    b = t.shape[0]
    t = t.view(b, 1, *((1,) * (4 - t.dim())), *t.shape[1:])
    return op(s.view(b, s.shape[0] // b, *s.shape[1:]), t).view(s.shape)


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v: (N, heads, T, d). bias: (heads, T, T) or (B, heads, T, T) float, N = B * S.
    mask: (T, T) or (B, T, T) bool, True = may attend. Returns (N, heads, T, d) in q's dtype.

    Softmax runs in fp32 for fp16/bf16 inputs (fp64 for fp64). A row with nothing allowed gives zeros (and a zero
    gradient), never NaN. T = 0 gives an empty output.
    """
    n, _, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("nhid,nhjd->nhij", q.to(work), k.to(work)) * scale
    if bias is not None:
        s = _per_sample(s, bias.to(work), torch.add, 3)
    if mask is not None:
        s = _per_sample(s, mask, lambda x, m: x.masked_fill(~m, float("-inf")), 2)
    # Max-subtracted softmax; a fully masked row has max -inf: shift by 0 instead and divide by 1, so it gives 0.
    if s.shape[-1] == 0:  # T = 0: nothing to attend to, and amax takes no empty dim
        return torch.einsum("nhij,nhjd->nhid", s, v.to(work)).to(q.dtype)
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("nhij,nhjd->nhid", p, v.to(work)).to(q.dtype)


def temporal_attention_packed(
    qkv: torch.Tensor,
    heads: int,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """qkv: (B, T, S, 3 * heads * d), last dim "(three heads d)". Sequence n = b * S + s of temporal_attention.
    Returns (B, T, S, heads * d)."""
    batch, frames, seqs, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.reshape(batch, frames, seqs, 3, heads, d).permute(3, 0, 2, 4, 1, 5).reshape(
        3, batch * seqs, heads, frames, d).unbind(0)
    out = temporal_attention(q, k, v, bias, mask, scale=scale)
    return out.reshape(batch, seqs, heads, frames, d).permute(0, 3, 1, 2, 4).reshape(batch, frames, seqs, heads * d)


def joint_video_image_mask(num_frames: int, num_video_frames: int, *, device=None) -> torch.Tensor:
    """(T, T) bool: the first `num_video_frames` frames attend to each other; every later frame (an independent
    image appended for joint image-video training) attends only to itself."""
    i = torch.arange(num_frames, device=device)
    video = i < num_video_frames
    return (video[:, None] & video[None, :]) | (i[:, None] == i[None, :])
