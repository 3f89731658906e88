"""vdm_fast: fast kernels, a 3D U-Net and samplers for Video Diffusion Models (Ho et al. 2022)."""

from vdm_fast import layers, ops, reference
from vdm_fast._dispatch import backend, current_mode

__version__ = "0.1.0"

__all__ = ["backend", "current_mode", "layers", "ops", "reference", "__version__"]
