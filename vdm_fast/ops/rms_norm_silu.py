"""rms_norm_silu: RMSNorm + FiLM + SiLU fused, the normalization of video-diffusion-pytorch 0.7's residual Block
(also imagen-pytorch's and make-a-video's): F.normalize over channels * sqrt(C) * gamma, then x * (scale + 1) + shift,
then SiLU.

Reference: vdm_fast/reference/rms_norm_silu.py. Fast code: kernels/rms_norm_silu.py (Triton, forward and
backward). Tests: tests/test_rms_norm_silu.py.
"""

from __future__ import annotations

import functools
import math

import torch

from vdm_fast import _checks, _dispatch
from vdm_fast import reference as ref
from vdm_fast.reference.group_norm_silu import memory_format

SPEC = _dispatch.OpSpec("rms_norm_silu", triton=True)
ACTIVATIONS = ("silu", None)


def rms_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-12,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """y = act(x / max(||x||_C, eps) * sqrt(C) * weight * (1 + scale) + shift): video-diffusion-pytorch's
    `RMSNorm` (`F.normalize(x, dim=1) * dim ** 0.5 * gamma`, so eps clamps the norm, F.normalize's default 1e-12)
    followed by the FiLM and the activation.

    x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); contiguous or channels_last(_3d) (other strides are copied);
    fp32, fp16, bf16 (fp64 runs the reference). The norm is over the C channels of each position, in fp32; any C
    (channels wider than a register tile are processed in chunks). weight: optional (C,) (RMSNorm's gamma of shape
    (C, 1, 1, 1), flattened). scale, shift: optional (B, C) FiLM. activation: "silu" or None.
    Returns y with x's shape, dtype and memory format. The backward gives every gradient and is deterministic.
    """
    if torch.compiler.is_compiling():  # traced once
        _check(x, weight, eps, scale, shift, activation)
    else:
        _checked(x, weight, eps, scale, shift, activation)
    impl = _dispatch.select(SPEC, x.device, x.dtype)
    if impl == "reference":
        return ref.rms_norm_silu(x, weight, eps, scale=scale, shift=shift, activation=activation)
    return _fused(x, weight, float(eps), scale, shift, activation == "silu", impl)


# Call signatures whose arguments passed `_check` (the entry is only a marker: the kernels cache their own plans).
_CALLS = _dispatch.CallCache()


def _checked(x, weight, eps, scale, shift, activation) -> None:
    """`_check`, skipped for a signature (everything it reads) that passed before."""
    try:
        key = (type(eps), eps, activation, *_dispatch.tensor_key(x, weight, scale, shift))
    except AttributeError:  # a non-tensor where a tensor belongs: _check names it
        key = None
    if _CALLS.get(key) is None:
        _check(x, weight, eps, scale, shift, activation)
        _CALLS.put(key, True)


def _check(x, weight, eps, scale, shift, activation) -> None:
    _checks.tensor(x, "x", ndim=(3, 4, 5), floating=True)
    B, C = x.shape[:2]
    for name, t, shape in (("weight", weight, (C,)), ("scale", scale, (B, C)), ("shift", shift, (B, C))):
        if t is not None:
            _checks.tensor(t, name, floating=True)
            _checks.shape(t, name, shape, "(C,) per channel" if len(shape) == 1 else "(B, C) per sample and channel")
    _checks.same_device(x=x, weight=weight, scale=scale, shift=shift)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    _checks.one_of(activation, "activation", ACTIVATIONS)


