"""Frame parallelism: one video split by frames across the ranks of a torch.distributed group, exactly.

In the factorized U-Net every layer but one is local to a frame: the 1x3x3 convolutions, the per-frame
GroupNorm + SiLU (statistics over each frame's (C / G, H, W)), the spatial attention over each frame's positions,
the FiLM conditioning from per-sample embeddings, spatial down/upsampling. Only the temporal attention mixes frames,
and it does so at each spatial position independently. So rank r holds a contiguous shard of frames
[t_r, t_{r+1}) of every activation, and each temporal attention is wrapped in one all-to-all in and one out (the
Ulysses scheme, over positions instead of heads):

    (B, C, T_r, H, W) on rank r  --all_to_all-->  (B, C, T, P_r) on rank r  (P_r: a contiguous shard of H*W)
    attention over all T frames at P_r positions, with the global frame indices (relative position bias,
    joint image-video mask)
    (B, C, T, P_r)               --all_to_all-->  (B, C, T_r, H, W)

Each rank computes the same arithmetic on the same numbers as one process would, only on fewer of them; results
equal a single process to fp32 rounding (a matmul over fewer rows may block its reduction differently). Shards are
as even as possible, the first T mod world ranks one frame longer (`frame_shards`); T must be >= the world size.

Calling conventions (`FrameParallel.forward`):
- drop-in: the full (B, C, T, H, W) input on every rank, the full output on every rank (gathered);
- sharded (`sharded=True`, with `num_frames=T`): rank r passes its (B, C, T_r, H, W) shard and gets its output shard.

Backward works through both exchanges (the all-to-alls are autograd functions). Each rank's parameter gradients
are the contributions of the frames it computed: `all_reduce_gradients()` sums them over the frame group, which
gives the single-process gradient. In drop-in mode every rank must compute the same loss from the gathered output
(the gather's backward keeps each rank's own frames' gradient and does not sum identical copies); in sharded mode
each rank's loss is its shard's share of the total (the sum over ranks is the loss). Combined with data parallelism
over a second set of ranks: build one frame group per data-parallel replica (`mesh.make_layout(K)` builds the grid of
frame groups x replicas) and pass `data_group=` to `all_reduce_gradients`, which averages over it after summing over
the frame group (flattened into buckets: a few collectives per step, not one per parameter).

Gradient checkpointing (Unet3D.enable_gradient_checkpointing) works under the wrapper: a checkpointed block is
recomputed in backward, after forward() has cleared the call's state, so every module holding a temporal attention
carries the model's RECOMPUTE_STATE hook, which captures the call's frame shards, positions and mask at forward time
and restores them for the recomputation. The recomputed attention then makes the same all-to-alls as in forward;
every rank runs the same backward graph, so all ranks recompute the same blocks in the same order and the
collectives pair up. (Under torch.compile the model checkpoints without the hook: the wrapper does not support
compilation.)

`batch_parallel` splits the batch instead: classifier-free guidance runs its conditional and unconditional halves
(one batched call in GaussianDiffusion) on two ranks and gathers the result.

The command lines build on this: `torchrun -m vdm_fast.sample --frame-parallel` / `--cfg-parallel` (vdm_fast.sample)
and `torchrun -m vdm_fast.train --frame-parallel` (vdm_fast.train.frame_parallel), over the grid of frame groups x
replicas of vdm_fast.parallel.mesh.

Noise is never drawn here: GaussianDiffusion.sample on a wrapped model draws on every rank from the generator it is
given, so equal seeds give equal noise and every rank holds the same sample.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from vdm_fast.layers.group_norm_silu import GroupNormSiLU
from vdm_fast.layers.rel_pos_bias import RelativePositionBias
from vdm_fast.layers.spatial_attention import SpatialAttention
from vdm_fast.layers.temporal_attention import TemporalAttention
from vdm_fast.model import blocks, embeddings, unet3d

_MARK = "_vdm_fast_frame_parallel"


def frame_shards(num_frames: int, world: int) -> list[int]:
    """Contiguous shard lengths of `num_frames` over `world` ranks, the first num_frames % world one longer."""
    base, extra = divmod(num_frames, world)
    return [base + (r < extra) for r in range(world)]


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("frame_parallel needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


class _State:
    """What the wrapped temporal attentions need to know about the current call: the frame shard lengths and the
    global frame indices / joint mask. Set by FrameParallel.forward for the duration of one call."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.shards: list[int] | None = None
        self.frames: dict = {}

    def capture(self):
        """A context manager that re-establishes this call's state (for a checkpointed block's recomputation)."""
        return self._restore(self.shards, self.frames)

    @contextlib.contextmanager
    def _restore(self, shards, frames):
        saved = self.shards, self.frames
        self.shards, self.frames = shards, frames
        try:
            yield
        finally:
            self.shards, self.frames = saved


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single along dim 0 with the given split sizes; its backward is the all-to-all with the splits
    swapped. (torch.distributed.nn.functional's version is deprecated; the functional collectives' one is private.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange_to_positions(x: torch.Tensor, shards: list[int], state: _State) -> tuple[torch.Tensor, list[int]]:
    """(B, C, T_r, H, W) frame shard -> (B, C, T, P_r, 1): every frame at this rank's shard of the H*W positions."""
    b, c, t_r, h, w = x.shape
    pos = frame_shards(h * w, state.world)
    send = x.permute(3, 4, 2, 0, 1).reshape(h * w * t_r, b, c)  # rows (position, frame): a chunk per rank
    recv = _AllToAll.apply(send, [pos[state.rank] * t for t in shards], [p * t_r for p in pos], state.group)
    chunks = [piece.view(pos[state.rank], t, b, c) for piece, t in zip(recv.split([pos[state.rank] * t
                                                                                    for t in shards]), shards)]
    return torch.cat(chunks, dim=1).permute(2, 3, 1, 0).unsqueeze(-1), pos


def _exchange_to_frames(y: torch.Tensor, shards: list[int], pos: list[int], hw: tuple[int, int],
                        state: _State) -> torch.Tensor:
    """The inverse: (B, C, T, P_r, 1) -> (B, C, T_r, H, W)."""
    b, c, t, p_r, _ = y.shape
    t_r = shards[state.rank]
    send = y.squeeze(-1).permute(2, 3, 0, 1).reshape(t * p_r, b, c)  # rows (frame, position)
    recv = _AllToAll.apply(send, [t_r * p for p in pos], [s * p_r for s in shards], state.group)
    chunks = [piece.view(t_r, p, b, c) for piece, p in zip(recv.split([t_r * p for p in pos]), pos)]
    return torch.cat(chunks, dim=1).permute(2, 3, 0, 1).reshape(b, c, t_r, *hw)


def _parallel_temporal_forward(module: TemporalAttention, state: _State, x: torch.Tensor,
                               positions: torch.Tensor | None = None, num_video_frames: int | None = None):
    if state.shards is None:  # called outside FrameParallel.forward: the plain layer
        return type(module).forward(module, x, positions=positions, num_video_frames=num_video_frames)
    h, w = x.shape[-2:]
    gathered, pos = _exchange_to_positions(x, state.shards, state)
    # fewer positions than ranks at this resolution: a rank with none has nothing to attend over
    out = type(module).forward(module, gathered, **state.frames) if pos[state.rank] > 0 else gathered
    return _exchange_to_frames(out, state.shards, pos, (h, w), state)


def _all_gather(x: torch.Tensor, shards: list[int], dim: int, state: _State) -> torch.Tensor:
    """Every rank's shard of x concatenated along `dim` (shards padded to the longest for all_gather)."""
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, max(shards) - x.shape[dim]]
    padded = torch.nn.functional.pad(x, pad).contiguous()
    parts = [torch.empty_like(padded) for _ in shards]
    dist.all_gather(parts, padded, group=state.group)
    return torch.cat([p.narrow(dim, 0, t) for p, t in zip(parts, shards)], dim=dim)


