"""`--frame-parallel`: the frames of each clip split over a group of K processes, and data parallelism over the
world / K groups (`torchrun --nproc_per_node=N -m vdm_fast.train --frame-parallel [--frame-parallel-size K]`).

The grid is vdm_fast.parallel.mesh's: frame group `replica` is ranks [replica * K, (replica + 1) * K), and the R =
world / K replicas split --batch-size as DDP's ranks do (each replica reads the data stream's shard `replica` of R:
every rank of a frame group sees the same clips, noise and times). Each rank runs the loss module on the whole clip
with the model wrapped by `frame_parallel` in its drop-in convention: the input is sharded by frames inside the
model, the output gathered, and every rank of the group computes the same loss, equal to one process's on the
replica's batch (so the logged mean over ranks is the mean over replicas, as under DDP). In backward each rank's
parameter gradients are its frames' share; at the end of backward they are summed over the frame group and
averaged over the replicas (`FrameParallel.all_reduce_gradients(data_group=...)`), which gives DDP's gradient of
the global batch. Every rank then clips and steps the same gradients from the same weights, so the weights, AdamW
and the EMA stay equal on all ranks, and rank 0 writes checkpoints (the plain model's state dict: the same format
as any run), samples (its plain model: outside the wrapped call the temporal attention is the plain layer) and the
log. --grad-accum: the inner micro-steps skip the reduction (`no_sync`, as with DDP), the last one reduces the sum.
--gradient-checkpointing works (the recomputed attention makes the same all-to-alls, vdm_fast.parallel).

Dropout, where the model has it, draws each rank's mask for its own frames from the same seed: the masks are not
those of one process, and a run with dropout matches one process statistically, not to rounding.

Refused: --fsdp (it shards the weights over all processes, which frame groups would need to gather as a 2-D mesh),
--compile (the wrapper's collectives are not traced), fewer frames per clip (video + image frames) than K, K not
dividing the world, and --frame-parallel outside torchrun.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from vdm_fast.diffusion import GaussianDiffusion
from vdm_fast.parallel import frame_parallel, mesh
from vdm_fast.train.config import TrainConfig, layout
from vdm_fast.train.distributed import Dist


def frame_size(cfg: TrainConfig, world: int) -> int:
    """K: --frame-parallel-size, or all processes."""
    return cfg.frame_parallel_size or world


def check_launch(cfg: TrainConfig) -> None:
    """What --frame-parallel needs of the launch, checked before the process group forms: torchrun, K dividing the
    world, at least K frames per clip."""
    if not cfg.frame_parallel:
        return
    if not mesh.launched():
        raise ValueError("--frame-parallel splits each clip over several processes: launch it with torchrun "
                         "--nproc_per_node=N -m vdm_fast.train --frame-parallel ... (N processes, e.g. one per GPU)")
    world = mesh.env_world_size()
    k = frame_size(cfg, world)
    mesh.check_frame_size(k, world)
    video = layout(cfg)[0]
    if video + cfg.image_frames < k:
        images = f" + --image-frames {cfg.image_frames}" if cfg.image_frames else ""
        raise ValueError(f"--frames {video}{images}: fewer frames per clip than the {k} processes that split each "
                         "clip; each needs a frame")


def setup(cfg: TrainConfig, d: Dist) -> mesh.Layout:
    """The grid over the formed world (a collective), with `d`'s data shard set to this rank's replica."""
    grid = mesh.make_layout(frame_size(cfg, d.world_size))
    d.replica, d.replicas = grid.replica, grid.replicas
    return grid


class FrameParallelLoss(nn.Module):
    """The loss module of a frame-parallel run, in DDP's place: `module(*args, **kw)` is GaussianDiffusion's loss on
    the frame-parallel model; the backward that follows ends with the gradient reduction (unless in `no_sync()`).
    Rank 0's weights are broadcast at construction, as DDP does."""

    def __init__(self, model: nn.Module, prediction: str, grid: mesh.Layout):
        super().__init__()
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, 0)
        self.grid = grid
        self.parallel = frame_parallel(model, grid.frame_group)
        self.module = GaussianDiffusion(self.parallel, prediction=prediction)
        self._sync = True

    def forward(self, *args, **kwargs) -> torch.Tensor:
        loss = self.module(*args, **kwargs)
        if self._sync and loss.requires_grad:
            loss.register_hook(self._queue_reduction)
        return loss

    def _queue_reduction(self, grad: torch.Tensor) -> torch.Tensor:
        # The loss's gradient comes first in backward; the reduction must wait until every parameter's has
        # accumulated: the engine's end-of-backward callback (what DDP and FSDP use).
        torch.autograd.Variable._execution_engine.queue_callback(self._reduce)
        return grad

    def _reduce(self) -> None:
        self.parallel.all_reduce_gradients(data_group=self.grid.data_group)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate this micro-step's gradients without reducing them (the last micro-step reduces the sum)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True
