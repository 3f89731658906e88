"""`vdm-fast sample --compile` (issue 12): the U-Net under torch.compile with the default Inductor backend writes the
videos eager sampling writes (fp32 rounding), compiled once (one graph for all the steps' calls, no graph break);
`--no-ema` samples a checkpoint whose EMA file is gone (it is not read). The model-level no-recompile-for-a-new-batch
property is tests/test_model_compile.py's."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, sample_videos
from torch._dynamo.utils import counters

import vdm_fast
from vdm_fast import sample
from vdm_fast.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (one training step): 4 frames of 16x16, attention at 8x8 and in the middle."""
    out = tmp_path_factory.mktemp("compile") / "run"
    with vdm_fast.backend("reference"):
        # one level (fewer distinct kernels for Inductor to build), attention in it and in the middle
        train(TrainConfig(out=str(out), preset="tiny", overrides=dict(base_channels=8, attn_head_dim=8,
                          channel_mults=(1,), attn_resolutions=(8,), zero_init=False), frames=4, resolution=8,
                          batch_size=2, steps=1, workers=0,
                          sample_every=0, progress=False, ema_decay=0.5))
    return out


def _sample(run, out, argv) -> torch.Tensor:
    return sample_videos(run, out, ["--steps", "2", "--sampler", "ddim", *argv])


@pytest.mark.slow  # Inductor compiles C++ for the U-Net's own kernels: about a minute of one core
def test_compiled_sampling_writes_the_eager_videos_compiled_once(run, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    try:
        eager = _sample(run, tmp_path / "eager.png", ["--num", "2"])
        compiled = _sample(run, tmp_path / "compiled.png", ["--num", "2", "--compile"])
        assert compiled.shape == eager.shape
        assert rel_err(compiled, eager) <= 1e-5, rel_err(compiled, eager)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_compile_is_refused_with_the_parallel_flags(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = sample.main(["--run", str(run), "--out", str(tmp_path / "x.gif"), "--frame-parallel", "--compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile" in err[0] and "--frame-parallel" in err[0], err


def test_no_ema_does_not_read_the_ema_weights(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in copy.glob("checkpoints/step_*/ema.safetensors"):
        f.unlink()
    raw = _sample(copy, tmp_path / "raw.png", ["--num", "1", "--no-ema"])
    want = _sample(run, tmp_path / "want.png", ["--num", "1", "--no-ema"])
    assert torch.equal(raw, want)
