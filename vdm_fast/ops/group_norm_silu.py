"""group_norm_silu: GroupNorm + FiLM + SiLU fused, the normalization of every residual block of the video U-Net.

Reference: vdm_fast/reference/group_norm_silu.py. Fast code: kernels/group_norm_silu.py (Triton, forward and
backward). Tests: tests/test_group_norm_silu.py.
"""

from __future__ import annotations

import functools
import math

import torch

from vdm_fast import _checks, _dispatch
from vdm_fast import reference as ref
from vdm_fast.reference.group_norm_silu import memory_format

SPEC = _dispatch.OpSpec("group_norm_silu", triton=True)
ACTIVATIONS = ("silu", None)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = "silu",
    per_frame: bool = False,
) -> torch.Tensor:
    """y = act(group_norm(x) * (1 + scale) + shift), the group norm including its (weight, bias) affine.

    x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); contiguous or channels_last(_3d) (other strides are copied);
    fp32, fp16, bf16 (fp64 runs the reference). Statistics over each group of C / num_groups channels and all spatial
    positions, as nn.GroupNorm, in fp32. per_frame=True on 5-D input: over each group of each frame (dims H, W),
    as if the T frames were a batch of images; on 3-D and 4-D input the whole input is one frame (no effect).
    weight, bias: optional (C,). scale, shift: optional (B, C) FiLM. activation: "silu" or None.
    Returns y with x's shape, dtype and memory format. The backward gives every gradient and is deterministic.
    """
    compiling = torch.compiler.is_compiling()  # traced once: the checks, then the one op Dynamo and Inductor see
    if compiling:
        _check(x, num_groups, weight, bias, eps, scale, shift, activation, per_frame)
    else:
        entry = _entry(x, num_groups, weight, bias, eps, scale, shift, activation, per_frame)  # checks, cached
    impl = _dispatch.select(SPEC, x.device, x.dtype)
    if impl == "reference":
        return ref.group_norm_silu(x, num_groups, weight, bias, eps, scale=scale, shift=shift, activation=activation,
                                   per_frame=per_frame)
    if compiling:
        return torch.ops.vdm_fast.group_norm_silu(x, num_groups, weight, bias, float(eps), scale, shift,
                                                  activation == "silu", per_frame, impl)[0]
    return _fused(entry, x, weight, bias, scale, shift)


# Validated call signatures -> _Entry (the checks' outcome and the kernels' Launcher).
_CALLS = _dispatch.CallCache()


class _Entry:
    """One validated call signature: the kernel-side scalars, and the Launcher (built on the first fast call, so the
    reference path never imports Triton)."""

    __slots__ = ("num_groups", "eps", "silu", "per_frame", "_launcher")

    def __init__(self, num_groups, eps, silu, per_frame):
        self.num_groups, self.eps, self.silu, self.per_frame = num_groups, float(eps), silu, per_frame
        self._launcher = None

    def launcher(self, x, weight, bias, scale, shift):
        if self._launcher is None:
            self._launcher = _kernels().Launcher(x, self.num_groups, weight, bias, scale, shift, self.eps, self.silu,
                                                 self.per_frame)
        return self._launcher


def _entry(x, num_groups, weight, bias, eps, scale, shift, activation, per_frame) -> _Entry:
    """The call's entry: looked up by everything `_check` reads (a hit skips it), else checked and built."""
    try:
        key = (type(num_groups), num_groups, type(eps), eps, activation, type(per_frame), per_frame,
               *_dispatch.tensor_key(x, weight, bias, scale, shift))
    except AttributeError:  # a non-tensor where a tensor belongs: _check names it
        key = None
    entry = _CALLS.get(key)
    if entry is None:
        _check(x, num_groups, weight, bias, eps, scale, shift, activation, per_frame)
        entry = _CALLS.put(key, _Entry(num_groups, eps, activation == "silu", per_frame))
    return entry


def _check(x, num_groups, weight, bias, eps, scale, shift, activation, per_frame) -> None:
    _checks.tensor(x, "x", ndim=(3, 4, 5), floating=True)
    B, C = x.shape[:2]
    _checks.positive_int(num_groups, "num_groups")
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the {C} channels of x (shape {tuple(x.shape)})")
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("scale", scale, (B, C)),
                           ("shift", shift, (B, C))):
        if t is not None:
            _checks.tensor(t, name, floating=True)
            _checks.shape(t, name, shape, "(C,) per channel" if len(shape) == 1 else "(B, C) per sample and channel")
    _checks.same_device(x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    _checks.one_of(activation, "activation", ACTIVATIONS)
    if not isinstance(per_frame, bool):
        raise TypeError(f"per_frame must be a bool, got {type(per_frame).__name__}")


def frames(x: torch.Tensor, per_frame: bool) -> int:
    """How many frames get their own statistics: T with per_frame on 5-D input, else 1."""
    return x.shape[2] if per_frame and x.dim() == 5 else 1


@functools.cache  # an import statement per call costs about a tenth of an eager aten dispatch
def _kernels():
    # Imported on first use, not at module level: the kernel module imports triton, an optional dependency.
    from vdm_fast.kernels import group_norm_silu as k

    return k


def _fused(entry, x, weight, bias, scale, shift):
    """The eager fast path: a torch.autograd.Function that launches the kernels directly (a few microseconds of
    host work), or no autograd node at all where nothing needs a gradient. (Under torch.compile the caller takes
    the torch.library op instead.)"""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (scale is not None and scale.requires_grad)
                                    or (shift is not None and shift.requires_grad)):
        return _APPLY(x, weight, bias, scale, shift, entry)
    return entry.launcher(x, weight, bias, scale, shift).forward(x, weight, bias, scale, shift)[0]


