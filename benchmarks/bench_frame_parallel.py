"""Frame parallelism (vdm_fast.parallel.frame_parallel): what each rank sends per step, and what it saves.

For each of the paper's U-Net layouts and world sizes 2, 4, 8, per rank and per training step (forward + backward):
- all-to-all bytes sent: each temporal attention sends (W-1)/W of its rank's (B, C, T_r, H, W) input in and of its
  output back, and the backward as much again, so 4 (W-1)/W x its activation bytes per attention layer;
- activation bytes saved for backward (torch.autograd.graph.saved_tensors_hooks), which fall with W since every
  rank holds T/W frames (the temporal attention's exchanged tensors hold the same number of elements);
- a model of the step on 8 NVLink GPUs: the exchange at an assumed 300 GB/s effective all-to-all bandwidth per
  GPU (H100/H200 SXM NVLink 4: 450 GB/s per direction) against the compute at an assumed 400 TFLOP/s (40% of bf16
  dense peak), FLOPs counted by torch.utils.flop_counter. These are models, labelled as such; nothing here is a
  GPU measurement.

Shapes are measured on a narrow copy of each layout (the same levels, resolutions, frames and attention placement at
1/8 of the width, 1/16 with --quick) and scaled: bytes scale with the width, matmul FLOPs with its square. On a CPU
this runs as is. The gloo exactness of the scheme is tested in tests/test_frame_parallel.py.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import vdm_fast
from vdm_fast.layers.temporal_attention import TemporalAttention
from vdm_fast.parallel import frame_shards

from .common import row

LAYOUTS = {  # preset: (batch per replica, frames, resolution), the paper's training layouts
    "bair": (1, 16, 64),
    "ucf101": (1, 16, 64),
    "sr-9x128": (1, 9, 128),
}
NARROW, NARROW_QUICK = 8, 16  # the measured copy is 1/NARROW of the width
BYTES = 2  # bf16 activations
A2A_GBPS, FLOPS = 300e9, 400e12  # assumptions of the model (see the module docstring)


def _measure(preset: str, batch: int, frames: int, size: int, narrow_by: int):
    """(attention input elements per frame summed over layers, saved elements per frame, FLOPs) of one training
    step of the narrow copy at (batch, 3, frames, size, size)."""
    cfg = vdm_fast.model.config.preset_config(preset)
    narrow = dict(base_channels=cfg.base_channels // narrow_by, attn_head_dim=cfg.attn_head_dim // narrow_by,
                  norm_groups=max(1, cfg.norm_groups // narrow_by), image_size=size, num_frames=frames,
                  zero_init=False)
    model = vdm_fast.Unet3D.preset(preset, **narrow)
    attn_elems = []
    hooks = [m.register_forward_pre_hook(lambda m, a: attn_elems.append(a[0].numel()))
             for m in model.modules() if isinstance(m, TemporalAttention)]
    saved = []

    def pack(t):
        saved.append(t.numel() if t.is_floating_point() else 0)
        return t

    x = torch.randn(batch, cfg.in_channels, frames, size, size)
    with vdm_fast.backend("reference"), FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, torch.zeros(batch))
        out.sum().backward()
    for h in hooks:
        h.remove()
    return sum(attn_elems) / frames, sum(saved) / frames, flops.get_total_flops(), len(attn_elems)


def run(quick: bool = False) -> list[dict]:
    rows = []
    layouts = {"ucf101": LAYOUTS["ucf101"]} if quick else LAYOUTS
    for preset, (batch, frames, size) in layouts.items():
        narrow_by = NARROW_QUICK if quick else NARROW
        attn_per_frame, saved_per_frame, flops, layers = _measure(preset, batch, frames, size, narrow_by)
        attn_per_frame *= narrow_by  # elements scale with the width
        saved_per_frame *= narrow_by
        flops *= narrow_by ** 2
        shape = f"{preset} ({batch}, 3, {frames}, {size}, {size}), {layers} temporal attentions"
        for world in (1, 2, 4, 8):
            if world > frames:
                continue
            t_r = max(frame_shards(frames, world))  # the busiest rank
            sent = 4 * (world - 1) / world * attn_per_frame * t_r * BYTES
            saved_gb = saved_per_frame * t_r * BYTES / 1e9
            comm_ms = sent / A2A_GBPS * 1e3
            compute_ms = flops * t_r / frames / FLOPS * 1e3
            note = (f"model (not measured): per rank {sent / 1e6:.0f} MB all-to-all per train step, saved activations "
                    f"{saved_gb:.2f} GB; exchange {comm_ms:.2f} ms vs compute {compute_ms:.2f} ms on {world} NVLink "
                    f"GPUs ({A2A_GBPS / 1e9:.0f} GB/s, {FLOPS / 1e12:.0f} TFLOP/s assumed)")
            r = row("frame_parallel", shape, "bfloat16", f"world {world}", None, note=note, layout=f"W={world}",
                    device="model")
            r.update(bytes_sent_per_rank=sent, saved_bytes_per_rank=saved_gb * 1e9, modeled_comm_ms=comm_ms,
                     modeled_compute_ms=compute_ms)
            rows.append(r)
    return rows
