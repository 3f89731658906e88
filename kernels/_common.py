"""What every kernel module and launcher shares: the device guard, dtype names, the interpreter flag, integer helpers.

Imports torch only (never triton), so the dispatcher and the extension wrapper can use it on a machine without Triton.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

# log2(e): kernels take exp via exp2 (one MUFU.EX2 instruction) with arguments pre-scaled by it.
LOG2E = 1.4426950408889634

# The element types the fast paths take, by the names Triton signatures use.
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (TRITON_INTERPRET=1; read at each call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(t: torch.Tensor):
    """Makes t's GPU the current one for a launch (Triton and the extension launch on the current device). A no-op
    context (one shared instance) where it already is, or for CPU tensors: entering torch.cuda.device costs more
    host time than the rest of a launch's bookkeeping, and one GPU per process is the common case."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


_NO_GUARD = contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def log2_int(n: int) -> int:
    assert is_pow2(n), n
    return int(math.log2(n))
