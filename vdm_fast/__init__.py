"""vdm_fast: fast kernels, a 3D U-Net and samplers for Video Diffusion Models (Ho et al. 2022).

- vdm_fast.ops: the fused ops (rel_pos_bias, group_norm_silu, rms_norm_silu, temporal_attention), vdm_fast.reference
  their plain-PyTorch definitions, vdm_fast.layers the modules on top;
- vdm_fast.Unet3D: the paper's factorized space-time U-Net; vdm_fast.GaussianDiffusion: its process and samplers;
- vdm_fast.patch / unpatch: fuse the same ops into existing models (diffusers, video-diffusion-pytorch);
- vdm_fast.backend("auto" | "reference" | "triton"): which implementation the ops run.
"""

from vdm_fast import diffusion, layers, model, ops, reference
from vdm_fast._dispatch import backend, current_mode
from vdm_fast.diffusion import GaussianDiffusion
from vdm_fast.model import Unet3D
from vdm_fast.patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "GaussianDiffusion", "Unet3D", "__version__", "backend", "current_mode", "diffusion", "layers", "model", "ops",
    "patch", "reference", "unpatch",
]
