"""vdm_fast.patch / unpatch: patched models give the original's outputs and gradients (fp32, Triton kernels through
the interpreter on CPU), the report counts what was replaced and names what was skipped, unpatch restores the
original bit for bit. The peers (diffusers, video-diffusion-pytorch) are optional: their tests skip without them.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import GPU, VDP_STUBBED, assert_close, import_video_diffusion_pytorch, rel_err, run_python
from torch import nn

import vdm_fast
from vdm_fast.patch import PatchReport, patch, unpatch

FP32 = 1e-5  # ||patched - original|| / ||original||, fp32, for outputs and for the gradient of every input/parameter


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere (diffusers zero-initializes some output layers, which would hide their paths)."""
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.normal_(0.0, 0.3 if p.dim() <= 1 else fan_in ** -0.5)
    return model.eval()  # eval: diffusers' TemporalConvLayer has dropout 0.1


def _run(model: nn.Module, inputs: dict):
    """Output and the gradients of every float input and parameter, for a fixed random output weighting."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    out = model(**inputs)
    out = out.sample if hasattr(out, "sample") else out
    g = torch.Generator().manual_seed(1234)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    grads = {f"input {k}": v.grad for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _compare(original, patched, inputs, tol=FP32):
    """Patched (Triton kernels) against the original, both fp32, with the original run in fp64 as the arbiter:
    the output within tol of the original's; each gradient within tol of the fp64 one, or no further from it than
    100x the original fp32's own error (a gradient that is zero in exact arithmetic, as a conv bias feeding a
    one-channel group norm, is rounding noise in both)."""
    want, want_grads = _run(original, inputs)
    exact, exact_grads = _run(copy.deepcopy(original).double(),
                              {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                               for k, v in inputs.items()})
    with vdm_fast.backend("triton"):
        got, got_grads = _run(patched, inputs)
    assert_close(got, want, tol, "output")
    assert set(got_grads) == set(want_grads) == set(exact_grads)
    total_err = total_ref = 0.0
    for name, ref in exact_grads.items():
        err, own = (got_grads[name].double() - ref).norm(), (want_grads[name].double() - ref).norm()
        # 100x the original's own rounding error: one sample of it can be small by chance (ratios of 11-13 were
        # seen on gradients that are ~0 in exact arithmetic), while a wrong formula is off by the gradient's scale.
        bound = tol * ref.norm() + 100 * own
        assert err <= bound, f"gradient of {name}: error {err:.3e} > {bound:.3e} (original fp32's own: {own:.3e})"
        total_err, total_ref = total_err + err.item() ** 2, total_ref + ref.norm().item() ** 2
    # All gradients together, relative to their joint size: the per-tensor slack cannot hide a global error.
    total_err, total_ref = total_err ** 0.5, total_ref ** 0.5
    assert total_err <= tol * total_ref, f"all gradients: error {total_err:.3e} against a norm of {total_ref:.3e}"
    return want


def _patched_copy(model, **kwargs):
    twin = copy.deepcopy(model)
    report = patch(twin, **kwargs)
    return twin, report


def _assert_restored(model, original, inputs):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert unpatch(model) > 0
    assert unpatch(model) == 0
    assert not any(k.startswith("_vdm_fast") for m in model.modules() for k in m.__dict__)
    a, _ = _run(model, inputs)
    b, _ = _run(original, inputs)
    assert torch.equal(a, b), "unpatch must restore bitwise-original outputs"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------- plain torch


class Plain(nn.Module):
    """Every case the generic adapter decides: fusable pairs, a GroupNorm feeding something else, a shared one, one
    with a hook, a subclass, a 2-D input, and a GroupNorm outside any nn.Sequential."""

    def __init__(self):
        super().__init__()
        shared = nn.GroupNorm(2, 6)
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.SiLU(), nn.Conv2d(6, 6, 1))
        self.b = nn.Sequential(nn.GroupNorm(2, 6, affine=False), nn.SiLU(inplace=True), nn.GroupNorm(3, 6),
                               nn.ReLU())
        self.c = nn.Sequential(shared, nn.SiLU())
        self.d = nn.Sequential(shared, nn.SiLU())
        self.hooked = nn.Sequential(nn.GroupNorm(2, 6), nn.SiLU())
        self.hooked[0].register_forward_hook(lambda m, i, o: None)
        self.sub = nn.Sequential(type("MyGroupNorm", (nn.GroupNorm,), {})(2, 6), nn.SiLU())
        self.loose = nn.GroupNorm(2, 6)
        self.flat = nn.Sequential(nn.Linear(6, 16), nn.GroupNorm(2, 16), nn.SiLU(), nn.Linear(16, 6))

    def forward(self, x):
        h = self.b(self.a(x))
        h = self.c(h) + self.d(h) + self.hooked(h) + self.sub(h)
        h = nn.functional.silu(self.loose(h))
        return h.mean((2, 3)) + self.flat(h.mean((2, 3)))


def test_plain_model_report_outputs_gradients_unpatch():
    model = _randomize(Plain())
    twin, report = _patched_copy(model)
    assert isinstance(report, PatchReport)
    # a, b[0], flat (2-D input: falls back to GroupNorm then SiLU inside the patched forward)
    assert report.counts == {"group_norm_silu": 3}
    skipped = {s.path: s.reason for s in report.skipped}
    assert "followed by ReLU, not nn.SiLU" in skipped["b.2"]
    assert "shared" in skipped["c.0"]
    assert "hooks" in skipped["hooked.0"]
    assert "MyGroupNorm subclasses nn.GroupNorm" in skipped["sub.0"]
    assert "no adapter proves" in skipped["loose"]
    text = str(report)
    assert "group_norm_silu" in text and "b.2 [GroupNorm]" in text
    d = report.as_dict()
    assert d["replaced"] == {"group_norm_silu": 3} and d["total"] == 3 and len(d["skipped"]) == len(report.skipped)
    assert list(twin.state_dict()) == list(model.state_dict())

    inputs = {"x": torch.randn(2, 3, 5, 7)}
    _compare(model, twin, inputs)
    again = patch(twin)
    assert again.total == 0 and again.already_patched == 3
    _assert_restored(twin, model, inputs)


def test_patched_model_copies_pickles_loads_and_compiles():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 6, 1), nn.GroupNorm(3, 6), nn.SiLU(), nn.Conv2d(6, 4, 1),
                                     nn.GroupNorm(2, 4), nn.SiLU()))
    twin, _ = _patched_copy(model)
    x = torch.randn(2, 3, 4, 4)
    want = twin(x)
    for clone in (copy.deepcopy(twin), pickle.loads(pickle.dumps(twin))):
        clone.load_state_dict(model.state_dict())
        assert torch.equal(clone(x), want)
        assert clone.forward.args[0] is clone, "a copy's patched forward must call the copy"
        assert unpatch(clone) == 1  # the Sequential, whose forward fuses both pairs; its children were not touched
        assert torch.equal(clone(x), model(x))
    compiled = torch.compile(twin, backend="aot_eager")
    assert_close(compiled(x), want, FP32, "compiled output")


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        patch("not a module")
    with pytest.raises(TypeError, match="model"):
        unpatch(None)


def test_peers_are_optional():
    """vdm_fast.patch imports and works with diffusers / video-diffusion-pytorch / torchvision unimportable, and
    never imports them itself."""
    code = (
        "import sys\n"
        "for m in ('diffusers', 'video_diffusion_pytorch', 'torchvision', 'transformers'): sys.modules[m] = None\n"
        "import torch, vdm_fast\n"
        "from vdm_fast.patch import patch, unpatch\n"
        "m = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())\n"
        "r = patch(m)\n"
        "assert r.counts == {'group_norm_silu': 1}, r\n"
        "assert unpatch(m) == 1\n"
        "assert all(sys.modules.get(k) is None for k in ('diffusers', 'video_diffusion_pytorch'))\n"
        "print('ok')\n"
    )
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- diffusers


def _unet3d(diffusers, head_dim, sample_size):
    return _randomize(diffusers.UNet3DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(4, 8), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8, attention_head_dim=head_dim, layers_per_block=1))


@pytest.mark.parametrize("head_dim,frames,size,batch", [(2, 3, 8, 1), (4, 2, 6, 2)])
def test_diffusers_unet3d(diffusers, head_dim, frames, size, batch):
    model = _unet3d(diffusers, head_dim, size)
    twin, report = _patched_copy(model)
    # 8 ResnetBlock2D x 2 norms, 8 TemporalConvLayer x 4, conv_norm_out; 5 TransformerTemporalModel x 2 attentions
    assert report.counts == {"group_norm_silu": 49, "temporal_attention": 10}, str(report)
    reasons = {s.path: s.reason for s in report.skipped}
    assert "cross-attention" in reasons["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert "proj_in" in reasons["transformer_in.norm"]
    assert len(report.skipped) == 17
    assert list(twin.state_dict()) == list(model.state_dict())
    inputs = dict(sample=torch.randn(batch, 4, frames, size, size), timestep=torch.tensor(7),
                  encoder_hidden_states=torch.randn(batch, 3, 8))
    _compare(model, twin, inputs)
    _assert_restored(twin, model, inputs)


@pytest.mark.parametrize("norm,variant", [("scale_shift", "up"), ("scale_shift", "down"), ("default", "no temb"),
                                          ("default", "skip_time_act")])
def test_diffusers_resnet_block(diffusers, norm, variant):
    from diffusers.models.resnet import ResnetBlock2D

    block = _randomize(ResnetBlock2D(
        in_channels=6, out_channels=4, groups=3, groups_out=2, temb_channels=None if variant == "no temb" else 5,
        time_embedding_norm=norm, up=variant == "up", down=variant == "down", skip_time_act=variant == "skip_time_act",
        output_scale_factor=1.5))
    twin, report = _patched_copy(block)
    assert report.counts == {"group_norm_silu": 2}
    inputs = dict(input_tensor=torch.randn(3, 6, 6, 5), temb=None if variant == "no temb" else torch.randn(3, 5))
    _compare(block, twin, inputs)
    _assert_restored(twin, block, inputs)


def test_diffusers_unprovable_left_alone(diffusers):
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.models.resnet import ResnetBlock2D

    mish = ResnetBlock2D(in_channels=4, out_channels=4, groups=2, temb_channels=3, non_linearity="mish")
    temporal = diffusers.models.TransformerTemporalModel(num_attention_heads=2, attention_head_dim=3, in_channels=4,
                                                         norm_num_groups=2)
    temporal.transformer_blocks[0].attn2.set_processor(AttnProcessor())  # the other processor it knows
    hooked = temporal.transformer_blocks[0].attn1
    hooked.set_processor(type("MyProcessor", (AttnProcessor,), {})())
    model = nn.ModuleDict(dict(mish=mish, temporal=temporal))
    report = patch(model)
    assert report.counts == {"temporal_attention": 1}
    reasons = {s.path: s.reason for s in report.skipped}
    assert "non_linearity is Mish" in reasons["mish.norm1"] and "Mish" in reasons["mish.norm2"]
    assert "MyProcessor" in reasons["temporal.transformer_blocks.0.attn1"]
    assert unpatch(model) == 1
    assert type(temporal.transformer_blocks[0].attn2.processor) is AttnProcessor


@pytest.mark.parametrize("use_mask", [False, True])
def test_diffusers_motion_module(diffusers, use_mask):
    """AnimateDiff's motion module: self-attention over (b*h*w, frames, c) with sinusoidal positions. A mask is
    handed to the original processor (the op's per-sample layout is not the processor's)."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    module = _randomize(AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=4, in_channels=8,
                                                 norm_num_groups=4, positional_embeddings="sinusoidal",
                                                 num_positional_embeddings=16))
    twin, report = _patched_copy(module)
    assert report.counts == {"temporal_attention": 2}
    frames = 5
    inputs = dict(hidden_states=torch.randn(2 * frames, 8, 3, 2), num_frames=frames)
    _compare(module, twin, inputs)
    if use_mask:  # what the op does not take goes to the original processor: a mask, keys from elsewhere, T > 128
        attn, orig = twin.transformer_blocks[0].attn1, module.transformer_blocks[0].attn1
        x = torch.randn(4, frames, 8)
        mask = torch.randn(4, 1, frames)
        assert torch.equal(attn(x, attention_mask=mask), orig(x, attention_mask=mask))
        y = torch.randn(4, 3, 8)
        assert torch.equal(attn(x, encoder_hidden_states=y), orig(x, encoder_hidden_states=y))
        long = torch.randn(2, 129, 8)
        with vdm_fast.backend("triton"):
            assert torch.equal(attn(long), orig(long))
    _assert_restored(twin, module, inputs)


