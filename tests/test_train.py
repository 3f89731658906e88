"""The trainer and the train / sample commands: exact resume, DDP (2 gloo processes) equal to one process on the
same global batch, joint image-video training, class conditioning, outputs of a run."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.cli import main as cli
from vdm_fast.train import TrainConfig, Trainer, plot_losses, train

# A model small enough for a few CPU steps a second: 4 frames of 16x16, widths 16 and 32, attention at 8x8.
TINY = dict(preset="tiny", overrides=dict(base_channels=16, attn_head_dim=16), frames=4, resolution=16,
            batch_size=2, workers=0, log_every=1, save_every=3, sample_every=0, progress=False, lr=1e-3,
            warmup_steps=2)
TINY_ARGS = ["--preset", "tiny", "--set", "base_channels=16", "--set", "attn_head_dim=16", "--frames", "4",
             "--resolution", "16", "--batch-size", "2", "--workers", "0", "--sample-every", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def _reference_backend():
    # The Triton interpreter would make training crawl (the kernels have their own tests); conftest sets one thread.
    with vdm_fast.backend("reference"):
        yield


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_continues_the_exact_trajectory(tmp_path):
    # Dropout on: the trajectory then also depends on the restored torch RNG state.
    kw = dict(TINY, overrides=dict(TINY["overrides"], dropout=0.2))
    whole = train(TrainConfig(out=str(tmp_path / "a"), steps=6, **kw))
    first = train(TrainConfig(out=str(tmp_path / "b"), steps=3, **kw))
    rest = train(TrainConfig(out=str(tmp_path / "b"), steps=6, resume=True, **kw))
    assert [s for s, _ in whole["losses"]] == list(range(1, 7))
    assert first["losses"] + rest["losses"] == whole["losses"]  # bitwise, every step
    a, b = ckpt.load(tmp_path / "a"), ckpt.load(tmp_path / "b")
    for part in ("model", "ema"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), (part, k)
    assert torch.equal(a.state["rng"]["0"]["torch"], b.state["rng"]["0"]["torch"])
    log_a, log_b = ((tmp_path / d / "log.jsonl").read_text().splitlines() for d in "ab")
    assert [line.split('"time"')[0] for line in log_a] == [line.split('"time"')[0] for line in log_b]
    # Resuming from the older checkpoint of a finished run replays steps 4..6 identically (the log is truncated).
    (tmp_path / "a" / "checkpoints" / "latest").write_text("step_00000003\n")
    again = train(TrainConfig(out=str(tmp_path / "a"), steps=6, resume=True, **kw))
    assert again["losses"] == whole["losses"][3:]
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == 6


def test_resume_guards(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli(["train", *TINY_ARGS, "--steps", "1", "--out", out]) == 0
    assert cli(["train", *TINY_ARGS, "--steps", "2", "--out", out]) == 2  # would overwrite: refuses
    assert "--resume" in capsys.readouterr().err
    assert cli(["train", *TINY_ARGS, "--steps", "2", "--out", out, "--resume", "--frames", "8"]) == 2
    assert "frames" in capsys.readouterr().err
    # Given only --resume, the saved options are used (steps comes from the command line), and the trajectory is that
    # of an uninterrupted run (this catches any option read before the saved ones are merged, e.g. the batch size).
    assert cli(["train", "--out", out, "--resume", "--steps", "3", "--no-progress"]) == 0
    c = ckpt.load(out, parts=())
    assert c.step == 3 and c.config["train"]["overrides"] == {"base_channels": 16, "attn_head_dim": 16}
    assert c.config["train"]["batch_size"] == 2
    whole = str(tmp_path / "whole")
    assert cli(["train", *TINY_ARGS, "--steps", "3", "--out", whole]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("r", "whole")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_train_and_sample_commands(tmp_path, capsys):
    from vdm_fast.data.video_folder import count_frames

    pytest.importorskip("PIL")  # gif and png writing
    out = tmp_path / "run"
    assert cli(["train", *TINY_ARGS, "--steps", "2", "--out", str(out), "--sample-every", "2", "--sample-num", "2",
                "--sample-steps", "2", "--save-every", "1", "--keep", "1"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step_00000002"]
    assert (out / "samples" / "step_00000002.gif").is_file() and (out / "samples" / "step_00000002.png").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").is_file()
    gif = tmp_path / "s.gif"
    assert cli(["sample", "--run", str(out), "--num", "2", "--steps", "2", "--out", str(gif), "--extend-to", "6",
                "--strip", str(tmp_path / "s.png"), "--no-progress", "--no-ema"]) == 0
    assert count_frames(gif) == 6 and (tmp_path / "s.png").is_file()
    assert cli(["sample", "--run", str(out), "--steps", "2", "--out", str(gif), "--guidance", "2"]) == 2
    assert "class-cond" in capsys.readouterr().err
    assert cli(["sample", "--run", str(tmp_path / "none"), "--out", str(gif)]) == 2


def test_class_conditional_training_and_guided_sampling(tmp_path, monkeypatch):
    from vdm_fast.model import Unet3D

    seen = []
    real = Unet3D.forward

    def spy(self, x, logsnr, cond=None, **kw):
        seen.append((x.shape, None if cond is None else cond.clone(), kw.get("cond_mask"), kw.get("num_video_frames")))
        return real(self, x, logsnr, cond, **kw)

    monkeypatch.setattr(Unet3D, "forward", spy)
    cfg = TrainConfig(out=str(tmp_path / "c"), steps=2, class_cond=True, cond_drop_prob=0.5, image_frames=2,
                      **{**TINY, "batch_size": 8})
    train(cfg)
    shape, cond, mask, nvf = seen[0]
    assert shape == (8, 3, 6, 16, 16) and nvf == 4  # 4 video frames + 2 images, the model told which are which
    assert cond.shape == (8, 3) and torch.equal(cond.sum(1), torch.ones(8))
    assert mask.dtype == torch.bool and 0 < int(mask.sum()) < 8  # some labels dropped at p = 0.5 (fixed draw)
    c = ckpt.load(tmp_path / "c", parts=())
    assert c.config["data"]["num_classes"] == 3 and c.config["model"]["cond_dim"] == 3
    seen.clear()
    assert cli(["sample", "--run", str(tmp_path / "c"), "--num", "2", "--steps", "2", "--guidance", "1.5",
                "--label", "2", "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert seen[0][0][0] == 4 and torch.equal(seen[0][1][0], torch.tensor([0.0, 0, 1]))  # both branches, one call
    assert (tmp_path / "g.png").is_file()


def test_trains_on_a_folder_of_videos(tmp_path):
    import numpy as np

    Image = pytest.importorskip("PIL.Image")

    data = tmp_path / "videos"
    data.mkdir()
    for v in range(2):
        frames = [Image.fromarray(np.random.randint(0, 255, (24, 20, 3), np.uint8)) for _ in range(6)]
        frames[0].save(data / f"{v}.gif", save_all=True, append_images=frames[1:])
    result = train(TrainConfig(out=str(tmp_path / "f"), data=str(data), steps=2, frameskip=2,
                               **{**TINY, "frames": 3}))
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in result["losses"])


def test_loss_curve_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png") is False
    assert "vdm_fast[plot]" in capsys.readouterr().err and not (tmp_path / "loss.png").exists()


# ---------------------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, cfg_kw: dict) -> None:
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), VDM_FAST_BACKEND="reference")
    no_sync, real = [], DDP.no_sync
    DDP.no_sync = lambda self: no_sync.append(1) or real(self)  # counts the micro-steps without an all-reduce
    trainer = Trainer(TrainConfig(out=out, **cfg_kw))
    try:
        result = trainer.run()
        save_file(_params(trainer.model), os.path.join(out, f"params_rank{rank}.safetensors"))
        losses = torch.tensor([v for _, v in result["losses"]])
        save_file({"losses": losses, "no_sync": torch.tensor(len(no_sync))},
                  os.path.join(out, f"losses_rank{rank}.safetensors"))
    finally:
        trainer.close()


def _change_err(a: dict, b: dict, init: dict) -> float:
    """||a - b|| / ||b - init|| over all tensors: a difference measured against how far training moved."""
    keys = sorted(init)
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in keys]).norm()
    moved = torch.cat([(b[k].double() - init[k].double()).flatten() for k in keys]).norm()
    return float(diff / moved)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """2 ranks x 2 accumulated micro-batches (--grad-accum 2: one all-reduce per step) against 1 process with the
    whole batch, with the same examples; the tolerance is the same-precision baseline below."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    cfg = dict(TINY, batch_size=4, steps=3, save_every=100, grad_clip=0.5)
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, {**cfg, "grad_accum": 2}), nprocs=2, join=True)
    p0, p1 = (load_file(os.path.join(out, f"params_rank{r}.safetensors")) for r in range(2))
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    assert ckpt.load(out, parts=()).step == 3 and not (tmp_path / "ddp" / "samples").exists()
    logged = load_file(os.path.join(out, "losses_rank0.safetensors"))
    assert int(logged["no_sync"]) == 3  # the inner micro-step of each of the 3 steps skipped the all-reduce

    single = Trainer(TrainConfig(out=str(tmp_path / "one"), **cfg))
    init = _params(single.model)
    result = single.run()
    ref = _params(single.model)
    single.close()
    changed = sum(not torch.equal(init[k], v) for k, v in ref.items())
    assert changed > len(ref) // 2, "training should move most tensors (else the comparison proves little)"
    # The same-precision baseline: one process summing the batch's four quarters (as the 2 x 2 micro-batches do)
    # differs from the whole batch by fp32 rounding only, amplified by Adam where gradients are tiny. DDP must
    # differ from the single process by no more than a few times that.
    quarters = train(TrainConfig(out=str(tmp_path / "quarters"), grad_accum=4, **cfg))
    assert [s for s, _ in quarters["losses"]] == [1, 2, 3]
    base = _change_err(ckpt.load(tmp_path / "quarters").model, ref, init)
    err = _change_err(p0, ref, init)
    assert err <= 10 * base + 1e-6, f"DDP differs by {err:.2e} of the change, the fp32 baseline by {base:.2e}"
    torch.testing.assert_close(logged["losses"], torch.tensor([v for _, v in result["losses"]]), rtol=1e-5,
                               atol=1e-7)
