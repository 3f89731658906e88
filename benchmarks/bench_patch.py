"""vdm_fast.patch on diffusers' UNet3DConditionModel: forward of a ModelScope-size model (bf16, 16 frames, 32x32
latents) patched against the same model unpatched, and a temporal transformer on >= 65,536 sequences (b*h*w), which
F.scaled_dot_product_attention cannot launch and the patched model runs.

Targets (GPU): forward >= 1.3x unpatched; the >= 65,536-sequence case runs patched. Random weights (nothing is
downloaded). Without a GPU, or without diffusers, the rows say why they were not run.
"""

from __future__ import annotations

import torch

from .common import GPU, NOT_RUN_GPU, check_close, peak_memory_mb, row, time_ms

BLOCKS = (320, 640, 1280, 1280)  # ModelScope text-to-video (diffusers' UNet3DConditionModel defaults)
FRAMES, LATENT, TEXT = 16, 32, 77
BIG_FRAMES, BIG_SIZE = 16, 256  # 256 * 256 = 65,536 sequences of 16 frames in the temporal transformer
TOL = 5e-2  # bf16 through a deep random network: the patched model against the unpatched one


def _diffusers():
    try:
        import diffusers
    except Exception as e:  # noqa: BLE001 - not installed, or installed beside a broken torchvision
        return None, f"not run: diffusers cannot be imported ({type(e).__name__}: {e}); pip install .[peers]"
    return diffusers, ""


def _unet_rows(diffusers, quick: bool) -> list[dict]:
    from vdm_fast.patch import patch, unpatch

    frames = FRAMES // 2 if quick else FRAMES
    shape = f"UNet3DConditionModel {BLOCKS} x (1, 4, {frames}, {LATENT}, {LATENT})"
    with torch.device("cuda"):
        model = diffusers.UNet3DConditionModel().to(torch.bfloat16).eval()
        x = torch.randn(1, 4, frames, LATENT, LATENT, dtype=torch.bfloat16)
        text = torch.randn(1, TEXT, 1024, dtype=torch.bfloat16)
    t = torch.tensor([500], device="cuda")

    def forward():
        with torch.no_grad():
            return model(x, t, text).sample

    want = forward()
    base_ms = time_ms(forward, quick=quick)
    base_mb = peak_memory_mb(forward)
    report = patch(model)
    try:
        check_close("vdm_fast.patch", forward(), want, TOL)
        ms = time_ms(forward, quick=quick)
        mb = peak_memory_mb(forward)
    finally:
        unpatch(model)
    replaced = ", ".join(f"{k} x{n}" for k, n in report.counts.items())
    return [
        row("patch", shape, torch.bfloat16, "diffusers unpatched", base_ms, baseline_ms=base_ms, peak_mb=base_mb,
            note="baseline (SDPA, nn.GroupNorm + nn.SiLU)"),
        row("patch", shape, torch.bfloat16, "vdm_fast.patch", ms, baseline_ms=base_ms, peak_mb=mb,
            note=f"forward, no_grad; replaced {replaced}; skipped {len(report.skipped)}; target >= 1.3x"),
    ]


def _big_rows(diffusers, quick: bool) -> list[dict]:
    from vdm_fast.patch import patch

    size = BIG_SIZE
    shape = f"TransformerTemporalModel(8 heads x 40, 320 ch) x ({BIG_FRAMES} frames, {size}x{size}: {size * size} seq)"
    with torch.device("cuda"):
        module = diffusers.models.TransformerTemporalModel(num_attention_heads=8, attention_head_dim=40,
                                                           in_channels=320, norm_num_groups=32)
        module = module.to(torch.bfloat16).eval()
        x = torch.randn(BIG_FRAMES, 320, size, size, dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            return module(x, num_frames=BIG_FRAMES).sample

    try:
        forward()
        torch.cuda.synchronize()
        base_ms, base_note = time_ms(forward, quick=quick), "unpatched ran"
    except RuntimeError as e:  # the 65,535 grid limit of SDPA's kernels
        base_ms, base_note = None, f"unpatched crashed: {str(e).splitlines()[0][:160]}"
        torch.cuda.synchronize()
    report = patch(module)
    ms = time_ms(forward, quick=quick)
    mb = peak_memory_mb(forward)
    return [row("patch", shape, torch.bfloat16, "vdm_fast.patch", ms, baseline_ms=base_ms, peak_mb=mb,
                note=f"{base_note}; replaced {report.counts}")]


def run(quick: bool) -> list[dict]:
    diffusers, why = _diffusers()
    shapes = [f"UNet3DConditionModel {BLOCKS} x (1, 4, {FRAMES}, {LATENT}, {LATENT})",
              f"TransformerTemporalModel x ({BIG_FRAMES} frames, {BIG_SIZE}x{BIG_SIZE} seq)"]
    if not GPU or diffusers is None:
        note = why or NOT_RUN_GPU
        return [row("patch", s, torch.bfloat16, "vdm_fast.patch", None, note=note) for s in shapes]
    return _unet_rows(diffusers, quick) + _big_rows(diffusers, quick)
