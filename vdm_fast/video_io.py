"""Writing videos: mp4/webm (imageio + imageio-ffmpeg), gif (pillow), a grid for several videos, and a frame strip PNG
(one row per video, one column per frame) to look at samples in a README.

Videos are float tensors in [-1, 1], (C, T, H, W) or a batch (B, C, T, H, W); C is 1 or 3.
The optional `video` extra installs what is needed; a missing piece raises an ImportError naming it.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

EXTRA = 'pip install "vdm_fast[video]"'
FFMPEG_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi")


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


def _atomic_target(path: Path):
    """A temp file beside `path` (same suffix, so writers pick the format by it); os.replace it onto path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path) -> None:
    """mkstemp makes 0600 files: give the usual permissions, then move into place atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _pil():
    try:
        from PIL import Image

        return Image
    except ImportError as e:
        raise ImportError(f"writing gif and png needs pillow: {EXTRA}") from e


def write_gif(path, frames: np.ndarray, fps: float = 8) -> None:
    Image = _pil()
    images = [Image.fromarray(f) for f in frames]
    tmp = _atomic_target(Path(path))
    try:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       optimize=False, disposal=1)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_ffmpeg(path, frames: np.ndarray, fps: float = 8) -> None:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's ffmpeg plugin needs it: fail here with a clear message)
    except ImportError as e:
        raise ImportError(f"writing {Path(path).suffix} needs imageio and imageio-ffmpeg: {EXTRA}") from e
    # yuv420p (what players accept) needs even sides: pad with the last row/column.
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    tmp = _atomic_target(Path(path))
    try:
        codec = "libvpx-vp9" if Path(path).suffix.lower() == ".webm" else "libx264"
        with imageio.get_writer(tmp, fps=fps, codec=codec, macro_block_size=1, pixelformat="yuv420p",
                                ffmpeg_log_level="error", quality=9) as writer:
            for f in frames:
                writer.append_data(f)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    tmp = _atomic_target(path.with_suffix(".png"))
    try:
        Image.fromarray(frame_strip(videos, max_frames=max_frames, scale=scale)).save(tmp, format="PNG")
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
