"""Unet3D: the paper's 3D U-Net (Ho et al. 2022, section 3), a 2D image U-Net factorized over space and time."""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast import _checks
from vdm_fast.model.blocks import AttentionBlock, Conv1x3x3, Downsample, ResBlock, Upsample, frame_norm
from vdm_fast.model.config import Unet3DConfig, preset_config
from vdm_fast.model.embeddings import ConditioningEmbedding


class Unet3D(nn.Module):
    """eps- or v-prediction network: forward(x, logsnr, cond=None, *, cond_mask=None, positions=None,
    num_video_frames=None) -> (B, out_channels, T, H, W).

    x: (B, in_channels, T, H, W) noisy video (for super-resolution, concatenated with the upsampled low-res video).
    logsnr: (B,) noise level. cond: (B, cond_dim) conditioning vector or None (the learned null embedding for the whole
    batch); cond_mask: (B,) bool, False = that sample gets the null embedding (classifier-free guidance, one call).
    positions: (T,) or (B, T) integer frame indices for the relative position bias (default 0..T-1).
    num_video_frames: k = frames 0..k-1 are one video and frames k..T-1 independent images (joint training).
    """

    def __init__(self, config: Unet3DConfig | None = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a Unet3DConfig or keyword arguments, not both")
        self.config = c = config if config is not None else Unet3DConfig(**kwargs)
        widths = [c.base_channels * m for m in c.channel_mults]
        attn = dict(dim_head=c.attn_head_dim, num_groups=c.norm_groups, num_buckets=c.num_buckets,
                    max_distance=c.max_distance)
        res = dict(emb_dim=c.emb_dim, num_groups=c.norm_groups, dropout=c.dropout)

        self.embedding = ConditioningEmbedding(c.base_channels, c.emb_dim, c.cond_dim, c.emb_layers)
        self.conv_in = Conv1x3x3(c.in_channels, c.base_channels)

        # Down path: num_res_blocks blocks per level (attention after each at attention levels), then downsample.
        # `skips` tracks the width of every activation the up path will concatenate back.
        self.down, skips, ch, size = nn.ModuleList(), [c.base_channels], c.base_channels, c.image_size
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(_Stage(ResBlock(ch, width, **res), _attention(width, size, c, attn)))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(_Stage(down=Downsample(ch)))
                skips.append(ch)
                size //= 2

        self.mid = _Stage(ResBlock(ch, ch, **res), AttentionBlock(ch, **attn) if c.mid_attention else None,
                          ResBlock(ch, ch, **res))

        # Up path: num_res_blocks + 1 blocks per level, each taking one skip by concatenation, then upsample.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            for i in range(c.num_res_blocks + 1):
                up = Upsample(width) if level > 0 and i == c.num_res_blocks else None
                self.up.append(_Stage(ResBlock(ch + skips.pop(), width, **res), _attention(width, size, c, attn),
                                      up=up))
                ch = width
            size *= 2

        self.norm_out = frame_norm(c.norm_groups, ch)
        self.conv_out = Conv1x3x3(ch, c.out_channels)
        if c.zero_init:
            for m in self.modules():
                if isinstance(m, ResBlock):
                    nn.init.zeros_(m.conv2.weight)
                    nn.init.zeros_(m.conv2.bias)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def preset(cls, name: str, **overrides) -> Unet3D:
        """A model of the paper's appendix (see vdm_fast.model.config.PRESETS), with any config field overridden."""
        return cls(preset_config(name, **overrides))

    @classmethod
    def from_config(cls, config: Unet3DConfig | dict) -> Unet3D:
        """Rebuild a model from `model.config` or its `to_dict()` (e.g. stored in a checkpoint)."""
        return cls(config if isinstance(config, Unet3DConfig) else Unet3DConfig(**config))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None = None, *,
                cond_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        self._check(x, logsnr, cond, cond_mask, positions, num_video_frames)
        emb = self.embedding(logsnr, cond, cond_mask)
        frames = dict(positions=positions, num_video_frames=num_video_frames)
        layout = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else None
        if self.config.channels_last:
            # NDHWC: the layout the 1x3x3 convs are fastest in (cuDNN tensor cores, oneDNN), that the per-frame
            # attention's (frames, positions, channels) view reads without a copy, and that the fused norm takes.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb, **frames)
            hs.append(h)
        h = self.mid(h, emb, **frames)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, **frames)
        out = self.conv_out(self.norm_out(h))
        return out.contiguous(memory_format=layout or torch.contiguous_format)

    def _check(self, x, logsnr, cond, cond_mask, positions, num_video_frames) -> None:
        c = self.config
        _checks.tensor(x, "x", ndim=5, floating=True)
        B, C, T, H, W = x.shape
        if C != c.in_channels:
            raise ValueError(f"x must have {c.in_channels} channels (in_channels), got shape {tuple(x.shape)}")
        if H % c.downsample_factor or W % c.downsample_factor:
            raise ValueError(f"x's spatial size {H}x{W} must be divisible by {c.downsample_factor} "
                             f"({len(c.channel_mults)} levels halve it {len(c.channel_mults) - 1} times)")
        _checks.tensor(logsnr, "logsnr", ndim=1, floating=True)
        _checks.shape(logsnr, "logsnr", (B,), "one noise level per sample")
        if cond is not None:
            if c.cond_dim is None:
                raise ValueError("cond was given but this model has no conditioning (cond_dim=None)")
            _checks.tensor(cond, "cond", ndim=2, floating=True)
            _checks.shape(cond, "cond", (B, c.cond_dim), "(batch, cond_dim)")
        if cond_mask is not None:
            if cond is None:
                raise ValueError("cond_mask was given without cond")
            _checks.tensor(cond_mask, "cond_mask", ndim=1, dtypes=(torch.bool,))
            _checks.shape(cond_mask, "cond_mask", (B,))
        if positions is not None:
            _checks.tensor(positions, "positions", ndim=(1, 2), integer=True)
            if positions.shape[-1] != T or (positions.dim() == 2 and positions.shape[0] != B):
                raise ValueError(f"positions must have shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
        if num_video_frames is not None:
            _checks.positive_int(num_video_frames, "num_video_frames", minimum=0)
            if num_video_frames > T:
                raise ValueError(f"num_video_frames must be in [0, {T}] (the number of frames), got {num_video_frames}")


class _Stage(nn.Module):
    """One step of a path: residual block(s), optional attention, optional resampling, in that order."""

    def __init__(self, res: ResBlock | None = None, attn: AttentionBlock | None = None, res2: ResBlock | None = None,
                 *, down: Downsample | None = None, up: Upsample | None = None):
        super().__init__()
        self.res, self.attn, self.res2, self.resample = res, attn, res2, down if down is not None else up

    def forward(self, h: torch.Tensor, emb: torch.Tensor, **frames) -> torch.Tensor:
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h, **frames)
        if self.res2 is not None:
            h = self.res2(h, emb)
        return self.resample(h) if self.resample is not None else h


def _attention(width: int, size: int, c: Unet3DConfig, attn: dict) -> AttentionBlock | None:
    return AttentionBlock(width, **attn) if size in c.attn_resolutions else None

