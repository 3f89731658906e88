"""Unet3D: the paper's 3D U-Net. Reference vs Triton (interpreter) on a micro config, the joint image-video training
property, conditioning (null embedding, cond_mask), positions, layouts, autocast, torch.compile, overfitting a
fixed batch, presets and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, rel_err
from torch import nn

import vdm_fast
from vdm_fast.layers.spatial_attention import SpatialAttention
from vdm_fast.model import PRESETS, Unet3D, Unet3DConfig
from vdm_fast.model.blocks import AttentionBlock, ResBlock
from vdm_fast.model.embeddings import sinusoidal_embedding

# Two levels (8x8 and 4x4), attention at 4x4 (down, middle, up), heads of 4: every block kind, and few enough
# kernel programs for the interpreter (each group of each frame is one program of the norm kernels).
MICRO = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), attn_head_dim=4,
             norm_groups=2, image_size=8, num_frames=3, emb_dim=16)


def randomize(model: nn.Module) -> nn.Module:
    """Every parameter random: the zero-initialized convs would make most gradients trivially zero (and the outputs
    zero), so a comparison could not fail."""
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear, nn.Embedding)):
            m.reset_parameters()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm affines, biases, the null embedding: away from 1 / 0
                p.add_(0.3 * torch.randn_like(p))
    return model


def micro(**overrides) -> Unet3D:
    return randomize(Unet3D(**{**MICRO, **overrides}))


def inputs(model: Unet3D, batch: int = 2, frames: int = 3, size: int = 8, dtype=torch.float32):
    c = model.config
    x = torch.randn(batch, c.in_channels, frames, size, size, dtype=dtype)
    logsnr = torch.empty(batch, dtype=dtype).uniform_(-10, 10)
    cond = torch.randn(batch, c.cond_dim, dtype=dtype) if c.cond_dim else None
    return x, logsnr, cond


# --- reference vs Triton (interpreter), fp32, forward and every parameter gradient --------------------------------


def _forward_backward(model: nn.Module, mode: str, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    with vdm_fast.backend(mode):
        out = model(*args, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _compare(model, *args, tol=1e-4, **kwargs):
    out_ref, g_ref = _forward_backward(model, "reference", *args, **kwargs)
    out_tri, g_tri = _forward_backward(model, "triton", *args, **kwargs)
    assert_close(out_tri, out_ref, tol, "forward")
    assert out_ref.abs().max() > 0
    assert g_ref.keys() == g_tri.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in g_ref.items():
        assert g.abs().max() > 0, f"{name}: zero gradient (the test could not fail)"
        assert_close(g_tri[name], g, tol, f"grad {name}")


def test_resblock_reference_vs_triton():
    block = randomize(ResBlock(8, 12, emb_dim=10, num_groups=4))
    _compare(block, torch.randn(2, 8, 3, 5, 6), torch.randn(2, 10))


def test_attention_block_reference_vs_triton():
    block = randomize(AttentionBlock(8, dim_head=4, num_groups=2))
    x = torch.randn(2, 8, 4, 3, 5)
    _compare(block, x, positions=torch.tensor([[0, 2, 3, 7], [1, 2, 9, 4]]), num_video_frames=2)


def test_unet3d_reference_vs_triton():
    model = micro(cond_dim=5)
    x, logsnr, cond = inputs(model)
    _compare(model, x, logsnr, cond, cond_mask=torch.tensor([True, False]), positions=torch.tensor([0, 1, 3]),
             num_video_frames=2)


def test_unet3d_bf16_autocast_reference_vs_triton():
    """Under autocast the fused ops get bf16 activations with fp32 norm affines and bf16 FiLM / q, k, v."""
    model = micro(cond_dim=5)
    x, logsnr, cond = inputs(model)
    results = {}
    for mode in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with vdm_fast.backend(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, logsnr, cond, cond_mask=torch.tensor([False, True]), num_video_frames=2)
        out.float().square().mean().backward()
        assert out.dtype == torch.bfloat16
        results[mode] = out.float(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert_close(results["triton"][0], results["reference"][0], 3e-2, "bf16 forward")
    assert_close(results["triton"][1], results["reference"][1], 3e-2, "bf16 gradients")


# --- joint image-video training: exact, because everything but the masked temporal attention is per frame -----------


@pytest.mark.parametrize("num_video_frames,num_images", [(3, 2), (1, 3), (0, 2)])
def test_joint_training_images_are_independent(num_video_frames, num_images):
    model = micro(cond_dim=5).double()
    T = num_video_frames + num_images
    x, logsnr, cond = inputs(model, frames=T, dtype=torch.float64)
    positions = torch.randint(0, 20, (2, T))
    with vdm_fast.backend("reference"):
        joint = model(x, logsnr, cond, positions=positions, num_video_frames=num_video_frames)
        for i in range(num_video_frames, T):  # each appended image: as if alone (T = 1), whatever its position
            alone = model(x[:, :, i:i + 1], logsnr, cond)
            assert_close(joint[:, :, i:i + 1], alone, 1e-12, f"image frame {i}")
        # Other images after the video: the video's output does not move.
        x2 = x.clone()
        x2[:, :, num_video_frames:] = torch.randn_like(x2[:, :, num_video_frames:])
        joint2 = model(x2, logsnr, cond, positions=positions, num_video_frames=num_video_frames)
        assert_close(joint2[:, :, :num_video_frames], joint[:, :, :num_video_frames], 1e-12, "video frames")
        if num_video_frames > 1:  # and without the mask they do mix (the property is not vacuous)
            unmasked = model(x2, logsnr, cond, positions=positions)
            assert rel_err(unmasked[:, :, :num_video_frames], joint[:, :, :num_video_frames]) > 1e-6
            assert rel_err(unmasked[:, :, num_video_frames:], joint2[:, :, num_video_frames:]) > 1e-6


def test_video_alone_equals_video_with_images():
    model = micro().double()
    x, logsnr, _ = inputs(model, frames=5, dtype=torch.float64)
    with vdm_fast.backend("reference"):
        joint = model(x, logsnr, num_video_frames=3)
        video = model(x[:, :, :3], logsnr)
    assert_close(joint[:, :, :3], video, 1e-12)


# --- conditioning ---------------------------------------------------------------------------------------------------


def test_cond_mask_selects_the_null_embedding():
    model = micro(cond_dim=5).double()
    x, logsnr, cond = inputs(model, batch=3, dtype=torch.float64)
    with vdm_fast.backend("reference"):
        uncond = model(x, logsnr)
        full = model(x, logsnr, cond)
        mixed = model(x, logsnr, cond, cond_mask=torch.tensor([True, False, True]))
        all_true = model(x, logsnr, cond, cond_mask=torch.ones(3, dtype=torch.bool))
    assert rel_err(full, uncond) > 1e-3  # the conditioning matters
    assert_close(mixed[[0, 2]], full[[0, 2]], 1e-12, "conditioned samples")
    assert_close(mixed[1], uncond[1], 1e-12, "null-embedding sample")
    assert_close(all_true, full, 1e-12, "cond_mask all True")


def test_logsnr_matters_and_embedding_is_bounded():
    model = micro().double()
    x, logsnr, _ = inputs(model, dtype=torch.float64)
    with vdm_fast.backend("reference"):
        assert rel_err(model(x, logsnr + 1.0), model(x, logsnr)) > 1e-4
    emb = sinusoidal_embedding(torch.tensor([-1e4, -20.0, 0.0, 20.0, 1e4]), 17)
    assert emb.shape == (5, 17) and torch.isfinite(emb).all() and emb.abs().max() <= 1


# --- positions, layouts, dtypes, compile ----------------------------------------------------------------------------


def test_positions_default_and_shift_invariance():
    model = micro().double()
    x, logsnr, _ = inputs(model, frames=4, dtype=torch.float64)
    with vdm_fast.backend("reference"):
        default = model(x, logsnr)
        assert_close(model(x, logsnr, positions=torch.arange(4)), default, 1e-12, "positions 0..T-1")
        # Only offsets matter (relative bias): a shift changes nothing, per-sample positions broadcast correctly.
        assert_close(model(x, logsnr, positions=torch.arange(4) + 7), default, 1e-12, "shifted positions")
        spread = torch.tensor([[0, 1, 2, 3], [0, 4, 8, 12]])
        out = model(x, logsnr, positions=spread)
        assert_close(out[:1], default[:1], 1e-12, "sample 0 at 0..3")
        assert rel_err(out[1:], default[1:]) > 1e-6  # frameskip does change sample 1


def test_in_channels_exceed_out_channels_and_rectangular_frames():
    model = micro(in_channels=6, out_channels=3)
    x = torch.randn(1, 6, 2, 8, 12)
    with vdm_fast.backend("reference"):
        assert model(x, torch.zeros(1)).shape == (1, 3, 2, 8, 12)


def test_channels_last_3d_input():
    model = micro()
    x, logsnr, _ = inputs(model)
    with vdm_fast.backend("reference"):
        ref = model(x, logsnr)
        out = model(x.contiguous(memory_format=torch.channels_last_3d), logsnr)
    assert_close(out, ref, 1e-5)


def test_bf16_autocast_forward_backward():
    model = micro()
    x, logsnr, _ = inputs(model)
    with vdm_fast.backend("reference"):
        ref = model(x, logsnr)
        ref.square().mean().backward()
        ref_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, logsnr)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, 5e-2, "bf16 autocast vs fp32")
    # every parameter's gradient is the fp32 one to bf16 accuracy (as a whole: single tiny entries may lose more)
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert_close(flat, torch.cat([g.flatten() for g in ref_grads]), 5e-2, "bf16 autocast gradients vs fp32")


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = micro(cond_dim=5)
    x, logsnr, cond = inputs(model)
    kwargs = dict(cond_mask=torch.tensor([True, False]), num_video_frames=2)
    with vdm_fast.backend("reference"):
        eager = model(x, logsnr, cond, **kwargs)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, logsnr, cond, **kwargs)
    assert_close(compiled, eager, 1e-5)


def test_torch_compile_through_the_fast_ops():
    """fullgraph over the custom ops (their fake implementations), forward and backward, against eager reference."""
    torch._dynamo.reset()
    model = micro(cond_dim=5)
    x, logsnr, cond = inputs(model)
    kwargs = dict(cond_mask=torch.tensor([True, False]), positions=torch.tensor([[0, 1, 2], [3, 5, 9]]),
                  num_video_frames=2)
    out_ref, g_ref = _forward_backward(model, "reference", x, logsnr, cond, **kwargs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _forward_backward(compiled, "triton", x, logsnr, cond, **kwargs)
    torch._dynamo.reset()  # the graph baked in the triton dispatch: keep it from later tests
    assert_close(out, out_ref, 1e-4, "forward")
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert grads.keys() == g_ref.keys()
    for name, g in g_ref.items():
        assert_close(grads[name], g, 1e-4, f"grad {name}")


# --- training ------------------------------------------------------------------------------------------------------


def test_tiny_model_overfits_a_fixed_batch():
    """Plain eps-prediction MSE on one fixed batch (fixed noise and noise levels): the loss falls > 10x."""
    model = Unet3D.preset("tiny", base_channels=16, attn_head_dim=16, norm_groups=4)  # zero-init: starts at eps^2
    x = torch.randn(2, 3, 4, 8, 8).clamp(-2, 2)
    eps = torch.randn_like(x)
    logsnr = torch.tensor([-2.0, 3.0])
    alpha, sigma = (torch.sigmoid(s * logsnr).sqrt().view(-1, 1, 1, 1, 1) for s in (1, -1))
    z = alpha * x + sigma * eps
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    with vdm_fast.backend("reference"):
        for _ in range(100):
            loss = (model(z, logsnr) - eps).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    final = sum(losses[-5:]) / 5
    assert final < losses[0] / 10, f"loss {losses[0]:.3f} -> {final:.3f}"


def test_zero_init_output_and_residual_convs():
    model = Unet3D(**MICRO)
    assert model.conv_out.weight.abs().max() == 0
    assert all(m.conv2.weight.abs().max() == 0 for m in model.modules() if isinstance(m, ResBlock))
    x, logsnr, _ = inputs(model)
    with vdm_fast.backend("reference"):
        assert model(x, logsnr).abs().max() == 0


# --- presets and config ------------------------------------------------------------------------------------------


def test_presets_build_and_config_round_trip():
    for name in PRESETS:
        with torch.device("meta"):
            model = Unet3D.preset(name)
            rebuilt = Unet3D.from_config(model.config.to_dict())
        assert rebuilt.config == model.config
        assert rebuilt.parameter_count() == model.parameter_count() > 0
        assert list(rebuilt.state_dict()) == list(model.state_dict())
    with torch.device("meta"):
        ucf = Unet3D.preset("ucf101")
        small = Unet3D.preset("ucf101", base_channels=128)
        sr = Unet3D.preset("sr-9x128")
    # 64 -> 32 -> 16 -> 8: attention at three levels, 2 blocks down + 3 up each, plus the middle.
    assert sum(isinstance(m, AttentionBlock) for m in ucf.modules()) == 3 * (2 + 3) + 1
    assert small.config.base_channels == 128 and small.config.emb_dim == 512
    assert 3.5 < ucf.parameter_count() / small.parameter_count() < 4.5  # width x2 -> parameters ~x4
    assert (sr.config.in_channels, sr.config.out_channels, sr.config.attn_head_dim) == (6, 3, 128)
    with pytest.raises(ValueError, match="unknown preset"):
        Unet3D.preset("nope")


def test_spatial_attention_matches_plain_attention():
    layer = SpatialAttention(12, heads=3, dim_head=5).double()
    x = torch.randn(2, 12, 3, 4, 5, dtype=torch.float64)
    out = layer(x)
    seq = x.permute(0, 2, 3, 4, 1).reshape(6, 20, 12)
    q, k, v = (t.view(6, 20, 3, 5).transpose(1, 2) for t in layer.to_qkv(seq).chunk(3, dim=-1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(5), dim=-1) @ v
    ref = layer.to_out(attn.transpose(1, 2).reshape(6, 20, 15)).view(2, 3, 4, 5, 12).permute(0, 4, 1, 2, 3)
    assert_close(out, ref, 1e-12)
    # Frames never mix.
    assert_close(layer(x[:, :, 1:2]), out[:, :, 1:2], 1e-12)


# --- errors --------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    model = Unet3D(**MICRO)
    cond_model = Unet3D(**MICRO, cond_dim=5)
    x, logsnr = torch.randn(2, 3, 3, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 3, 3, 8, 7), logsnr)
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(2, 4, 3, 8, 8), logsnr)
    with pytest.raises(ValueError, match=r"^x must have 3 channels .*got shape \(2, 4, 3, 8, 8\)"):
        model(torch.randn(2, 4, 3, 8, 8), logsnr)
    with pytest.raises(TypeError, match=r"^x has dtype torch.float64 but the model's parameters are torch.float32"):
        model(x.double(), logsnr)
    with pytest.raises(TypeError, match=r"^x has dtype torch.bfloat16"):  # outside autocast
        model(x.bfloat16(), logsnr)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        model(x.to(torch.uint8), logsnr)
    with pytest.raises(ValueError, match="logsnr"):
        model(x, torch.zeros(3))
    with pytest.raises(ValueError, match="cond_dim=None"):
        model(x, logsnr, torch.randn(2, 5))
    with pytest.raises(ValueError, match="cond"):
        cond_model(x, logsnr, torch.randn(2, 6))
    with pytest.raises(ValueError, match="cond_mask"):
        cond_model(x, logsnr, cond_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="cond_mask"):
        cond_model(x, logsnr, torch.randn(2, 5), cond_mask=torch.ones(2))
    with pytest.raises(ValueError, match="num_video_frames"):
        model(x, logsnr, num_video_frames=4)
    with pytest.raises(ValueError, match="num_video_frames"):
        model(x, logsnr, num_video_frames=-1)
    with pytest.raises(ValueError, match="positions"):
        model(x, logsnr, positions=torch.arange(4))
    with pytest.raises(ValueError, match="image_size"):
        Unet3DConfig(**{**MICRO, "image_size": 7})
    with pytest.raises(ValueError, match="norm_groups"):
        Unet3DConfig(**{**MICRO, "norm_groups": 3})
    with pytest.raises(ValueError, match="head dim"):
        Unet3D(**{**MICRO, "attn_head_dim": 3})


def test_fp64_model_runs_the_reference_in_auto_mode():
    model = micro(cond_dim=5).double()
    x, logsnr, cond = inputs(model, dtype=torch.float64)
    with vdm_fast.backend("reference"):
        ref = model(x, logsnr, cond)
    with vdm_fast.backend("auto"):
        out = model(x, logsnr, cond)
    assert out.dtype == torch.float64 and ref.abs().max() > 0
    assert torch.equal(out, ref)


# --- GPU: the benchmark's layout, vdm_fast ops vs the reference, bf16 autocast ------------------------------------


@pytest.mark.gpu
def test_ucf101_base128_training_step_matches_reference_gpu():
    torch.manual_seed(0)
    model = randomize(Unet3D.preset("ucf101", base_channels=128)).cuda()
    x = torch.randn(1, 3, 16, 64, 64, device="cuda")
    logsnr = torch.randn(1, device="cuda")
    outs, grads = {}, {}
    for mode in ("reference", "auto"):
        model.zero_grad(set_to_none=True)
        with vdm_fast.backend(mode), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, logsnr, num_video_frames=12)
        out.float().square().mean().backward()
        outs[mode] = out.float()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert_close(outs["auto"], outs["reference"], 3e-2, "forward")
    assert_close(grads["auto"], grads["reference"], 5e-2, "gradients")
