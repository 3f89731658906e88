"""Numerical comparison shared by the tests and the benchmarks (one definition of relative error).

rel_err(out, ref) = ||out - ref||_2 / ||ref||_2, computed in fp64; the absolute norm ||out - ref||_2 where ref is all
zeros (a relative error of an all-zero reference is undefined); inf where out holds a NaN or an infinity, so that
every `err <= tol` comparison fails on non-finite output.
"""

from __future__ import annotations

import collections
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
    backward alike (a TorchDispatchMode sees every aten op autograd runs), c.ops their names, and c.by_origin the
    bytes by (phase, where, op): a backward op by its autograd node, a forward op by the innermost submodule of
    `model` running (module hooks while counting: "up.0.blocks.1.res.norm1 (GroupNormSiLU)"; "top level" outside
    them all, or without a model). `c.paused()`: a block not counted (a kernel launch under the Triton interpreter,
    whose own copies are not the caller's)."""

    def __init__(self, model: torch.nn.Module | None = None):
        from torch.utils._python_dispatch import TorchDispatchMode  # torch internals: only when counting

        counter = self
        self.bytes, self.ops, self._paused = 0, [], 0
        self.by_origin: collections.Counter = collections.Counter()
        self._model, self._scope, self._handles = model, [], []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if not counter._paused and name in COPY_OPS:
                    t = out if isinstance(out, torch.Tensor) else args[0]
                    n = t.numel() * t.element_size()
                    counter.bytes += n
                    counter.ops.append(name)
                    node = torch._C._current_autograd_node()
                    where = (("backward", node.name()) if node is not None
                             else ("forward", counter._scope[-1] if counter._scope else "top level"))
                    counter.by_origin[(*where, name)] += n
                return out

        self._mode = _Mode()

    def __enter__(self):
        if self._model is not None:
            def leave(*_):
                self._scope.pop()  # returns None: a forward hook's return value would replace the output

            for name, m in self._model.named_modules():
                if m is not self._model:
                    label = f"{name} ({type(m).__name__})"
                    self._handles.append(m.register_forward_pre_hook(lambda *_, n=label: self._scope.append(n)))
                    self._handles.append(m.register_forward_hook(leave))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._mode.__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def paused(self):
        @contextlib.contextmanager
        def block():
            self._paused += 1
            try:
                yield
            finally:
                self._paused -= 1

        return block()
