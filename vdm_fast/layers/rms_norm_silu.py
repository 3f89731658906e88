"""RMSNormSiLU: video-diffusion-pytorch 0.7's RMSNorm followed by FiLM and SiLU in one fused op."""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast.ops.rms_norm_silu import rms_norm_silu


class RMSNormSiLU(nn.Module):
    """silu(F.normalize(x, dim=1) * sqrt(C) * gamma * (1 + scale) + shift) for x (B, C, *spatial), scale and shift
    optional (B, C).

    `gamma` has video-diffusion-pytorch's RMSNorm shape (C, 1, 1, 1) and key, so the layer loads that module's
    state_dict as is (the op takes it flattened: a view, gradients flow to it). eps clamps the norm (F.normalize's
    default 1e-12). affine=False: no gamma. activation: "silu" or None (the RMSNorm alone).
    """

    def __init__(self, dim: int, eps: float = 1e-12, affine: bool = True, activation: str | None = "silu",
                 device=None, dtype=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim, self.eps, self.affine, self.activation = dim, eps, affine, activation
        if affine:
            self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1, device=device, dtype=dtype))
        else:
            self.register_parameter("gamma", None)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() >= 2 and x.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} channels (dim 1), got shape {tuple(x.shape)}")
        weight = self.gamma.view(self.dim) if self.gamma is not None else None
        return rms_norm_silu(x, weight, self.eps, scale=scale, shift=shift, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.affine}, activation={self.activation!r}"
