"""GroupNormSiLU: nn.GroupNorm followed by FiLM and SiLU in one fused op."""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast.ops.group_norm_silu import group_norm_silu


class GroupNormSiLU(nn.Module):
    """silu(group_norm(x) * (1 + scale) + shift) for x (B, C, *spatial), scale and shift optional (B, C).

    Same parameters and state_dict keys (`weight`, `bias`) as nn.GroupNorm(num_groups, num_channels, eps, affine), so
    it replaces nn.Sequential(nn.GroupNorm(...), nn.SiLU()) by loading either the GroupNorm's state_dict or the
    Sequential's (keys `0.weight`, `0.bias`). per_frame=True: 5-D input is normalized per frame (statistics over
    H, W of each frame and group), as if the frames were a batch of images.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 per_frame: bool = False, activation: str | None = "silu", device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide num_channels ({num_channels})")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.affine, self.per_frame, self.activation = affine, per_frame, activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(f"x must have {self.num_channels} channels (dim 1), got shape {tuple(x.shape)}")
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, scale=scale, shift=shift,
                               activation=self.activation, per_frame=self.per_frame)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Also take the state_dict of nn.Sequential(nn.GroupNorm(...), nn.SiLU()) as is: keys "0.weight", "0.bias".
        for key in ("weight", "bias"):
            if prefix + key not in state_dict and prefix + "0." + key in state_dict:
                state_dict[prefix + key] = state_dict.pop(prefix + "0." + key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"per_frame={self.per_frame}, activation={self.activation!r}")
