"""The samplers' update rules as per-step coefficient tables (fp64 math, fp32 on the device), and the step grids.

Every sampler step is one call of the fused update (vdm_fast.ops.diffusion_update, defined by
vdm_fast/reference/diffusion_update.py):

    z <- c_z z + c_x e + c_h1 h1 + c_h2 h2 + c_n noise,   then the history shifts: h2 <- h1, h1 <- e,

e = x_hat (the clipped data prediction; a corrector uses eps_hat) from the guided model output, h1 and h2 the
x_hat of the two previous steps. A table row holds [logsnr_t, alpha_t, sigma_t, c_z, c_x, c_n, c_h1, c_h2]: 8 floats,
so every row stays 16-byte aligned for the kernel. Tables are computed once before the loop; the loop only indexes
them on the device (a CUDA graph replays one step and picks the row with a device step counter).

Notation: one step goes from level t to level s (noisier to cleaner, lambda_s > lambda_t), lambda = log-SNR =
log(alpha^2 / sigma^2), alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda). DPM-Solver works in half the log-SNR,
l = lambda / 2 = log(alpha / sigma), and h = l_s - l_t > 0 is a step's size there. 1 - e^(-h) is -expm1(-h) in fp64
(it is tiny for close levels, where 1 - exp would cancel).

Ancestral (the paper's sampler): z_s = c_z z_t + c_x x_hat + c_n eps with c_z = e^(lambda_t - lambda_s) alpha_s /
alpha_t, c_x = (1 - e^(lambda_t - lambda_s)) alpha_s, c_n^2 = var~^(1 - gamma) (sigma^2_{t|s})^gamma with
var~ = (1 - e^(lambda_t - lambda_s)) sigma_s^2 and sigma^2_{t|s} = (1 - e^(lambda_t - lambda_s)) sigma_t^2.

DDIM (eta = 0): z_s = alpha_s x_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x_hat) / sigma_t: c_z = sigma_s /
sigma_t, c_x = alpha_s - sigma_s alpha_t / sigma_t (eps recomputed from the clipped x_hat).

Langevin corrector at level s (pc): z <- z - (delta / 2) sigma_s eps_hat(z) + sqrt(delta) sigma_s eps', the same form
with e = eps_hat (unclipped: a score estimate), c_z = 1, c_x = -delta sigma_s / 2, c_n = sqrt(delta) sigma_s.

DPM-Solver++ (Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095), in our words. The probability-flow ODE of the VP process, written for
z / sigma against l, has the exact solution
    z_s = (sigma_s / sigma_t) z_t + sigma_s int_{l_t}^{l_s} e^l x_theta(z_l, l) dl,
linear in z (solved exactly) and an exponentially weighted integral of the data prediction x_theta only. The solver
approximates x_theta on [l_t, l_s] by a polynomial in l through the current and previous predictions
(D0 = x_hat at l_t, D1 at l_t - h1, D2 at l_t - h1 - h2: the history), and integrates it exactly:
- order 1, x_theta = D0: sigma_s D0 (e^(l_s) - e^(l_t)) = alpha_s (1 - e^(-h)) D0 (= DDIM);
- order 2 ("2M", their Algorithm 2): the line through D1 and D0, r = h1 / h, integrated with the midpoint rule
  D = (1 + 1/(2r)) D0 - 1/(2r) D1 in place of D0: c_x = A (1 + 1/(2r)), c_h1 = -A / (2r), A = alpha_s (1 - e^(-h));
- order 3 ("3M"): the parabola through D2, D1, D0, integrated exactly with phi_2 = 1 - (1 - e^(-h)) / h and
  phi_3 = phi_2 / h - 1/2: z_s = c_z z_t + alpha_s ((1 - e^(-h)) D0 + phi_2 d1 - phi_3 d2) with the divided
  differences d1_0 = (D0 - D1) / r0, d1_1 = (D1 - D2) / r1, d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1),
  d2 = (d1_0 - d1_1) / (r0 + r1), r0 = h1 / h, r1 = h2 / h (k-diffusion's dpmpp_3m_sde with eta = 0 and diffusers'
  3rd-order DPM-Solver++ update, which we follow), all linear in D0, D1, D2: the table holds the resulting c_x,
  c_h1, c_h2. A caveat we measured: d1 is h x' and d2 is h^2 x'' / 2, so the exact integral of the parabola needs
  2 phi_3 d2; with phi_3 d2 the curvature term is halved and the step is exact for linear x_theta only (global
  order 2: tests/test_diffusion.py measures both). We keep the published weight: the exact one (order 3) gave
  larger errors on both oracles at 10-25 calls (a stronger extrapolation), and equal ones from 50 calls on.
- "2M SDE" (their SDE-DPM-Solver++(2M), section 4): the reverse SDE integrated the same way: the linear part
  decays faster, c_z = (sigma_s / sigma_t) e^(-h), A = alpha_s (1 - e^(-2h)), fresh noise c_n = sigma_s
  sqrt(1 - e^(-2h)), and the same midpoint correction on A. At order 1 it is exactly the ancestral step with
  gamma = 0 (the posterior q(z_s | z_t, x_hat)).
UniPC (Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", arXiv:2302.04867), order 2, data prediction, B(h) = e^(-h) - 1 ("bh2"), as diffusers' default
UniPCMultistepScheduler: the model output m_i at the predicted z_i is used twice, first to correct z_i (UniC: the
same exponential integrator from z_{i-1}, now through m_{i-1} and m_i, with weights rho_c solving its order
conditions R rho = b, b_k = h phi_(k+1)(h) k! / B(h)), then to predict z_{i+1} (UniP-2, rho_p = 1/2). The corrector
costs no model call and raises the order by one (third order measured). Both parts are linear in m_i, m_{i-1},
m_{i-2} and share the linear part, so one row holds the whole step (_unipc_rows).
The first step has no history (order 1); the second has one previous prediction (order <= 2). With fewer than 15
steps the last updates are taken at lower order (the final update at order 1, 3M's second to last at order <= 2), as
in Lu et al.'s code: a large final step with an extrapolated D is what makes few-step multistep samples unstable.
The sampler returns x_hat of the last model call (at level t_{N-1}); the final update, to lambda_max, is not used.

Step grids (`timesteps`, N = steps model calls, N + 1 levels from logsnr_min to logsnr_max):
- "uniform": uniform in t of the cosine schedule (t_i = 1 - i / N), the paper's and today's grid;
- "logsnr": uniform in lambda (DPM-Solver's "logSNR" grid);
- "karras": EDM's rho = 7 grid in the EDM noise level sigma_edm = sigma / alpha = e^(-lambda/2) (Karras et al.
  2022, eq. 5) from sigma_max = 10 to EDM's sigma_min = 0.002 (both clamped to the schedule's limits) for levels
  1..N-1, after level 0 = logsnr_min, where z ~ N(0, I) is the exact prior; the last (unused) level is logsnr_max.
  EDM starts its grid at sigma_max = 80 from pure noise; we start from the exact prior instead (one model call:
  starting at sigma_edm = 20 from N(0, I) measurably shifts the mean of Gaussian data, 2.5 % at 25 calls), and
  then sigma_max = 10 (lambda = -4.6) measured best on both oracles at 10, 25 and 50 calls among 80, 20 and 10.
"""

