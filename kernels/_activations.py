"""Triton device functions shared by the normalization kernels: the SiLU they fuse, and its derivative.

silu(z) = z * sigmoid(z), with the exponential as one exp2 and an approximate division (a few instructions: the
kernels are memory-bound); silu'(z) = sig(z) * (1 + z * (1 - sig(z))). Each kernel selects them with its own
activation bit of its runtime `opt_flags`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from vdm_fast.kernels._common import LOG2E

_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def silu(z):
    return tl.fdiv(z, 1.0 + tl.exp2(-z * _LOG2E), ieee_rounding=False)


@triton.jit
def silu_grad(dy, z):
    """dy * silu'(z)."""
    sig = tl.fdiv(1.0, 1.0 + tl.exp2(-z * _LOG2E), ieee_rounding=False)
    return dy * sig * (1.0 + z * (1.0 - sig))
