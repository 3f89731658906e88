"""Numerical comparison shared by the tests and the benchmarks (one definition of relative error).

rel_err(out, ref) = ||out - ref||_2 / ||ref||_2, computed in fp64; the absolute norm ||out - ref||_2 where ref is all
zeros (a relative error of an all-zero reference is undefined); inf where out holds a NaN or an infinity, so that
every `err <= tol` comparison fails on non-finite output.
"""

from __future__ import annotations

import contextlib
import math

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in fp64 (inf for non-finite out); 0 for empty tensors."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return (out - ref).abs().max().item()


# Copy-like aten ops: each writes a new copy of (part of) a tensor. contiguous / reshape reach clone or copy_.
COPY_OPS = frozenset({"copy_", "clone", "cat", "stack", "_to_copy", "slice_scatter", "select_scatter",
                      "as_strided_scatter", "constant_pad_nd"})


class CopyCounter:
    """`with CopyCounter() as c: step()`: c.bytes written by copy-like aten ops (COPY_OPS) during step, forward and
    backward alike (a TorchDispatchMode sees every aten op autograd runs), c.ops their names. `c.paused()`: a block
    not counted (a kernel launch under the Triton interpreter, whose own copies are not the caller's)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode  # torch internals: only when counting

        counter = self
        self.bytes, self.ops, self._paused = 0, [], 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if not counter._paused and name in COPY_OPS:
                    t = out if isinstance(out, torch.Tensor) else args[0]
                    counter.bytes += t.numel() * t.element_size()
                    counter.ops.append(name)
                return out

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def paused(self):
        @contextlib.contextmanager
        def block():
            self._paused += 1
            try:
                yield
            finally:
                self._paused -= 1

        return block()
