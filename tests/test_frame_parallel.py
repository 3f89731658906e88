"""vdm_fast.parallel: a video's frames split across gloo processes (2, and 3 for uneven shards) give the single
process's forward, input gradient and parameter gradients (after all_reduce_gradients) to fp32 rounding, for a small
Unet3D with attention at two levels, positions, the joint image-video mask and conditioning; a frame-parallel sample
with a fixed generator equals the single-process sample; the CFG halves on two ranks equal the batched call. Each
test spawns its processes, and each process compares against the single-process result it computes itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from helpers import run_ranks

import vdm_fast
from vdm_fast.parallel import frame_parallel, frame_shards

WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    import vdm_fast
    from vdm_fast.parallel import frame_parallel, batch_parallel
    rank, world, init, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    torch.manual_seed(0)  # the same weights and inputs on every rank
    model = vdm_fast.Unet3D.preset("tiny", attn_resolutions=(8, 4), cond_dim=6, zero_init=False)
    B, T = 2, 7
    x = torch.randn(B, 3, T, 8, 8)
    logsnr, cond = torch.randn(B), torch.randn(B, 6)
    positions = torch.tensor([0, 2, 3, 5, 9, 10, 14])
    kw = dict(cond=cond, positions=positions, num_video_frames=5)
    if mode == "forward_backward":
        xs = x.clone().requires_grad_()
        want = model(xs, logsnr, **kw)
        weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
        (want * weight).sum().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        unused = {n for n, p in model.named_parameters() if p.grad is None}  # e.g. the null-condition embedding
        model.zero_grad()
        fp = frame_parallel(model)
        xp = x.clone().requires_grad_()
        got = fp(xp, logsnr, **kw)  # drop-in: full input, full output
        (got * weight).sum().backward()
        fp.all_reduce_gradients()
        errs = [rel(got, want), rel(xp.grad, xs.grad)] + [rel(p.grad, want_grads[n])
                                                         for n, p in model.named_parameters() if n not in unused]
        assert all(not p.grad.any() for n, p in model.named_parameters() if n in unused)
        assert max(errs) < 1e-5, ("drop-in", max(errs))
        # sharded: each rank passes its frames and gets its output frames
        mine = fp.shard_of(T)
        out = fp(x[:, :, mine], logsnr, sharded=True, num_frames=T, **kw)
        assert rel(out, want[:, :, mine].detach()) < 1e-5
        try:
            fp(x[:, :, :world - 1], logsnr, cond=cond)
            raise AssertionError("fewer frames than ranks must be refused")
        except ValueError as e:
            assert "fewer than" in str(e), e
    elif mode == "checkpointing":
        # Gradient checkpointing recomputes each block in backward: the recomputed temporal attentions must make the
        # same all-to-alls with the call's frame shards, positions and mask. The reference runs without it.
        xs = x.clone().requires_grad_()
        want = model(xs, logsnr, **kw)
        weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
        (want * weight).sum().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.enable_gradient_checkpointing()
        fp = frame_parallel(model)
        for sharded in (False, True):
            mine = fp.shard_of(T)
            xp = (x[:, :, mine] if sharded else x).clone().requires_grad_()
            if sharded:
                got = fp(xp, logsnr, sharded=True, num_frames=T, **kw)
                (got * weight[:, :, mine]).sum().backward()
                assert rel(got, want[:, :, mine].detach()) < 1e-5
                assert rel(xp.grad, xs.grad[:, :, mine]) < 1e-5
            else:
                got = fp(xp, logsnr, **kw)
                (got * weight).sum().backward()
                assert rel(got, want.detach()) < 1e-5 and rel(xp.grad, xs.grad) < 1e-5
            fp.all_reduce_gradients(bucket_bytes=4096 if sharded else 64 << 20)  # many buckets, then one
            errs = {n: rel(p.grad, want_grads[n]) for n, p in model.named_parameters() if n in want_grads}
            assert len(errs) > 20 and max(errs.values()) < 1e-5, (sharded, max(errs.items(), key=lambda e: e[1]))
            model.zero_grad(set_to_none=True)
    elif mode == "sample":
        diffusion = vdm_fast.GaussianDiffusion(model, prediction="v")
        shape = (1, 3, T, 8, 8)
        want = diffusion.sample(shape, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(3))
        fp = frame_parallel(model)
        got = vdm_fast.GaussianDiffusion(fp, prediction="v").sample(
            shape, steps=4, sampler="ddim", generator=torch.Generator().manual_seed(3))
        assert rel(got, want) < 1e-5, rel(got, want)
    elif mode == "cfg":
        m = vdm_fast.Unet3D.preset("tiny", cond_dim=6, zero_init=False)
        z = torch.randn(4, 3, 4, 8, 8)
        c, mask = torch.randn(4, 6), torch.tensor([True, True, False, False])  # conditional and null halves
        ls = torch.randn(4)
        pos = torch.tensor([3, 4, 6, 7])  # (T,) frame indices with T == the batch: not split like a per-sample tensor
        weight = torch.randn(4, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        zs = z.clone().requires_grad_()
        want = m(zs, ls, cond=c, cond_mask=mask, positions=pos)
        (want * weight).sum().backward()  # the input gradient, as reconstruction guidance takes it
        zp = z.clone().requires_grad_()
        got = batch_parallel(m)(zp, ls, cond=c, cond_mask=mask, positions=pos)
        (got * weight).sum().backward()
        assert rel(got, want) < 1e-6, rel(got, want)
        assert rel(zp.grad, zs.grad) < 1e-6, rel(zp.grad, zs.grad)
    dist.destroy_process_group()
    print("ok", rank)
''')


def _spawn(world: int, mode: str, timeout: float = 240) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        init = os.path.join(tmp, "init")
        env = dict(os.environ, VDM_FAST_BACKEND="reference", OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, script, str(r), str(world), init, mode], cwd=tmp, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=timeout))
        finally:
            for p in procs:
                p.kill()
        for r, (p, (out, err)) in enumerate(zip(procs, outs)):
            assert p.returncode == 0 and f"ok {r}" in out, f"rank {r}: {err[-3000:]}"


@pytest.mark.parametrize("world", [2, 3])
def test_frame_parallel_forward_backward_equals_one_process(world):
    _spawn(world, "forward_backward")


def test_frame_parallel_with_gradient_checkpointing_equals_one_process():
    _spawn(2, "checkpointing")


def test_frame_parallel_sample_equals_one_process():
    _spawn(2, "sample")


def test_cfg_branches_on_two_ranks_equal_the_batched_call():
    _spawn(2, "cfg")


def test_frame_shards_are_contiguous_and_even():
    assert frame_shards(7, 3) == [3, 2, 2] and frame_shards(16, 4) == [4] * 4 and sum(frame_shards(5, 5)) == 5


def test_bad_use_is_refused(tmp_path):
    model = vdm_fast.Unet3D.preset("tiny")
    with pytest.raises(ValueError, match="process group"):
        frame_parallel(model)  # no process group in this process
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="group"):
            frame_parallel(model, group="world")
        mixing = torch.nn.Sequential(torch.nn.Conv3d(3, 3, (3, 1, 1), padding=(1, 0, 0)))
        with pytest.raises(ValueError, match="mixes frames"):
            frame_parallel(mixing)
        with pytest.raises(ValueError, match="normalizes over all frames"):
            frame_parallel(torch.nn.Sequential(torch.nn.GroupNorm(1, 3)))
        fp = frame_parallel(model)
        with pytest.raises(TypeError, match="num_frames"):
            fp(torch.randn(1, 3, 2, 16, 16), torch.randn(1), sharded=True)
        with pytest.raises(ValueError, match="positions"):
            fp(torch.randn(1, 3, 2, 16, 16), torch.randn(1), positions=torch.arange(3))
        with pytest.raises(ValueError, match="already"):
            frame_parallel(model)
        fp.unwrap()
    finally:
        dist.destroy_process_group()


AGREE = textwrap.dedent('''
    import os, torch, torch.distributed as dist
    from vdm_fast.model import Unet3D
    from vdm_fast.parallel import batch_parallel, frame_parallel
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = Unet3D(base_channels=8, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(4,), attn_head_dim=8,
                   norm_groups=2, image_size=4, emb_dim=8)
    fp = frame_parallel(model)
    nested = batch_parallel(frame_parallel(Unet3D(base_channels=8, channel_mults=(1,), num_res_blocks=1,
                            attn_resolutions=(4,), attn_head_dim=8, norm_groups=2, image_size=4, emb_dim=8)))
    got = [w.all_ranks_ok(ok) for w in (fp, nested) for ok in (True, rank == 0)]
    print("agree", got)
    dist.destroy_process_group()
''')


def test_graph_capture_agreement_is_collective():
    """The CUDA graph sampling loop asks the parallel wrappers whether every rank captured: True only when all did,
    through nested wrappers too (here the one rank's False reaches both ranks)."""
    results = run_ranks(AGREE, 2, timeout=240)
    for code, out, err in results:
        assert code == 0, err[-2000:]
        assert "agree [True, False, True, False]" in out, out
