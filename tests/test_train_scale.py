"""Training at scale (issue 15), the trainer's side: gradient accumulation (the update of a K times larger batch, the
same examples; DDP's no_sync on inner micro-steps is tested in test_train.py), fp16 with a GradScaler (overflow steps
skipped by the scaler, its state resumed), gradient checkpointing (bitwise the same trajectory), torch.compile
wiring, and EMA for users' own loops."""

from __future__ import annotations

import copy

import pytest
import torch
from test_train import TINY
from test_train import _change_err as change_err
from test_train import _params as params

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.diffusion import GaussianDiffusion
from vdm_fast.train import EMA, TrainConfig, Trainer, TrainingDiverged, train


@pytest.fixture(autouse=True)
def _reference_backend():
    with vdm_fast.backend("reference"):
        yield


def _spy_inputs(monkeypatch) -> list[torch.Tensor]:
    seen = []
    real = GaussianDiffusion.loss

    def loss(self, x, *a, **kw):
        seen.append(torch.cat([x.detach().flatten(1), kw["noise"].flatten(1), kw["t"][:, None].float()], 1))
        return real(self, x, *a, **kw)

    monkeypatch.setattr(GaussianDiffusion, "loss", loss)
    return seen


# ------------------------------------------------------------------------------------------ gradient accumulation
def test_grad_accum_is_the_update_of_the_whole_batch(tmp_path, monkeypatch):
    seen = _spy_inputs(monkeypatch)
    cfg = dict(TINY, batch_size=4, steps=3, grad_clip=0.5)
    one = Trainer(TrainConfig(out=str(tmp_path / "one"), **cfg))
    init = params(one.model)
    whole = one.run()
    one.close()
    full, calls_full = params(one.model), len(seen)
    acc = train(TrainConfig(out=str(tmp_path / "acc"), grad_accum=2, **cfg))
    split = ckpt.load(tmp_path / "acc").model
    # The same examples, noise and times, split in time: micro-batch k of step s is rows [2k, 2k + 2) of its batch.
    assert len(seen) - calls_full == 2 * calls_full == 6
    for s in range(3):
        assert torch.equal(torch.cat(seen[calls_full + 2 * s:calls_full + 2 * s + 2]), seen[s])
    # To fp32 rounding: the sum of the two half-batch gradients differs from the whole batch's in the last bits
    # only; Adam (its first steps normalise each gradient element) carries that on, so bound it against the change.
    assert change_err(split, full, init) < 1e-4
    torch.testing.assert_close(torch.tensor([v for _, v in acc["losses"]]),
                               torch.tensor([v for _, v in whole["losses"]]), rtol=1e-5, atol=0)
    assert [s for s, _ in acc["losses"]] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ fp16 + GradScaler
def test_fp16_scaler_skips_an_overflowing_step_without_counting_it_as_divergence(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "h"), steps=2, precision="fp16", ema_decay=0.9, **TINY)
    t = Trainer(cfg)
    assert t.scaler is not None and t.train_step.dtype == torch.float16
    calls = [0]

    def overflow_on_step_2(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == 2 else grad

    t.model.conv_out.weight.register_hook(overflow_on_step_2)
    seen = {}
    real = t.train_step.__call__

    def step(batch, i):
        out = real(batch, i)
        seen[i] = (out, params(t.model), params(t.ema.module), t.scaler.get_scale())
        return out

    t.train_step = step
    result = t.run()
    t.close()
    first, second = seen[0], seen[1]
    assert first[0].applied and not second[0].applied and second[0].overflow
    assert result["skipped"] == 0  # the scaler's own business: not a non-finite streak
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])  # weights untouched
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])  # EMA untouched
    assert second[3] == first[3] / 2  # the scale backed off
    c = ckpt.load(tmp_path / "h")
    assert c.state["scaler"]["scale"] == second[3]
    assert {float(s["step"]) for s in c.optimizer["state"].values()} == {1.0}
    resumed = Trainer(TrainConfig(out=str(tmp_path / "h"), steps=3, precision="fp16", ema_decay=0.9, resume=True,
                                  **TINY))
    assert resumed.scaler.get_scale() == second[3]
    resumed.close()


def test_fp16_gradients_that_overflow_at_scale_1_are_divergence(tmp_path):
    t = Trainer(TrainConfig(out=str(tmp_path / "s"), steps=3, precision="fp16", **TINY))
    t.scaler = t.train_step.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # as after 16 overflows from 2^16
    t.model.conv_out.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        t.run()
    t.close(clean=False)


def test_fp32_overflow_is_a_skipped_step(tmp_path):
    t = Trainer(TrainConfig(out=str(tmp_path / "f"), steps=2, **TINY))
    t.model.conv_out.weight.register_hook(lambda g: g * float("inf"))
    result = t.run()
    t.close()
    assert result["skipped"] == 2 and result["step"] == 2


# ---------------------------------------------------------------------------------- checkpointing and compile
def test_gradient_checkpointing_gives_the_same_trajectory(tmp_path):
    kw = dict(TINY, steps=2, overrides=dict(TINY["overrides"], dropout=0.2))
    plain = train(TrainConfig(out=str(tmp_path / "p"), **kw))
    t = Trainer(TrainConfig(out=str(tmp_path / "c"), gradient_checkpointing=True, **kw))
    assert t.model.is_gradient_checkpointing
    ckpted = t.run()
    t.close()
    assert ckpted["losses"] == plain["losses"]  # bitwise, dropout included
    a, b = ckpt.load(tmp_path / "p").model, ckpt.load(tmp_path / "c").model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_flag_compiles_the_model_and_keeps_checkpoints_plain(tmp_path, monkeypatch):
    import vdm_fast.train.trainer as trainer_module

    compiled = []

    def fake_compile(model, **kw):  # Inductor on a CPU takes minutes: check the wiring, run the eager model
        compiled.append(model)
        return model

    monkeypatch.setattr(trainer_module.torch, "compile", fake_compile)
    t = Trainer(TrainConfig(out=str(tmp_path / "k"), steps=1, compile=True, **TINY))
    assert compiled == [t.model] and t.train_module is not t.diffusion and t.train_module.model is t.model
    t.run()
    t.close()
    assert not any(k.startswith("_orig_mod") for k in ckpt.load(tmp_path / "k").model)


# -------------------------------------------------------------------------------------------------------- EMA
def test_ema_for_a_users_own_loop():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.5)
    ref = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(1, 4):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ref[k] = d * ref[k] + (1 - d) * v
            else:
                assert ema.module.state_dict()[k] == ref[k]  # integer buffers are not averaged
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="not the same model"):
        ema.update(torch.nn.Linear(3, 4))
