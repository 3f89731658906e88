"""--fsdp (FSDP2, issue 15) with gloo on CPU: 2 processes follow the 1-process trajectory to fp32 rounding (the
tolerance is a same-precision baseline, as in the DDP test), each rank holds about half of the weights, AdamW state
and EMA, the checkpoint is the plain single-file format (it loads in one process without FSDP), --resume under FSDP
continues bitwise, --grad-accum skips the reduce-scatter on inner micro-steps, checkpoints move between FSDP and
plain runs (also those with the old layout-1 keys), --precision fp16 on 2 processes skips the same overflow steps
as 1 process (ShardedGradScaler), and where FSDP cannot run --fsdp is one line and exit 2.

What only runs on GPUs: NCCL, and the memory it saves (measured here as shard sizes, not as device memory)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from test_train import TINY, _free_port
from test_train import _change_err as change_err
from test_train import _params as params

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.cli import main as cli
from vdm_fast.model import Unet3D, Unet3DConfig, legacy
from vdm_fast.train import TrainConfig, Trainer, train
from vdm_fast.train import fsdp as fsdp_mod

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")

# 4 examples a step in 2 micro-batches: on 2 ranks each rank accumulates 2 examples of 1 (one inner micro-step).
CFG = dict(TINY, batch_size=4, grad_accum=2, steps=4, save_every=100, grad_clip=0.5)


@pytest.fixture(autouse=True)
def _reference_backend():
    with vdm_fast.backend("reference"):
        yield


def _fsdp_worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), VDM_FAST_BACKEND="reference")
    # One group for the three runs (the trainer uses a group that exists and leaves it up).
    dist.init_process_group("gloo", rank=rank, world_size=world)
    no_sync, real = [], FSDPModule.set_requires_gradient_sync

    def spy(self, requires_gradient_sync, **kw):
        if not requires_gradient_sync:
            no_sync.append(1)
        return real(self, requires_gradient_sync, **kw)

    FSDPModule.set_requires_gradient_sync = spy
    out = {}
    try:
        with vdm_fast.backend("reference"):
            runs = (("whole", dict(steps=4, sample_every=4, sample_num=1, sample_steps=2)), ("split", dict(steps=2)),
                    ("split", dict(steps=4, resume=True)))
            for i, (name, kw) in enumerate(runs):
                trainer = Trainer(TrainConfig(out=os.path.join(root, name), fsdp=True, **{**CFG, **kw}))
                try:
                    if i == 0:
                        m, e = trainer.model, trainer.ema.module
                        local = sum(fsdp_mod.local(p).numel() for p in m.parameters())
                        out["numel"] = torch.tensor([local, sum(p.numel() for p in m.parameters()),
                                                     sum(fsdp_mod.local(p).numel() for p in e.parameters())])
                        out["sharded"] = torch.tensor(int(fsdp_mod.is_sharded(m) and fsdp_mod.is_sharded(e)))
                    result = trainer.run()
                    if i == 0:
                        out["adam_local"] = torch.tensor(sum(fsdp_mod.local(t).numel() for s in
                                                             trainer.optimizer.state.values() for t in s.values()
                                                             if t.dim() > 0))
                finally:
                    trainer.close()
                    # Rank 0 writes the checkpoint after the gather: the next run must not look for it before.
                    dist.barrier()
                out[f"losses{i}"] = torch.tensor([v for _, v in result["losses"]])
        out["no_sync"] = torch.tensor(len(no_sync))
        save_file(out, os.path.join(root, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_fsdp_two_gloo_processes_match_one_process_and_resume_exactly(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    root = str(tmp_path)
    mp.spawn(_fsdp_worker, args=(2, _free_port(), root), nprocs=2, join=True)
    r0, r1 = (load_file(os.path.join(root, f"rank{r}.safetensors")) for r in range(2))
    assert int(r0["sharded"]) == 1
    # Sharding: each rank holds about half of every parameter (dim 0 split, padded), of the EMA and of Adam's moments.
    local, total, ema_local = (int(v) for v in r0["numel"])
    assert local + int(r1["numel"][0]) == total and ema_local == local and 0.4 * total < local < 0.6 * total
    assert int(r0["adam_local"]) == 2 * local
    # 4 + 2 + 2 steps with one inner micro-step each ran without the reduce-scatter.
    assert int(r0["no_sync"]) == int(r1["no_sync"]) == 8
    for i in range(3):
        assert torch.equal(r0[f"losses{i}"], r1[f"losses{i}"])  # the logged loss is the global batch's, on every rank

    # --resume under FSDP: the interrupted run continues bitwise (losses, weights, EMA, Adam state).
    assert torch.equal(torch.cat([r0["losses1"], r0["losses2"]]), r0["losses0"])
    whole, split = ckpt.load(tmp_path / "whole"), ckpt.load(tmp_path / "split")
    for part in ("model", "ema"):
        for k, v in getattr(whole, part).items():
            assert torch.equal(v, getattr(split, part)[k]), (part, k)
    for i, s in whole.optimizer["state"].items():
        for name, t in s.items():
            assert torch.equal(t, split.optimizer["state"][i][name]), (i, name)
    assert whole.step == 4 and whole.state["world_size"] == 2 and set(whole.state["rng"]) == {"0", "1"}
    if (tmp_path / "whole" / "samples").exists():  # pillow present: the gathered EMA sampled on rank 0
        assert (tmp_path / "whole" / "samples" / "step_00000004.gif").is_file()

    # The same format as a plain run: it loads in one process without FSDP (strict), the optimizer state included.
    model = Unet3D.from_config(whole.config["model"])
    model.load_state_dict(whole.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(whole.optimizer)
    assert all(torch.equal(opt.state[p]["exp_avg"], whole.optimizer["state"][i]["exp_avg"])
               for i, p in enumerate(model.parameters()))

    # 1 process, no FSDP, the whole batch: the same trajectory to fp32 rounding. The same-precision baseline: one
    # process summing the batch's four quarters (as the 2 ranks x 2 micro-batches do) against the whole batch.
    single = Trainer(TrainConfig(out=str(tmp_path / "one"), **{**CFG, "grad_accum": 1}))
    init = params(single.model)
    result = single.run()
    single.close()
    ref = params(single.model)
    assert sum(not torch.equal(init[k], v) for k, v in ref.items()) > len(ref) // 2
    quarters = train(TrainConfig(out=str(tmp_path / "quarters"), **{**CFG, "grad_accum": 4}))
    base = change_err(ckpt.load(tmp_path / "quarters").model, ref, init)
    err = change_err(whole.model, ref, init)
    assert err <= 10 * base + 1e-6, f"FSDP differs by {err:.2e} of the change, the fp32 baseline by {base:.2e}"
    torch.testing.assert_close(r0["losses0"], torch.tensor([v for _, v in result["losses"]]), rtol=1e-5, atol=1e-7)
    assert len(quarters["losses"]) == 4


def test_fsdp_one_process_and_checkpoints_move_between_fsdp_and_plain(tmp_path):
    """One process with --fsdp (a 1-process group, the same code path): the plain run's trajectory, and a checkpoint
    of either kind resumes under the other."""
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **CFG))
    fs = train(TrainConfig(out=str(tmp_path / "fsdp"), fsdp=True, **CFG))
    torch.testing.assert_close(torch.tensor([v for _, v in fs["losses"]]),
                               torch.tensor([v for _, v in plain["losses"]]), rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)  # the trainer's initial weights (--seed 0)
    init = params(Unet3D.from_config(ckpt.load(tmp_path / "plain", parts=()).config["model"]))
    ref = ckpt.load(tmp_path / "plain").model
    # plain -> FSDP and FSDP -> plain: a 2-step run of one kind resumed to step 4 by the other.
    for first in (False, True):
        out = str(tmp_path / f"{'fsdp' if first else 'plain'}-then-{'plain' if first else 'fsdp'}")
        train(TrainConfig(out=out, fsdp=first, **{**CFG, "steps": 2}))
        rest = train(TrainConfig(out=out, fsdp=not first, resume=True, **CFG))
        assert [s for s, _ in rest["losses"]] == [3, 4]
        torch.testing.assert_close(torch.tensor([v for _, v in rest["losses"]]),
                                   torch.tensor([v for _, v in plain["losses"][2:]]), rtol=1e-5, atol=1e-7)
        err = change_err(ckpt.load(out).model, ref, init)
        assert err < 1e-4, (first, err)


def test_fsdp_where_it_cannot_run_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # a torch without FSDP2
    monkeypatch.setitem(sys.modules, "torch.distributed._composable.fsdp", None)
    from test_train import TINY_ARGS

    assert cli(["train", *TINY_ARGS, "--steps", "1", "--out", str(tmp_path / "r"), "--fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fsdp" in err[0] and "FSDP2" in err[0]
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--fsdp: this torch build has no torch.distributed"):
        fsdp_mod.fully_shard_fn()
    with pytest.raises(TypeError, match="--fsdp"):
        TrainConfig(fsdp="yes")


def test_train_help_documents_fsdp(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--fsdp" in text and "20P/N" in text and "FSDP2" in text
    assert "--fsdp" in vdm_fast.train.__doc__ and "20P" in vdm_fast.train.__doc__


def test_fsdp_fp16_scaler_agrees_over_shards(tmp_path):
    """--precision fp16 under --fsdp: the scaler all-reduces each rank's shard overflow (ShardedGradScaler), so all
    ranks skip the same steps; its state is checkpointed like the plain scaler's."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    trainer = Trainer(TrainConfig(out=str(tmp_path / "h"), fsdp=True, precision="fp16", **{**CFG, "steps": 2}))
    try:
        assert isinstance(trainer.scaler, ShardedGradScaler)
        result = trainer.run()
    finally:
        trainer.close()
    assert [s for s, _ in result["losses"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result["losses"])
    assert "scaler" in ckpt.load(tmp_path / "h", parts=("state",)).state


def _to_layout1(state: dict, config) -> dict:
    """Today's Unet3D keys -> layout 1's (the inverse of vdm_fast.model.legacy's renames), same order."""
    inverse = {new: old for old, new in legacy.layout1_prefixes(config).items()}
    out = {}
    for k, v in state.items():
        new = next((p for p in inverse if k.startswith(p)), None)
        out[inverse[new] + k[len(new):] if new else k] = v
    return out


def test_fsdp_resumes_a_checkpoint_with_layout1_keys(tmp_path):
    """A checkpoint written before the Level/MidBlock layout (model and EMA keys of layout 1) resumes under --fsdp
    as without it: the same trajectory as resuming today's keys (fsdp.load_model_state converts, as
    Unet3D.load_state_dict does on the plain path)."""
    kw = {**CFG, "steps": 2}
    train(TrainConfig(out=str(tmp_path / "new"), **kw))
    c = ckpt.load(tmp_path / "new")
    config = Unet3DConfig(**c.config["model"])
    old_model, old_ema = _to_layout1(c.model, config), _to_layout1(c.ema, config)
    assert set(old_model) != set(c.model) and any(k.startswith("mid.res.") for k in old_model)
    assert legacy.convert_state_dict(old_model, config).keys() == c.model.keys()
    ckpt.save(tmp_path / "old", c.step, config=c.config, model=old_model, ema=old_ema, optimizer=c.optimizer,
              state=c.state)
    runs = {}
    for name, src, fs in (("plain", "new", False), ("fsdp-new", "new", True), ("fsdp-old", "old", True),
                          ("plain-old", "old", False)):
        shutil.copytree(tmp_path / src, tmp_path / name)
        runs[name] = train(TrainConfig(out=str(tmp_path / name), fsdp=fs, resume=True, **{**CFG, "steps": 4}))
        assert [s for s, _ in runs[name]["losses"]] == [3, 4], name
    for name in ("fsdp-new", "fsdp-old", "plain-old"):
        torch.testing.assert_close(torch.tensor([v for _, v in runs[name]["losses"]]),
                                   torch.tensor([v for _, v in runs["plain"]["losses"]]), rtol=1e-5, atol=1e-7)
    # Bitwise like the checkpoint of today's keys under FSDP: the conversion changes names, not values.
    assert runs["fsdp-old"]["losses"] == runs["fsdp-new"]["losses"]
    a, b = ckpt.load(tmp_path / "fsdp-old"), ckpt.load(tmp_path / "fsdp-new")
    assert a.model.keys() == b.model.keys() == c.model.keys()  # saved again in today's layout
    assert all(torch.equal(a.model[k], b.model[k]) and torch.equal(a.ema[k], b.ema[k]) for k in a.model)


# 3 steps of fp16 autocast (GradScaler) on the 4-example global batch; step 2's gradients overflow on one rank.
# 2 frames of 8x8 (still with attention at 8x8): fp16 autocast on a CPU is slow.
FP16 = dict(CFG, precision="fp16", grad_accum=1, steps=3, frames=2, resolution=8)
OVERFLOW_STEP = 2


def _inject_overflow_and_record(trainer, *, overflow_rank: int) -> tuple[list, list]:
    """Make one element of this rank's local gradients Inf before the scaler unscales them at step OVERFLOW_STEP
    (on `overflow_rank` only); returns lists filled as the run goes: each step's [applied, overflow] and the scale
    after it."""
    rank = int(os.environ.get("RANK", "0"))
    scaler, calls, flags, scales = trainer.scaler, [0], [], []
    real_unscale, real_step = scaler.unscale_, trainer.train_step

    def unscale_(optimizer):
        calls[0] += 1
        if calls[0] == OVERFLOW_STEP and rank == overflow_rank:
            p = next(p for p in trainer.model.parameters() if p.grad is not None and fsdp_mod.local(p.grad).numel())
            fsdp_mod.local(p.grad).view(-1)[0] = float("inf")
        return real_unscale(optimizer)

    def step(batch, i):
        r = real_step(batch, i)
        flags.append([float(r.applied), float(r.overflow)])
        scales.append(scaler.get_scale())
        return r

    scaler.unscale_ = unscale_
    trainer.train_step = step
    return flags, scales


def _fp16_worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), VDM_FAST_BACKEND="reference")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with vdm_fast.backend("reference"):
            trainer = Trainer(TrainConfig(out=os.path.join(root, "fsdp"), fsdp=True, **FP16))
            try:
                flags, scales = _inject_overflow_and_record(trainer, overflow_rank=1)
                result = trainer.run()
            finally:
                trainer.close()
        save_file({"losses": torch.tensor([v for _, v in result["losses"]]), "flags": torch.tensor(flags),
                   "scales": torch.tensor(scales, dtype=torch.float64)},
                  os.path.join(root, f"fp16-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _fp16_single(out, **kw) -> tuple[dict, dict]:
    t = Trainer(TrainConfig(out=str(out), **{**FP16, **kw}))
    try:
        flags, scales = _inject_overflow_and_record(t, overflow_rank=0)
        result = t.run()
    finally:
        t.close()
    return {"losses": torch.tensor([v for _, v in result["losses"]]), "flags": torch.tensor(flags),
            "scales": torch.tensor(scales, dtype=torch.float64)}, ckpt.load(out).model


def test_fsdp_fp16_two_gloo_processes_skip_the_same_overflow_step_as_one_process(tmp_path):
    """--fsdp --precision fp16 on 2 processes: an overflow in one rank's gradient shard is seen by both
    (ShardedGradScaler all-reduces it), so both skip that step and back their scale off alike; the trajectory is
    the 1-process fp16 run's (the same overflow injected) to rounding, bounded by a same-precision baseline (one
    process summing the batch's two halves, as the 2 ranks do, against the whole batch)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    root = str(tmp_path)
    mp.spawn(_fp16_worker, args=(2, _free_port(), root), nprocs=2, join=True)
    r0, r1 = (load_file(os.path.join(root, f"fp16-rank{r}.safetensors")) for r in range(2))
    one, ref = _fp16_single(tmp_path / "one")
    halves, halves_model = _fp16_single(tmp_path / "halves", grad_accum=2)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    for r in (r0, r1, one, halves):  # step 2 skipped as an overflow on every rank, the others applied
        assert torch.equal(r["flags"], expected), r["flags"]
    assert torch.equal(r0["scales"], r1["scales"]) and torch.equal(r0["scales"], one["scales"])
    # Backed off once, on both ranks (a plain GradScaler would not on rank 0, whose own shards stayed finite).
    assert float(r0["scales"][1]) == float(r0["scales"][0]) / 2
    assert torch.equal(r0["losses"], r1["losses"])  # the global batch's loss on every rank
    torch.manual_seed(0)  # the trainer's initial weights (--seed 0)
    init = params(Unet3D.from_config(ckpt.load(tmp_path / "one", parts=()).config["model"]))
    assert sum(not torch.equal(init[k], v) for k, v in ref.items()) > len(ref) // 2  # it trained
    base = change_err(halves_model, ref, init)
    err = change_err(ckpt.load(tmp_path / "fsdp").model, ref, init)
    assert err <= 10 * base + 1e-6, f"FSDP fp16 differs by {err:.2e} of the change, the baseline by {base:.2e}"
    loss_base = float((halves["losses"] - one["losses"]).abs().max())
    loss_err = float((r0["losses"] - one["losses"]).abs().max())
    assert loss_err <= 10 * loss_base + 1e-6, (loss_err, loss_base)
