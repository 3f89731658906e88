"""Reference RMSNorm + FiLM + SiLU: y = act(x / max(||x||_C, eps) * sqrt(C) * weight * (1 + scale) + shift).

The norm is video-diffusion-pytorch 0.7's RMSNorm (also imagen-pytorch's and make-a-video's):
`F.normalize(x, dim=1) * dim ** 0.5 * gamma`, i.e. each position's channel vector divided by its L2 norm clamped
below at eps (F.normalize's default eps = 1e-12), times sqrt(C). It is the RMS normalization x / rms(x) with
rms = ||x|| / sqrt(C), but with the clamp on the norm, not an eps added to the mean square. FiLM follows
group_norm_silu's convention: `scale` is the deviation from 1 (the model computes x * (scale + 1) + shift), so the
patch code that feeds both ops is shared.
"""

from __future__ import annotations

import math

import torch

from vdm_fast.reference.group_norm_silu import memory_format


def rms_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-12,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """x: (B, C, *spatial). Per position (b, *spatial): the norm over the C channels, computed in fp32 (fp64 for
    fp64 input), clamped at eps as F.normalize does (so the gradient has no norm term where it is clamped).

    weight: (C,) gain (RMSNorm's gamma, flattened). scale, shift: (B, C) FiLM applied after the norm. activation:
    "silu" or None. Returns y of x's shape, dtype and memory format.
    """
    B, C = x.shape[:2]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    # F.normalize's own arithmetic: x / norm.clamp_min(eps) (its autograd is the definition of the gradient)
    y = torch.nn.functional.normalize(xf, dim=1, eps=eps) * math.sqrt(C)
    per_channel = (C,) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute).view(per_channel)
    if scale is not None:
        y = y * (1 + scale.to(compute).view((B,) + per_channel))
    if shift is not None:
        y = y + shift.to(compute).view((B,) + per_channel)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype).contiguous(memory_format=memory_format(x))
