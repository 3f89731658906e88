"""Reference GroupNorm + FiLM + SiLU: y = act(group_norm(x) * (1 + scale) + shift), as nn.GroupNorm defines it."""

from __future__ import annotations

import torch


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = "silu",
    per_frame: bool = False,
) -> torch.Tensor:
    """x: (B, C, *spatial). Statistics over each group of C / num_groups channels and all spatial positions (with
    per_frame on 5-D input: over each group of each frame, dims H and W only), computed in fp32 (fp64 for fp64 input).

    weight, bias: (C,) affine of the group norm. scale, shift: (B, C) FiLM applied after it. activation: "silu" or
    None. Returns y of x's shape, dtype and memory format.
    """
    B, C = x.shape[:2]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute).unflatten(1, (num_groups, C // num_groups))  # (B, G, Cg, *spatial): a view of x's layout
    dims = (2, 4, 5) if per_frame and x.dim() == 5 else tuple(range(2, xf.dim()))  # per frame: keep dim T (3)
    mean = xf.mean(dim=dims, keepdim=True)
    var = (xf - mean).square().mean(dim=dims, keepdim=True)  # biased variance, as nn.GroupNorm
    y = ((xf - mean) * torch.rsqrt(var + eps)).flatten(1, 2)
    per_channel = (C,) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute).view(per_channel)
    if bias is not None:
        y = y + bias.to(compute).view(per_channel)
    if scale is not None:
        y = y * (1 + scale.to(compute).view((B,) + per_channel))
    if shift is not None:
        y = y + shift.to(compute).view((B,) + per_channel)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype).contiguous(memory_format=memory_format(x))


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the output takes: channels_last(_3d) for such inputs, else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