class _Shard(torch.autograd.Function):
    """This rank's shard (along `dim`) of the full input. Backward: every rank's shard's input gradient gathered, so
    that the full input gets the whole gradient on every rank (as a single process would give it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shards: list[int], dim: int, state: _State):
        ctx.shards, ctx.dim, ctx.state = shards, dim, state
        return x.narrow(dim, sum(shards[:state.rank]), shards[state.rank])

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.shards, ctx.dim, ctx.state), None, None, None


class _Gather(torch.autograd.Function):
    """All ranks' shards concatenated along `dim`. Backward: this rank's own shard's slice of the gradient (every
    rank computed the same loss from the same gathered tensor, so summing the copies would count it world times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shards: list[int], dim: int, state: _State):
        ctx.start, ctx.length, ctx.dim = sum(shards[:state.rank]), shards[state.rank], dim
        return _all_gather(x, shards, dim, state)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.length), None, None, None


# Modules the wrapper knows to be local to each frame (or handled: TemporalAttention). Anything else with
# parameters or a forward of its own might mix frames, and is refused.
_FRAME_LOCAL = (nn.Linear, nn.SiLU, nn.Identity, nn.Dropout, nn.Embedding, nn.Sequential, nn.ModuleList,
                nn.ModuleDict)


def _why_not_frame_local(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv3d):
        if module.kernel_size[0] != 1 or module.stride[0] != 1 or module.padding[0] != 0:
            return f"a Conv3d with temporal kernel/stride/padding {module.kernel_size[0]}/{module.stride[0]}/" \
                   f"{module.padding[0]} mixes frames"
        return None
    if isinstance(module, GroupNormSiLU):
        return None if module.per_frame else "a GroupNormSiLU with per_frame=False normalizes over all frames"
    if isinstance(module, nn.GroupNorm):
        return "an nn.GroupNorm on (B, C, T, H, W) normalizes over all frames"
    known = _FRAME_LOCAL + (TemporalAttention, SpatialAttention, RelativePositionBias)
    known += tuple(v for m in (blocks, embeddings, unet3d) for v in vars(m).values()
                   if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == m.__name__)
    if type(module) in known:
        return None
    return f"{type(module).__name__} is not a layer frame_parallel knows to be local to each frame"


