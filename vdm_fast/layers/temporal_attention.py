"""TemporalAttention: the video U-Net's attention along frames, at every spatial position, on the fused op."""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast.layers.rel_pos_bias import RelativePositionBias
from vdm_fast.ops.temporal_attention import joint_video_image_mask, temporal_attention_packed


class TemporalAttention(nn.Module):
    """(B, C, T, H, W) -> (B, C, T, H, W): qkv projection, attention over T with a learned relative position bias
    (and the joint image-video mask when asked), output projection. No norm and no residual: the block around it
    adds those, as video-diffusion-pytorch's Residual(PreNorm(...)) does.

    Layout, with no copy of an activation for channels_last_3d input (what Unet3D runs): the projection runs on x's
    own memory viewed (B, T, H, W, C), giving qkv (B, T, H*W, 3 * heads * d), which the op reads in place
    (`ops.temporal_attention_packed`); its output (B, T, H*W, heads * d) feeds the output projection as is; the
    result, (B, T, H, W, C) memory, is returned as a channels_last_3d (B, C, T, H, W) view. In the backward the op
    writes one packed dqkv for the projection. Contiguous input is projected as a batched matmul on its
    (B, C, T*H*W) view instead (no copy either; the op then reads q, k, v with a strided channel dim).
    Parameter names follow video-diffusion-pytorch's Attention (to_qkv, to_out, bias-free linears).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        hidden = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * hidden, bias=False)
        self.to_out = nn.Linear(hidden, dim, bias=False)
        self.rel_pos_bias = RelativePositionBias(heads, num_buckets, max_distance)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        """x: (B, C, T, H, W). positions: (T,) or (B, T) integer frame indices (default 0..T-1).
        num_video_frames: if given, frames from that index on are independent images (joint training mask)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.dim}, T, H, W), got {got}")
        b, c, frames, h, w = x.shape
        bias = self.rel_pos_bias(frames if positions is None else _check_positions(positions, b, frames))
        mask = None if num_video_frames is None else joint_video_image_mask(frames, num_video_frames, device=x.device)
        out = temporal_attention_packed(self._qkv(x), self.heads, bias, mask)  # (B, T, H*W, heads * d)
        return self.to_out(out).view(b, frames, h, w, c).permute(0, 4, 1, 2, 3)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H*W, 3 * heads * d), computed on x's memory without copying x."""
        b, c, frames, h, w = x.shape
        channels_last = x.permute(0, 2, 3, 4, 1)
        if channels_last.is_contiguous():
            return self.to_qkv(channels_last).flatten(2, 3)
        # bmm on the expanded weight: torch.matmul would fold the batch into the rows and copy the transposed x.
        qkv = torch.bmm(self.to_qkv.weight.expand(b, -1, -1), x.reshape(b, c, frames * h * w))  # (B, 3hd, THW)
        return qkv.view(b, -1, frames, h * w).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}"


def _check_positions(positions, batch: int, frames: int):
    """positions: (T,) or (B, T) for x's B and T (its values are rel_pos_bias's to check)."""
    if isinstance(positions, torch.Tensor) and (
            (positions.dim() == 1 and positions.shape[0] == frames)
            or (positions.dim() == 2 and tuple(positions.shape) == (batch, frames))):
        return positions
    got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
    raise ValueError(f"positions must have shape (T,) = ({frames},) or (B, T) = ({batch}, {frames}) for x, got {got}")
