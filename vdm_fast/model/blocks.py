"""The 3D U-Net's blocks: every one is per frame in space, except the temporal attention, which is masked.

So normalization, convolutions and spatial attention never mix frames, which is what makes joint image-video training
exact (an appended image is processed as if alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdm_fast.layers.group_norm_silu import GroupNormSiLU
from vdm_fast.layers.spatial_attention import SpatialAttention
from vdm_fast.layers.temporal_attention import TemporalAttention


class Conv1x3x3(nn.Conv3d):
    """The paper's factorized conv: a 2D 3x3 conv applied to every frame (kernel 1x3x3, padding only in space)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(in_channels, out_channels, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))


def frame_norm(num_groups: int, channels: int, activation: str | None = "silu") -> GroupNormSiLU:
    """GroupNorm over each frame's (C / groups, H, W) on its own, fused with the activation (None: plain norm)."""
    return GroupNormSiLU(num_groups, channels, per_frame=True, activation=activation)


class ResBlock(nn.Module):
    """h = conv(GN-SiLU(x)); h = conv(dropout(GN-SiLU(h) with FiLM from emb)); out = skip(x) + h.

    FiLM: (scale, shift) = Linear(SiLU(emb)), applied as gn(h) * (1 + scale) + shift inside the fused GroupNormSiLU.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, num_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = frame_norm(num_groups, in_channels)
        self.conv1 = Conv1x3x3(in_channels, out_channels)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = frame_norm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv1x3x3(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        scale, shift = self.emb_proj(emb).chunk(2, dim=1)
        h = self.conv2(self.dropout(self.norm2(h, scale=scale, shift=shift)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial attention over each frame's positions, then temporal attention over frames at each position
    (relative position bias, joint image-video mask), each pre-normed per frame and added residually."""

    def __init__(self, channels: int, dim_head: int = 64, num_groups: int = 32, num_buckets: int = 32,
                 max_distance: int = 32):
        super().__init__()
        if channels % dim_head:
            raise ValueError(f"attention at width {channels}: not a multiple of the head dim {dim_head}")
        heads = channels // dim_head
        self.spatial_norm = frame_norm(num_groups, channels, activation=None)
        self.spatial = SpatialAttention(channels, heads=heads, dim_head=dim_head)
        self.temporal_norm = frame_norm(num_groups, channels, activation=None)
        self.temporal = TemporalAttention(channels, heads=heads, dim_head=dim_head, num_buckets=num_buckets,
                                          max_distance=max_distance)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        x = x + self.spatial(self.spatial_norm(x))
        return x + self.temporal(self.temporal_norm(x), positions=positions, num_video_frames=num_video_frames)


class Downsample(nn.Module):
    """Halve H and W (never T): a stride-2 1x3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv1x3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (never T): nearest-neighbour in space, then a 1x3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv1x3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
