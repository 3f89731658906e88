"""nn.Module layers on vdm_fast's ops, drop-in for the layers of common video diffusion code."""

from vdm_fast.layers.rel_pos_bias import RelativePositionBias

__all__ = ["RelativePositionBias"]
