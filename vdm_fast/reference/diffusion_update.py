"""diffusion_update, the samplers' update, in plain PyTorch: the definition of correct for the fused kernel.

In place, elementwise, with coefficients from one table row coef = [logsnr, alpha, sigma, c_z, c_x, c_n, c_h1, c_h2]:

    p = (1 + w) pred - w pred_uncond                 (classifier-free guidance, when pred_uncond is given)
    e = x_hat(z, p)  clipped to [-1, 1] if clip      (predictor)   or   e = eps_hat(z, p)   (corrector, never clipped)
    z <- c_z z + c_x e + c_h1 history[0] + c_h2 history[1] + c_n noise     (terms of absent tensors left out)
    history[1] <- history[0], history[0] <- e        (the multistep solvers' memory of previous x_hat)
    e_out <- e

x_hat and eps_hat from the prediction type (vdm_fast/diffusion/parameterization.py, written here as the kernel
computes them: eps: x = (z - sigma p) / alpha; v: x = alpha z - sigma p; x: p; and eps = p, alpha p + sigma z,
(z - alpha p) / sigma). Arithmetic in z's dtype (fp32 on the fast path, fp64 in the tests); pred may be lower
precision (a model's bf16 output) and is upcast first.
"""

from __future__ import annotations

import torch

NCOEF = 8


def convert(z: torch.Tensor, p: torch.Tensor, alpha, sigma, prediction: str, corrector: bool) -> torch.Tensor:
    """e = x_hat (corrector False) or eps_hat (corrector True) of the prediction p at z."""
    if corrector:
        if prediction == "eps":
            return p
        if prediction == "v":
            return alpha * p + sigma * z
        return (z - alpha * p) / sigma
    if prediction == "eps":
        return (z - sigma * p) / alpha
    if prediction == "v":
        return alpha * z - sigma * p
    return p


def diffusion_update(z: torch.Tensor, pred: torch.Tensor, coef: torch.Tensor, e_out: torch.Tensor, *,
                     pred_uncond: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                     history: torch.Tensor | None = None, guidance_weight: float = 0.0, prediction: str = "eps",
                     corrector: bool = False, clip: bool = False) -> None:
    """See the module docstring; updates z, e_out and history in place."""
    dt = z.dtype
    c = coef.to(dt)
    p = pred.to(dt)
    if pred_uncond is not None:
        w = guidance_weight
        p = (1.0 + w) * p - w * pred_uncond.to(dt)
    e = convert(z, p, c[1], c[2], prediction, corrector)
    if clip and not corrector:
        e = e.clamp(-1.0, 1.0)
    zn = c[3] * z + c[4] * e
    if history is not None and history.shape[0] >= 1:
        zn = zn + c[6] * history[0]
        if history.shape[0] == 2:
            zn = zn + c[7] * history[1]
            history[1].copy_(history[0])
        history[0].copy_(e)
    if noise is not None:
        zn = zn + c[5] * noise.to(dt)
    e_out.copy_(e)
    z.copy_(zn)