@pytest.mark.gpu
def test_diffusers_temporal_attention_past_65535_sequences(diffusers):
    """b*h*w >= 65,536 sequences: what F.scaled_dot_product_attention cannot launch runs patched."""
    module = diffusers.models.TransformerTemporalModel(num_attention_heads=8, attention_head_dim=40,
                                                       in_channels=320, norm_num_groups=32).cuda().bfloat16()
    frames, batch, size = 16, 1, 264  # 264 * 264 = 69,696 sequences
    x = torch.randn(batch * frames, 320, size, size, device="cuda", dtype=torch.bfloat16)
    twin, report = _patched_copy(module)
    assert report.counts == {"temporal_attention": 2}
    with torch.no_grad():
        got = twin(x, num_frames=frames).sample
        with vdm_fast.backend("reference"):  # the same patched model on the plain-PyTorch reference ops
            want = twin(x, num_frames=frames).sample
    assert rel_err(got, want) < 2e-2


# ----------------------------------------------------------------------------------------- video-diffusion-pytorch


@pytest.fixture(scope="module")
def vdp():
    """video-diffusion-pytorch's model module; torchvision (and einops-exts / rotary-embedding-torch) stubbed where
    unimportable (tests/helpers.py says why): the Block and RMSNorm tests need none of them."""
    try:
        return import_video_diffusion_pytorch()
    except Exception as e:  # noqa: BLE001 - whatever else its import raises here
        pytest.skip(f"video-diffusion-pytorch cannot be imported here: {type(e).__name__}: {e}")


