"""Where training examples come from, by name: "bouncing" (generated on the fly) or a folder of videos, and the
independent images of joint training (an image folder, else frames of the training videos)."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch.utils.data import Dataset

from vdm_fast.data.bouncing import BouncingShapes
from vdm_fast.data.video_folder import ImageFolder, VideoFolder, is_image_folder

__all__ = ["BUILTIN", "make_dataset", "make_image_source"]

BUILTIN = ("bouncing",)


def _missing_folder(data: str, option: str) -> FileNotFoundError:
    close = difflib.get_close_matches(data.lower(), BUILTIN, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return FileNotFoundError(f"{option} {data!r}: no such folder{hint}; give {' or '.join(map(repr, BUILTIN))} or a "
                             "folder of videos / directories of frames")


def make_dataset(data: str, *, size, frames: int, frameskip: int = 1, seed: int = 0, channels: int = 3,
                 skip_short: bool = False, skip_bad: int = 0) -> Dataset:
    """"bouncing" (the default, generated on the fly) or a folder of videos / directories of frames."""
    if data == "bouncing":
        return BouncingShapes(size, frames, channels=channels, frameskip=frameskip, seed=seed)
    if not Path(data).exists():
        raise _missing_folder(data, "--data")
    if channels != 3:
        raise ValueError(f"video folders give RGB videos: channels must be 3, got {channels}")
    return VideoFolder(data, size, frames, frameskip=frameskip, seed=seed, skip_short=skip_short, skip_bad=skip_bad)


def make_image_source(image_data: str | None, videos: Dataset, size, *, skip_bad: int = 0) -> Dataset:
    """Where joint training's independent images come from: an image folder, else frames of the training videos."""
    if image_data is None:
        return videos
    if image_data != "bouncing" and not Path(image_data).exists():
        raise FileNotFoundError(f"--image-data {image_data!r}: no such folder")
    if image_data == "bouncing" or not is_image_folder(image_data):
        raise ValueError(f"--image-data must be a folder of images, got {image_data!r}")
    return ImageFolder(image_data, size, skip_bad=skip_bad)
