"""The paper's 3D U-Net (Ho et al. 2022, section 3): Unet3D, its blocks, conditioning and presets."""

from vdm_fast.model.presets import PRESETS, preset_config
from vdm_fast.model.unet3d import Unet3D, Unet3DConfig

__all__ = ["PRESETS", "Unet3D", "Unet3DConfig", "preset_config"]
