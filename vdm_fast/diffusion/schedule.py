"""The cosine log-SNR schedule of the variance-preserving process and its alpha, sigma.

lambda_t = log(alpha_t^2 / sigma_t^2) = -2 log tan(a t + b), with b and a chosen so that lambda_0 = logsnr_max and
lambda_1 = logsnr_min; alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t). Everything is computed in fp64
(tan near pi/2 and the sigmoid tails lose digits in fp32) and cast to the caller's dtype at the end.
"""

from __future__ import annotations

import math

import torch

# The widest log-SNR range the samplers take: at |lambda| = 30, alpha or sigma is e^-15 = 3e-7, and z's fp32 rounding
# (6e-8 relative) divided by it is ~0.2 of the data scale; at 100 it is 1e14 (the garbage such a range gave).
MAX_ABS_LOGSNR = 30.0


class CosineSchedule:
    """lambda(t) = -2 log tan(a t + b) on t in [0, 1], from logsnr_max at t = 0 down to logsnr_min at t = 1."""

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        for name, v in (("logsnr_min", logsnr_min), ("logsnr_max", logsnr_max)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite float, got {v!r}")
            if abs(v) > MAX_ABS_LOGSNR:
                raise ValueError(f"{name} must be in [-{MAX_ABS_LOGSNR:g}, {MAX_ABS_LOGSNR:g}] (beyond, fp32 "
                                 f"rounding of z divided by alpha or sigma exceeds the data's scale), got {v}")
        if not logsnr_min < logsnr_max:
            raise ValueError(f"logsnr_min must be < logsnr_max, got logsnr_min={logsnr_min}, logsnr_max={logsnr_max}")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self.a = math.atan(math.exp(-0.5 * self.logsnr_min)) - self.b

    def logsnr(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """lambda_t for t in [0, 1] (computed in fp64; returned in `dtype`, default t's floating dtype or fp32)."""
        out_dtype = dtype or (t.dtype if t.is_floating_point() else torch.float32)
        lam = -2.0 * torch.log(torch.tan(self.a * t.double() + self.b))
        return lam.to(out_dtype)

    def levels(self, steps: int) -> torch.Tensor:
        """fp64 lambda at the sampler's grid t_i = 1 - i / steps, i = 0..steps (noisiest first, t = 0 last)."""
        t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
        return self.logsnr(t, torch.float64)

    def __repr__(self) -> str:
        return f"CosineSchedule(logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})"


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), in logsnr's dtype (fp64 inside)."""
    lam = logsnr.double()
    alpha = torch.sigmoid(lam).sqrt()
    sigma = torch.sigmoid(-lam).sqrt()
    return alpha.to(logsnr.dtype), sigma.to(logsnr.dtype)
