"""The samplers' update rules: per-step coefficient tables (fp64 math, fp32 on the device) and the fused update.

One step from level t to level s < t (lambda_s > lambda_t), x_hat the (clipped) prediction of x:

- ancestral: z_s = c_z z_t + c_x x_hat + c_n eps with c_z = e^(lambda_t - lambda_s) alpha_s / alpha_t,
  c_x = (1 - e^(lambda_t - lambda_s)) alpha_s, c_n^2 = var~^(1 - gamma) (sigma^2_{t|s})^gamma,
  var~ = (1 - e^(lambda_t - lambda_s)) sigma_s^2, sigma^2_{t|s} = (1 - e^(lambda_t - lambda_s)) sigma_t^2;
- ddim (eta = 0): z_s = alpha_s x_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x_hat) / sigma_t, i.e. c_z =
  sigma_s / sigma_t, c_x = alpha_s - sigma_s alpha_t / sigma_t, c_n = 0 (eps recomputed from the clipped x_hat);
- Langevin corrector at level s: z <- z - (delta / 2) sigma_s eps_hat(z) + sqrt(delta) sigma_s eps', i.e. the
  same form z <- c_z z + c_x e + c_n eps' with e = eps_hat (unclipped: it is a score estimate), c_z = 1,
  c_x = -delta sigma_s / 2, c_n = sqrt(delta) sigma_s.

So every update is z <- c_z z + c_x e + c_n noise with e = x_hat (predictor) or eps_hat (corrector) computed from
the model output, after classifier-free guidance: pred = (1 + w) pred_c - w pred_u (guidance is affine with
weights summing to 1, so it is the same in eps, v or x space). A table row holds
[logsnr, alpha, sigma, c_z, c_x, c_n, 0, 0] (8 floats: every row stays 16-byte aligned for the Triton kernel), and
the whole schedule is computed once, before the loop: the loop only indexes it on the device.
1 - e^(lambda_t - lambda_s) is -expm1(.) in fp64 (it is tiny for close levels: 1 - exp would cancel).
"""

from __future__ import annotations

import math

import torch

from vdm_fast import _checks, _dispatch
from vdm_fast.diffusion.parameterization import eps_from_prediction, x_from_prediction
from vdm_fast.diffusion.schedule import CosineSchedule

SAMPLERS = ("ancestral", "ddim", "pc")
NCOEF = 8
LOGSNR, ALPHA, SIGMA, CZ, CX, CN = range(6)
SPEC = _dispatch.OpSpec("diffusion_update", triton=True, dtypes=(torch.float32,))


def check_sampler(sampler) -> str:
    return _checks.one_of(sampler, "sampler", SAMPLERS)


def _logsig(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(x)


def predictor_table(schedule: CosineSchedule, steps: int, sampler: str, gamma: float = 0.0) -> torch.Tensor:
    """(steps, NCOEF) fp64: row i takes level t_i = 1 - i/steps to s_i = 1 - (i+1)/steps."""
    lam = schedule.levels(steps)
    lt, ls = lam[:-1], lam[1:]
    # log alpha^2 = logsigmoid(lambda), log sigma^2 = logsigmoid(-lambda): exact in the tails where alpha -> 0.
    la2_t, ls2_t, la2_s, ls2_s = _logsig(lt), _logsig(-lt), _logsig(ls), _logsig(-ls)
    alpha_t, sigma_t = (0.5 * la2_t).exp(), (0.5 * ls2_t).exp()
    alpha_s, sigma_s = (0.5 * la2_s).exp(), (0.5 * ls2_s).exp()
    rows = torch.zeros(steps, NCOEF, dtype=torch.float64)
    rows[:, LOGSNR], rows[:, ALPHA], rows[:, SIGMA] = lt, alpha_t, sigma_t
    if sampler == "ddim":
        rows[:, CZ] = sigma_s / sigma_t
        rows[:, CX] = alpha_s - sigma_s * alpha_t / sigma_t
        return rows
    d = lt - ls  # < 0
    one_minus_r = -torch.expm1(d)
    rows[:, CZ] = (d + 0.5 * (la2_s - la2_t)).exp()
    rows[:, CX] = one_minus_r * alpha_s
    log_var_post = one_minus_r.log() + ls2_s
    log_var_prior = one_minus_r.log() + ls2_t
    rows[:, CN] = (0.5 * ((1.0 - gamma) * log_var_post + gamma * log_var_prior)).exp()
    return rows


def corrector_table(schedule: CosineSchedule, steps: int, delta: float) -> torch.Tensor:
    """(steps, NCOEF) fp64: row i is the Langevin step at level s_i (the level step i lands on)."""
    ls = schedule.levels(steps)[1:]
    alpha_s, sigma_s = torch.sigmoid(ls).sqrt(), torch.sigmoid(-ls).sqrt()
    rows = torch.zeros(steps, NCOEF, dtype=torch.float64)
    rows[:, LOGSNR], rows[:, ALPHA], rows[:, SIGMA] = ls, alpha_s, sigma_s
    rows[:, CZ] = 1.0
    rows[:, CX] = -0.5 * delta * sigma_s
    rows[:, CN] = math.sqrt(delta) * sigma_s
    return rows


def update_reference(z: torch.Tensor, pred: torch.Tensor, pred_u: torch.Tensor | None, row: torch.Tensor,
                     noise: torch.Tensor | None, *, w: float, prediction: str, corrector: bool, clip: bool,
                     out_e: torch.Tensor) -> None:
    """The update in plain PyTorch, in place: z <- c_z z + c_x e + c_n noise; out_e <- e (see the module doc)."""
    p = pred.float()
    if pred_u is not None:
        p = (1.0 + w) * p - w * pred_u.float()
    alpha, sigma = row[ALPHA], row[SIGMA]
    if corrector:
        e = eps_from_prediction(z, p, alpha, sigma, prediction)
    else:
        e = x_from_prediction(z, p, alpha, sigma, prediction)
        if clip:
            e = e.clamp(-1.0, 1.0)
    zn = row[CZ] * z + row[CX] * e
    if noise is not None:
        zn = zn + row[CN] * noise
    out_e.copy_(e)
    z.copy_(zn)


def update_(z: torch.Tensor, pred: torch.Tensor, pred_u: torch.Tensor | None, row: torch.Tensor,
            noise: torch.Tensor | None, *, w: float, prediction: str, corrector: bool, clip: bool,
            out_e: torch.Tensor) -> None:
    """The fused update (one Triton kernel on CUDA, the reference on CPU unless vdm_fast.backend("triton")).

    z (fp32, contiguous) is updated in place, out_e (z's shape, fp32) receives x_hat or eps_hat; row is a
    (NCOEF,) fp32 tensor on z's device (a table row: read by the kernel, so no host sync per step)."""
    impl = _dispatch.select(SPEC, z.device, z.dtype)
    if impl == "reference":
        update_reference(z, pred, pred_u, row, noise, w=w, prediction=prediction, corrector=corrector, clip=clip,
                         out_e=out_e)
        return
    _dispatch.check_impl(SPEC, impl)
    from vdm_fast.kernels import diffusion_update as k  # lazy: TRITON_INTERPRET is read at import

    k.launch(z, pred, pred_u, row, noise, w=w, prediction=prediction, corrector=corrector, clip=clip, out_e=out_e)
