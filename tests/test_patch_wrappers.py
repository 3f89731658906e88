"""vdm_fast.patch under the wrappers users apply after (or before) patching, and the video models of today:
hooks added after patching run and see unfused values, slices of a patched nn.Sequential compute what the unpatched
one does, accelerate's cpu_offload works in either order, diffusers' set_default_attn_processor() /
set_attn_processor() work on a patched model, and Stable Video Diffusion's blocks (TemporalResnetBlock, the temporal
self-attention of TemporalBasicTransformerBlock, SpatioTemporalResBlock, the temporal VAE decoder) are fused with
outputs and gradients matching the unpatched model.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import assert_close
from test_patch import FP32, _compare, _patched_copy, _randomize
from torch import nn

import vdm_fast
from vdm_fast.patch import patch, unpatch


def _seq():
    return _randomize(nn.Sequential(nn.Conv2d(3, 6, 1), nn.GroupNorm(3, 6), nn.SiLU(), nn.Conv2d(6, 4, 1),
                                    nn.GroupNorm(2, 4), nn.SiLU()))


def test_sequential_slices_and_replaced_children_compute_what_the_unpatched_module_does():
    model = _seq()
    twin, report = _patched_copy(model)
    assert report.counts == {"group_norm_silu": 2}
    x = torch.randn(2, 3, 5, 4)
    with vdm_fast.backend("triton"):
        for k in range(1, len(model) + 1):  # a slice ending on a GroupNorm must not apply its SiLU
            assert_close(twin[:k](x), model[:k](x), FP32, f"twin[:{k}]")
        assert_close(twin[1](twin[0](x)), model[1](model[0](x)), FP32, "the GroupNorm called alone")
        twin[5] = nn.ReLU()  # a child replaced after patching: that pair is no longer fused
        model[5] = nn.ReLU()
        assert_close(twin(x), model(x), FP32, "after replacing the SiLU")


@pytest.mark.parametrize("where", ["norm", "act", "global"])
def test_hooks_added_after_patching_run_and_see_unfused_values(where):
    model = _seq()
    twin, _ = _patched_copy(model)
    seen, want_seen = [], []

    def hook(store):
        return lambda m, i, o: store.append((type(m).__name__, o.detach().clone()))

    x = torch.randn(2, 3, 4, 4)
    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: (seen if m in set(twin.modules()) else want_seen).append((type(m).__name__, o.detach())))
        handles = [handle]
    else:
        index = 1 if where == "norm" else 2
        handles = [twin[index].register_forward_hook(hook(seen)), model[index].register_forward_hook(hook(want_seen))]
    try:
        with vdm_fast.backend("triton"):
            got = twin(x)
        want = model(x)
    finally:
        for h in handles:
            h.remove()
    assert_close(got, want, FP32)
    assert [n for n, _ in seen] == [n for n, _ in want_seen] and seen, (seen, want_seen)
    for (name, a), (_, b) in zip(seen, want_seen):
        assert_close(a, b, FP32, f"what a hook on {name} saw")
    with vdm_fast.backend("triton"):  # hooks removed: fused again, same values
        assert_close(twin(x), want, FP32)


def test_hook_on_a_sequential_child_that_is_a_wrapper_of_another_library_is_respected():
    """A module whose forward another library replaced after patching (as accelerate and diffusers' hooks do) is
    called, not bypassed."""
    model = _seq()
    twin, _ = _patched_copy(model)
    calls = []
    norm = twin[1]
    inner = norm.forward

    def wrapped(x):
        calls.append(1)
        return inner(x)

    norm.forward = wrapped
    x = torch.randn(2, 3, 4, 4)
    with vdm_fast.backend("triton"):
        assert_close(twin(x), model(x), FP32)
    assert calls == [1]


def _resnet(diffusers):
    from diffusers.models.resnet import ResnetBlock2D

    return _randomize(ResnetBlock2D(in_channels=6, out_channels=4, groups=3, groups_out=2, temb_channels=5,
                                    time_embedding_norm="scale_shift"))


def test_resnet_block_hook_added_after_patching_fires(diffusers):
    block = _resnet(diffusers)
    twin, report = _patched_copy(block)
    assert report.counts == {"group_norm_silu": 2}
    seen, want_seen = [], []
    twin.norm1.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    block.norm1.register_forward_hook(lambda m, i, o: want_seen.append(o.detach().clone()))
    inputs = dict(input_tensor=torch.randn(2, 6, 5, 4), temb=torch.randn(2, 5))
    with vdm_fast.backend("triton"):
        got = twin(**inputs)
    assert_close(got, block(**inputs), FP32)
    assert len(seen) == 1 and len(want_seen) == 1
    assert_close(seen[0], want_seen[0], FP32, "the GroupNorm's output seen by its hook")


@pytest.mark.parametrize("order", ["patch then offload", "offload then patch"])
def test_accelerate_cpu_offload_in_either_order(diffusers, order):
    accelerate = pytest.importorskip("accelerate", reason="accelerate is a peer extra (pip install .[peers])")
    block = _resnet(diffusers)
    inputs = dict(input_tensor=torch.randn(2, 6, 5, 4), temb=torch.randn(2, 5))
    want = block(**inputs).detach()
    twin = copy.deepcopy(block)
    if order == "patch then offload":
        patch(twin)
        accelerate.cpu_offload(twin, execution_device=torch.device("cpu"))
    else:
        accelerate.cpu_offload(twin, execution_device=torch.device("cpu"))
        report = patch(twin)
        assert report.total == 0, "offloaded modules carry wrappers: nothing may be fused"
    assert twin.norm1.weight.device.type == "meta"  # offloaded: the weights live with the hook, not the module
    with vdm_fast.backend("triton"), torch.no_grad():
        got = twin(**inputs)
    assert_close(got, want, FP32)


def _motion_unet(diffusers):
    return _randomize(diffusers.UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8, attention_head_dim=2, layers_per_block=1))


def test_set_default_and_set_attn_processor_on_a_patched_model(diffusers):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from vdm_fast.patch.diffusers import TemporalAttnProcessor

    unet = _motion_unet(diffusers)
    report = patch(unet)
    assert report.counts["temporal_attention"] == 10
    procs = unet.attn_processors.values()
    assert sum(isinstance(p, TemporalAttnProcessor) for p in procs) == 10
    clone = pickle.loads(pickle.dumps(copy.deepcopy(unet)))  # the processor pickles as itself
    assert sum(type(p) is TemporalAttnProcessor for p in clone.attn_processors.values()) == 10
    unet.set_default_attn_processor()  # raised on a patched model before
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert unpatch(unet) > 0  # the fused GroupNorms are still restored; no processor is left to restore
    patch(clone)  # already patched: nothing new
    clone.set_attn_processor(AttnProcessor2_0())
    assert all(type(p) is AttnProcessor2_0 for p in clone.attn_processors.values())
    again = patch(clone)
    assert again.counts.get("temporal_attention") == 10


def test_svd_temporal_resnet_block(diffusers):
    from diffusers.models.resnet import SpatioTemporalResBlock

    # diffusers fixes 32 groups: 32 channels, one per group; a small clip
    block = _randomize(SpatioTemporalResBlock(in_channels=32, out_channels=32, temb_channels=5, eps=1e-6,
                                              temporal_eps=1e-5, merge_factor=0.3))
    twin, report = _patched_copy(block)
    assert report.counts == {"group_norm_silu": 4}, str(report)
    hows = {r.path: r.how for r in report.replaced}
    assert "TemporalResnetBlock" in hows["temporal_res_block.norm1"]
    frames = 3
    inputs = dict(hidden_states=torch.randn(frames, 32, 3, 5), temb=torch.randn(frames, 5),
                  image_only_indicator=torch.tensor([[False, True, False]]))  # one image among the frames
    _compare(block, twin, inputs)


def test_svd_temporal_self_attention(diffusers):
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    model = _randomize(TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                                      cross_attention_dim=6))
    twin, report = _patched_copy(model)
    # each TemporalBasicTransformerBlock: attn1 over frames fused, attn2 (cross-attention) left alone
    assert report.counts == {"temporal_attention": 1}, str(report)
    paths = [r.path for r in report.replaced]
    assert paths == ["temporal_transformer_blocks.0.attn1"]
    frames = 3
    inputs = dict(hidden_states=torch.randn(2 * frames, 32, 3, 2), encoder_hidden_states=torch.randn(2 * frames, 1, 6),
                  image_only_indicator=torch.zeros(2, frames, dtype=torch.bool))
    _compare(model, twin, inputs)


@pytest.mark.parametrize("which", ["hunyuan", "cogvideox"])
def test_video_vae_resnet_blocks_5d(diffusers, which):
    """The 5-D video VAEs' resnet blocks (GroupNorm over the whole clip -> SiLU): HunyuanVideo's and CogVideoX's
    encoder blocks (its decoder's spatial norms are left alone)."""
    if which == "hunyuan":
        from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoResnetBlockCausal3D

        block = _randomize(HunyuanVideoResnetBlockCausal3D(in_channels=32, out_channels=32, groups=16))
        inputs = dict(hidden_states=torch.randn(1, 32, 3, 4, 5))
    else:
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXResnetBlock3D

        block = _FirstOutput(_randomize(CogVideoXResnetBlock3D(in_channels=32, out_channels=32, temb_channels=0,
                                                               groups=16)))
        inputs = dict(inputs=torch.randn(1, 32, 3, 4, 5))
    twin, report = _patched_copy(block)
    assert report.counts == {"group_norm_silu": 2}, str(report)
    _compare(block, twin, inputs)


class _FirstOutput(nn.Module):
    """CogVideoX's blocks return (hidden_states, conv_cache): the tensor, for the output/gradient comparison."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)[0]