def _vdp_unet(vdp):
    stubbed = VDP_STUBBED & {"einops_exts", "rotary_embedding_torch"}
    if stubbed:
        pytest.skip(f"Unet3D needs {', '.join(sorted(stubbed))} (not installed)")
    return _randomize(vdp.Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=4, channels=3))


@pytest.mark.parametrize("focus", ["none", "some", "all"])
def test_vdp_unet3d(vdp, focus):
    model = _vdp_unet(vdp)
    twin, report = _patched_copy(model)
    blocks = sum(type(m) is vdp.Block for m in model.modules())
    group_norm_block = isinstance(getattr(next(m for m in model.modules() if type(m) is vdp.Block), "norm", None),
                                  nn.GroupNorm)
    # temporal attention: init + one per down/up level + mid; spatial: the mid one (skipped)
    expected = {"temporal_attention": 6, "rel_pos_bias": 1}
    # releases before 0.7: GroupNorm Blocks; 0.7: RMSNorm Blocks
    expected["group_norm_silu" if group_norm_block else "rms_norm_silu"] = blocks
    assert report.counts == expected, str(report)
    assert any("not temporal attention" in s.reason for s in report.skipped)
    assert list(twin.state_dict()) == list(model.state_dict())
    mask = {"none": None, "some": torch.tensor([True, False]), "all": torch.tensor([True, True])}[focus]
    inputs = dict(x=torch.randn(2, 3, 3, 8, 8), time=torch.tensor([3.0, 50.0]), focus_present_mask=mask)
    _compare(model, twin, inputs)
    _assert_restored(twin, model, inputs)


