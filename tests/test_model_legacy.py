"""Unet3D checkpoints from before the Level/MidBlock layout keep loading, with bitwise the same outputs.

Two sources of layout-1 weights: tests/data/unet3d_micro_legacy.safetensors, written by the code at ad5ea80 (weights,
inputs and the fp64 output of that code), and `Layout1Unet3D` below, a frozen copy of that code's assembly (the flat
`_Stage` lists) on today's blocks, which writes layout-1 checkpoints for any config at test time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file, safe_open
from test_unet3d import MICRO, inputs, randomize
from torch import nn

import vdm_fast
from vdm_fast.model import Unet3D, Unet3DConfig, legacy
from vdm_fast.model.blocks import AttentionBlock, Conv1x3x3, Downsample, ResBlock, Upsample, frame_norm
from vdm_fast.model.embeddings import ConditioningEmbedding

FIXTURE = Path(__file__).parent / "data" / "unet3d_micro_legacy.safetensors"


# --- frozen copy of the layout-1 assembly (vdm_fast/model/unet3d.py at ad5ea80) -----------------------------------


class _Stage(nn.Module):
    def __init__(self, res=None, attn=None, res2=None, *, down=None, up=None):
        super().__init__()
        self.res, self.attn, self.res2, self.resample = res, attn, res2, down if down is not None else up

    def forward(self, h, emb, **frames):
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h, **frames)
        if self.res2 is not None:
            h = self.res2(h, emb)
        return self.resample(h) if self.resample is not None else h


class Layout1Unet3D(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.config = c = Unet3DConfig(**kwargs)
        widths = [c.base_channels * m for m in c.channel_mults]
        attn = dict(dim_head=c.attn_head_dim, num_groups=c.norm_groups, num_buckets=c.num_buckets,
                    max_distance=c.max_distance)
        res = dict(emb_dim=c.emb_dim, num_groups=c.norm_groups, dropout=c.dropout)

        def attention(width, size):
            return AttentionBlock(width, **attn) if size in c.attn_resolutions else None

        self.embedding = ConditioningEmbedding(c.base_channels, c.emb_dim, c.cond_dim, c.emb_layers)
        self.conv_in = Conv1x3x3(c.in_channels, c.base_channels)
        self.down, skips, ch, size = nn.ModuleList(), [c.base_channels], c.base_channels, c.image_size
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(_Stage(ResBlock(ch, width, **res), attention(width, size)))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(_Stage(down=Downsample(ch)))
                skips.append(ch)
                size //= 2
        self.mid = _Stage(ResBlock(ch, ch, **res), AttentionBlock(ch, **attn) if c.mid_attention else None,
                          ResBlock(ch, ch, **res))
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            for i in range(c.num_res_blocks + 1):
                up = Upsample(width) if level > 0 and i == c.num_res_blocks else None
                self.up.append(_Stage(ResBlock(ch + skips.pop(), width, **res), attention(width, size), up=up))
                ch = width
            size *= 2
        self.norm_out = frame_norm(c.norm_groups, ch)
        self.conv_out = Conv1x3x3(ch, c.out_channels)

    def forward(self, x, logsnr, cond=None, *, cond_mask=None, positions=None, num_video_frames=None):
        emb = self.embedding(logsnr, cond, cond_mask)
        frames = dict(positions=positions, num_video_frames=num_video_frames)
        layout = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else None
        if self.config.channels_last:
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


# --- the checkpoint written by the old code -------------------------------------------------------------------------


def test_checkpoint_written_before_the_rebuild_loads_and_gives_its_output():
    tensors = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    config, key_order = json.loads(meta["config"]), json.loads(meta["key_order"])
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    assert list(weights) != [] and set(weights) == set(key_order)
    assert any(k.startswith("down.1.resample.") for k in weights)  # the file really is layout 1
    model = Unet3D.from_config(config)
    assert set(model.state_dict()) != set(weights)
    result = model.load_state_dict(weights)  # strict: every key converted, none missing
    assert not result.missing_keys and not result.unexpected_keys
    # Same parameter order as the old model: the converted old key order is today's state_dict order.
    assert [legacy.convert_state_dict({k: 0}, config).popitem()[0] for k in key_order] == list(model.state_dict())
    for old, new in legacy.renames(weights, model.config).items():
        assert torch.equal(model.state_dict()[new], weights[old])
    model = model.double()
    with vdm_fast.backend("reference"), torch.no_grad():
        out = model(tensors["input.x"], tensors["input.logsnr"], tensors["input.cond"],
                    cond_mask=torch.tensor([True, False]), positions=tensors["input.positions"], num_video_frames=2)
    # fp64 and the same op sequence; only a different CPU's conv kernels could move the last bits.
    assert tensors["output"].abs().max() > 0
    assert_close(out, tensors["output"], 1e-13, "output of the layout-1 checkpoint")


# --- layout-1 checkpoints written at test time by the frozen copy ---------------------------------------------------


def _pair(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    old = randomize(Layout1Unet3D(**{**MICRO, **overrides}))
    new = Unet3D(**{**MICRO, **overrides})
    new.load_state_dict(old.state_dict())
    return old, new


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_same_weights_same_output_and_gradients_bitwise(mode):
    old, new = _pair(cond_dim=5, dropout=0.25)
    # The interpreter runs each kernel program in Python: smaller frames for the Triton run, still two levels.
    x, logsnr, cond = inputs(new) if mode == "reference" else inputs(new, size=4)
    kwargs = dict(cond_mask=torch.tensor([True, False]), positions=torch.tensor([0, 2, 3]), num_video_frames=2)
    results = []
    for model in (old, new):
        model.train()  # dropout on: the same seed draws the same masks in both layouts
        torch.manual_seed(7)
        with vdm_fast.backend(mode):
            out = model(x, logsnr, cond, **kwargs)
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_old, g_old), (out_new, g_new) = results
    assert out_old.abs().max() > 0
    assert torch.equal(out_new, out_old), "the rebuilt model's output differs from the old layout's"
    assert len(g_new) == len(g_old)
    for i, (a, b) in enumerate(zip(g_new, g_old)):  # same parameter order, so an old optimizer state fits
        assert a.shape == b.shape and torch.equal(a, b), f"gradient of parameter {i}"


CONFIGS = [dict(MICRO), dict(MICRO, num_res_blocks=2, channel_mults=(1, 2, 2), image_size=16, attn_resolutions=(8, 4)),
           dict(MICRO, mid_attention=False, num_res_blocks=3, attn_resolutions=()), dict(MICRO, channel_mults=(2,))]


@pytest.mark.parametrize("config", CONFIGS + ["ucf101", "bair", "sr-9x128", "tiny"])
def test_converter_maps_every_layout1_key_in_order(config):
    kwargs = dict(vdm_fast.model.PRESETS[config]) if isinstance(config, str) else config
    with torch.device("meta"):
        old, new = Layout1Unet3D(**kwargs), Unet3D(**kwargs)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    converted = legacy.convert_state_dict(old_sd, new.config)
    assert list(converted) == list(new_sd)  # every key, in parameter order
    assert all(converted[k].shape == v.shape for k, v in new_sd.items())
    assert legacy.convert_state_dict(converted, new.config).keys() == converted.keys()  # idempotent
    assert legacy.convert_state_dict(new_sd, new.config).keys() == new_sd.keys()  # today's keys pass unchanged
    assert [p.shape for p in old.parameters()] == [p.shape for p in new.parameters()]


def test_layout1_keys_load_under_a_prefix_and_mismatches_are_reported():
    old, new = _pair()
    holder = nn.ModuleDict({"net": Unet3D(**MICRO)})  # e.g. a diffusion wrapper or an EMA copy
    holder.load_state_dict({f"net.{k}": v for k, v in old.state_dict().items()})
    for (n1, p1), (n2, p2) in zip(holder["net"].state_dict().items(), new.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # A layout-1 checkpoint of another config (more blocks): the keys with no counterpart are reported, not dropped.
    other = Layout1Unet3D(**{**MICRO, "num_res_blocks": 2})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Unet3D(**MICRO).load_state_dict(other.state_dict())
