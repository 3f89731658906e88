"""Processes for one model run over torchrun's processes: the process group, and a grid of frame groups x replicas.

world = K * R processes (torchrun's WORLD_SIZE), rank = replica * K + frame_rank:
- frame group `replica`: the K consecutive ranks [replica * K, (replica + 1) * K). They split each video's frames
  (`frame_parallel` over this group). Consecutive, so that with one process per GPU the all-to-alls, the only
  collectives inside the model, stay on one node as long as K fits it.
- data group `frame_rank`: the R ranks {frame_rank + j * K, j < R}, one per replica. They split the batch of each
  model call in sampling (`batch_parallel`) or average the gradients in training (data parallelism), after each
  frame group has summed its ranks' gradient shares.

Every rank builds every group: torch.distributed.new_group is collective over the whole world and must be called in
the same order everywhere. K == world needs no group of its own (the world is the frame group), R == 1 no data group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process runs under torchrun (its environment names a world) or a process group exists."""
    return (dist.is_available() and dist.is_initialized()) or "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    """The world size before the group exists: the group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank before the group exists (the group's, else torchrun's RANK, else 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def init_process_group(device_kind: str, timeout: float) -> None:
    """The default process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL on GPUs (each process on GPU LOCAL_RANK first), gloo on CPU; every collective waits at most `timeout`
    seconds. A world of one (no WORLD_SIZE, or 1) gets an in-memory store: no port, no rendezvous."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_kind == "cuda":  # NCCL wants each process on its own GPU before the group forms
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    limit = datetime.timedelta(seconds=timeout)
    if world <= 1:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=limit)
    else:
        dist.init_process_group(backend=backend, init_method="env://", timeout=limit)


@dataclass
class Layout:
    """This rank's place in the grid (see the module docstring). Groups are None where the world itself serves
    (frame_group with K == world) or where there is nothing to split (data_group with R == 1)."""

    world: int
    rank: int
    frame_size: int  # K
    frame_group: object = None
    data_group: object = None

    @property
    def replicas(self) -> int:  # R
        return self.world // self.frame_size

    @property
    def replica(self) -> int:
        return self.rank // self.frame_size

    @property
    def frame_rank(self) -> int:
        return self.rank % self.frame_size


def check_frame_size(frame_size: int, world: int, option: str = "--frame-parallel-size") -> None:
    """K divides the world: ValueError naming the option otherwise."""
    if isinstance(frame_size, bool) or not isinstance(frame_size, int) or frame_size < 1:
        raise ValueError(f"{option} must be a positive integer, got {frame_size!r}")
    if world % frame_size:
        raise ValueError(f"{option} {frame_size} must divide the {world} processes (world = {option} x replicas)")


def make_layout(frame_size: int) -> Layout:
    """The grid for K = `frame_size` over the initialized world (a collective: every rank calls it)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_frame_size(frame_size, world)
    layout = Layout(world, rank, frame_size)
    replicas = world // frame_size
    if frame_size < world:
        for replica in range(replicas):
            group = dist.new_group(list(range(replica * frame_size, (replica + 1) * frame_size)))
            if replica == layout.replica:
                layout.frame_group = group
    if replicas > 1:
        for frame_rank in range(frame_size):
            group = dist.new_group(list(range(frame_rank, world, frame_size)))
            if frame_rank == layout.frame_rank:
                layout.data_group = group
    return layout
