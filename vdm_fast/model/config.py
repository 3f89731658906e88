"""Unet3DConfig, the plain description of a Unet3D, and the paper's models (appendix) as presets.

A leaf: it imports no model code, so the model, the trainer and the CLI can all read configs without importing each
other. `Unet3D(config)` builds a model; `Unet3D.preset(name, **overrides)` = `Unet3D(preset_config(name, ...))`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vdm_fast import _checks


@dataclass
class Unet3DConfig:
    """Everything needed to rebuild a Unet3D: `Unet3D(**dataclasses.asdict(model.config))`.

    image_size (the training resolution) only places the attention: at the levels whose spatial size is in
    attn_resolutions. forward takes any size divisible by 2 ** (len(channel_mults) - 1).
    """

    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8, 16, 32)
    attn_head_dim: int = 64
    image_size: int = 64
    num_frames: int = 16  # the training layout's frames (documentation and benchmarks; forward takes any T)
    cond_dim: int | None = None  # width of the conditioning vector (e.g. a pooled text embedding); None: none
    emb_dim: int | None = None  # conditioning MLP width; None: 4 * base_channels (1024 at base 256, as in the paper)
    emb_layers: int = 2
    norm_groups: int = 32
    dropout: float = 0.0
    mid_attention: bool = True
    num_buckets: int = 32
    max_distance: int = 32
    zero_init: bool = True  # zero the last conv of each residual block and the output conv (DDPM practice)
    channels_last: bool = True  # run in channels_last_3d memory (the output comes back in x's memory format)
    # Recompute each residual and attention block in backward instead of keeping its activations (training memory
    # for compute; the loss and gradients are bitwise the same). Also model.enable_gradient_checkpointing().
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.channel_mults, self.attn_resolutions = tuple(self.channel_mults), tuple(self.attn_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.emb_dim is None:
            self.emb_dim = 4 * self.base_channels
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "attn_head_dim", "image_size",
                     "num_frames", "emb_dim", "emb_layers", "norm_groups", "num_buckets", "max_distance"):
            _checks.positive_int(getattr(self, name), name)
        if not self.channel_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                         for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty sequence of positive ints, got {self.channel_mults}")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be a sequence of positive ints, got {self.attn_resolutions}")
        if self.cond_dim is not None:
            _checks.positive_int(self.cond_dim, "cond_dim")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {type(self.dropout).__name__}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("mid_attention", "zero_init", "channels_last", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"norm_groups ({self.norm_groups}) must divide every level's width "
                                 f"(base_channels {self.base_channels} x mult {m})")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by {self.downsample_factor} "
                             f"(2 ** (levels - 1) for {len(self.channel_mults)} levels)")

    def to_dict(self) -> dict:
        """A plain dict (for checkpoints): Unet3D(**config.to_dict()) rebuilds the model."""
        return dataclasses.asdict(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def widths(self) -> list[int]:
        """The channel width of each level, top (full resolution) first."""
        return [self.base_channels * m for m in self.channel_mults]

    def attention_at(self, level: int) -> bool:
        """Whether level `level` (0 = full resolution) has spatial + temporal attention after its residual blocks."""
        return self.image_size // 2 ** level in self.attn_resolutions


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
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {tuple(PRESETS)}, got {type(name).__name__}")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Unet3DConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown Unet3DConfig field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
    return Unet3DConfig(**{**PRESETS[name], **overrides})