def _double_backward_grads(dy, x, weight, bias, scale, shift, num_groups, eps, silu, per_frame, needs):
    """First-order gradients that are themselves differentiable (create_graph=True: gradient penalties, higher-order
    guidance): the reference's autograd graph rebuilt on the saved inputs. The kernels' backward is not
    differentiable; this is, at the reference's cost."""
    inputs = (x, weight, bias, scale, shift)
    with torch.enable_grad():
        y = ref.group_norm_silu(x, num_groups, weight, bias, eps, scale=scale, shift=shift,
                                activation="silu" if silu else None, per_frame=per_frame)
        wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
        got = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True)) if wanted else iter(())
    return tuple(next(got) if n and t is not None else None for t, n in zip(inputs, needs))


class _GroupNormSiLU(torch.autograd.Function):
    """Eager autograd wiring of the fast path (see `_fused`); the same kernels as the custom op's."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, entry):
        launcher = entry.launcher(x, weight, bias, scale, shift)
        y, stats = launcher.forward(x, weight, bias, scale, shift)
        ctx.save_for_backward(x, stats, weight, bias, scale, shift)
        ctx.entry = entry
        return y

    @staticmethod
    def backward(ctx, dy):
        x, stats, weight, bias, scale, shift = ctx.saved_tensors
        entry = ctx.entry
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            grads = _double_backward_grads(dy, x, weight, bias, scale, shift, entry.num_groups, entry.eps,
                                           entry.silu, entry.per_frame, needs[:5])
        else:
            grads = entry.launcher(x, weight, bias, scale, shift).backward(dy, x, stats, weight, bias, scale, shift)
        dx, dw, db, ds, dsh = grads
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
                ds if needs[3] else None, dsh if needs[4] else None, None)


@torch.library.custom_op("vdm_fast::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    scale: torch.Tensor | None, shift: torch.Tensor | None, silu: bool, per_frame: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, stats): y in x's dtype and memory format, stats (B, G, F, 2) fp32 (mean, rstd) for the backward."""
    _dispatch.check_impl(SPEC, impl)
    entry = _entry(x, num_groups, weight, bias, eps, scale, shift, "silu" if silu else None, per_frame)
    return entry.launcher(x, weight, bias, scale, shift).forward(x, weight, bias, scale, shift)


@_group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, silu, per_frame, impl):
    y = torch.empty_like(x, memory_format=memory_format(x))
    return y, x.new_empty((x.shape[0], num_groups, frames(x, per_frame), 2), dtype=torch.float32)


@torch.library.custom_op("vdm_fast::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(
    dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, num_groups: int,
    weight: torch.Tensor | None, bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
    silu: bool, per_frame: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias, dscale, dshift), each like its input; an absent input's gradient is empty (0,)."""
    _dispatch.check_impl(SPEC, impl)
    grads = _kernels().backward(dy, x, stats, num_groups, weight, bias, scale, shift, silu, per_frame)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_group_norm_silu_backward_op.register_fake
def _(dy, x, stats, num_groups, weight, bias, scale, shift, silu, per_frame, impl):
    dx = torch.empty_like(x, memory_format=memory_format(x))
    return (dx,) + tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None
                         else x.new_empty(0) for t in (weight, bias, scale, shift))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, scale, shift, silu, per_frame, impl = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, stats, weight, bias, scale, shift)
    ctx.args = (num_groups, eps, silu, per_frame, impl)


def _backward(ctx, dy, _dstats):
    x, stats, weight, bias, scale, shift = ctx.saved_tensors
    num_groups, eps, silu, per_frame, impl = ctx.args
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4], *ctx.needs_input_grad[5:7])
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients through the reference
        dx, dw, db, ds, dsh = _double_backward_grads(dy, x, weight, bias, scale, shift, num_groups, eps, silu,
                                                     per_frame, needs)
    else:
        dx, dw, db, ds, dsh = torch.ops.vdm_fast.group_norm_silu_backward(
            dy, x, stats, num_groups, weight, bias, scale, shift, silu, per_frame, impl)
        present = (weight is not None, bias is not None, scale is not None, shift is not None)
        dw, db, ds, dsh = (g if p else None for g, p in zip((dw, db, ds, dsh), present))
    return dx, None, dw, db, None, ds, dsh, None, None, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)
_APPLY = _dispatch.autograd_apply(_GroupNormSiLU)
