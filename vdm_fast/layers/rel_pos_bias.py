"""RelativePositionBias: the temporal attention's learned bias over frame offsets."""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast.ops import rel_pos_bias


class RelativePositionBias(nn.Module):
    """T5-bucketed relative position bias, (heads, T, T) or (B, heads, T, T).

    Same parameter and state_dict key (`relative_attention_bias.weight`) as video-diffusion-pytorch's
    RelativePositionBias, so its trained tables load unchanged.
    """

    def __init__(self, heads: int = 8, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.heads, self.num_buckets, self.max_distance = heads, num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, positions: int | torch.Tensor) -> torch.Tensor:
        """positions: an int T (frames 0..T-1) or a (T,) / (B, T) integer tensor of frame indices."""
        weight = self.relative_attention_bias.weight
        if isinstance(positions, int):
            positions = torch.arange(positions, device=weight.device)
        return rel_pos_bias(weight, positions, max_distance=self.max_distance)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}"