from __future__ import annotations

import math

import torch

from vdm_fast import _checks
from vdm_fast.diffusion.schedule import CosineSchedule
from vdm_fast.ops.diffusion_update import NCOEF, diffusion_update

SAMPLERS = ("ancestral", "ddim", "pc", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc")
TIMESTEPS = ("uniform", "logsnr", "karras")
# The step grid each sampler uses unless timesteps= says otherwise (measured: kernels/notes/diffusion_update.md and
# docs/sampler_quality.png). The paper's samplers keep the paper's grid, uniform in t. The DPM-Solver++ samplers take
# the Karras grid: at 25-50 calls it has the lowest error on both oracles (Gaussian and bimodal), because its last
# called level is clean (lambda 12.4 against 5.5 for uniform t at 25 calls: a noisier last level leaves x_hat, the
# sample, blurred within each mode) and it skips the high-noise levels where the data barely change. At 10 calls
# and fewer the uniform grid is better (the notes say so, and the benchmark shows it).
DEFAULT_TIMESTEPS = {"ancestral": "uniform", "ddim": "uniform", "pc": "uniform", "dpmpp_2m": "karras",
                     "dpmpp_2m_sde": "karras", "dpmpp_3m": "karras", "unipc": "karras"}
# How many previous x_hat each sampler keeps (the history buffer's length).
HISTORY = {"ancestral": 0, "ddim": 0, "pc": 0, "dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m": 2, "unipc": 2}
# The multistep samplers' highest order (UniPC-2 keeps two previous x_hat: its corrector reaches one step further).
ORDER = {"dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m": 3, "unipc": 2}
# Which samplers draw fresh noise in every predictor step.
NOISY = ("ancestral", "pc", "dpmpp_2m_sde")
LOGSNR, ALPHA, SIGMA, CZ, CX, CN, CH1, CH2 = range(NCOEF)
KARRAS_SIGMA_MAX, KARRAS_SIGMA_MIN, KARRAS_RHO = 10.0, 0.002, 7.0
LOWER_ORDER_FINAL_BELOW = 15


def check_sampler(sampler) -> str:
    return _checks.one_of(sampler, "sampler", SAMPLERS)


def check_timesteps(timesteps, sampler: str) -> str:
    """The grid name; None gives the sampler's default (DEFAULT_TIMESTEPS)."""
    if timesteps is None:
        return DEFAULT_TIMESTEPS[sampler]
    return _checks.one_of(timesteps, "timesteps", TIMESTEPS)


def levels(schedule: CosineSchedule, steps: int, timesteps: str = "uniform") -> torch.Tensor:
    """fp64 log-SNR of the N + 1 levels, noisiest first: lambda_0 = logsnr_min, increasing strictly to
    lambda_N = logsnr_max."""
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    if timesteps == "uniform":
        return schedule.levels(steps)
    if timesteps == "logsnr":
        lam = torch.linspace(lo, hi, steps + 1, dtype=torch.float64)
        lam[-1] = hi
        return lam
    # karras: sigma_edm = e^(-lambda/2), rho-spaced between sigma_max and sigma_min for the N - 1 called levels
    # after the first, which is logsnr_min itself (the exact prior).
    # Kept strictly inside (logsnr_min, logsnr_max), so levels increase strictly on any schedule.
    margin = 0.05 * (hi - lo)
    s_max = math.exp(-0.5 * max(-2.0 * math.log(KARRAS_SIGMA_MAX), lo + margin))
    s_min = math.exp(-0.5 * min(-2.0 * math.log(KARRAS_SIGMA_MIN), hi - margin))
    n = steps - 1
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(n, dtype=torch.float64)
    inv = 1.0 / KARRAS_RHO
    sig = (s_max**inv + ramp * (s_min**inv - s_max**inv)) ** KARRAS_RHO
    return torch.cat([torch.tensor([lo], dtype=torch.float64), -2.0 * sig.log(),
                      torch.tensor([hi], dtype=torch.float64)])


def _logsig(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(x)


def _frame(lam: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows with [logsnr_t, alpha_t, sigma_t] filled, and the fp64 quantities of each step t -> s."""
    lt, ls = lam[:-1], lam[1:]
    # log alpha^2 = logsigmoid(lambda), log sigma^2 = logsigmoid(-lambda): exact in the tails where alpha -> 0.
    la2_t, ls2_t, la2_s, ls2_s = _logsig(lt), _logsig(-lt), _logsig(ls), _logsig(-ls)
    alpha_t, sigma_t = (0.5 * la2_t).exp(), (0.5 * ls2_t).exp()
    alpha_s, sigma_s = (0.5 * la2_s).exp(), (0.5 * ls2_s).exp()
    rows = torch.zeros(lt.shape[0], NCOEF, dtype=torch.float64)
    rows[:, LOGSNR], rows[:, ALPHA], rows[:, SIGMA] = lt, alpha_t, sigma_t
    return rows, lt, ls, la2_t, ls2_t, la2_s, ls2_s, alpha_s, sigma_s, sigma_t


def orders(steps: int, sampler: str) -> list[int]:
    """The order of each step's update: 1 at the first, growing with the history, lower at the end of short runs."""
    top = ORDER.get(sampler, 1)
    out = [min(top, i + 1) for i in range(steps)]
    if steps >= 1:
        out[-1] = 1  # the final update (to lambda_max) is unused: x_hat of the last call is the sample
    if LOWER_ORDER_FINAL_BELOW > steps >= 2:
        out[-2] = min(out[-2], 2)
    return out


def predictor_table(schedule: CosineSchedule, steps: int, sampler: str, gamma: float = 0.0,
                    timesteps: str = "uniform") -> torch.Tensor:
    """(steps, NCOEF) fp64: row i takes level i to level i + 1 of `levels(schedule, steps, timesteps)`.

    sampler: "ancestral" (also pc's predictor), "ddim", "dpmpp_2m", "dpmpp_2m_sde" or "dpmpp_3m"."""
    lam = levels(schedule, steps, timesteps)
    rows, lt, ls, la2_t, ls2_t, la2_s, ls2_s, alpha_s, sigma_s, sigma_t = _frame(lam)
    alpha_t = rows[:, ALPHA]
    if sampler == "ddim":
        rows[:, CZ] = sigma_s / sigma_t
        rows[:, CX] = alpha_s - sigma_s * alpha_t / sigma_t
        return rows
    if sampler in ("ancestral", "pc"):
        d = lt - ls  # < 0
        one_minus_r = -torch.expm1(d)
        rows[:, CZ] = (d + 0.5 * (la2_s - la2_t)).exp()
        rows[:, CX] = one_minus_r * alpha_s
        log_var_post = one_minus_r.log() + ls2_s
        log_var_prior = one_minus_r.log() + ls2_t
        rows[:, CN] = (0.5 * ((1.0 - gamma) * log_var_post + gamma * log_var_prior)).exp()
        return rows
    if sampler == "unipc":
        return _unipc_rows(rows, 0.5 * lam, alpha_s, sigma_s, sigma_t, orders(steps, sampler))
    h = 0.5 * (ls - lt)  # step sizes in l = lambda / 2, > 0
    sde = sampler == "dpmpp_2m_sde"
    he = 2.0 * h if sde else h  # the exponent of the data term's weight: h (ODE) or 2h (SDE, eta = 1)
    A = alpha_s * -torch.expm1(-he)
    rows[:, CZ] = sigma_s / sigma_t * (torch.exp(-h) if sde else 1.0)
    if sde:
        rows[:, CN] = sigma_s * (-torch.expm1(-2.0 * h)).sqrt()
    for i, k in enumerate(orders(steps, sampler)):
        if k == 1:
            rows[i, CX] = A[i]
        elif k == 2 and sampler != "dpmpp_3m":
            r = h[i - 1] / h[i]
            rows[i, CX] = A[i] * (1.0 + 0.5 / r)
            rows[i, CH1] = -A[i] * 0.5 / r
        else:
            c = _dpmpp_3m_weights(h[i], h[i - 1], h[i - 2] if k == 3 else None)
            rows[i, CX], rows[i, CH1], rows[i, CH2] = (alpha_s[i] * c).unbind()
    return rows


def _unipc_b(h: float, order: int) -> tuple[float, float, list[float]]:
    """UniPC's h phi_1 = e^(-h) - 1, B(h) = e^(-h) - 1 (the "bh2" choice) and the right-hand side b_k =
    h phi_(k+1) k! / B(h) of its order conditions (data prediction: hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    fact, b = 1.0, []
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / h_phi_1)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, h_phi_1, b


def _unipc_rows(rows: torch.Tensor, ell: torch.Tensor, alpha_s, sigma_s, sigma_t, order: list[int]) -> torch.Tensor:
    """UniPC-2 (predictor UniP-2 and corrector UniC, bh2, data prediction) as one linear update per step.

    At step i the model output m_i at the predicted z_i first corrects z_i (UniC for the step i-1 -> i, using
    m_i, m_{i-1}, m_{i-2}; no extra model call), then UniP predicts z_{i+1} from the corrected z_i with m_i, m_{i-1}.
    The corrector and the predictor share the same exponential-integrator part, so the corrected z_i is the
    predicted one plus a combination of m_i, m_{i-1}, m_{i-2}: the whole step is z_{i+1} = c_z z_i + c_x m_i +
    c_h1 m_{i-1} + c_h2 m_{i-2}, the fused update's form with two history buffers. Weights below are over
    (m_i, m_{i-1}, m_{i-2})."""
    ell = ell.tolist()
    for i, p in enumerate(order):
        a_next = float(alpha_s[i])
        c = float(sigma_s[i] / sigma_t[i])
        h = ell[i + 1] - ell[i]
        h_phi_1, B_h, _ = _unipc_b(h, p)
        w = [-a_next * h_phi_1, 0.0, 0.0]  # exponential-integrator part: alpha_s (1 - e^(-h)) m_i
        if p == 2:  # D1 = (m_{i-1} - m_i) / rk, rho_p = 1/2
            rk = (ell[i - 1] - ell[i]) / h
            w[0] -= a_next * B_h * 0.5 * (-1.0 / rk)
            w[1] -= a_next * B_h * 0.5 * (1.0 / rk)
        if i >= 1:  # UniC for the step i-1 -> i, of the order that step's predictor had
            q = order[i - 1]
            a_i = float(rows[i, ALPHA])
            h1 = ell[i] - ell[i - 1]
            _, B1, b1 = _unipc_b(h1, q)
            corr = [0.0, 0.0, 0.0]
            if q == 1:
                rho_c = [0.5]
            else:
                rk1 = (ell[i - 2] - ell[i - 1]) / h1
                R = torch.tensor([[1.0, 1.0], [rk1, 1.0]], dtype=torch.float64)
                rho_c = torch.linalg.solve(R, torch.tensor(b1, dtype=torch.float64)).tolist()
                d1 = [0.0, -1.0 / rk1, 1.0 / rk1]  # D1' = (m_{i-2} - m_{i-1}) / rk1
                corr = [(0.5 - rho_c[0]) * v for v in d1]  # the predictor used rho_p = 1/2 on it
            corr[0] -= rho_c[-1]
            corr[1] += rho_c[-1]  # - rho_c (m_i - m_{i-1})
            w = [wk + c * a_i * B1 * ck for wk, ck in zip(w, corr)]
        rows[i, CZ] = c
        rows[i, CX], rows[i, CH1], rows[i, CH2] = w
    return rows


def _dpmpp_3m_weights(h: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor | None) -> torch.Tensor:
    """Weights of (D0, D1, D2) in (1 - e^(-h)) D0 + phi_2 d1 - phi_3 d2 (order 3), or + phi_2 d (order 2)."""
    phi1 = -torch.expm1(-h)
    phi2 = torch.expm1(-h) / h + 1.0
    e0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    if h2 is None:
        r = h1 / h
        return phi1 * e0 + phi2 * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r
    phi3 = phi2 / h - 0.5
    r0, r1 = h1 / h, h2 / h
    d1_0 = torch.stack([1.0 / r0, -1.0 / r0, torch.zeros_like(r0)])
    d1_1 = torch.stack([torch.zeros_like(r1), 1.0 / r1, -1.0 / r1])
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return phi1 * e0 + phi2 * d1 - phi3 * d2


def corrector_table(schedule: CosineSchedule, steps: int, delta: float, timesteps: str = "uniform") -> torch.Tensor:
    """(steps, NCOEF) fp64: row i is the Langevin step at level i + 1 (the level step i lands on)."""
    ls = levels(schedule, steps, timesteps)[1:]
    alpha_s, sigma_s = torch.sigmoid(ls).sqrt(), torch.sigmoid(-ls).sqrt()
    rows = torch.zeros(steps, NCOEF, dtype=torch.float64)
    rows[:, LOGSNR], rows[:, ALPHA], rows[:, SIGMA] = ls, alpha_s, sigma_s
    rows[:, CZ] = 1.0
    rows[:, CX] = -0.5 * delta * sigma_s
    rows[:, CN] = math.sqrt(delta) * sigma_s
    return rows


def update_(z: torch.Tensor, pred: torch.Tensor, pred_u: torch.Tensor | None, row: torch.Tensor,
            noise: torch.Tensor | None, *, w: float, prediction: str, corrector: bool, clip: bool,
            out_e: torch.Tensor, history: torch.Tensor | None = None) -> None:
    """One step's update in place (vdm_fast.ops.diffusion_update: the fused kernel on CUDA, the reference on CPU)."""
    diffusion_update(z, pred, row, out_e, pred_uncond=pred_u, noise=noise, history=history, guidance_weight=w,
                     prediction=prediction, corrector=corrector, clip=clip)


__all__ = ["SAMPLERS", "TIMESTEPS", "DEFAULT_TIMESTEPS", "levels", "predictor_table", "corrector_table", "orders"]
