"""The Gaussian diffusion process of Video Diffusion Models and its samplers (ancestral, DDIM, predictor-corrector),
classifier-free guidance, reconstruction guidance for conditional generation and super-resolution."""

from vdm_fast.diffusion.gaussian import GaussianDiffusion
from vdm_fast.diffusion.parameterization import (
    PREDICTIONS,
    eps_from_prediction,
    prediction_target,
    x_from_prediction,
)
from vdm_fast.diffusion.samplers import SAMPLERS
from vdm_fast.diffusion.schedule import CosineSchedule, alpha_sigma

__all__ = ["GaussianDiffusion", "CosineSchedule", "alpha_sigma", "PREDICTIONS", "SAMPLERS", "x_from_prediction",
           "eps_from_prediction", "prediction_target"]
