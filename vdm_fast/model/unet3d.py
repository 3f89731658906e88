"""Unet3D: the paper's 3D U-Net (Ho et al. 2022, section 3, figure 1), a 2D image U-Net factorized over space and time.

    h = conv_in(x)                                                          skips = [h]
    down, per level (full resolution first): num_res_blocks x Block, each  skips += [h]; then downsample, skips += [h]
    mid: ResBlock, spatial + temporal attention, ResBlock
    up, per level (lowest resolution first): num_res_blocks + 1 x Block on cat([h, skips.pop()], channels); upsample
    eps (or v) = conv_out(GN-SiLU(h))

A Block is a residual block (FiLM from the embedded log-SNR and conditioning) followed, at the attention resolutions,
by spatial attention within each frame and then temporal attention across frames (relative position bias, joint
image-video mask). Every conv is 1x3x3 and every norm per frame: only the temporal attention mixes frames.

Layout: activations run in channels_last_3d memory (NDHWC) when config.channels_last; the output comes back in x's
memory format. Parameters are registered in forward order (down, mid, up; within a block residual then attention), the
same order as every earlier layout, so optimizer states keyed by parameter index stay valid across layouts
(vdm_fast.model.legacy converts the state-dict keys).

Gradient checkpointing (config.gradient_checkpointing, enable_gradient_checkpointing()): each residual block and
each attention block keeps only its inputs for backward and recomputes the rest, with the RNG state restored so that
dropout draws the same mask; the kernels are deterministic, so loss and gradients are bitwise those without it.
The recomputation runs at backward time, outside the forward's call: whatever call-scoped state the layers read is
re-established for it as the forward saw it, the backend mode and, for a module carrying a `RECOMPUTE_STATE`
attribute (a callable that captures that state now and returns a context manager restoring it), that state too
(vdm_fast.parallel's frame shards of the current call, so that a recomputed temporal attention makes the same
all-to-alls on every rank).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vdm_fast import _checks, _dispatch
from vdm_fast.model import legacy
from vdm_fast.model.blocks import AttentionBlock, Conv1x3x3, Downsample, ResBlock, Upsample, frame_norm
from vdm_fast.model.config import Unet3DConfig, preset_config
from vdm_fast.model.embeddings import ConditioningEmbedding


def _run(module: nn.Module, recompute: bool, *args, **kwargs) -> torch.Tensor:
    """module(*args, **kwargs), keeping only the inputs for backward when `recompute` (and autograd records)."""
    if not (recompute and torch.is_grad_enabled()):
        return module(*args, **kwargs)
    if torch.compiler.is_compiling():  # the traced graph fixed the backend; compile takes no custom context_fn
        return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    # The ops read the backend when called, and the recomputation runs at backward time, perhaps outside the
    # forward's `with vdm_fast.backend(...)`: recompute under the forward's backend, or it would run other ops; the
    # same for a wrapper's state of this call (RECOMPUTE_STATE).
    mode = _dispatch.current_mode()
    capture = getattr(module, RECOMPUTE_STATE, None)
    return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: _contexts(mode, capture), **kwargs)


# The attribute naming a module's hook for state of the current call that its recomputation must see (see the
# module docstring); set by wrappers such as vdm_fast.parallel.frame_parallel, which the model does not import.
RECOMPUTE_STATE = "_vdm_fast_recompute_state"


def _contexts(mode: str, capture) -> tuple:
    """checkpoint's (forward, recompute) contexts, made at forward time: the state is captured now, entered later."""
    restore = capture() if capture is not None else contextlib.nullcontext()
    return contextlib.nullcontext(), _recompute_under(mode, restore)


@contextlib.contextmanager
def _recompute_under(mode: str, restore):
    with _dispatch.backend(mode), restore:
        yield


def _is_channels_last_3d(x: torch.Tensor) -> bool:
    """x.is_contiguous(memory_format=torch.channels_last_3d), read from the strides of the dimensions of size > 1
    with the batch last in line: torch's own check guards on the batch size, which would make torch.compile
    specialize a batch marked dynamic."""
    B, C, T, H, W = x.shape
    expected = C * T * H * W
    for dim, stride in ((1, 1), (4, C), (3, C * W), (2, C * W * H)):
        if x.shape[dim] > 1 and x.stride(dim) != stride:
            return False
    return B == 1 or x.stride(0) == expected


