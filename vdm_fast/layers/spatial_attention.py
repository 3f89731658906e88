"""SpatialAttention: multi-head self-attention over the H*W positions of each frame of a video, frames as batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatialAttention(nn.Module):
    """x (B, C, T, H, W) -> (B, C, T, H, W): qkv projection, softmax attention among the H*W positions of each frame
    (F.scaled_dot_product_attention, which picks flash / memory-efficient kernels on GPU), output projection.

    Frames never mix, so this layer is exact under joint image-video training. The residual add is the caller's.
    heads * dim_head is the inner width; `heads=None` means dim // dim_head heads.

    Copies: for channels_last_3d input (what Unet3D runs) x's memory is (B*T, H*W, C) as is. q, k and v are
    projected with the three row blocks of to_qkv's weight (views) rather than split from one qkv output, whose
    backward would stack dq, dk, dv into a new buffer (the weight gradient's three blocks are concatenated instead:
    3 * inner * C elements); the result comes back as a channels_last_3d view. Contiguous input with B > 1 is
    copied once into that frame-major order.
    """

    def __init__(self, dim: int, heads: int | None = None, dim_head: int = 64):
        super().__init__()
        if heads is None:
            if dim % dim_head:
                raise ValueError(f"dim ({dim}) must be a multiple of dim_head ({dim_head}) when heads is not given")
            heads = dim // dim_head
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.dim}, T, H, W), got {got}")
        B, C, T, H, W = x.shape
        # (B, C, T, H, W) -> (B*T, H*W, C): one sequence per frame. Free for channels_last_3d input.
        seq = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
        # Under autocast each projection returns the autocast dtype: the attention sees one dtype.
        q, k, v = (F.linear(seq, w).view(B * T, H * W, self.heads, self.dim_head).transpose(1, 2)
                   for w in self.to_qkv.weight.chunk(3, 0))
        out = F.scaled_dot_product_attention(q, k, v)  # (B*T, heads, H*W, dim_head), scale 1/sqrt(dim_head)
        out = self.to_out(out.transpose(1, 2).reshape(B * T, H * W, self.heads * self.dim_head))
        # Back to (B, C, T, H, W) as a channels_last_3d-strided view (no copy).
        return out.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}"
