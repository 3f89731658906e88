"""One optimizer step: micro-batches (gradient accumulation), mixed precision, the gradient norm, the update.

With --grad-accum K the local batch of B examples is split in time into K micro-batches of B / K (the same examples
in the same order: the data stream does not change). Each micro-batch's loss is its mean over its examples, so

    grad = sum_k grad(loss_k) / K = grad(mean loss over the B examples)

is the gradient of one K times larger step, to fp32 rounding (the sum runs in another order). Under DDP the inner
micro-steps run in `no_sync()`: gradients are all-reduced once, with the last micro-batch's backward; under FSDP
they run with `set_requires_gradient_sync(False)`: one reduce-scatter, with the last micro-batch's backward.

Precision: fp32; bf16 autocast; fp16 autocast with a GradScaler (the loss is scaled up so that fp16 gradients do not
underflow; a step whose unscaled gradients overflow is skipped by the scaler, which halves its scale; it is the
scaler's normal operation, not divergence).

A step is *applied* only when the loss and the gradient norm are finite (on every rank: the decision is all-reduced
so that DDP ranks never disagree); otherwise the gradients are dropped, the weights, optimizer state and EMA stay as
they were, and the trainer counts the step as skipped (an fp16 overflow only once the scale is down to 1: above, it
is the scaler's search). Deciding costs one host synchronisation per step, the price of never applying a NaN.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vdm_fast.train import fsdp
from vdm_fast.train.config import TrainConfig, lr_at
from vdm_fast.train.distributed import Dist, all_min


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss over the local batch (fp32, detached)
    grad_norm: float  # before clipping; NaN/Inf when the step was skipped for it
    applied: bool  # the optimizer stepped
    overflow: bool = False  # fp16: the scaler skipped the step (finite loss, gradients overflowing at a scale > 1)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp16":
        return torch.float16
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def make_scaler(cfg: TrainConfig, device: torch.device):
    if cfg.precision != "fp16":
        return None
    if cfg.fsdp:
        # Each rank sees only its shards' overflow: this scaler all-reduces it, so every rank skips the same steps.
        # Function-level import: FSDP is optional (train.fsdp checks that this torch has it).
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: a float, or filled into the device tensor a capturable AdamW reads (train.graph)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)  # in place: a captured optimizer step reads this tensor's memory
        else:
            g["lr"] = lr


class TrainStep:
    """`step(batch, step_index) -> StepResult` for `module` (the loss module, maybe DDP-wrapped) training `model`."""

    def __init__(self, cfg: TrainConfig, d: Dist, device: torch.device, module, model, optimizer, ema, scaler,
                 num_classes: int, frames: int):
        self.cfg, self.d, self.device = cfg, d, device
        self.module, self.model, self.optimizer, self.ema, self.scaler = module, model, optimizer, ema, scaler
        self.num_classes, self.frames = num_classes, frames
        self.dtype = autocast_dtype(cfg, device)
        self.sharded = fsdp.is_sharded(model)

    def _inputs(self, batch: dict, part: slice, device: torch.device | str | None = None) -> tuple[tuple, dict]:
        cfg, dev = self.cfg, device or self.device
        x = batch["video"][part].to(dev, non_blocking=True)
        kw = {"t": batch["t_u"][part].to(dev, non_blocking=True),
              "noise": batch["noise"][part].to(dev, non_blocking=True), "cond_drop_prob": 0.0}
        if cfg.class_cond:
            kw["cond"] = F.one_hot(batch["label"][part].long(), self.num_classes).float().to(dev)
            kw["cond_mask"] = (batch["drop_u"][part] >= cfg.cond_drop_prob).to(dev)
        if cfg.image_frames:
            kw["num_video_frames"] = self.frames
        return (x,), kw

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def __call__(self, batch: dict, step: int) -> StepResult:
        cfg = self.cfg
        k = cfg.grad_accum
        n = len(batch["video"])
        if n % k:
            raise ValueError(f"the local batch ({n}) must be divisible by --grad-accum ({k})")
        set_lr(self.optimizer, lr_at(cfg, step))
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i in range(k):
            part = slice(i * n // k, (i + 1) * n // k)
            args, kw = self._inputs(batch, part)
            inner = i < k - 1
            if self.sharded:  # FSDP: no reduce-scatter on the inner micro-steps (gradients accumulate unsharded)
                self.model.set_requires_gradient_sync(not inner)
            with self.module.no_sync() if inner and hasattr(self.module, "no_sync") else contextlib.nullcontext():
                with self._autocast():
                    loss = self.module(*args, **kw)
                losses.append(loss.detach().float())
                scaled = loss / k if k > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        loss = torch.stack(losses).mean() if k > 1 else losses[0]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # max_norm=inf multiplies by exactly 1: the norm comes for free, the gradients stay bitwise as they were.
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        # Under FSDP the norm is a DTensor (over every rank's shards): its full value is the global norm.
        norm = fsdp.full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        ok = all_min(self.d, torch.stack([torch.isfinite(loss), torch.isfinite(norm)]).to(self.device).float())
        loss_ok, norm_ok = bool(ok[0]), bool(ok[1])
        if self.scaler is not None and loss_ok:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself when the gradients overflowed
            self.scaler.update()
            if not norm_ok:
                self.optimizer.zero_grad(set_to_none=True)
                # At a scale <= 1 the scaler is no longer the cause: the gradients themselves are not finite.
                return StepResult(loss, float(norm), applied=False, overflow=scale > 1.0)
        elif loss_ok and norm_ok:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, float(norm), applied=False)
        if self.ema is not None:
            self.ema.update(self.model)
        return StepResult(loss, float(norm), applied=True)