def _needs_rms(vdp):
    if not hasattr(vdp, "RMSNorm"):
        pytest.skip("video-diffusion-pytorch < 0.7 installed: its Block has no RMSNorm")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last_3d"])
def test_vdp_07_resnet_block_rmsnorm(vdp, fmt):
    """0.7's own ResnetBlock source (two Blocks with RMSNorm: block1 with the time embedding's scale/shift, block2
    without): patched (rms_norm_silu, Triton through the interpreter) against unpatched, output and every gradient to
    fp32 rounding (the fp64 original as arbiter), on the reference backend too; unpatch restores it bit for bit."""
    from vdm_fast.patch import _common
    from vdm_fast.patch import video_diffusion_pytorch as adapter

    _needs_rms(vdp)
    assert _common.fingerprint(vdp.RMSNorm.forward) in adapter.RMS_NORM_FORWARD
    assert _common.fingerprint(vdp.Block.forward) in adapter.BLOCK_FORWARD
    model = _randomize(vdp.ResnetBlock(5, 7, time_emb_dim=6))
    x = torch.randn(2, 5, 3, 4, 5)
    if fmt == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            assert model.block1.proj(x).is_contiguous(memory_format=torch.channels_last_3d)
    twin, report = _patched_copy(model)
    assert report.counts == {"rms_norm_silu": 2}, str(report)
    assert not report.skipped and "0.7 Block (RMSNorm" in str(report)
    assert list(twin.state_dict()) == list(model.state_dict())
    inputs = dict(x=x, time_emb=torch.randn(2, 6))
    _compare(model, twin, inputs)
    with vdm_fast.backend("reference"):
        want, want_grads = _run(model, inputs)
        got, got_grads = _run(twin, inputs)
    assert_close(got, want, FP32, "reference backend output")
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, 1e-4, f"reference backend gradient of {name}")
    again = patch(twin)
    assert again.total == 0 and again.already_patched == 2
    _assert_restored(twin, model, inputs)


