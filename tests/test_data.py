"""Training data: bouncing shapes, video/image folders, the deterministic example stream, video writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vdm_fast.data import (
    BouncingShapes,
    GlobalBatchSampler,
    ImageFolder,
    TrainingItems,
    VideoFolder,
    make_dataset,
    make_image_source,
)
from vdm_fast.data.video_folder import count_frames, read_frames, resize_crop


def _pil():
    return pytest.importorskip("PIL.Image")  # pillow: the `video` extra (also in `test`)


# ------------------------------------------------------------------------------------------------------------ bouncing
def test_bouncing_shape_range_and_determinism():
    d = BouncingShapes(16, 6, seed=3)
    a = d[7]
    assert a["video"].shape == (3, 6, 16, 16) and a["video"].dtype == torch.float32
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    assert a["video"].min() == -1 and a["video"].max() > 0  # black background, bright shapes
    assert a["label"] in (0, 1, 2)
    assert torch.equal(a["video"], BouncingShapes(16, 6, seed=3)[7]["video"])  # a fresh instance: same video
    assert not torch.equal(a["video"], d[8]["video"])
    assert not torch.equal(a["video"], BouncingShapes(16, 6, seed=4)[7]["video"])


def test_bouncing_moves_and_stays_inside():
    d = BouncingShapes(24, 16, seed=0)
    moved = 0
    for i in range(8):
        v = d[i]["video"]
        diffs = (v[:, 1:] - v[:, :-1]).abs().amax(dim=(0, 2, 3))
        moved += int((diffs > 0.5).all())
        # Shapes never leave the frame: every frame shows about as much colour as the first one.
        lit = (v > -0.5).any(0).float().sum(dim=(1, 2))
        assert (lit > 0.5 * lit[0]).all(), f"video {i}: a shape left the frame ({lit.tolist()})"
    assert moved >= 7, "shapes should move in (almost) every frame"


def test_bouncing_frameskip_is_every_kth_frame():
    every = BouncingShapes(16, 13, seed=1)[5]["video"]
    skip = BouncingShapes(16, 5, frameskip=3, seed=1)[5]["video"]
    torch.testing.assert_close(skip, every[:, ::3], rtol=0, atol=1e-5)


def test_bouncing_options_and_errors():
    d = BouncingShapes((16, 24), 3, channels=1, max_shapes=1)
    assert d[0]["video"].shape == (1, 3, 16, 24)
    assert d.image(0, np.random.default_rng(0)).shape == (1, 16, 24)
    for kw, name in ((dict(frames=0), "frames"), (dict(channels=2), "channels"), (dict(frameskip=0), "frameskip"),
                     (dict(size=2), "size"), (dict(max_shapes=0), "max_shapes")):
        with pytest.raises(ValueError, match=name):
            BouncingShapes(**{"size": 16, "frames": 4, **kw})
    with pytest.raises(IndexError):
        d[-1]


# ---------------------------------------------------------------------------------------------------- example stream
def test_training_items_deterministic_with_images():
    items = TrainingItems(BouncingShapes(16, 4, seed=2), image_frames=3, seed=2)
    a, b = items[11], items[11]
    assert a["video"].shape == a["noise"].shape == (3, 7, 16, 16)
    for k in ("video", "noise", "t_u", "drop_u"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["video"][:, :4], BouncingShapes(16, 4, seed=2)[11]["video"])
    # The appended images are frames of other videos: not copies of the clip's frames.
    for j in range(4, 7):
        assert not any(torch.equal(a["video"][:, j], a["video"][:, i]) for i in range(4))
    c = items[12]
    assert not torch.equal(a["noise"], c["noise"]) and a["t_u"] != c["t_u"]
    assert 0 <= float(a["t_u"]) < 1 and 0 <= float(a["drop_u"]) < 1


def test_global_batch_sampler_splits_the_global_batch():
    for infinite in (True, False):
        one = GlobalBatchSampler(10, 6, seed=5, infinite=infinite)
        parts = [GlobalBatchSampler(10, 3, rank=r, world_size=2, seed=5, infinite=infinite) for r in range(2)]
        for step in range(4):
            assert one.batch(step) == parts[0].batch(step) + parts[1].batch(step)
    # A finite dataset: every example once per epoch, a distinct index per epoch (fresh clip and noise draws).
    s = GlobalBatchSampler(10, 5, seed=1)
    e0, e1 = s.batch(0) + s.batch(1), s.batch(2) + s.batch(3)
    assert sorted(i % 10 for i in e0) == list(range(10)) and sorted(i % 10 for i in e1) == list(range(10))
    assert set(e0).isdisjoint(e1)
    # Iteration starts at start_step (what resuming relies on).
    it = iter(GlobalBatchSampler(10, 5, seed=1, start_step=2))
    assert next(it) == s.batch(2) and next(it) == s.batch(3)
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 2, rank=2, world_size=2)


def test_worker_processes_give_the_same_batches():
    items = TrainingItems(BouncingShapes(16, 4, seed=0), image_frames=1, seed=0)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(items, batch_sampler=GlobalBatchSampler(len(items), 3, infinite=True), num_workers=workers)
        it = iter(loader)
        batches.append([next(it) for _ in range(3)])
    for a, b in zip(*batches):
        for k in ("video", "noise", "t_u", "drop_u", "label", "index"):
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------- folders
def _grey_gif(path, n, h=20, w=30):
    """A gif whose frame k is a flat grey of level 10 k: frame order is readable after any resize."""
    frames = [_pil().fromarray(np.full((h, w, 3), 10 * k, np.uint8)) for k in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _levels(video):
    return [round(float(v)) for v in ((video.mean(dim=(0, 2, 3)) + 1) * 127.5 / 10)]


def test_video_folder_clips_frameskip_and_resize(tmp_path):
    _grey_gif(tmp_path / "a.gif", 12)
    (tmp_path / "sub").mkdir()
    _grey_gif(tmp_path / "sub" / "b.gif", 20)
    d = VideoFolder(tmp_path, 8, 4, frameskip=3, seed=0)
    assert len(d) == 2
    for i in range(6):
        v = d[i]["video"]
        assert v.shape == (3, 4, 8, 8)
        lv = _levels(v)
        assert [b - a for a, b in zip(lv, lv[1:])] == [3, 3, 3], lv  # 4 frames, 3 apart, in order
    starts = {_levels(d[i]["video"])[0] for i in range(0, 40, 2)}
    assert len(starts) > 1, "clip starts should vary with the example index"


def test_video_folder_of_frame_directories(tmp_path):
    clip = tmp_path / "clip0"
    clip.mkdir()
    for k in range(6):
        _pil().fromarray(np.full((10, 10, 3), 20 * k, np.uint8)).save(clip / f"{k:03d}.png")
    d = VideoFolder(tmp_path, 8, 3, frameskip=2, random_start=False)
    lv = _levels(d[0]["video"])
    assert lv == [0, 4, 8], lv


def test_video_folder_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from vdm_fast.video_io import write_video

    video = BouncingShapes(32, 10, seed=0)[0]["video"]
    write_video(tmp_path / "x.mp4", video, scale=1)
    assert count_frames(tmp_path / "x.mp4") == 10
    assert read_frames(tmp_path / "x.mp4", [0, 9]).shape == (2, 32, 32, 3)
    clip = VideoFolder(tmp_path, 32, 10, random_start=False)[0]["video"]
    assert (clip - video).abs().mean() < 0.1  # lossy codec: close, not equal


def test_folder_errors_name_the_problem(tmp_path):
    _pil()
    with pytest.raises(FileNotFoundError, match="nope"):
        VideoFolder(tmp_path / "nope", 8, 4)
    with pytest.raises(ValueError, match="holds no videos"):
        VideoFolder(tmp_path, 8, 4)
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        VideoFolder(tmp_path, 8, 4)
    (tmp_path / "broken.mp4").unlink()
    _grey_gif(tmp_path / "short.gif", 5)
    _grey_gif(tmp_path / "long.gif", 12)
    with pytest.raises(ValueError, match=r"short\.gif.*5 frames"):
        VideoFolder(tmp_path, 8, 4, frameskip=2)  # needs 7 frames
    d = VideoFolder(tmp_path, 8, 4, frameskip=2, skip_short=True)
    assert len(d) == 1
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(tmp_path, 8)


def test_image_folder_and_joint_images(tmp_path):
    for k in range(3):
        _pil().fromarray(np.full((12, 18, 3), 50 * k, np.uint8)).save(tmp_path / f"{k}.jpg")
    imgs = ImageFolder(tmp_path, 8)
    assert len(imgs) == 3 and imgs.image(1).shape == (3, 8, 8)
    videos = make_dataset("bouncing", size=8, frames=4)
    items = TrainingItems(videos, image_frames=2, images=make_image_source(str(tmp_path), videos, 8))
    v = items[0]["video"]
    assert v.shape == (3, 6, 8, 8)
    assert all(round(float(v[:, j].std()), 3) == 0 for j in (4, 5))  # flat images from the folder
    with pytest.raises(ValueError, match="folder of images"):
        make_image_source("bouncing", videos, 8)


def test_resize_crop_centre():
    x = torch.zeros(1, 10, 20, 3, dtype=torch.uint8)
    x[:, :, 5:15] = 255  # a bright centre band, as wide as the crop
    out = resize_crop(x, (10, 10))
    assert out.shape == (3, 1, 10, 10)
    assert out.min() > 0.9  # the centre crop keeps exactly the band


# ------------------------------------------------------------------------------------------------------------ video io
def test_write_gif_grid_and_strip(tmp_path):
    from vdm_fast import video_io

    _pil()
    videos = torch.stack([BouncingShapes(16, 5, seed=0)[i]["video"] for i in range(3)])
    video_io.write_video(tmp_path / "g.gif", videos, scale=1, fps=4)
    assert count_frames(tmp_path / "g.gif") == 5
    grid = read_frames(tmp_path / "g.gif", [0])[0]
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # 2x2 grid of 16x16 with 2-pixel padding
    video_io.write_frame_strip(tmp_path / "s.png", videos, scale=2)
    with _pil().open(tmp_path / "s.png") as im:
        assert im.size == (5 * 34 + 2, 3 * 34 + 2)
    with pytest.raises(ValueError, match="suffix"):
        video_io.write_video(tmp_path / "x.avi2", videos)
    with pytest.raises(ValueError, match="videos must be"):
        video_io.write_video(tmp_path / "x.gif", videos[:, :2])
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_mp4_without_ffmpeg_names_the_extra(tmp_path, monkeypatch):
    import sys

    from vdm_fast import video_io

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ImportError, match=r"vdm_fast\[video\]"):
        video_io.write_video(tmp_path / "x.mp4", torch.zeros(3, 2, 8, 8))


# ------------------------------------------------------------------------------------------------------- bad data
class _Flaky(torch.utils.data.Dataset):
    """Videos whose odd indices fail to read, as a corrupt file would."""

    channels, frames, size, num_classes = 1, 2, (4, 4), 0

    def __init__(self, bad=(1, 3)):
        from vdm_fast.data import BadDataError

        self.bad, self.error = set(bad), BadDataError

    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i % 10 in self.bad:
            raise self.error(f"cannot read video 'v{i % 10}.mp4': broken", f"v{i % 10}.mp4")
        return {"video": torch.full((1, 2, 4, 4), float(i)), "label": 0}

    def image(self, i, rng):
        return self[i]["video"][:, 0]


def test_training_items_replace_a_bad_clip_by_the_next_readable_one():
    items = TrainingItems(_Flaky(), seed=1, skip_bad=2)
    a = items[1]
    assert float(a["video"][0, 0, 0, 0]) == 2.0 and a["bad"] == "v1.mp4\tcannot read video 'v1.mp4': broken"
    assert torch.equal(a["noise"], TrainingItems(_Flaky(bad=()), seed=1)[1]["noise"])  # its own noise draw
    assert items[2]["bad"] == "" and float(items[2]["video"][0, 0, 0, 0]) == 2.0
    assert float(TrainingItems(_Flaky(bad=(1, 2)), skip_bad=2)[1]["video"][0, 0, 0, 0]) == 3.0  # two in a row
    # No budget: a placeholder of the clip's shape that carries the error (the trainer stops on it, naming the file).
    none = TrainingItems(_Flaky(), image_frames=1)[3]
    assert none["video"].shape == (1, 3, 4, 4) and not none["video"].any() and none["bad"].startswith("v3.mp4\t")
    # A bad image of joint training is replaced the same way.
    joint = TrainingItems(_Flaky(bad=()), image_frames=2, images=_Flaky(bad=range(10)), skip_bad=1)[0]
    assert joint["bad"].count("\n") == 1 and not joint["video"][:, 2:].any()
    with pytest.raises(ValueError, match="skip_bad"):
        TrainingItems(_Flaky(), skip_bad=-1)


def test_data_names_are_checked_with_a_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean 'bouncing'"):
        make_dataset("Bouncing", size=8, frames=2)
    with pytest.raises(FileNotFoundError, match="image-data"):
        make_image_source(str(tmp_path / "none"), make_dataset("bouncing", size=8, frames=2), 8)
