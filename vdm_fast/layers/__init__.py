"""nn.Module layers on vdm_fast's ops, drop-in for the layers of common video diffusion code."""

from vdm_fast.layers.group_norm_silu import GroupNormSiLU
from vdm_fast.layers.rel_pos_bias import RelativePositionBias
from vdm_fast.layers.rms_norm_silu import RMSNormSiLU

__all__ = ["GroupNormSiLU", "RelativePositionBias", "RMSNormSiLU"]

from vdm_fast.layers.temporal_attention import TemporalAttention  # noqa: E402

__all__ += ["TemporalAttention"]
from vdm_fast.layers.spatial_attention import SpatialAttention  # noqa: E402

__all__ += ["SpatialAttention"]
