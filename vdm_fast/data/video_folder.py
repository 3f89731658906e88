"""Folders of videos or images as training data.

- `VideoFolder(root, size, frames, frameskip)`: every video file under root (mp4, webm, gif, ... read with PyAV, else
  imageio), and every directory whose files are images (its frames, in name order). Item i is a clip of `frames`
  frames `frameskip` apart from video i % len, at a start drawn from (seed, i), resized (shorter side) and
  centre-cropped to `size`.
- `ImageFolder(root, size)`: every image under root: the independent images of joint image-video training.

Errors are raised up front, naming the file: an empty folder, videos shorter than a clip, and every bad file at once
(the scan decodes the first frame of each video file, checks every image file's structure and decodes the first frame
of each frame directory, whose frames must share one size). A file that fails later, at read time (a video corrupt
past its first frame), raises `BadDataError` naming it; `skip_bad=N` drops up to N files that fail the scan (with a
warning) instead of refusing them, and data.stream.TrainingItems replaces clips that fail at read time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

VIDEO_EXTS = (".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTRA = 'pip install "vdm_fast[video]"'


class BadDataError(ValueError):
    """A data file that cannot be read; `path` names it."""

    def __init__(self, message: str, path: str | Path = ""):
        super().__init__(message)
        self.path = str(path)

    def __reduce__(self):  # crosses DataLoader worker processes intact
        return type(self), (str(self), self.path)


def _files(root: Path, exts: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def _frame_dirs(root: Path) -> list[Path]:
    """Directories (root included) holding images directly: each is one video, its frames in name order."""
    dirs = {p.parent for p in _files(root, IMAGE_EXTS)}
    return sorted(dirs)


def _check_root(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {str(root)!r} is not a directory")
    return root


def resize_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, C) -> float (C, T, h, w) in [-1, 1]: resize the shorter side (antialiased), centre crop."""
    x = frames.permute(0, 3, 1, 2).float()  # (T, C, H, W)
    h, w = size
    scale = max(h / x.shape[-2], w / x.shape[-1])
    nh, nw = max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale))
    if (nh, nw) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    x = x[..., top:top + h, left:left + w]
    return (x / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def _rgb(a: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8 -> (H, W, 3): grey expanded, alpha dropped."""
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return a[..., :3]


def read_image(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"reading images needs pillow: {VIDEO_EXTRA}") from e
    try:
        with Image.open(path) as im:
            return _rgb(np.array(im.convert("RGB")))  # a writable copy (torch.from_numpy warns otherwise)
    except Exception as e:
        raise BadDataError(f"cannot read image {str(path)!r}: {e}", path) from e


def _av():
    try:
        import av

        return av
    except ImportError:
        return None


def count_frames(path: Path) -> int:
    """Frames in a video file: from the container header, else by demuxing (no decoding), else by reading it."""
    av = _av()
    try:
        if av is not None:
            with av.open(str(path)) as c:
                stream = c.streams.video[0]
                n = stream.frames
                if n <= 0:
                    n = sum(1 for pkt in c.demux(stream) if pkt.size > 0)
                return int(n)
        try:
            import imageio.v3 as iio
        except ImportError as e:
            raise ImportError(f"reading videos needs PyAV or imageio: {VIDEO_EXTRA}") from e
        return sum(1 for _ in iio.imiter(path))
    except ImportError:
        raise
    except Exception as e:
        raise BadDataError(f"cannot read video {str(path)!r}: {e}", path) from e


def read_frames(path: Path, indices: list[int]) -> np.ndarray:
    """uint8 (len(indices), H, W, 3): the frames of a video file at increasing `indices`, decoding no further."""
    wanted, out = set(indices), {}
    last = max(indices)
    try:
        av = _av()
        if av is not None:
            with av.open(str(path)) as c:
                for i, frame in enumerate(c.decode(video=0)):
                    if i in wanted:
                        out[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        else:
            import imageio.v3 as iio

            for i, frame in enumerate(iio.imiter(path)):
                if i in wanted:
                    out[i] = _rgb(np.asarray(frame))
                if i >= last:
                    break
    except Exception as e:
        raise BadDataError(f"cannot read video {str(path)!r}: {e}", path) from e
    missing = [i for i in indices if i not in out]
    if missing:
        raise BadDataError(f"video {str(path)!r} ended before frame {missing[0]}", path)
    return np.stack([out[i] for i in indices])


def _image_header(path: Path) -> tuple[int, int]:
    """(width, height) of an image file after checking its structure (PNG chunk CRCs, ...) without decoding it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"reading images needs pillow: {VIDEO_EXTRA}") from e
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except Exception as e:
        raise BadDataError(f"cannot read image {str(path)!r}: {e}", path) from e


def _scan_frame_dir(d: Path, imgs: list[Path]) -> None:
    """Every frame's header, one size for all, and the first frame decoded."""
    sizes = {}
    for p in imgs:
        sizes.setdefault(_image_header(p), p)
    if len(sizes) > 1:
        (s0, p0), (s1, p1) = list(sizes.items())[:2]
        raise BadDataError(f"frame directory {str(d)!r} mixes frame sizes: {p0.name} is {s0[0]}x{s0[1]}, "
                           f"{p1.name} is {s1[0]}x{s1[1]}", d)
    read_image(imgs[0])


def refuse_or_drop(bad: list[BadDataError], total: int, skip_bad: int, what: str) -> set[str]:
    """All the bad files of a scan in one error, or (with skip_bad >= their number) their paths, with a warning."""
    if not bad:
        return set()
    listed = "; ".join(str(e).replace("\n", " ") for e in bad)
    if len(bad) > skip_bad:
        hint = f" (--skip-bad-data {skip_bad} allows fewer)" if skip_bad else " (--skip-bad-data N skips up to N)"
        raise ValueError(f"{len(bad)} of {total} {what} cannot be read{hint}: {listed}")
    print(f"skipping {len(bad)} unreadable {what} (--skip-bad-data {skip_bad}): {listed}", file=sys.stderr)
    return {e.path for e in bad}


class VideoFolder(Dataset):
    """Clips (C, T, H, W) in [-1, 1] from the videos under `root` (files, or directories of frame images)."""

    num_classes = 0
    channels = 3

    def __init__(self, root, size: int | tuple[int, int] = 64, frames: int = 16, *, frameskip: int = 1,
                 seed: int = 0, skip_short: bool = False, random_start: bool = True, skip_bad: int = 0):
        from vdm_fast.data.bouncing import _size2

        self.root, self.size = _check_root(root), _size2(size)
        if frames < 1 or frameskip < 1:
            raise ValueError(f"frames and frameskip must be >= 1, got {frames} and {frameskip}")
        self.frames, self.frameskip, self.seed, self.random_start = frames, frameskip, seed, random_start
        sources: list[tuple[Path, int, list[Path] | None]] = []
        bad: list[BadDataError] = []
        for p in _files(self.root, VIDEO_EXTS):
            try:
                n = count_frames(p)
                read_frames(p, [0])
                sources.append((p, n, None))
            except BadDataError as e:
                bad.append(e)
        for d in _frame_dirs(self.root):
            imgs = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            try:
                _scan_frame_dir(d, imgs)
                sources.append((d, len(imgs), imgs))
            except BadDataError as e:
                bad.append(e)
        if not sources and not bad:
            raise ValueError(f"data folder {str(self.root)!r} holds no videos ({', '.join(VIDEO_EXTS)}) "
                             f"and no directories of frame images ({', '.join(IMAGE_EXTS)})")
        refuse_or_drop(bad, len(sources) + len(bad), skip_bad, f"videos under {str(self.root)!r}")
        need = self.span
        short = [(p, n) for p, n, _ in sources if n < need]
        if short and not skip_short:
            listed = ", ".join(f"{str(p)!r} ({n} frames)" for p, n in short[:3])
            more = f" and {len(short) - 3} more" if len(short) > 3 else ""
            raise ValueError(f"{len(short)} of {len(sources)} videos are shorter than a clip of {frames} frames "
                             f"{frameskip} apart ({need} frames): {listed}{more}; lower frames/frameskip or skip "
                             "them (skip_short=True, --skip-short)")
        self.sources = [s for s in sources if s[1] >= need]
        if not self.sources:
            raise ValueError(f"every video under {str(self.root)!r} is shorter than {need} frames")

    @property
    def span(self) -> int:
        """Frames of the source one clip covers."""
        return (self.frames - 1) * self.frameskip + 1

    def __len__(self) -> int:
        return len(self.sources)

    def _read(self, source, indices: list[int]) -> torch.Tensor:
        path, _, imgs = source
        if imgs is None:
            arr = read_frames(path, indices)
        else:
            arr = np.stack([read_image(imgs[i]) for i in indices])
        return resize_crop(torch.from_numpy(arr), self.size)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index % len(self.sources)]
        rng = np.random.default_rng([self.seed, int(index)])
        start = int(rng.integers(0, source[1] - self.span + 1)) if self.random_start else 0
        indices = list(range(start, start + self.span, self.frameskip))
        return {"video": self._read(source, indices), "label": 0}

    def image(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """A random frame (C, H, W) of video index % len: an independent image for joint training."""
        source = self.sources[index % len(self.sources)]
        return self._read(source, [int(rng.integers(0, source[1]))])[:, 0]


class ImageFolder(Dataset):
    """Images (C, H, W) in [-1, 1] under `root`, resized and centre-cropped to `size`."""

    def __init__(self, root, size: int | tuple[int, int] = 64, *, skip_bad: int = 0):
        from vdm_fast.data.bouncing import _size2

        self.root, self.size = _check_root(root), _size2(size)
        files = _files(self.root, IMAGE_EXTS)
        if not files:
            raise ValueError(f"image folder {str(self.root)!r} holds no images ({', '.join(IMAGE_EXTS)})")
        bad = []
        for p in files:
            try:
                _image_header(p)
            except BadDataError as e:
                bad.append(e)
        drop = refuse_or_drop(bad, len(files), skip_bad, f"images under {str(self.root)!r}")
        self.files = [p for p in files if str(p) not in drop]

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        arr = read_image(self.files[index % len(self.files)])
        return resize_crop(torch.from_numpy(arr[None]), self.size)[:, 0]

    def __getitem__(self, index: int) -> dict:
        return {"image": self.image(index), "label": 0}


def is_image_folder(root) -> bool:
    """True when root holds images but no video files (used to pick ImageFolder for --image-data)."""
    root = Path(root)
    return root.is_dir() and not _files(root, VIDEO_EXTS) and bool(_files(root, IMAGE_EXTS))


__all__ = ["BadDataError", "VideoFolder", "ImageFolder", "resize_crop", "read_frames", "count_frames",
           "is_image_folder", "refuse_or_drop", "VIDEO_EXTS", "IMAGE_EXTS"]
