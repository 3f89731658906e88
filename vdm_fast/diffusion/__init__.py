"""The Gaussian diffusion process of Video Diffusion Models and its samplers (ancestral, DDIM, predictor-corrector,
DPM-Solver++ 2M / 2M SDE / 3M, UniPC), step grids, classifier-free guidance, reconstruction guidance for
conditional generation and super-resolution, and exact oracle denoisers to test samplers against.

SAMPLERS and TIMESTEPS are the choices `GaussianDiffusion.sample(sampler=..., timesteps=...)` takes."""

from vdm_fast.diffusion.gaussian import GaussianDiffusion
from vdm_fast.diffusion.parameterization import (
    PREDICTIONS,
    eps_from_prediction,
    prediction_target,
    x_from_prediction,
)
from vdm_fast.diffusion.samplers import DEFAULT_TIMESTEPS, SAMPLERS, TIMESTEPS
from vdm_fast.diffusion.schedule import CosineSchedule, alpha_sigma

__all__ = ["GaussianDiffusion", "CosineSchedule", "alpha_sigma", "PREDICTIONS", "SAMPLERS", "TIMESTEPS",
           "DEFAULT_TIMESTEPS", "x_from_prediction", "eps_from_prediction", "prediction_target"]
