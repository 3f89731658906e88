"""Bouncing shapes: procedurally generated videos of coloured shapes moving at constant velocity and bouncing off the
walls. Any size and frame count, generated on the fly from (seed, index): no download, and the same index always gives
the same video, in any worker process or rank (what makes resumed and multi-process training exact)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

KINDS = ("square", "circle", "triangle")
# Saturated colours, far from the black background and from each other, so shapes stay visible at 16x16.
PALETTE = np.array(
    [[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.4, 1.0], [1.0, 1.0, 0.2], [1.0, 0.3, 1.0], [0.2, 1.0, 1.0],
     [1.0, 0.6, 0.1], [1.0, 1.0, 1.0]], dtype=np.float32)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 4 or w < 4:
        raise ValueError(f"size must be at least 4x4, got {size!r}")
    return int(h), int(w)


def _reflect(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Position after bouncing between lo and hi: a triangle wave of the free motion (exact for any time)."""
    span = np.maximum(hi - lo, 1e-6)
    q = np.mod(p - lo, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


class BouncingShapes(Dataset):
    """Videos (C, T, H, W) in [-1, 1] of 1..max_shapes shapes of one kind (the label: 0 square, 1 circle,
    2 triangle) on a black background, each with its own colour, size and constant velocity.

    `frameskip` multiplies the time between frames (as sampling every k-th frame of a longer video would).
    `length` is nominal: any non-negative index is valid and gives its own video.
    """

    num_classes = len(KINDS)
    infinite = True  # every index >= 0 is its own video: samplers need not cycle through len()

    def __init__(self, size: int | tuple[int, int] = 32, frames: int = 16, *, channels: int = 3,
                 max_shapes: int = 3, frameskip: int = 1, seed: int = 0, length: int = 1_000_000):
        self.size = _size2(size)
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        if frameskip < 1:
            raise ValueError(f"frameskip must be >= 1, got {frameskip}")
        self.frames, self.channels, self.max_shapes = frames, channels, max_shapes
        self.frameskip, self.seed, self.length = frameskip, seed, length
        h, w = self.size
        self._yy, self._xx = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                                         indexing="ij")

    def __len__(self) -> int:
        return self.length

    def _scene(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        h, w = self.size
        n = int(rng.integers(1, self.max_shapes + 1))
        kind = int(rng.integers(len(KINDS)))
        # Half-extent between ~1/8 and ~1/5 of the side: big enough to see at 16x16, small enough to move freely.
        radius = rng.uniform(0.12, 0.2, size=n).astype(np.float32) * min(h, w)
        radius = np.maximum(radius, 1.5)
        lo = np.stack([radius, radius], 1)
        hi = np.stack([h - radius, w - radius], 1)
        pos = lo + rng.uniform(size=(n, 2)).astype(np.float32) * (hi - lo)
        # Speed 4..9% of the side per frame, random direction: visible motion, several bounces in 16 frames.
        angle = rng.uniform(0, 2 * np.pi, size=n)
        speed = rng.uniform(0.04, 0.09, size=n) * min(h, w)
        vel = np.stack([np.sin(angle), np.cos(angle)], 1).astype(np.float32) * speed[:, None].astype(np.float32)
        colors = PALETTE[rng.permutation(len(PALETTE))[:n]]
        return dict(kind=kind, radius=radius, lo=lo, hi=hi, pos=pos, vel=vel, colors=colors)

    def _render(self, scene: dict, times: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) float in [0, 1]: later shapes are drawn over earlier ones, edges anti-aliased over a pixel."""
        h, w = self.size
        out = np.zeros((len(times), h, w, 3), dtype=np.float32)
        yy, xx = self._yy[None], self._xx[None]
        for i in range(len(scene["radius"])):
            r = scene["radius"][i]
            p = _reflect(scene["pos"][i] + times[:, None] * scene["vel"][i], scene["lo"][i], scene["hi"][i])
            dy, dx = yy - p[:, 0, None, None], xx - p[:, 1, None, None]
            if scene["kind"] == 0:
                dist = np.maximum(np.abs(dy), np.abs(dx)) - r
            elif scene["kind"] == 1:
                dist = np.sqrt(dy * dy + dx * dx) - r
            else:  # upward triangle: the max of the signed distances to its three edge lines
                k = np.float32(0.8660254)  # cos 30
                dist = np.maximum.reduce([dy - 0.5 * r, -k * dx - 0.5 * dy - 0.5 * r, k * dx - 0.5 * dy - 0.5 * r])
            alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
            out = out * (1 - alpha) + alpha * scene["colors"][i]
        return out

    def _to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        if self.channels == 1:
            rgb = rgb.mean(-1, keepdims=True)
        # numpy does the arithmetic: a tiny torch op in a worker process can stall on the intra-op thread pool.
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(3, 0, 1, 2) * 2 - 1))  # (C, T, H, W)

    def video(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self._scene(index)
        times = np.arange(self.frames, dtype=np.float32) * self.frameskip
        return self._to_tensor(self._render(scene, times)), scene["kind"]

    def image(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """One frame (C, H, W) of video `index` at a random time: an independent image for joint training."""
        t = np.array([rng.uniform(0, 64 * self.frameskip)], dtype=np.float32)
        return self._to_tensor(self._render(self._scene(index), t))[:, 0]

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        video, label = self.video(int(index))
        return {"video": video, "label": label}
