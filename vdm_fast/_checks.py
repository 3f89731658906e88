"""Argument checks shared by the ops: bad input raises TypeError or ValueError naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(x, name: str, *, ndim: int | Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None,
           floating: bool = False, integer: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16 or fp64), got {x.dtype}")
    if integer and x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(x.shape)}")
    return x


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def shape(x: torch.Tensor, name: str, expected: Sequence[int], what: str = "") -> None:
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(x.shape)}")


def positive_int(v, name: str, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def one_of(value, name: str, choices):
    """value must be one of choices (TypeError for a non-str where choices are strs, ValueError otherwise)."""
    if value in choices and (value is None or isinstance(value, str)):
        return value
    if value is not None and not isinstance(value, str) and all(isinstance(c, str) for c in choices):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}, got {type(value).__name__}")
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def number(v, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] ((lo, hi] with lo_open); bool is not a number. Returns it as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name} must be a finite number in {rng}, got {v}")
    return v


def finite(t: torch.Tensor, name: str, *, lo: float | None = None, hi: float | None = None) -> None:
    """t (floating) holds no NaN or Inf, and lies in [lo, hi] where given: ONE min/max reduction and one host sync
    (NaN propagates into both ends, an Inf shows in one)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo_t, hi_t = torch.aminmax(t.detach())
    mn, mx = torch.stack([lo_t, hi_t]).double().tolist()
    if not (math.isfinite(mn) and math.isfinite(mx)):
        raise ValueError(f"{name} holds NaN or Inf values")
    if (lo is not None and mn < lo) or (hi is not None and mx > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in [{mn:.4g}, {mx:.4g}]")
