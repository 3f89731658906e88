"""Conditioning of the 3D U-Net: the noise level (log-SNR) and an optional conditioning vector, through one MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


def logsnr_to_unit(logsnr: torch.Tensor) -> torch.Tensor:
    """Map any log-SNR to (0, 1) monotonically (decreasing): the time t of the cosine schedule with this log-SNR,
    t = (2 / pi) * atan(exp(-logsnr / 2)). Bounded, so the sinusoids see the same range whatever the clipping."""
    return torch.atan(torch.exp(-0.5 * logsnr.float())) * (2.0 / math.pi)


def sinusoidal_embedding(logsnr: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) log-SNR -> (B, dim) fp32 [cos | sin] features of 1000 * logsnr_to_unit(logsnr) (DDPM's timestep range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=logsnr.device, dtype=torch.float32) / half)
    args = (1000.0 * logsnr_to_unit(logsnr))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))  # odd dim: one zero feature


class ConditioningEmbedding(nn.Module):
    """emb = MLP(Linear(sinusoid(logsnr)) + cond term): the vector every residual block reads its FiLM from.

    The cond term is Linear(cond) for samples with conditioning and a learned null embedding for the others
    (cond=None: the whole batch; cond_mask[b] False: sample b), so classifier-free guidance runs its conditional and
    unconditional branches in one batched call.
    """

    def __init__(self, sinusoid_dim: int, emb_dim: int, cond_dim: int | None = None, num_layers: int = 2):
        super().__init__()
        self.sinusoid_dim, self.cond_dim = sinusoid_dim, cond_dim
        self.logsnr_proj = nn.Linear(sinusoid_dim, emb_dim)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, emb_dim)
            self.null_embedding = nn.Parameter(torch.randn(emb_dim) * 0.02)
        layers: list[nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [nn.SiLU(), nn.Linear(emb_dim, emb_dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, logsnr: torch.Tensor, cond: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.logsnr_proj(sinusoidal_embedding(logsnr, self.sinusoid_dim).to(self.logsnr_proj.weight.dtype))
        if self.cond_dim is not None:
            null = self.null_embedding.to(h.dtype).expand_as(h)
            if cond is None:
                c = null
            else:
                c = self.cond_proj(cond.to(self.cond_proj.weight.dtype)).to(h.dtype)
                if cond_mask is not None:
                    c = torch.where(cond_mask[:, None], c, null)
            h = h + c
        return self.mlp(h)
