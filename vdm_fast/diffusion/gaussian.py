"""The Gaussian diffusion process of Video Diffusion Models: forward process, training loss, predictions, sampling.

z_t = alpha_t x + sigma_t eps (variance preserving, continuous t in [0, 1], cosine log-SNR schedule). The network
predicts eps, v = alpha eps - sigma x, or x (the conversions: parameterization.py). Sampling (the samplers'
update rules: samplers.py; guidance: guidance.py) runs in fast_loop.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vdm_fast import _checks
from vdm_fast.diffusion import fast_loop, guidance
from vdm_fast.diffusion.parameterization import (
    PREDICTIONS,
    bcast,
    check_prediction,
    eps_from_prediction,
    prediction_target,
    x_from_prediction,
)
from vdm_fast.diffusion.schedule import CosineSchedule, alpha_sigma

# loss() takes data scaled to [-1, 1]. It refuses values beyond +-8: pixel-range data ([0, 255], x * 255) for sure,
# while data of unit scale that exceed [-1, 1] legitimately (Gaussian test data: 8 is 8 standard deviations) pass.
X_MAX_ABS = 8.0


class GaussianDiffusion(torch.nn.Module):
    """The continuous-time variance-preserving diffusion process around a denoising model.

    model: any callable `model(z, logsnr, cond=None, cond_mask=None, **kw) -> prediction`, logsnr a (B,) tensor,
    cond_mask a (B,) bool tensor, True where the sample uses its cond (False: the unconditional branch / dropped
    conditioning; None: every sample conditional). prediction: "eps", "v" or "x", what the model outputs; the
    default "v" is the paper's choice for its video models and the trainer's (vdm-fast train --prediction).
    cond_drop_prob: default probability of dropping a sample's cond in `loss` (classifier-free guidance training).
    """

    def __init__(self, model: Callable, *, prediction: str = "v", logsnr_min: float = -20.0,
                 logsnr_max: float = 20.0, cond_drop_prob: float = 0.0):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.prediction = check_prediction(prediction)
        self.schedule = CosineSchedule(logsnr_min, logsnr_max)
        self.cond_drop_prob = _check_prob(cond_drop_prob, "cond_drop_prob")
        # Filled by each sample() call: {"cuda_graph": bool, "reason": str, ...} (why the fast loop ran or not).
        self.last_sample_info: dict = {}

    # ---- the process --------------------------------------------------------------------------------------------
    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t of the cosine schedule (fp64 inside, returned in t's floating dtype or fp32)."""
        return self.schedule.logsnr(t)

    @staticmethod
    def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_sigma(logsnr)

    @staticmethod
    def _alpha_sigma(logsnr: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha, sigma in fp64 from logsnr, cast to like's dtype (fp64 data keeps fp64 coefficients)."""
        alpha, sigma = alpha_sigma(logsnr.double())
        return alpha.to(like.dtype), sigma.to(like.dtype)

    def q_sample(self, x: torch.Tensor, logsnr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = alpha x + sigma eps for a (B,) logsnr."""
        alpha, sigma = self._alpha_sigma(logsnr, x)
        return bcast(alpha, x) * x + bcast(sigma, x) * noise

    def predict_x(self, z, pred, logsnr) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(logsnr, z)
        return x_from_prediction(z, pred, alpha, sigma, self.prediction)

    def predict_eps(self, z, pred, logsnr) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(logsnr, z)
        return eps_from_prediction(z, pred, alpha, sigma, self.prediction)

    def target(self, x, noise, logsnr) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(logsnr, x)
        return prediction_target(x, noise, alpha, sigma, self.prediction)

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, cond: torch.Tensor | None = None, *, cond_drop_prob: float | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, **model_kw) -> torch.Tensor:
        """Mean squared error in the prediction's own space, t ~ U[0, 1] per sample; x scaled to [-1, 1] (values
        beyond +-8, such as pixel values in [0, 255], are refused; so are NaN and Inf).

        cond_drop_prob (default: the constructor's) drops each sample's cond independently: the model gets
        cond_mask (B,) bool, False for dropped samples (combined with a cond_mask passed here). t (B,) and noise
        (x's shape) may be given to fix the draw; otherwise both come from `generator`. Other keywords
        (num_video_frames, positions, ...) pass through to the model.
        """
        _checks.tensor(x, "x", floating=True)
        if x.dim() < 2:
            raise ValueError(f"x must have a batch dim and data dims, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"x must not be empty (a loss over no element is undefined), got shape {tuple(x.shape)}")
        # One min/max reduction (one host sync): pixel-range data ([0, 255]) trains a model that samples nonsense,
        # silently. Data of unit scale pass, also beyond [-1, 1] (Gaussian data in the oracle tests).
        _checks.finite(x, "x (the data, scaled to [-1, 1])", lo=-X_MAX_ABS, hi=X_MAX_ABS)
        B = x.shape[0]
        p = self.cond_drop_prob if cond_drop_prob is None else _check_prob(cond_drop_prob, "cond_drop_prob")
        if t is None:
            t = torch.rand(B, device=x.device, generator=generator, dtype=torch.float64)
        else:
            _checks.tensor(t, "t", floating=True)
            _checks.shape(t, "t", (B,), "one time per sample")
            _checks.finite(t, "t", lo=0.0, hi=1.0)
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        else:
            _checks.tensor(noise, "noise", floating=True)
            _checks.shape(noise, "noise", tuple(x.shape), "x's shape")
            noise = noise.to(x.device)
        cond_mask = model_kw.pop("cond_mask", None)
        if cond_mask is not None:
            _checks.tensor(cond_mask, "cond_mask", dtypes=(torch.bool,))
            _checks.shape(cond_mask, "cond_mask", (B,), "one flag per sample")
        if cond is not None:
            _check_batch(cond, "cond", B)
            _checks.finite(cond, "cond")
            if p > 0:
                keep = torch.rand(B, device=x.device, generator=generator) >= p
                cond_mask = keep if cond_mask is None else cond_mask & keep
        elif cond_mask is not None:
            raise ValueError("cond_mask was given without cond")
        return self.loss_given(x, t, noise, cond, cond_mask, **model_kw)

    def loss_given(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None = None,
                   cond_mask: torch.Tensor | None = None, **model_kw) -> torch.Tensor:
        """`loss` for a fixed draw (t, noise, cond_mask), without its argument checks: no host sync and no random
        draw, so a CUDA graph can capture it (vdm_fast.train.graph). Check the arguments first (`loss` does)."""
        logsnr64 = self.schedule.logsnr(t.to(x.device), torch.float64)
        alpha, sigma = alpha_sigma(logsnr64)
        alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
        z = bcast(alpha, x) * x + bcast(sigma, x) * noise
        pred = self.model(z, logsnr64.to(x.dtype), cond=cond, cond_mask=cond_mask, **model_kw)
        if pred.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(pred.shape)}, expected x's {tuple(x.shape)}")
        target = prediction_target(x, noise, alpha, sigma, self.prediction)
        return torch.mean((pred.float() - target.float()) ** 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, **kw) -> torch.Tensor:
        return self.loss(x, cond, **kw)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample(self, shape, *, steps: int = 256, sampler: str = "ancestral", timesteps: str | None = None,
               gamma: float = 0.3, corrector_steps: int | None = None, langevin_delta: float = 0.1,
               cond: torch.Tensor | None = None, guidance_weight: float = 0.0, x_a: torch.Tensor | None = None,
               a_mask: torch.Tensor | None = None, x_lowres: torch.Tensor | None = None,
               conditioning: str = "reconstruction", w_r: float = 1.0, clip: bool = True,
               generator: torch.Generator | None = None, progress: bool = True, cuda_graph: bool | None = None,
               device: torch.device | str | None = None, **model_kw) -> torch.Tensor:
        """Draw samples of `shape` (video: (B, C, T, H, W)); returns x in [-1, 1] (unclipped when clip=False).

        steps: model calls (pc: times 1 + corrector_steps). sampler (vdm_fast.diffusion.SAMPLERS): "ancestral"
        (variance (sigma~^2_{s|t})^(1-gamma) (sigma^2_{t|s})^gamma, gamma in [0, 1]), "ddim" (eta = 0), "pc"
        (ancestral + `corrector_steps` Langevin steps of size `langevin_delta` in (0, 1] after each step but the
        last; default 1), or the fast multistep samplers, one model call per step: DPM-Solver++ "dpmpp_2m"
        (2nd-order ODE, the fast default: 25 steps), "dpmpp_3m", "dpmpp_2m_sde" (2nd-order SDE) and "unipc"
        (UniPC-2 with its corrector). timesteps (TIMESTEPS): the step grid, "uniform" in t, "logsnr" or
        "karras"; None picks the sampler's default (samplers.DEFAULT_TIMESTEPS, with the reasons).
        cond + guidance_weight w in [-1, 1000]: classifier-free guidance (1 + w) pred(z, cond) - w pred(z, None),
        both branches in one model call of batch 2B. x_a + a_mask (bool (T,)): frames given (x_a (B, C, A, H, W)
        in a_mask's order, or a full video of which the marked frames are read); conditioning "reconstruction"
        (the paper's reconstruction guidance with weight w_r in [0, 1e4], plus replacement of z^a) or
        "replacement" (baseline). x_lowres (B, C, T, h, w): spatial super-resolution by reconstruction guidance.
        With the multistep samplers the guided prediction x~ is the solver's data prediction: it enters the
        update and the history like an unguided x_hat (guidance.py). The returned video holds x_a at the marked
        frames. All noise comes from `generator`. cuda_graph (default: on for CUDA) captures each step in a CUDA
        graph; see fast_loop.py for what falls back to eager and why (in self.last_sample_info). device: where
        to sample (default: the model's). Other keywords go to the model unchanged.
        """
        dev = guidance.sampling_device(device, self.model, cond, x_a, x_lowres)
        plan = fast_loop.make_plan(
            self, shape, steps=steps, sampler=sampler, timesteps=timesteps, gamma=gamma,
            corrector_steps=corrector_steps, langevin_delta=langevin_delta, cond=cond,
            guidance_weight=guidance_weight, x_a=x_a, a_mask=a_mask, x_lowres=x_lowres, conditioning=conditioning,
            w_r=w_r, clip=clip, generator=generator, progress=progress, cuda_graph=cuda_graph, device=dev,
            model_kw=model_kw)
        out, info = fast_loop.run(plan)
        self.last_sample_info = info
        return out

    def extend(self, video: torch.Tensor, num_frames: int, *, window: int = 16, overlap: int | None = None,
               **sample_kw) -> torch.Tensor:
        """Autoregressive extension: append `window - overlap` frames at a time (overlap default: window // 2), each
        chunk sampled as a window of `window` frames whose first ones are the last frames so far (given by
        reconstruction guidance unless sample_kw says conditioning="replacement"), until num_frames frames exist.

        The model gets positions = the absolute frame indices of the window. Near the end, when fewer new frames
        are needed, the window keeps its length and conditions on more frames. video: (B, C, T0, H, W) in [-1, 1].
        """
        return guidance.extend(self, video, num_frames, window=window, overlap=overlap, **sample_kw)


def _check_prob(p, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def _check_batch(t, name: str, B: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0 or t.shape[0] != B:
        raise ValueError(f"{name} must have batch size {B} (first dim), got shape {tuple(t.shape)}")


__all__ = ["GaussianDiffusion", "PREDICTIONS", "x_from_prediction", "eps_from_prediction", "prediction_target"]
