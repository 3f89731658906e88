"""Writing videos: mp4/webm (imageio + imageio-ffmpeg), gif (pillow), a grid for several videos, and a frame strip PNG
(one row per video, one column per frame) to look at samples in a README.

Videos are float tensors in [-1, 1], (C, T, H, W) or a batch (B, C, T, H, W); C is 1 or 3.
GIF and PNG need pillow (a core dependency); mp4/webm/... need the optional `video` extra, and a missing piece raises
an ImportError naming it. `check_output` says all of that, and whether the path is writable, before any work.
Every file is written to a temp file beside its target and moved into place: a reader never sees half a file.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import torch

from vdm_fast._fsutil import atomic_path, probe_writable

EXTRA = 'pip install "vdm_fast[video]"'
FFMPEG_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi")


SUFFIXES = (".gif", ".png", *FFMPEG_EXTS)


def _missing(*modules: str) -> list[str]:
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    return missing


def check_output(path, option: str = "path") -> Path:
    """Whether `path` can be written as a video or strip, checked before the work that produces it: a known
    suffix, the packages its writer needs, and a writable folder (created later if missing). ValueError or
    ImportError naming `option`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; give a file name such as {str(path / 'samples.gif')!r}")
    if suffix not in SUFFIXES:
        raise ValueError(f"{option} {str(path)!r}: unknown extension {suffix or '(none)'!r}; allowed: "
                         f"{', '.join(SUFFIXES)}")
    if suffix in FFMPEG_EXTS:
        missing = _missing("imageio", "imageio_ffmpeg")
        if missing:
            raise ImportError(f"{option} {str(path)!r}: writing {suffix} needs {' and '.join(missing)}: {EXTRA} "
                              "(or write .gif or .png)")
    elif _missing("PIL"):
        raise ImportError(f"{option} {str(path)!r}: writing {suffix} needs pillow: pip install pillow")
    folder = path.parent
    while not folder.exists():  # the writer creates missing folders: the nearest existing one must be writable
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    try:
        probe_writable(folder)
    except OSError as e:
        raise ValueError(f"{option} {str(path)!r}: cannot write in {str(folder)!r} ({e.strerror or e})") from None
    return path


def _batch(videos: torch.Tensor) -> torch.Tensor:
    if videos.dim() == 4:
        videos = videos[None]
    if videos.dim() != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"videos must be (C, T, H, W) or (B, C, T, H, W) with C 1 or 3, got {tuple(videos.shape)}")
    return videos


def to_uint8(videos: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats (B, C, T, H, W) -> uint8 (B, T, H, W, 3)."""
    v = _batch(videos).detach().float().cpu()
    v = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    if v.shape[-1] == 1:
        v = v.expand(*v.shape[:-1], 3)
    return np.ascontiguousarray(v.numpy())


def make_grid(videos: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Several videos tiled into one: uint8 (T, H', W', 3), `nrow` videos per row (default: about square)."""
    frames = to_uint8(videos)
    b, t, h, w, _ = frames.shape
    if b == 1:
        return frames[0]
    ncol = nrow or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncol)
    grid = np.full((t, nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, y:y + h, x:x + w] = frames[i]
    return grid


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling (..., H, W, 3): 16x16 samples are unreadable at their own size."""
    return frames.repeat(scale, -3).repeat(scale, -2) if scale > 1 else frames


def _auto_scale(h: int, w: int, target: int = 128) -> int:
    return max(1, target // max(h, w))


def _pil():
    try:
        from PIL import Image

        return Image
    except ImportError as e:
        raise ImportError(f"writing gif and png needs pillow: {EXTRA}") from e


def write_gif(path, frames: np.ndarray, fps: float = 8) -> None:
    Image = _pil()
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path, make_parents=True) as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       optimize=False, disposal=1)


def write_ffmpeg(path, frames: np.ndarray, fps: float = 8) -> None:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's ffmpeg plugin needs it: fail here with a clear message)
    except ImportError as e:
        raise ImportError(f"writing {Path(path).suffix} needs imageio and imageio-ffmpeg: {EXTRA}") from e
    # yuv420p (what players accept) needs even sides: pad with the last row/column.
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = "libvpx-vp9" if Path(path).suffix.lower() == ".webm" else "libx264"
    with atomic_path(path, make_parents=True) as tmp, imageio.get_writer(
            tmp, fps=fps, codec=codec, macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error",
            quality=9) as writer:
        for f in frames:
            writer.append_data(f)


def write_video(path, videos: torch.Tensor, *, fps: float = 8, nrow: int | None = None,
                scale: int | None = None) -> Path:
    """Write one video or a grid of several to `path`: .gif (pillow), .mp4/.webm/... (imageio-ffmpeg), or .png (a
    frame strip). `scale` upsizes small frames (default: to about 128 pixels a video)."""
    path = Path(path)
    videos = _batch(videos)
    suffix = path.suffix.lower()
    if suffix == ".png":
        write_frame_strip(path, videos, scale=scale)
        return path
    s = scale or _auto_scale(*videos.shape[-2:])
    grid = _upscale(make_grid(videos, nrow), s)
    if suffix == ".gif":
        write_gif(path, grid, fps)
    elif suffix in FFMPEG_EXTS:
        write_ffmpeg(path, grid, fps)
    else:
        raise ValueError(f"cannot write {str(path)!r}: the suffix must be .gif, .png or one of "
                         f"{', '.join(FFMPEG_EXTS)}")
    return path


def frame_strip(videos: torch.Tensor, *, max_frames: int | None = None, scale: int | None = None,
                padding: int = 2) -> np.ndarray:
    """uint8 (H', W', 3): one row per video, one column per frame."""
    frames = to_uint8(videos)
    if max_frames is not None and frames.shape[1] > max_frames:
        keep = np.linspace(0, frames.shape[1] - 1, max_frames).round().astype(int)
        frames = frames[:, keep]
    b, t, h, w, _ = frames.shape
    s = scale or _auto_scale(h, w, 64)
    frames = _upscale(frames, s)
    h, w = h * s, w * s
    out = np.full((b * (h + padding) + padding, t * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(b):
        for j in range(t):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            out[y:y + h, x:x + w] = frames[i, j]
    return out


def write_frame_strip(path, videos: torch.Tensor, *, max_frames: int | None = None, scale: int | None = None) -> Path:
    """A PNG with one row per video and one column per frame (pillow)."""
    Image = _pil()
    path = Path(path)
    with atomic_path(path, make_parents=True) as tmp:
        Image.fromarray(frame_strip(videos, max_frames=max_frames, scale=scale)).save(tmp, format="PNG")
    return path
