"""--fsdp (FSDP2, issue 15) with gloo on CPU: 2 processes follow the 1-process trajectory to fp32 rounding (the
tolerance is a same-precision baseline, as in the DDP test), each rank holds about half of the weights, AdamW state
and EMA, the checkpoint is the plain single-file format (it loads in one process without FSDP), --resume under FSDP
continues bitwise, --grad-accum skips the reduce-scatter on inner micro-steps, checkpoints move between FSDP and
plain runs, and where FSDP cannot run --fsdp is one line and exit 2.

What only runs on GPUs: NCCL, and the memory it saves (measured here as shard sizes, not as device memory)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from test_train import TINY, _free_port
from test_train import _change_err as change_err
from test_train import _params as params

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.cli import main as cli
from vdm_fast.model import Unet3D
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
