"""Unet3D gradient checkpointing: the loss, the output and every gradient bitwise those without it (dropout on, both
backends, autocast, backward outside the forward's backend), far fewer bytes saved for backward, and the switches."""

from __future__ import annotations

import pytest
import torch
from test_unet3d import MICRO, inputs, micro
from vdm_fast.benchmarks.bench_unet3d import saved_for_backward_bytes

import vdm_fast
from vdm_fast.model import Unet3D, Unet3DConfig
from vdm_fast.model.unet3d import Block, MidBlock


def _step(model, x, logsnr, cond, *, mode, seed, checkpointing, backward_outside=False, autocast=False):
    """One training step's loss, output and gradients (parameters and x), with dropout drawn from `seed`."""
    model.train()
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    B, T = x.shape[0], x.shape[2]
    torch.manual_seed(seed)
    with vdm_fast.backend(mode), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, logsnr, cond, cond_mask=torch.arange(B) % 2 == 0, positions=torch.arange(T) * 2 + 1,
                    num_video_frames=T - 1)
        loss = (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
        if not backward_outside:
            loss.backward()
    if backward_outside:  # the recomputation runs now, under whatever backend is current
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    return loss.detach(), out.detach(), grads


def _assert_bitwise(a, b):
    (loss_a, out_a, g_a), (loss_b, out_b, g_b) = a, b
    assert torch.equal(loss_a, loss_b), f"loss {loss_a.item()!r} != {loss_b.item()!r}"
    assert torch.equal(out_a, out_b)
    assert len(g_a) == len(g_b)
    for i, (ga, gb) in enumerate(zip(g_a, g_b)):
        assert torch.equal(ga, gb), f"gradient {i} differs"


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_checkpointing_is_bitwise_with_dropout(mode):
    model = micro(cond_dim=5, dropout=0.3)
    # The interpreter runs each kernel program in Python: the smallest input that still has a video and an image.
    x, logsnr, cond = inputs(model, batch=2, frames=3) if mode == "reference" else inputs(model, 2, 3, 4)
    plain = _step(model, x, logsnr, cond, mode=mode, seed=5, checkpointing=False)
    _assert_bitwise(_step(model, x, logsnr, cond, mode=mode, seed=5, checkpointing=True), plain)
    assert plain[1].abs().max() > 0 and all(g.abs().max() > 0 for g in plain[2])
    # The dropout is live (another seed moves the loss), so the equality above covers its masks.
    assert not torch.equal(_step(model, x, logsnr, cond, mode="reference", seed=6, checkpointing=False)[0],
                           _step(model, x, logsnr, cond, mode="reference", seed=5, checkpointing=False)[0])


def test_checkpointing_is_bitwise_under_autocast_and_backward_outside_the_backend():
    model = micro(cond_dim=5, dropout=0.1)
    x, logsnr, cond = inputs(model)
    for autocast in (False, True):
        plain = _step(model, x, logsnr, cond, mode="reference", seed=1, checkpointing=False, autocast=autocast)
        # backward outside `backend("reference")`: the recomputation must still run the reference ops (the auto
        # backend would pick compiled code for rel_pos_bias on CPU, which saves other tensors).
        ckpt = _step(model, x, logsnr, cond, mode="reference", seed=1, checkpointing=True, autocast=autocast,
                     backward_outside=True)
        _assert_bitwise(ckpt, plain)


def test_checkpointing_saves_far_fewer_bytes():
    model = Unet3D(**{**MICRO, "num_res_blocks": 2, "dropout": 0.1})
    x, logsnr, _ = inputs(model, frames=4)
    saved = {}
    for enabled in (False, True):
        model.train()
        model._set_gradient_checkpointing(enabled)
        with vdm_fast.backend("reference"):
            saved[enabled] = saved_for_backward_bytes(lambda: model(x, logsnr).square().mean())
    assert 0 < saved[True] < 0.4 * saved[False], saved


def test_switches_config_field_and_inference():
    model = micro(gradient_checkpointing=True)
    blocks = [m for m in model.modules() if isinstance(m, (Block, MidBlock))]
    assert model.is_gradient_checkpointing and model.config.gradient_checkpointing
    assert len(blocks) == 2 + 4 + 1 and all(m.gradient_checkpointing for m in blocks)
    rebuilt = Unet3D.from_config(model.config.to_dict())
    assert rebuilt.is_gradient_checkpointing
    model.disable_gradient_checkpointing()
    assert not model.config.gradient_checkpointing and not any(m.gradient_checkpointing for m in blocks)
    model.enable_gradient_checkpointing()
    assert all(m.gradient_checkpointing for m in blocks)
    assert not Unet3D(**MICRO).is_gradient_checkpointing  # off by default
    shared = Unet3DConfig(**MICRO)
    Unet3D(shared).enable_gradient_checkpointing()
    assert not shared.gradient_checkpointing  # the model switched its own copy, not the caller's config
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        Unet3DConfig(**MICRO, gradient_checkpointing="yes")
    # Without autograd (sampling) nothing is checkpointed and the output is the same.
    x, logsnr, _ = inputs(model)
    model.eval()
    with vdm_fast.backend("reference"), torch.no_grad():
        on = model(x, logsnr)
        model.disable_gradient_checkpointing()
        off = model(x, logsnr)
    assert torch.equal(on, off)
