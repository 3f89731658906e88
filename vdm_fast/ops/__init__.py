"""vdm_fast's ops. Each follows one contract (see README, "The op contract"): a plain-PyTorch reference in
vdm_fast.reference, fast code (Triton in vdm_fast.kernels, or the compiled vdm_fast._C), one dispatch
(vdm_fast._dispatch), a torch.library registration with fake and autograd implementations, and checked arguments.
"""

from vdm_fast.ops.diffusion_update import diffusion_update
from vdm_fast.ops.group_norm_silu import group_norm_silu
from vdm_fast.ops.rel_pos_bias import rel_pos_bias
from vdm_fast.ops.rms_norm_silu import rms_norm_silu

__all__ = ["diffusion_update", "group_norm_silu", "rel_pos_bias", "rms_norm_silu"]

from vdm_fast.ops.temporal_attention import (  # noqa: E402
    joint_video_image_mask,
    temporal_attention,
    temporal_attention_packed,
)

__all__ += ["temporal_attention", "temporal_attention_packed", "joint_video_image_mask"]
