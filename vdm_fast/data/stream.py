"""The deterministic stream of training examples: which examples a step sees, and everything random about each.

Everything random about a training example (which video, which clip, the extra images, the diffusion noise, t and the
guidance drop) is drawn from (seed, example index) and the example indices of a step are fixed by (seed, step, rank).
So the data does not depend on worker processes, resuming continues the same stream, and a global batch split over
ranks holds exactly the examples one process would see with the whole batch.

Bad data (`skip_bad`): a clip or image whose file fails to read is replaced by example index + 1, + 2, ... (the next
video of the folder, with its own clip draw) until one reads, at most `skip_bad` times. The replacement depends only
on the index, so it is the same in every worker, rank and resumed run. The item names each failing file (`bad`:
"path<TAB>message" lines), so the trainer can record them and enforce its bound on the run's bad files; with
`skip_bad=0` the item is a placeholder (zeros) carrying the error, and the trainer stops naming the file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vdm_fast.data.video_folder import BadDataError

__all__ = ["TrainingItems", "GlobalBatchSampler", "item_seed", "loader_throughput"]


def item_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one example (SeedSequence mixes the three well)."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class TrainingItems(Dataset):
    """Example `index` of `videos` with everything the loss needs, drawn from (seed, index):

    video (C, T + K, H, W): the clip, then K independent images (frames of other videos or images of `images`);
    noise (same shape), t_u (uniform in [0, 1): the diffusion time), drop_u (uniform: guidance drop when < p), label;
    bad: the files that failed to read for this example ("" when none; see the module docstring).
    """

    def __init__(self, videos: Dataset, *, image_frames: int = 0, images: Dataset | None = None, seed: int = 0,
                 skip_bad: int = 0):
        if image_frames < 0:
            raise ValueError(f"image_frames must be >= 0, got {image_frames}")
        if skip_bad < 0:
            raise ValueError(f"skip_bad must be >= 0, got {skip_bad}")
        self.videos, self.image_frames, self.seed, self.skip_bad = videos, image_frames, seed, skip_bad
        self.images = images if images is not None else videos

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def infinite(self) -> bool:
        return getattr(self.videos, "infinite", False)

    def _read(self, read, index: int, bad: list[str]):
        """read(index), else read(index + k) for the first k <= skip_bad that works; None if none did."""
        for k in range(self.skip_bad + 1):
            try:
                return read(index + k)
            except BadDataError as e:
                bad.append(f"{e.path}\t{e}")
        return None

    def _images(self, index: int, bad: list[str]) -> torch.Tensor | None:
        rng = np.random.default_rng([self.seed, index, 2])
        n = 2**62 if getattr(self.images, "infinite", False) else len(self.images)
        out = []
        for _ in range(self.image_frames):
            img = self._read(lambda i: self.images.image(i, rng), int(rng.integers(n)), bad)
            if img is None:
                return None
            out.append(img)
        return torch.stack(out, 1)

    def __getitem__(self, index: int) -> dict:
        bad: list[str] = []
        item = self._read(self.videos.__getitem__, index, bad)
        video = None if item is None else item["video"]
        if video is not None and self.image_frames:
            images = self._images(index, bad)
            video = None if images is None else torch.cat([video, images.to(video.dtype)], 1)
        if video is None:  # a placeholder of the right shape: the trainer stops on `bad` before training on it
            c, t, (h, w) = self.videos.channels, self.videos.frames, self.videos.size
            video, item = torch.zeros(c, t + self.image_frames, h, w), {"label": 0}
        g = torch.Generator().manual_seed(item_seed(self.seed, index, 1))
        noise = torch.randn(video.shape, generator=g)
        t_u, drop_u = torch.rand(2, generator=g, dtype=torch.float64).unbind()
        return {"video": video, "noise": noise, "t_u": t_u, "drop_u": drop_u, "label": item["label"], "index": index,
                "bad": "\n".join(bad)}


class GlobalBatchSampler(Sampler):
    """Batches of example indices: at step s, rank r of `world_size` takes positions [s*G + r*B, s*G + (r+1)*B) of
    the global stream (G = B * world_size). Position p maps to example p for datasets with `infinite = True`, else to
    perm_e[p % N] + e * N with e = p // N the epoch and perm_e a permutation seeded by (seed, e): every example once
    per epoch, and a distinct index (hence distinct random clip and noise) each epoch. Endless; starts at
    `start_step`."""

    def __init__(self, num_examples: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, seed: int = 0, infinite: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = num_examples, batch_size, rank, world_size
        self.start_step, self.seed, self.infinite = start_step, seed, infinite
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, p: int) -> int:
        if self.infinite:
            return p
        epoch, i = divmod(p, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 3]).permutation(self.n))
        return int(self._perm[1][i]) + epoch * self.n

    def batch(self, step: int) -> list[int]:
        first = step * self.batch_size * self.world_size + self.rank * self.batch_size
        return [self._index(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def state_dict(self) -> dict:
        return {"seed": self.seed, "start_step": self.start_step, "batch_size": self.batch_size,
                "world_size": self.world_size}


def loader_throughput(dataset: Dataset, *, batch_size: int = 16, workers: int = 0, seconds: float = 5.0) -> float:
    """Examples per second a DataLoader over `dataset` delivers (after its first batch, i.e. worker start-up)."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, infinite=getattr(dataset, "infinite", False))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["video"])
    return n / (time.perf_counter() - t0)
