"""Plain-PyTorch reference implementations: the definition of correct for every op in vdm_fast.ops.

They favour clarity over speed and run on any device and dtype (fp64 included); tests compare every fast path
against them in fp64.
"""

from vdm_fast.reference.diffusion_update import diffusion_update
from vdm_fast.reference.group_norm_silu import group_norm_silu
from vdm_fast.reference.rel_pos_bias import rel_pos_bias, relative_position_bucket
from vdm_fast.reference.rms_norm_silu import rms_norm_silu

__all__ = ["diffusion_update", "group_norm_silu", "relative_position_bucket", "rel_pos_bias", "rms_norm_silu"]

from vdm_fast.reference.temporal_attention import (  # noqa: E402
    joint_video_image_mask,
    temporal_attention,
    temporal_attention_packed,
)

__all__ += ["temporal_attention", "temporal_attention_packed", "joint_video_image_mask"]
