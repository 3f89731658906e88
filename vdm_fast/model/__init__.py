"""The paper's 3D U-Net (Ho et al. 2022, section 3): Unet3D, its blocks, conditioning and presets."""

from vdm_fast.model.config import PRESETS, Unet3DConfig, preset_config
from vdm_fast.model.unet3d import Unet3D

__all__ = ["PRESETS", "Unet3D", "Unet3DConfig", "preset_config"]
