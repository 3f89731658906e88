"""Processes and devices: torchrun's environment -> a process group (NCCL on GPUs, gloo on CPU) with a timeout.

Every collective (DDP's gradient all-reduce, the per-step agreement, the RNG gather at a save) waits at most
`timeout` seconds for the other processes, so a rank that froze (SIGSTOP, a hung filesystem) ends the job with
`DistributedTimeout` and a one-line message instead of gloo's 30-minute default; the newest checkpoint stays intact
and `--resume` continues from it. A rank that died is noticed by the others at once (its sockets close).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vdm_fast import checkpoint as ckpt
from vdm_fast.parallel import mesh


class DistributedTimeout(RuntimeError):
    """Another process did not answer within --ddp-timeout."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it
    timeout: float = 300.0
    # The data-parallel shard this rank reads, of how many: under DDP the rank and the world; the ranks of a
    # --frame-parallel group share one (train.frame_parallel sets them).
    replica: int | None = None
    replicas: int | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank if self.replica is None else self.replica

    @property
    def data_world(self) -> int:
        return self.world_size if self.replicas is None else self.replicas


def setup_distributed(device_kind: str, timeout: float = 300.0, *, group_of_one: bool = False) -> Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); single process otherwise.
    `group_of_one`: a single process still forms a (1-process, in-memory) group, for FSDP's collectives."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, timeout=timeout)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not group_of_one:
        return Dist(timeout=timeout)
    mesh.init_process_group(device_kind, timeout)  # NCCL or gloo; one process: an in-memory store, no rendezvous
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=True, timeout=timeout)


def device_kind(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested.split(":")[0]


def pick_device(requested: str, d: Dist | None = None) -> torch.device:
    kind = device_kind(requested)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
        index = int(requested.split(":")[1]) if ":" in requested else (d.local_rank if d is not None else 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(kind)


def is_timeout(e: BaseException) -> bool:
    """A collective that gave up waiting (gloo: "Timed out waiting ..."; NCCL's watchdog: "... timeout ...")."""
    text = str(e).lower()
    return isinstance(e, (RuntimeError, dist.DistBackendError)) and ("timed out" in text or "timeout" in text)


def timeout_error(d: Dist, what: str) -> DistributedTimeout:
    return DistributedTimeout(f"rank {d.rank}: the other processes did not answer within --ddp-timeout "
                              f"({d.timeout:g} s) during {what}; a process froze or died. Resume with --resume")


def all_min(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks (so every rank takes the same decision)."""
    if d.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def gather_rng(d: Dist) -> dict:
    """Every rank's RNG states, keyed by rank (a collective: all ranks call it)."""
    mine = ckpt.rng_state()
    if d.world_size == 1:
        return {"0": mine}
    out = [None] * d.world_size
    dist.all_gather_object(out, mine)
    return {str(r): s for r, s in enumerate(out)}


def close(d: Dist, *, clean: bool = True) -> None:
    """Tear the group down; `clean=False` after a failure skips the barrier (a peer may be gone)."""
    if d.owns_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
