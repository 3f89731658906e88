"""FSDP2 (`--fsdp`): the weights, gradients, AdamW state and EMA sharded over the processes, for models whose
optimizer state does not fit one GPU.

Memory per process, P parameters in fp32: weights 4P, gradients 4P, AdamW's two moments 8P and the EMA 4P make 20P
bytes under DDP (every rank holds everything); FSDP holds 20P / N on each of N processes, plus the all-gathered
weights of the one block that runs (and, in backward, its unsharded gradients). The 1.17 B `ucf101` preset: 23 GB
per GPU under DDP, 2.9 GB on 8 GPUs under FSDP, before activations.

Layout: `fully_shard` on every `Block` (a residual block and its attention) and on the `MidBlock`, then on the root
(the embedding, the first and last convolutions, the down/up-samplers). Each parameter becomes a DTensor sharded on
dim 0 over a 1-D mesh of all processes; a block's forward all-gathers its weights and frees them after (again in
backward); gradients are reduce-scattered (the mean over ranks, like DDP's all-reduce), so each rank's AdamW steps
its own shard. The update is DDP's to fp32 rounding (the same global batch, reduced in another order).

- EMA: the EMA copy is sharded like the model (each rank averages its own shards: 4P / N bytes); it is gathered
  for checkpoints and preview samples.
- Checkpoints: the same single-file safetensors format as without FSDP. At a save every rank takes part in
  gathering full state dicts (`get_model_state_dict` / `get_optimizer_state_dict`, full_state_dict=True,
  cpu_offload=True: the full copy exists on rank 0's CPU only) and rank 0 writes them; the optimizer state is
  written with `torch.optim`'s integer parameter ids, so a checkpoint resumes with or without --fsdp and loads in a
  single process (`vdm_fast.checkpoint.load`, `Unet3D.load_state_dict`, `AdamW.load_state_dict`). On --resume every
  rank reads the checkpoint and `set_model_state_dict` / `set_optimizer_state_dict` keep its shards: the trajectory
  continues bitwise. Checkpoints with an earlier layout's keys (vdm_fast.model.legacy) are converted before that
  (FSDP's loader matches keys itself, before Unet3D's load would rename them).
- --grad-accum K: the inner micro-steps run with `set_requires_gradient_sync(False)` (gradients accumulate
  unsharded, no reduce-scatter; memory grows by the unsharded gradients for those steps), the last one reduces.
- --precision fp16: a ShardedGradScaler (each rank sees only its shards' overflow; the scaler all-reduces it, so
  every rank skips the same steps). The gradient norm for clipping and the non-finite guard is the global one.
- One process with --fsdp forms a 1-process group (nothing to shard; it runs the same code path, e.g. to check a
  configuration before a multi-GPU job).

FSDP2 is `torch.distributed.fsdp.fully_shard` (torch >= 2.6; `torch.distributed._composable.fsdp` in some 2.6
builds). Where neither exists, or torch has no distributed support, --fsdp is a one-line error.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vdm_fast.model import legacy
from vdm_fast.model.unet3d import Block, MidBlock


def fully_shard_fn():
    """torch's `fully_shard`, or a ValueError naming --fsdp where this torch has none."""
    if not dist.is_available():
        raise ValueError("--fsdp: this torch build has no torch.distributed support; train without --fsdp")
    # Function-level imports: FSDP2 is optional (absent from some builds) and costs import time when unused.
    try:
        from torch.distributed.fsdp import fully_shard  # optional: FSDP2 where this torch has it (>= 2.6)
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # optional: its older home
        except ImportError:
            raise ValueError(f"--fsdp: torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard, "
                             "torch >= 2.6); upgrade torch or use DDP (torchrun without --fsdp)") from None
    return fully_shard


def _state_dict_api():
    # Function-level import: the distributed checkpoint package is only needed (and loaded) under --fsdp.
    from torch.distributed.checkpoint import state_dict as api
    return api


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` (a Unet3D, in place) over all processes of the default group: each Block, the MidBlock, then
    the root. Returns the model (its class becomes FSDP's subclass of Unet3D)."""
    fully_shard = fully_shard_fn()
    # Function-level import: DeviceMesh is part of the optional distributed stack (see fully_shard_fn).
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in list(model.modules()):
        if isinstance(m, (Block, MidBlock)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(module: nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync") and hasattr(module, "unshard")


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "full_tensor")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective); a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _options(**kw):
    return _state_dict_api().StateDictOptions(full_state_dict=True, **kw)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict: a collective under FSDP (rank 0 gets it on the CPU, the others {}); else state_dict()."""
    if not is_sharded(module):
        return module.state_dict()
    return _state_dict_api().get_model_state_dict(module, options=_options(cpu_offload=True))


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it; each keeps its shards). Keys of an earlier Unet3D layout are
    converted first: set_model_state_dict matches the keys itself, before Unet3D's own load would rename them."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    if hasattr(module, "config"):
        state = legacy.convert_state_dict(state, module.config)
    _state_dict_api().set_model_state_dict(module, state, options=_options())


def _names(model: nn.Module) -> list[str]:
    # torch.optim numbers the parameters of its groups in order; the trainer's one group is model.parameters().
    return [n for n, _ in model.named_parameters()]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() of the unsharded model (integer ids): a collective under FSDP, {} off rank 0."""
    if not is_sharded(model):
        return optimizer.state_dict()
    sd = _state_dict_api().get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not sd:
        return {}
    ids = {n: i for i, n in enumerate(_names(model))}
    return {"state": {ids[n]: s for n, s in sd["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer.state_dict() of the unsharded model (integer ids, as checkpoints hold it)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = _names(model)

    def name(i) -> str:
        i = int(i)
        if not 0 <= i < len(names):
            raise ValueError(f"the optimizer state names parameter {i}; the model has {len(names)}")
        return names[i]

    sd = {"state": {name(i): s for i, s in state["state"].items()},
          "param_groups": [{**g, "params": [name(i) for i in g["params"]]} for g in state["param_groups"]]}
    _state_dict_api().set_optimizer_state_dict(model, optimizer, sd, options=_options())
