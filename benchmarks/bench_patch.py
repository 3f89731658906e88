"""vdm_fast.patch on diffusers' video models, patched against the same model unpatched (bf16 forward, no_grad):

- UNet3DConditionModel at ModelScope size (16 frames, 32x32 latents), and a temporal transformer on >= 65,536
  sequences (b*h*w), which F.scaled_dot_product_attention cannot launch and the patched model runs;
- Stable Video Diffusion's U-Net (UNetSpatioTemporalConditionModel, SVD's config) at a small latent (14 frames,
  32x32) and past the limit (2 frames of 256x256 latents: 65,536 temporal sequences at the first level);
- SVD's VAE decoder (AutoencoderKLTemporalDecoder) decoding 8 frames of 32x32 latents and 4 of 128x128 (1024 px).

Targets (GPU): forward >= 1.3x unpatched; the >= 65,536-sequence case runs patched. Random weights (nothing is
downloaded). Without a GPU, or without diffusers, the rows say why they were not run.
"""

from __future__ import annotations

import torch

from .common import GPU, NOT_RUN_GPU, check_close, peak_memory_mb, row, time_ms

BLOCKS = (320, 640, 1280, 1280)  # ModelScope text-to-video (diffusers' UNet3DConditionModel defaults)
FRAMES, LATENT, TEXT = 16, 32, 77
BIG_FRAMES, BIG_SIZE = 16, 256  # 256 * 256 = 65,536 sequences of 16 frames in the temporal transformer
SVD_LATENT = 32  # the small SVD cases: 256 px
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


def _compare_rows(shape: str, module, forward, quick: bool, target: str) -> list[dict]:
    """`forward()` of `module` unpatched (it may crash: the 65,535 limit) then patched, checked against each other
    where both ran; rows of both, the patched one against the unpatched."""
    from vdm_fast.patch import patch, unpatch

    try:
        want = forward()
        torch.cuda.synchronize()
        base_ms, base_mb, base_note = time_ms(forward, quick=quick), peak_memory_mb(forward), "unpatched ran"
    except RuntimeError as e:  # the 65,535 grid limit of SDPA's kernels
        want, base_ms, base_mb = None, None, None
        base_note = f"unpatched crashed: {str(e).splitlines()[0][:160]}"
        torch.cuda.synchronize()
    report = patch(module)
    try:
        out = forward()
        if want is not None:
            check_close("vdm_fast.patch", out, want, TOL)
        del out, want
        ms, mb = time_ms(forward, quick=quick), peak_memory_mb(forward)
    finally:
        unpatch(module)
    replaced = ", ".join(f"{k} x{n}" for k, n in report.counts.items())
    rows = [row("patch", shape, torch.bfloat16, "vdm_fast.patch", ms, baseline_ms=base_ms, peak_mb=mb,
                note=f"{base_note}; forward, no_grad; replaced {replaced}; skipped {len(report.skipped)}; {target}")]
    if base_ms is not None:
        rows.insert(0, row("patch", shape, torch.bfloat16, "diffusers unpatched", base_ms, baseline_ms=base_ms,
                           peak_mb=base_mb, note="baseline (SDPA, nn.GroupNorm + nn.SiLU)"))
    return rows


def _svd_unet_rows(diffusers, quick: bool) -> list[dict]:
    with torch.device("cuda"):
        unet = diffusers.UNetSpatioTemporalConditionModel().to(torch.bfloat16).eval()  # SVD's config
    rows = []
    for frames, size in ((8 if quick else 14, SVD_LATENT), (2, BIG_SIZE)):
        with torch.device("cuda"):
            x = torch.randn(1, frames, 8, size, size, dtype=torch.bfloat16)
            image = torch.randn(1, 1, 1024, dtype=torch.bfloat16)
            time_ids = torch.tensor([[6.0, 127.0, 0.02]], dtype=torch.bfloat16)
        t = torch.tensor([500.0], device="cuda")

        def forward(x=x, image=image, time_ids=time_ids, t=t):
            with torch.no_grad():
                return unet(x, t, image, time_ids).sample

        shape = f"UNetSpatioTemporalConditionModel (SVD) x (1, {frames}, 8, {size}, {size}): {size * size} seq"
        rows += _compare_rows(shape, unet, forward, quick, "target >= 1.3x; past 65,535 sequences: runs patched")
    return rows


def _svd_vae_rows(diffusers, quick: bool) -> list[dict]:
    with torch.device("cuda"):
        vae = diffusers.AutoencoderKLTemporalDecoder().to(torch.bfloat16).eval()  # SVD's config
    rows = []
    for frames, size in ((8, SVD_LATENT), (4, 128)):
        with torch.device("cuda"):
            z = torch.randn(frames, 4, size, size, dtype=torch.bfloat16)

        def forward(z=z, frames=frames):
            with torch.no_grad():
                return vae.decode(z, num_frames=frames).sample

        shape = f"AutoencoderKLTemporalDecoder (SVD VAE) decode ({frames}, 4, {size}, {size}) -> {8 * size} px"
        rows += _compare_rows(shape, vae, forward, quick, "decoder GroupNorm + SiLU fused")
    return rows


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
              f"TransformerTemporalModel x ({BIG_FRAMES} frames, {BIG_SIZE}x{BIG_SIZE} seq)",
              f"UNetSpatioTemporalConditionModel (SVD) x (1, 14, 8, {SVD_LATENT}, {SVD_LATENT})",
              f"UNetSpatioTemporalConditionModel (SVD) x (1, 2, 8, {BIG_SIZE}, {BIG_SIZE}): {BIG_SIZE ** 2} seq",
              f"AutoencoderKLTemporalDecoder (SVD VAE) decode (8, 4, {SVD_LATENT}, {SVD_LATENT})",
              "AutoencoderKLTemporalDecoder (SVD VAE) decode (4, 4, 128, 128) -> 1024 px"]
    if not GPU or diffusers is None:
        note = why or NOT_RUN_GPU
        return [row("patch", s, torch.bfloat16, "vdm_fast.patch", None, note=note) for s in shapes]
    rows = _unet_rows(diffusers, quick) + _big_rows(diffusers, quick)
    for more in (_svd_unet_rows, _svd_vae_rows):  # one model failing (memory, a diffusers change) keeps the rest
        try:
            rows += more(diffusers, quick)
        except Exception as e:  # noqa: BLE001 - reported as a row, the benchmark goes on
            rows.append(row("patch", more.__name__.strip("_").removesuffix("_rows"), torch.bfloat16,
                            "vdm_fast.patch", None, note=f"failed: {type(e).__name__}: {str(e)[:200]}"))
        torch.cuda.empty_cache()
    return rows
