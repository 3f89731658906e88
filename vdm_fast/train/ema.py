"""EMA: an exponential moving average of a model's weights, for any training loop.

    ema = EMA(model, decay=0.999)
    for batch in data:
        loss = ...; loss.backward(); optimizer.step()
        ema.update(model)                  # after every optimizer step
    ema.module(x)                          # the averaged model (eval mode, no gradients)
    torch.save(ema.state_dict(), ...)      # {"module": ..., "updates": n}; ema.load_state_dict(...) restores it

After update n (n = 1, 2, ...) every floating-point tensor of the state dict (parameters and floating buffers) is

    ema <- d_n * ema + (1 - d_n) * model,    d_n = min(decay, (1 + n) / (10 + n)),

the warm-up keeps the first updates from averaging in the random initial weights for thousands of steps. Integer
buffers (counters) are not averaged; they keep the copy's value. The copy is made once, at construction (a deepcopy
of `model`, so build the EMA after moving the model to its device and before wrapping it in DDP or torch.compile).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """An exponential moving average copy of `model` (see the module docstring for the update rule)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        """d_n of the next update."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Average `model`'s current weights in (model must have the copy's architecture)."""
        d = self.current_decay()
        self.updates += 1
        ema = [p for p in self.module.state_dict().values() if p.is_floating_point()]
        new = [p for p in model.state_dict().values() if p.is_floating_point()]
        if len(ema) != len(new):
            raise ValueError(f"model has {len(new)} floating tensors, the EMA copy {len(ema)}: not the same model")
        torch._foreach_lerp_(ema, new, 1.0 - d)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