def rstd_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The saved per-position statistic: (B, *spatial)."""
    return (x.shape[0], *x.shape[2:])


@functools.cache  # an import statement per call costs about a tenth of an eager aten dispatch
def _kernels():
    # Imported on first use, not at module level: the kernel module imports triton, an optional dependency.
    from vdm_fast.kernels import rms_norm_silu as k

    return k


def _fused(x, weight, eps, scale, shift, silu, impl):
    """The fast path. Eager: a torch.autograd.Function that launches the kernels directly (a few microseconds of
    host work); under torch.compile (or where nothing needs a gradient: no autograd node at all) the one
    torch.library op, which Dynamo and Inductor see with its fake."""
    if torch.compiler.is_compiling():
        return torch.ops.vdm_fast.rms_norm_silu(x, weight, eps, scale, shift, silu, impl)[0]
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (scale is not None and scale.requires_grad)
                                    or (shift is not None and shift.requires_grad)):
        return _APPLY(x, weight, scale, shift, eps, silu)
    return _kernels().forward(x, weight, scale, shift, eps, silu)[0]


def _double_backward_grads(dy, x, weight, scale, shift, eps, silu, needs):
    """First-order gradients that are themselves differentiable (create_graph=True): the reference's autograd graph
    rebuilt on the saved inputs. The kernels' backward is not differentiable; this is, at the reference's cost."""
    inputs = (x, weight, scale, shift)
    with torch.enable_grad():
        y = ref.rms_norm_silu(x, weight, eps, scale=scale, shift=shift, activation="silu" if silu else None)
        wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
        got = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True)) if wanted else iter(())
    return tuple(next(got) if n and t is not None else None for t, n in zip(inputs, needs))


class _RMSNormSiLU(torch.autograd.Function):
    """Eager autograd wiring of the fast path (see `_fused`); the same kernels as the custom op's."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, eps, silu):
        y, rstd = _kernels().forward(x, weight, scale, shift, eps, silu)
        ctx.save_for_backward(x, rstd, weight, scale, shift)
        ctx.args = (eps, silu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight, scale, shift = ctx.saved_tensors
        eps, silu = ctx.args
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True
            grads = _double_backward_grads(dy, x, weight, scale, shift, eps, silu, needs)
        else:
            grads = _kernels().backward(dy, x, rstd, weight, scale, shift, eps, silu)
        return (*(g if n else None for g, n in zip(grads, needs)), None, None)


@torch.library.custom_op("vdm_fast::rms_norm_silu", mutates_args=())
def _rms_norm_silu_op(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, scale: torch.Tensor | None,
    shift: torch.Tensor | None, silu: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd): y in x's dtype and memory format, rstd (B, *spatial) fp32 = 1 / max(||x||, eps)."""
    _dispatch.check_impl(SPEC, impl)
    return _kernels().forward(x, weight, scale, shift, eps, silu)


@_rms_norm_silu_op.register_fake
def _(x, weight, eps, scale, shift, silu, impl):
    y = torch.empty_like(x, memory_format=memory_format(x))
    return y, x.new_empty(rstd_shape(x), dtype=torch.float32)


@torch.library.custom_op("vdm_fast::rms_norm_silu_backward", mutates_args=())
def _rms_norm_silu_backward_op(
    dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, silu: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dscale, dshift), each like its input; an absent input's gradient is empty (0,)."""
    _dispatch.check_impl(SPEC, impl)
    grads = _kernels().backward(dy, x, rstd, weight, scale, shift, eps, silu)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_rms_norm_silu_backward_op.register_fake
def _(dy, x, rstd, weight, scale, shift, eps, silu, impl):
    dx = torch.empty_like(x, memory_format=memory_format(x))
    return (dx,) + tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None
                         else x.new_empty(0) for t in (weight, scale, shift))


def _setup_context(ctx, inputs, output):
    x, weight, eps, scale, shift, silu, impl = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, rstd, weight, scale, shift)
    ctx.args = (eps, silu, impl)


def _backward(ctx, dy, _drstd):
    x, rstd, weight, scale, shift = ctx.saved_tensors
    eps, silu, impl = ctx.args
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[3:5])
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients through the reference
        dx, dw, ds, dsh = _double_backward_grads(dy, x, weight, scale, shift, eps, silu, needs)
    else:
        dx, dw, ds, dsh = torch.ops.vdm_fast.rms_norm_silu_backward(dy, x, rstd, weight, scale, shift, eps, silu,
                                                                    impl)
        present = (weight is not None, scale is not None, shift is not None)
        dw, ds, dsh = (g if p else None for g, p in zip((dw, ds, dsh), present))
    return dx, dw, None, ds, dsh, None, None


_rms_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)
_APPLY = _dispatch.autograd_apply(_RMSNormSiLU)
