"""Reference relative position bias: Hugging Face T5's bucketing, as video-diffusion-pytorch uses it."""

from __future__ import annotations

import math

import torch


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's `_relative_position_bucket`: exact offsets near zero, log-spaced buckets out to max_distance."""
    relative_buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # Same float32 arithmetic as T5 (a float32 log divided by a Python double), so buckets match bit for bit.
    log_ratio = torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, if_large)


def rel_pos_bias(
    table: torch.Tensor, positions: torch.Tensor, *, max_distance: int = 32, bidirectional: bool = True
) -> torch.Tensor:
    """bias[..., h, i, j] = table[bucket(positions[..., j] - positions[..., i]), h].

    table: (num_buckets, heads). positions: (T,) or (B, T) ints. Returns (heads, T, T) or (B, heads, T, T).
    """
    positions = positions.long()
    relative = positions[..., None, :] - positions[..., :, None]
    buckets = relative_position_bucket(relative, bidirectional, table.shape[0], max_distance)
    return table[buckets].movedim(-1, -3)
