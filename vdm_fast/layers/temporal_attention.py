"""TemporalAttention: the video U-Net's attention along frames, at every spatial position, on the fused op."""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast.layers.rel_pos_bias import RelativePositionBias
from vdm_fast.ops.temporal_attention import joint_video_image_mask, temporal_attention


class TemporalAttention(nn.Module):
    """(B, C, T, H, W) -> (B, C, T, H, W): qkv projection, attention over T with a learned relative position bias
    (and the joint image-video mask when asked), output projection. No norm and no residual: the block around it
    adds those, as video-diffusion-pytorch's Residual(PreNorm(...)) does.

    Layout: the projections run over a channels-last view (B, H, W, T, C), so q, k, v are strided views of the qkv
    output that the op reads in place, and the op's output ((N, T, heads, d) memory) feeds the output projection as
    a view. The result is a (B, C, T, H, W) view of (B, H, W, T, C) memory. Parameter names follow
    video-diffusion-pytorch's Attention (to_qkv, to_out, bias-free linears).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        hidden = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * hidden, bias=False)
        self.to_out = nn.Linear(hidden, dim, bias=False)
        self.rel_pos_bias = RelativePositionBias(heads, num_buckets, max_distance)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        """x: (B, C, T, H, W). positions: (T,) or (B, T) integer frame indices (default 0..T-1).
        num_video_frames: if given, frames from that index on are independent images (joint training mask)."""
        if x.dim() != 5:
            raise ValueError(f"x must have shape (B, C, T, H, W), got {tuple(x.shape)}")
        b, _, frames, h, w = x.shape
        qkv = self.to_qkv(x.permute(0, 3, 4, 2, 1))  # (B, H, W, T, 3 * heads * d)
        q, k, v = (t.reshape(b * h * w, frames, self.heads, self.dim_head).transpose(1, 2) for t in qkv.chunk(3, -1))
        bias = self.rel_pos_bias(frames if positions is None else positions)
        mask = None if num_video_frames is None else joint_video_image_mask(frames, num_video_frames, device=x.device)
        out = temporal_attention(q, k, v, bias, mask)  # (N, heads, T, d)
        out = out.transpose(1, 2).reshape(b, h, w, frames, self.heads * self.dim_head)
        return self.to_out(out).permute(0, 4, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}"
