"""What vdm_fast.patch does to each diffusers video model class: replaced modules by kind, what it left alone and
why (grouped), and how many fused op calls one forward makes. CPU-run on small configurations of each class with
random weights (nothing is downloaded): the counts depend on the architecture, not on the width, so they are those
of the full-size model scaled to fewer blocks where the configuration says so.

    python -m vdm_fast.benchmarks.patch_coverage [--markdown]

Speedups of the patched models need a GPU (benchmarks/bench_patch.py); on CPU this reports structure only.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

import vdm_fast
from vdm_fast import ops


def _models(diffusers):
    """(name, builder, forward inputs or None): small configurations of each class."""
    d = diffusers
    cross = 16
    yield ("UNet3DConditionModel (ModelScope T2V)", lambda: d.UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=cross, attention_head_dim=8, layers_per_block=1),
        dict(sample=torch.randn(1, 4, 4, 8, 8), timestep=torch.tensor(10),
             encoder_hidden_states=torch.randn(1, 3, cross)))
    yield ("UNetMotionModel (AnimateDiff)", lambda: d.UNetMotionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=cross, layers_per_block=1,
        motion_num_attention_heads=2, motion_max_seq_length=8),
        dict(sample=torch.randn(1, 4, 4, 8, 8), timestep=torch.tensor(10),
             encoder_hidden_states=torch.randn(4, 3, cross)))
    yield ("UNetSpatioTemporalConditionModel (Stable Video Diffusion)", lambda: d.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=cross,
        num_attention_heads=(2, 4), layers_per_block=1, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        transformer_layers_per_block=1),
        dict(sample=torch.randn(1, 4, 8, 8, 8), timestep=torch.tensor(10.0),
             encoder_hidden_states=torch.randn(1, 1, cross), added_time_ids=torch.randn(1, 3)))
    yield ("I2VGenXLUNet (I2VGen-XL)", lambda: d.I2VGenXLUNet(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=cross, attention_head_dim=8, num_attention_heads=None, layers_per_block=1), None)
    yield ("AutoencoderKLTemporalDecoder (SVD VAE)", lambda: d.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        layers_per_block=1, latent_channels=4),
        dict(sample=torch.randn(4, 3, 16, 16), num_frames=4))
    yield ("AutoencoderKLCogVideoX", lambda: d.AutoencoderKLCogVideoX(
        block_out_channels=(32, 64), down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32),
        dict(sample=torch.randn(1, 3, 5, 16, 16)))
    yield ("AutoencoderKLHunyuanVideo", lambda: d.AutoencoderKLHunyuanVideo(
        block_out_channels=(32, 64), down_block_types=("HunyuanVideoDownBlock3D",) * 2,
        up_block_types=("HunyuanVideoUpBlock3D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32),
        dict(sample=torch.randn(1, 3, 5, 16, 16)))
    yield ("AutoencoderKLMochi", lambda: d.AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
        latent_channels=4, layers_per_block=(1, 1, 1, 1, 1)), None)
    yield ("CogVideoXTransformer3DModel (a DiT, for the record)", lambda: d.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        text_embed_dim=16, sample_width=8, sample_height=8, sample_frames=5, time_embed_dim=8), None)


def _count_calls(model, inputs) -> Counter:
    counts = Counter()
    originals = {name: getattr(ops, name) for name in ("group_norm_silu", "temporal_attention")}

    def counting(name):
        def call(*a, **k):
            counts[name] += 1
            return originals[name](*a, **k)
        return call

    try:
        for name in originals:
            setattr(ops, name, counting(name))
        with torch.no_grad(), vdm_fast.backend("reference"):
            model(**inputs)
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    return counts


def _reason_kind(reason: str) -> str:
    """A skip reason without its module-specific details, so that skips group."""
    for marker in (" (fingerprint", " (in "):
        if marker in reason:
            reason = reason.split(marker)[0]
    return reason


def coverage() -> list[dict]:
    import diffusers  # optional peer: pip install .[peers]

    rows = []
    for name, build, inputs in _models(diffusers):
        try:
            model = build().eval()
        except Exception as e:  # noqa: BLE001 - a diffusers release whose constructor differs: said in the row
            rows.append(dict(model=name, error=f"{type(e).__name__}: {e}"))
            continue
        report = vdm_fast.patch(model)
        skipped = Counter(f"{s.what}: {_reason_kind(s.reason)}" for s in report.skipped)
        row = dict(model=name, replaced=report.counts, skipped=dict(skipped.most_common()))
        if inputs is not None:
            try:
                row["fused_calls_per_forward"] = dict(_count_calls(model, inputs))
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                row["fused_calls_per_forward"] = f"forward failed: {type(e).__name__}: {e}"
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model class | fused by `patch` | fused calls per forward | left alone (count: reason) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | not built: {r['error'][:80]} | | |")
            continue
        fused = ", ".join(f"{k} x{v}" for k, v in r["replaced"].items()) or "nothing"
        calls = r.get("fused_calls_per_forward", "not run")
        calls = ", ".join(f"{k} x{v}" for k, v in calls.items()) if isinstance(calls, dict) else calls
        left = "; ".join(f"{v}: {k}" for k, v in r["skipped"].items()) or "-"
        lines.append(f"| {r['model']} | {fused} | {calls or '-'} | {left} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON")
    args = p.parse_args(argv)
    rows = coverage()
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
