"""Multi-process execution of one model: frame parallelism (a video's frames across ranks, exact) and batch
parallelism (e.g. the two classifier-free-guidance branches on two ranks). See frame_parallel.py."""

from vdm_fast.parallel.frame_parallel import (
    BatchParallel,
    FrameParallel,
    batch_parallel,
    frame_parallel,
    frame_shards,
)

__all__ = ["BatchParallel", "FrameParallel", "batch_parallel", "frame_parallel", "frame_shards"]
