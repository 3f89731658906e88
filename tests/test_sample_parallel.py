"""`torchrun -m vdm_fast.sample --frame-parallel / --cfg-parallel`: the sample CLI's main run as 2 (and 4) gloo
processes with torchrun's environment writes, from rank 0 only, the videos one process writes, to fp32 rounding
(frames split unevenly, guidance branches split, both on a 2 x 2 grid, and an extension whose reconstruction guidance
differentiates through the split model); the misuses are one line and exit 2 before any process group forms."""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers import rel_err, run_ranks, sample_videos

import vdm_fast
from vdm_fast import sample
from vdm_fast.train import TrainConfig, train

# Each rank runs the CLI's main; write_outputs also saves the videos tensor and which rank wrote.
RANK = textwrap.dedent('''
    import os, sys, torch
    import vdm_fast.sample as S
    real = S.write_outputs
    def spy(videos, out, **kw):
        torch.save(videos, str(out) + ".pt")
        open(str(out) + ".rank" + os.environ["RANK"], "w").close()
        return real(videos, out, **kw)
    S.write_outputs = spy
    real_generate = S.generate
    def generate(diffusion, *args, **kw):  # what the model was wrapped in, outermost first
        m, chain = diffusion.model, []
        while type(m).__name__ != "Unet3D":
            chain.append(type(m).__name__)
            m = m.model
        print("wrapped:", ">".join(chain))
        return real_generate(diffusion, *args, **kw)
    S.generate = generate
    torch.set_num_threads(1)
    sys.exit(S.main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A class-conditional tiny run (one training step): 4 frames of 16x16, attention at 8x8 and in the middle."""
    out = tmp_path_factory.mktemp("fp") / "run"
    with vdm_fast.backend("reference"):
        train(TrainConfig(out=str(out), preset="tiny", overrides=dict(base_channels=16, attn_head_dim=16,
                          zero_init=False), frames=4, resolution=16, batch_size=2, steps=1, workers=0,
                          sample_every=0, progress=False, class_cond=True, ema_decay=0.5))
    return out


CASES = {  # world, flags, other options, the wrappers
    "frames": (2, ["--frame-parallel"], ["--num", "2", "--frames", "3"], "FrameParallel"),  # uneven: 2 + 1
    "extend": (2, ["--frame-parallel"], ["--num", "1", "--extend-to", "6", "--window", "4", "--sampler", "ddim"],
               "FrameParallel"),
    "cfg": (2, ["--cfg-parallel"], ["--num", "2", "--guidance", "1.5", "--label", "1", "--label", "2"],
            "BatchParallel"),
    "grid": (4, ["--frame-parallel", "--cfg-parallel"], ["--num", "1", "--guidance", "2"],
             "BatchParallel>FrameParallel"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_sample_writes_the_one_process_videos_from_rank_0(run, tmp_path, monkeypatch, case):
    world, flags, argv, wrapped = CASES[case]
    argv = [*argv, "--steps", "3", "--seed", "5"]
    want = sample_videos(run, tmp_path / "one.png", argv)
    out = tmp_path / "fp.png"
    env = dict(__import__("os").environ, VDM_FAST_BACKEND="reference")
    results = run_ranks(RANK, world, "--run", str(run), "--out", str(out), "--no-progress", *flags, *argv, env=env)
    for r, (code, out_text, err) in enumerate(results):
        assert code == 0, f"rank {r}: {err[-3000:]}"
        assert f"wrapped: {wrapped}\n" in out_text, out_text
    assert "sampling" in results[0][2] and all("sampling" not in err for _, _, err in results[1:])
    assert sorted(p.name for p in tmp_path.iterdir() if ".rank" in p.name) == ["fp.png.rank0"]
    got = torch.load(str(out) + ".pt")
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    # The written strip: the same 8-bit pixels but where fp32 rounding crosses a quantization step.
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (out, tmp_path / "one.png"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


@pytest.mark.parametrize("env,argv,words", [
    ({}, ["--frame-parallel"], ["torchrun --nproc_per_node=N -m vdm_fast.sample --frame-parallel"]),
    ({}, ["--cfg-parallel", "--guidance", "1"], ["torchrun", "--cfg-parallel"]),
    ({"WORLD_SIZE": "2"}, [], ["without --frame-parallel"]),
    ({"WORLD_SIZE": "2"}, ["--frame-parallel", "--device", "cuda:1"], ["--device cuda:1", "LOCAL_RANK"]),
    ({"WORLD_SIZE": "2"}, ["--frame-parallel-size", "2"], ["--frame-parallel-size is for --frame-parallel"]),
    ({"WORLD_SIZE": "8"}, ["--frame-parallel"], ["--frames 4", "fewer frames than the 8 processes"]),
    ({"WORLD_SIZE": "4"}, ["--frame-parallel", "--frame-parallel-size", "4", "--extend-to", "8", "--window", "3"],
     ["--window 3", "fewer frames than the 4"]),
    ({"WORLD_SIZE": "4"}, ["--frame-parallel", "--frame-parallel-size", "3"], ["must divide the 4 processes"]),
    ({"WORLD_SIZE": "2"}, ["--cfg-parallel"], ["needs --guidance"]),
    ({"WORLD_SIZE": "4"}, ["--cfg-parallel", "--guidance", "1"], ["alone runs on 2 processes"]),
    ({"WORLD_SIZE": "6"}, ["--frame-parallel", "--frame-parallel-size", "2", "--cfg-parallel", "--guidance", "1"],
     ["needs 2 x 2 processes, got 6"]),
    ({"WORLD_SIZE": "4"}, ["--frame-parallel", "--frame-parallel-size", "1", "--num", "3"],
     ["--num 3", "does not split over the 4 process groups", "multiple of 4"]),
    ({"WORLD_SIZE": "4"}, ["--frame-parallel", "--frame-parallel-size", "1", "--num", "3", "--guidance", "1"],
     ["batch of 6", "multiple of 2"]),
])
def test_parallel_misuse_is_one_line_before_any_group(run, tmp_path, monkeypatch, capsys, env, argv, words):
    import torch.distributed as dist

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = sample.main(["--run", str(run), "--out", str(tmp_path / "x.gif"), "--steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not dist.is_initialized() and not (tmp_path / "x.gif").exists()