def test_vdp_07_block_decides_at_call_time(vdp):
    """A patched 0.7 Block runs its original lines when fusing would change what it computes: a hook added on the
    RMSNorm after patching, a scale/shift that is not per (sample, channel), an RMSNorm whose scale was changed."""
    _needs_rms(vdp)
    block = _randomize(vdp.Block(4, 6))
    twin, report = _patched_copy(block)
    assert report.counts == {"rms_norm_silu": 1}
    x = torch.randn(2, 4, 3, 5, 5)
    film = (torch.randn(2, 6, 1, 1, 1), torch.randn(2, 6, 1, 1, 1))
    with torch.no_grad(), vdm_fast.backend("triton"):
        assert_close(twin(x, film), block(x, film), FP32, "fused with FiLM")
        assert_close(twin(x), block(x), FP32, "fused without FiLM")
        calls = []
        hook = twin.norm.register_forward_hook(lambda m, i, o: calls.append(1))
        assert torch.equal(twin(x, film), block(x, film)) and calls == [1], "the hook must run"
        hook.remove()
        per_frame = (torch.randn(2, 6, 3, 1, 1), torch.randn(2, 6, 3, 1, 1))
        assert torch.equal(twin(x, per_frame), block(x, per_frame))
        twin.norm.scale = block.norm.scale = 2.0
        assert torch.equal(twin(x, film), block(x, film))


def test_vdp_07_unprovable_blocks_left_alone(vdp, monkeypatch):
    from vdm_fast.patch import video_diffusion_pytorch as adapter

    _needs_rms(vdp)
    sub = vdp.Block(4, 6)
    sub.norm = type("MyRMSNorm", (vdp.RMSNorm,), {})(6)
    odd = vdp.Block(4, 6)
    odd.norm.scale = 3.0
    gelu = vdp.Block(4, 6)
    gelu.act = nn.GELU()
    hooked = vdp.Block(4, 6)
    hooked.norm.register_forward_pre_hook(lambda m, i: None)
    model = nn.ModuleDict(dict(sub=sub, odd=odd, gelu=gelu, hooked=hooked))
    report = patch(model)
    assert report.total == 0
    reasons = {s.path: s.reason for s in report.skipped}
    assert "MyRMSNorm" in reasons["sub.norm"]
    assert "dim ** 0.5" in reasons["odd.norm"]
    assert "GELU" in reasons["gelu.norm"]
    assert "hooks" in reasons["hooked.norm"]
    monkeypatch.setattr(adapter, "RMS_NORM_FORWARD", {})  # a release whose RMSNorm.forward reads differently
    report = patch(nn.ModuleDict(dict(plain=vdp.Block(4, 6))))
    assert report.total == 0 and "RMSNorm.forward source" in report.skipped[0].reason


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_bf16_diffusers_smoke(diffusers):
    """bf16 on the GPU: the patched UNet3D runs the Triton kernels and stays near the original."""
    model = _unet3d(diffusers, 4, 16).cuda().bfloat16()
    twin, _ = _patched_copy(model)
    x = torch.randn(1, 4, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    e = torch.randn(1, 3, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(twin(x, 5, e).sample, model(x, 5, e).sample) < 3e-2
