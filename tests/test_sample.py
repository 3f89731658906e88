"""vdm_fast.sample and vdm_fast.video_io in-process: output checks before any work, option checks against the run's
config, class labels, the frame strip's frame count, the plain progress lines, and seeded reproducibility of
`generate` on a micro U-Net (the command end to end is in test_cli.py)."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import torch

from vdm_fast import _cli, _progress, sample, video_io
from vdm_fast.diffusion import SAMPLERS, GaussianDiffusion
from vdm_fast.model import Unet3D


def _micro() -> Unet3D:
    return Unet3D(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), attn_head_dim=8,
                  image_size=8, num_frames=4, norm_groups=4, zero_init=False)


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sample.add_arguments(p)
    argv = ["--run", str(kw.pop("run", "."))]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


@pytest.mark.parametrize("name", ["x.gif", "x.png", "x.GIF", "sub/dir/x.gif"])
def test_check_output_accepts_writable_gif_and_png(tmp_path, name):
    assert video_io.check_output(tmp_path / name, "--out") == tmp_path / name
    assert not (tmp_path / "sub").exists()  # checking creates nothing


@pytest.mark.parametrize("name,words", [("x.jpeg", ["unknown extension", ".gif"]), ("x", ["(none)"]),
                                        ("FILE/x.gif", ["not a folder"]), (".", ["is a folder"])])
def test_check_output_rejects_with_the_option_named(tmp_path, name, words):
    (tmp_path / "FILE").write_text("")
    with pytest.raises(ValueError) as e:
        video_io.check_output(tmp_path / name, "--strip")
    assert str(e.value).startswith("--strip ") and all(w in str(e.value) for w in words)


def test_check_output_names_the_missing_video_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ImportError, match=r"--out .*imageio_ffmpeg.*vdm_fast\[video\]"):
        video_io.check_output(tmp_path / "x.mp4", "--out")


def test_sampler_choices_come_from_the_library():
    p = argparse.ArgumentParser()
    sample.add_arguments(p)
    action = next(a for a in p._actions if a.dest == "sampler")
    assert tuple(action.choices) == tuple(SAMPLERS)
    for name in SAMPLERS:
        assert name in action.help
    for dest in ("seed", "fps", "sampler", "strip_frames"):
        assert next(a for a in p._actions if a.dest == dest).help


def test_check_run_uses_the_config():
    config = {"model": _micro().config.to_dict(), "data": {"frames": 4, "resolution": 8, "num_classes": 3}}
    assert sample.check_run(_args(), config) == (4, 8)
    assert sample.check_run(_args(frames=6, resolution=12), config) == (6, 12)
    with pytest.raises(ValueError, match="--resolution 9: must be a multiple of 2"):
        sample.check_run(_args(resolution=9), config)
    with pytest.raises(ValueError, match="--extend-to"):
        sample.check_run(_args(extend_to=4), config)
    with pytest.raises(ValueError, match=r"--label must be in \[0, 3\)"):
        sample.check_run(_args(label=3), config)
    assert sample.check_run(_args(guidance=1.5, label=2), config) == (4, 8)


def test_check_args_points_long_videos_to_extend_to(tmp_path):
    with pytest.raises(ValueError, match="--frames 129.*--extend-to 129"):
        sample.check_args(_args(run=tmp_path, out=tmp_path / "a.gif", frames=129))
    sample.check_args(_args(run=tmp_path, out=tmp_path / "a.gif", frames=128))


def test_class_cond_defaults_cycle_the_classes():
    c = sample.class_cond(None, 5, 2, "cpu")
    assert c.argmax(1).tolist() == [0, 1, 0, 1, 0]
    assert sample.class_cond([1], 3, 2, "cpu").argmax(1).tolist() == [1, 1, 1]
    assert sample.class_cond(None, 3, 0, "cpu") is None


def test_frame_strip_keeps_at_most_max_frames_evenly():
    videos = torch.linspace(-1, 1, 20).view(1, 1, 20, 1, 1).expand(2, 3, 20, 4, 4)
    strip = video_io.frame_strip(videos, max_frames=4, scale=1, padding=0)
    assert strip.shape == (2 * 4, 4 * 4, 3)
    kept = strip[0, ::4, 0].astype(int)
    full = video_io.to_uint8(videos)[0, :, 0, 0, 0].astype(int)
    assert kept.tolist() == [full[0], full[6], full[13], full[19]]  # first and last kept, evenly between
    assert video_io.frame_strip(videos, max_frames=None, scale=1, padding=0).shape[1] == 20 * 4


def test_write_outputs_gif_and_strip(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # relative paths, as `--out samples.gif` gives (their folder is ".")
    videos = torch.rand(2, 3, 6, 8, 8) * 2 - 1
    out = sample.write_outputs(videos, "v.gif", fps=4, strip="s.png", strip_frames=3)
    assert [p.resolve() for p in out] == [tmp_path / "v.gif", tmp_path / "s.png"]
    with Image.open(out[0]) as im:
        assert im.n_frames == 6
    with Image.open(out[1]) as im:
        assert np.asarray(im).shape[1] > np.asarray(im).shape[0]


def test_plain_progress_lines_and_silence_for_short_loops():
    buf = io.StringIO()
    bar = _progress.progress_bar(4, "sampling", every_s=0, file=buf)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("sampling: 1/4 steps (25%)") and "left" in lines[0]
    assert lines[-1].startswith("sampling: 4/4 steps in ") and "\r" not in buf.getvalue()
    quiet = io.StringIO()
    bar = _progress.progress_bar(4, "sampling", every_s=3600, file=quiet)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert quiet.getvalue() == ""  # a loop shorter than the period prints nothing, not even a closing line
    off = io.StringIO()
    bar = _progress.progress_bar(4, "sampling", enabled=False, file=off)
    bar.update(4)
    bar.close()
    assert off.getvalue() == ""


def test_cli_option_types_reject_non_finite_and_out_of_range():
    for bad in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            _cli.finite_float(positive=True)(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        _cli.finite_float(positive=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        _cli.positive_int("0")
    assert _cli.nonneg_int("0") == 0 and _cli.finite_float(minimum=0.0)("0") == 0.0
    assert _cli.check_device("CPU") == "cpu"
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        _cli.check_device("gpu")


def test_generate_is_reproducible_by_seed():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(_micro().eval(), prediction="v")
    shape = (1, 3, 4, 8, 8)
    a = sample.generate(diffusion, shape, steps=2, seed=3, progress=False)
    b = sample.generate(diffusion, shape, steps=2, seed=3, progress=False)
    c = sample.generate(diffusion, shape, steps=2, seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == shape and a.abs().max() <= 1


def test_mp4_with_the_video_extra(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    path = video_io.write_video(tmp_path / "v.mp4", torch.rand(2, 3, 5, 8, 8) * 2 - 1, fps=5)
    frames = iio.imread(path)
    assert frames.shape[0] == 5 and frames.shape[-1] == 3  # a 2-video grid, 5 frames, upscaled and even-sized
