"""The paper's models (appendix) as Unet3D configs. Unet3D.preset(name, **overrides) builds one."""

from __future__ import annotations

from vdm_fast.model.unet3d import Unet3DConfig

_PAPER = dict(attn_resolutions=(8, 16, 32), attn_head_dim=64)

PRESETS: dict[str, dict] = {
    # UCF101 unconditional, 16x64x64, eps-prediction.
    "ucf101": dict(_PAPER, base_channels=256, channel_mults=(1, 2, 4, 8), num_res_blocks=2, num_frames=16,
                   image_size=64),
    # BAIR robot pushing 64x64 (1 -> 15 frames: trained on 16), v-prediction.
    "bair": dict(_PAPER, base_channels=128, channel_mults=(1, 2, 3, 4), num_res_blocks=3, num_frames=16,
                 image_size=64),
    # Kinetics-600 64x64 (5 -> 11 frames: trained on 16), v-prediction.
    "kinetics": dict(_PAPER, base_channels=256, channel_mults=(1, 2, 4, 8), num_res_blocks=2, num_frames=16,
                     image_size=64),
    # Text-conditioned, small: a pooled text embedding of width 512 (any encoder; nothing is downloaded).
    "text-small": dict(_PAPER, base_channels=128, channel_mults=(1, 2, 4, 8), num_res_blocks=2, num_frames=16,
                       image_size=64, cond_dim=512),
    # Text-conditioned spatial super-resolution to 9x128x128: the upsampled low-res video rides on 3 extra channels.
    "sr-9x128": dict(_PAPER, base_channels=128, channel_mults=(1, 2, 4, 8, 16), num_res_blocks=2, num_frames=9,
                     image_size=128, attn_head_dim=128, in_channels=6, out_channels=3, cond_dim=512),
    # Small enough to train for a few minutes on a 2-core CPU: 8 frames of 16x16, attention at 8x8.
    "tiny": dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), attn_head_dim=32,
                 norm_groups=8, num_frames=8, image_size=16),
}


def preset_config(name: str, **overrides) -> Unet3DConfig:
    """The config of preset `name` with `overrides` applied (any Unet3DConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return Unet3DConfig(**{**PRESETS[name], **overrides})