def _all_ranks_ok(model: nn.Module, group, ok: bool) -> bool:
    """True when `ok` holds on every rank of `group` (and, first, of the wrapped model's own group, for nested
    wrappers): one MIN all-reduce of a flag, on the device the group's backend reduces on. GaussianDiffusion's CUDA
    graph loop calls it after each rank's capture attempt: a rank replaying a graph while another steps eagerly
    would issue its collectives in a different order, so either every rank replays or none does."""
    inner = getattr(model, "all_ranks_ok", None)
    if inner is not None:
        ok = inner(ok)
    nccl = dist.get_backend(group) == "nccl"
    flag = torch.tensor([1 if ok else 0], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class FrameParallel(nn.Module):
    """A model run with its frames split across a process group (see the module docstring)."""

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        rank, world = _group_info(group)
        for name, m in model.named_modules():
            reason = _why_not_frame_local(m)
            if reason:
                raise ValueError(f"model: frame_parallel cannot split {name or 'the model'} by frames: {reason}")
        self.model = model
        self._state = _State(group, rank, world)
        self.attentions = 0
        for m in model.modules():
            if isinstance(m, TemporalAttention):
                if _MARK in m.__dict__:
                    raise ValueError("model: its temporal attention layers are already frame-parallel")
                m.__dict__["forward"] = functools.partial(_parallel_temporal_forward, m, self._state)
                m.__dict__[_MARK] = True
                self.attentions += 1
        # Gradient checkpointing recomputes a block in backward, after forward() has cleared the call's state: each
        # module holding a temporal attention (what the model may checkpoint) captures it for its recomputation.
        for m in model.modules():
            if any(isinstance(sub, TemporalAttention) for sub in m.modules()):
                m.__dict__[unet3d.RECOMPUTE_STATE] = self._state.capture

    @property
    def rank(self) -> int:
        return self._state.rank

    @property
    def world_size(self) -> int:
        return self._state.world

    def all_ranks_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank of the frame group (see `_all_ranks_ok`)."""
        return _all_ranks_ok(self.model, self._state.group, ok)

    def shard_of(self, num_frames: int) -> slice:
        """The frames this rank computes, of a video of `num_frames`."""
        shards = frame_shards(num_frames, self._state.world)
        start = sum(shards[:self._state.rank])
        return slice(start, start + shards[self._state.rank])

    def forward(self, x: torch.Tensor, *args, positions: torch.Tensor | None = None,
                num_video_frames: int | None = None, sharded: bool = False, num_frames: int | None = None,
                **kwargs) -> torch.Tensor:
        st = self._state
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"x must be a (B, C, T, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if sharded:
            if not isinstance(num_frames, int) or isinstance(num_frames, bool):
                raise TypeError("num_frames (the whole video's T) is required with sharded=True")
            total = num_frames
        else:
            if num_frames not in (None, x.shape[2]):
                raise ValueError(f"num_frames ({num_frames}) must equal x's T ({x.shape[2]}) for the full input")
            total = x.shape[2]
        if total < st.world:
            raise ValueError(f"x has {total} frames, fewer than the {st.world} ranks of the frame-parallel group")
        shards = frame_shards(total, st.world)
        mine = self.shard_of(total)
        if sharded and x.shape[2] != shards[st.rank]:
            raise ValueError(f"x: rank {st.rank} must pass frames {mine.start}..{mine.stop - 1} "
                             f"({shards[st.rank]} of {total}), got {x.shape[2]} frames")
        local = x if sharded else _Shard.apply(x, shards, 2, st)
        if positions is not None:
            if not isinstance(positions, torch.Tensor) or positions.shape[-1] != total:
                raise ValueError(f"positions must hold the whole video's {total} frame indices, "
                                 f"got {getattr(positions, 'shape', positions)}")
        st.shards, st.frames = shards, dict(positions=positions, num_video_frames=num_video_frames)
        try:
            out = self.model(local, *args, **kwargs)
        finally:
            st.shards, st.frames = None, {}
        return out if sharded else _Gather.apply(out, shards, 2, st)

    def all_reduce_gradients(self, data_group=None, bucket_bytes: int = 64 << 20) -> None:
        """Sum every parameter gradient over the frame group (each rank holds its frames' share), then average over
        `data_group` if given (data parallelism over frame-parallel replicas). Gradients travel flattened in buckets
        of about `bucket_bytes` (one collective per bucket and group, not per parameter)."""
        grads = []
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must join each collective in the same order
            grads.append(p.grad)
        bucket, size = [], 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            nxt = grads[i + 1] if i + 1 < len(grads) else None
            if nxt is None or size >= bucket_bytes or (nxt.dtype, nxt.device) != (g.dtype, g.device):
                self._reduce_bucket(bucket, data_group)
                bucket, size = [], 0

    def _reduce_bucket(self, grads: list[torch.Tensor], data_group) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1)
        dist.all_reduce(flat, group=self._state.group)
        if data_group is not None:
            dist.all_reduce(flat, group=data_group)
            flat /= dist.get_world_size(data_group)
        if len(grads) > 1 or flat.data_ptr() != grads[0].data_ptr():
            for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(piece.view_as(g))

    def unwrap(self) -> nn.Module:
        """Undo the wrapping: the model's temporal attentions become plain layers again; returns the model."""
        for m in self.model.modules():
            m.__dict__.pop(unet3d.RECOMPUTE_STATE, None)
            if m.__dict__.pop(_MARK, None):
                m.__dict__.pop("forward", None)
        return self.model


def frame_parallel(model: nn.Module, group=None) -> FrameParallel:
    """Wrap `model` (a Unet3D, or a model built of vdm_fast's layers) to run with its frames split over `group`
    (default: the whole world). Call it in every rank of the group, with the same model weights on each."""
    return FrameParallel(model, group)


class BatchParallel(nn.Module):
    """`model` with the batch split across the ranks of `group` and the output gathered on every rank: for
    classifier-free guidance, GaussianDiffusion's one batched call of (conditional, unconditional) halves runs
    each half on its own rank of a 2-rank group. The batch must divide by the world size. Tensor arguments with the
    batch's length are split (a 1-D `positions` holds frame indices, not one per sample, and is not). Gradients flow
    to x as with one process (reconstruction guidance differentiates the prediction with respect to z), when every
    rank computes the same loss from the gathered output."""

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        rank, world = _group_info(group)
        self.model, self.group, self.rank, self.world = model, group, rank, world
        self._state = _State(group, rank, world)

    def all_ranks_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank of the group, the wrapped model's group included (see `_all_ranks_ok`)."""
        return _all_ranks_ok(self.model, self.group, ok)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b = x.shape[0]
        if b % self.world:
            raise ValueError(f"x: a batch of {b} does not split over the {self.world} ranks of the group")
        n = b // self.world
        part = slice(self.rank * n, (self.rank + 1) * n)

        def split(v, name=None):
            if name == "positions" and isinstance(v, torch.Tensor) and v.dim() == 1:
                return v
            return v[part] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v

        shards = [n] * self.world
        out = self.model(_Shard.apply(x, shards, 0, self._state), split(logsnr), *(split(a) for a in args),
                         **{k: split(v, k) for k, v in kwargs.items()})
        return _Gather.apply(out, shards, 0, self._state)


def batch_parallel(model: nn.Module, group=None) -> BatchParallel:
    """Wrap `model` so each rank of `group` runs its share of the batch (e.g. one classifier-free-guidance branch)."""
    return BatchParallel(model, group)