class Block(nn.Module):
    """The unit every level stacks: a residual block, then (at the attention resolutions) spatial-then-temporal
    attention. forward(h, emb, positions=None, num_video_frames=None)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None):
        super().__init__()
        self.res, self.attn = res, attn
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        h = _run(self.res, self.gradient_checkpointing, h, emb)
        if self.attn is not None:
            h = _run(self.attn, self.gradient_checkpointing, h, positions=positions,
                     num_video_frames=num_video_frames)
        return h


class Level(nn.Module):
    """One resolution of a path: `blocks` (num_res_blocks of them going down, one more going up, each taking a skip),
    then `downsample` (down path, all but the lowest level) or `upsample` (up path, all but the top level); the
    other is None."""

    def __init__(self, blocks: list[Block], *, downsample: Downsample | None = None, upsample: Upsample | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample, self.upsample = downsample, upsample


class MidBlock(nn.Module):
    """The bottom of the U: residual block, spatial + temporal attention (if config.mid_attention), residual block."""

    def __init__(self, res1: ResBlock, attn: AttentionBlock | None, res2: ResBlock):
        super().__init__()
        self.res1, self.attn, self.res2 = res1, attn, res2
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        h = _run(self.res1, self.gradient_checkpointing, h, emb)
        if self.attn is not None:
            h = _run(self.attn, self.gradient_checkpointing, h, positions=positions,
                     num_video_frames=num_video_frames)
        return _run(self.res2, self.gradient_checkpointing, h, emb)


class Unet3D(nn.Module):
    """eps- or v-prediction network: forward(x, logsnr, cond=None, *, cond_mask=None, positions=None,
    num_video_frames=None) -> (B, out_channels, T, H, W).

    x: (B, in_channels, T, H, W) noisy video (for super-resolution, concatenated with the upsampled low-res video), in
    the parameters' dtype (or any under autocast); fp64 runs the reference ops. logsnr: (B,) noise level.
    cond: (B, cond_dim) conditioning vector or None (the learned null embedding for the whole batch);
    cond_mask: (B,) bool, False = that sample gets the null embedding (classifier-free guidance, one call).
    positions: (T,) or (B, T) integer frame indices for the relative position bias (default 0..T-1).
    num_video_frames: k = frames 0..k-1 are one video and frames k..T-1 independent images (joint training).
    """

    def __init__(self, config: Unet3DConfig | None = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a Unet3DConfig or keyword arguments, not both")
        if config is not None and not isinstance(config, Unet3DConfig):
            raise TypeError(f"config must be a Unet3DConfig, got {type(config).__name__} (use Unet3D.from_config)")
        # A copy: enable_gradient_checkpointing() writes to the model's config, never to one the caller shares.
        self.config = c = dataclasses.replace(config) if config is not None else Unet3DConfig(**kwargs)
        widths, last = c.widths, len(c.widths) - 1
        attn = dict(dim_head=c.attn_head_dim, num_groups=c.norm_groups, num_buckets=c.num_buckets,
                    max_distance=c.max_distance)
        res = dict(emb_dim=c.emb_dim, num_groups=c.norm_groups, dropout=c.dropout)

        def block(in_ch: int, width: int, level: int) -> Block:
            attention = AttentionBlock(width, **attn) if c.attention_at(level) else None
            return Block(ResBlock(in_ch, width, **res), attention)

        self.embedding = ConditioningEmbedding(c.base_channels, c.emb_dim, c.cond_dim, c.emb_layers)
        self.conv_in = Conv1x3x3(c.in_channels, c.base_channels)

        # `skips`: the width of each activation the down path hands the up path, in the order forward pushes them.
        self.down, skips, ch = nn.ModuleList(), [c.base_channels], c.base_channels
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(block(ch, width, level))
                ch = width
                skips.append(ch)
            self.down.append(Level(blocks, downsample=Downsample(ch) if level < last else None))
            if level < last:
                skips.append(ch)

        self.mid = MidBlock(ResBlock(ch, ch, **res), AttentionBlock(ch, **attn) if c.mid_attention else None,
                            ResBlock(ch, ch, **res))

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), widths[level], level))
                ch = widths[level]
            self.up.append(Level(blocks, upsample=Upsample(ch) if level > 0 else None))

        self.norm_out = frame_norm(c.norm_groups, ch)
        self.conv_out = Conv1x3x3(ch, c.out_channels)
        if c.zero_init:
            for m in self.modules():
                if isinstance(m, ResBlock):
                    nn.init.zeros_(m.conv2.weight)
                    nn.init.zeros_(m.conv2.bias)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        self._set_gradient_checkpointing(c.gradient_checkpointing)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None = None, *,
                cond_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        self._check(x, logsnr, cond, cond_mask, positions, num_video_frames)
        emb = self.embedding(logsnr, cond, cond_mask)
        frames = dict(positions=positions, num_video_frames=num_video_frames)
        layout = torch.channels_last_3d if _is_channels_last_3d(x) else None
        if self.config.channels_last:
            # NDHWC: the layout the 1x3x3 convs are fastest in (cuDNN tensor cores, oneDNN), that the per-frame
            # attention's (frames, positions, channels) view reads without a copy, and that the fused norm takes.
            x = x.contiguous(memory_format=torch.channels_last_3d)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb, **frames)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)
        h = self.mid(h, emb, **frames)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, **frames)
            if level.upsample is not None:
                h = level.upsample(h)
        out = self.conv_out(self.norm_out(h))
        return out.contiguous(memory_format=layout or torch.contiguous_format)

    # --- gradient checkpointing, as diffusers models expose it ---------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each residual and attention block in backward (sets config.gradient_checkpointing)."""
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.config.gradient_checkpointing

    def _set_gradient_checkpointing(self, enable: bool) -> None:
        self.config.gradient_checkpointing = bool(enable)
        for m in self.modules():
            if isinstance(m, (Block, MidBlock)):
                m.gradient_checkpointing = bool(enable)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the Level/MidBlock layout: rename their keys in place (this load's own copy).
        for old, new in legacy.renames(list(state_dict), self.config, prefix).items():
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    def _check(self, x, logsnr, cond, cond_mask, positions, num_video_frames) -> None:
        c = self.config
        _checks.tensor(x, "x", ndim=5, floating=True)
        B, C, T, H, W = x.shape
        if C != c.in_channels:
            raise ValueError(f"x must have {c.in_channels} channels (in_channels), got shape {tuple(x.shape)}")
        weight = self.conv_in.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: cast x, convert the "
                            f"model (model.to({x.dtype}); fp64 runs the reference ops) or run under torch.autocast")
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
