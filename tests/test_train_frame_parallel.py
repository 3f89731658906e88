"""`torchrun -m vdm_fast.train --frame-parallel`: the train CLI's main run as gloo processes with torchrun's
environment follows the one-process run: 2 ranks splitting each clip (uneven: 4 video frames + 1 image, with
--gradient-checkpointing and --grad-accum 2, class-conditional), stopped and resumed, log the one-process losses and
write its checkpoint (weights and EMA) to fp32 rounding; 4 ranks as 2 frame groups x 2 replicas match one process
as DDP does. Misuse is one line and exit 2 before any process group forms."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from helpers import run_ranks

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.cli import main as cli
from vdm_fast.train import TrainConfig

RANK = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    from vdm_fast.train.cli import main
    sys.exit(main(sys.argv[1:]))
''')

MODEL = dict(preset="tiny", overrides=dict(base_channels=16, attn_head_dim=16), frames=4, resolution=16,
             workers=0, log_every=1, save_every=100, sample_every=0, progress=False, lr=1e-3, warmup_steps=2,
             ema_decay=0.9, grad_clip=0.5)
ARGS = ["--preset", "tiny", "--set", "base_channels=16", "--set", "attn_head_dim=16", "--frames", "4",
        "--resolution", "16", "--workers", "0", "--log-every", "1", "--save-every", "100", "--sample-every", "0",
        "--no-progress", "--lr", "1e-3", "--warmup-steps", "2", "--ema-decay", "0.9", "--grad-clip", "0.5"]


def _ranks(world: int, *argv: str) -> list:
    env = dict(os.environ, VDM_FAST_BACKEND="reference")
    results = run_ranks(RANK, world, *ARGS, *argv, env=env, timeout=400)
    for r, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {r}: {err[-3000:]}"
    return results


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _change_err(a: dict, b: dict, init: dict) -> float:
    """||a - b|| / ||b - init|| over all tensors: a difference measured against how far training moved."""
    keys = sorted(init)
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in keys]).norm()
    moved = torch.cat([(b[k].double() - init[k].double()).flatten() for k in keys]).norm()
    return float(diff / moved)


def _one_process(out, **kw) -> tuple[dict, list[float]]:
    """A one-process run; returns its initial weights and its logged losses."""
    from vdm_fast.train import Trainer

    with vdm_fast.backend("reference"):
        trainer = Trainer(TrainConfig(out=str(out), **MODEL, **kw))
        init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        try:
            trainer.run()
        finally:
            trainer.close()
    return init, _losses(out)


def test_two_ranks_split_each_clip_and_follow_one_process_through_a_resume(tmp_path):
    common = dict(batch_size=2, grad_accum=2, image_frames=1, class_cond=True)
    argv = ["--batch-size", "2", "--grad-accum", "2", "--image-frames", "1", "--class-cond", "--frame-parallel",
            "--gradient-checkpointing", "--out", str(tmp_path / "fp")]
    first = _ranks(2, *argv, "--steps", "2")
    assert "frame-parallel: 2 per clip x 1 replica" in first[0][2] and "vdm-fast train" not in first[1][2]
    _ranks(2, *argv, "--steps", "3", "--resume")
    init, want = _one_process(tmp_path / "one", steps=3, **common)
    got = _losses(tmp_path / "fp")
    assert len(got) == 3 and len(want) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-7)
    a, b = ckpt.load(tmp_path / "fp"), ckpt.load(tmp_path / "one")
    assert a.step == b.step == 3 and a.config["model"] == dict(b.config["model"], gradient_checkpointing=True)
    assert sum(not torch.equal(init[k], v) for k, v in b.model.items()) > len(init) // 2  # training moved most
    for part in ("model", "ema"):
        err = _change_err(getattr(a, part), getattr(b, part), init)
        assert err < 3e-5, f"{part}: the frame-parallel run differs by {err:.2e} of the change"


def test_two_frame_groups_as_data_parallel_replicas_match_one_process(tmp_path):
    """4 ranks = 2 frame groups x 2 replicas, each replica half of the batch: one process with the whole batch, to
    the rounding of one process summing the two halves (--grad-accum 2) as the replicas do."""
    _ranks(4, "--batch-size", "4", "--frame-parallel", "--frame-parallel-size", "2", "--steps", "2",
           "--out", str(tmp_path / "fp"))
    init, want = _one_process(tmp_path / "one", batch_size=4, steps=2)
    _, halves = _one_process(tmp_path / "halves", batch_size=4, grad_accum=2, steps=2)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "fp")), torch.tensor(want), rtol=1e-5, atol=1e-7)
    ref = ckpt.load(tmp_path / "one").model
    base = _change_err(ckpt.load(tmp_path / "halves").model, ref, init)
    err = _change_err(ckpt.load(tmp_path / "fp").model, ref, init)
    assert err <= 10 * base + 1e-6, f"frame groups x replicas differ by {err:.2e} of the change, fp32 by {base:.2e}"


@pytest.mark.parametrize("env,argv,words", [
    ({}, ["--frame-parallel"], ["torchrun --nproc_per_node=N -m vdm_fast.train --frame-parallel"]),
    ({}, ["--frame-parallel", "--fsdp"], ["--frame-parallel with --fsdp"]),
    ({}, ["--frame-parallel", "--compile"], ["--frame-parallel with --compile"]),
    ({}, ["--frame-parallel-size", "2"], ["--frame-parallel-size is for --frame-parallel"]),
    ({"WORLD_SIZE": "4"}, ["--frame-parallel", "--frame-parallel-size", "3"], ["must divide the 4 processes"]),
    ({"WORLD_SIZE": "8"}, ["--frame-parallel", "--image-frames", "2"],
     ["--frames 4 + --image-frames 2", "fewer frames per clip than the 8"]),
])
def test_frame_parallel_misuse_is_one_line_before_any_group(tmp_path, monkeypatch, capsys, env, argv, words):
    import torch.distributed as dist

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = cli(["train", *ARGS, "--steps", "1", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not dist.is_initialized() and not (tmp_path / "r" / "checkpoints").exists()


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--frame-parallel " in text and "--frame-parallel-size K" in text and "replicas" in text

