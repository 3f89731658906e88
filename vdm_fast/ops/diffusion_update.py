"""diffusion_update: the samplers' update in one elementwise pass (guidance, x_hat / eps_hat, clip, the multistep
combination, the noise term, the history shift), in place on the sampler's static buffers.

Reference: vdm_fast/reference/diffusion_update.py (the formula). Fast code: kernels/diffusion_update.py (Triton).
Tests: tests/test_diffusion_update.py. Coefficient tables: vdm_fast/diffusion/samplers.py.

No autograd, by design: the op mutates the sampler's buffers in place (PyTorch registers no autograd formula for a
mutating custom op), and nothing differentiates through a sampler's update (reconstruction guidance differentiates
through the model before it). Called with an input that requires grad while grad mode is on, it raises a ValueError
naming the input instead of silently returning values with no gradient.
"""

from __future__ import annotations

import functools
import math

import torch

from vdm_fast import _checks, _dispatch
from vdm_fast.kernels._common import device_guard
from vdm_fast.reference.diffusion_update import NCOEF
from vdm_fast.reference.diffusion_update import diffusion_update as reference

SPEC = _dispatch.OpSpec("diffusion_update", triton=True, dtypes=(torch.float32,))
PREDICTIONS = ("eps", "v", "x")
MAX_HISTORY = 2


def diffusion_update(z: torch.Tensor, pred: torch.Tensor, coef: torch.Tensor, e_out: torch.Tensor, *,
                     pred_uncond: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                     history: torch.Tensor | None = None, guidance_weight: float = 0.0, prediction: str = "eps",
                     corrector: bool = False, clip: bool = False) -> None:
    """One sampler update, in place (returns None, as an optimizer step):

        p = (1 + w) pred - w pred_uncond;  e = clip(x_hat(z, p)) or eps_hat(z, p) (corrector);
        z <- c_z z + c_x e + c_h1 history[0] + c_h2 history[1] + c_n noise;  history shifts in e;  e_out <- e.

    z: the latent, fp32 on the fast path (fp64 runs the reference), any shape and strides. pred, pred_uncond: the
    model's (conditional, unconditional) output, z's shape, fp32 / fp16 / bf16 / fp64. coef: (8,) floating, on z's
    device: [logsnr, alpha, sigma, c_z, c_x, c_n, c_h1, c_h2], a row of a samplers.py table (read on the device: no
    host sync, so a CUDA graph can replay the step with another row). e_out: z's shape and dtype, receives e.
    noise: z's shape and dtype, or None (no noise term). history: (K, *z.shape) with K <= 2, z's dtype, the previous
    steps' x_hat, newest first, or None; not with corrector=True. guidance_weight: finite float (used only with
    pred_uncond). prediction: "eps", "v" or "x". clip: clamp x_hat to [-1, 1] (ignored by the corrector).
    No output may alias another tensor argument.
    """
    _check(z, pred, coef, e_out, pred_uncond, noise, history, guidance_weight, prediction, corrector, clip)
    impl = _dispatch.select(SPEC, z.device, z.dtype)
    if impl == "reference":
        reference(z, pred, coef, e_out, pred_uncond=pred_uncond, noise=noise, history=history,
                             guidance_weight=float(guidance_weight), prediction=prediction, corrector=corrector,
                             clip=clip)
        return
    torch.ops.vdm_fast.diffusion_update(z, pred, pred_uncond, coef, noise, history, e_out, float(guidance_weight),
                                        prediction, bool(corrector), bool(clip), impl)


def _check(z, pred, coef, e_out, pred_uncond, noise, history, w, prediction, corrector, clip) -> None:
    _checks.tensor(z, "z", floating=True)
    shape = tuple(z.shape)
    for name, t in (("pred", pred), ("e_out", e_out), ("pred_uncond", pred_uncond), ("noise", noise)):
        if t is not None:
            _checks.tensor(t, name, floating=True)
            _checks.shape(t, name, shape, "z's shape")
    for name, t in (("e_out", e_out), ("noise", noise), ("history", history)):
        if t is not None and t.dtype != z.dtype:
            raise TypeError(f"{name} must have z's dtype {z.dtype}, got {t.dtype}")
    _checks.tensor(coef, "coef", ndim=1, floating=True)
    _checks.shape(coef, "coef", (NCOEF,), "one table row [logsnr, alpha, sigma, c_z, c_x, c_n, c_h1, c_h2]")
    if history is not None:
        _checks.tensor(history, "history", floating=True)
        if history.dim() != z.dim() + 1 or tuple(history.shape[1:]) != shape or history.shape[0] > MAX_HISTORY:
            raise ValueError(f"history must have shape (K, *z.shape) with K <= {MAX_HISTORY}, z.shape = {shape}, "
                             f"got {tuple(history.shape)}")
        if corrector:
            raise ValueError("history must be None with corrector=True (a Langevin step keeps no history)")
    _checks.same_device(z=z, pred=pred, coef=coef, e_out=e_out, pred_uncond=pred_uncond, noise=noise,
                        history=history)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"guidance_weight must be a finite float, got {w!r}")
    _checks.one_of(prediction, "prediction", PREDICTIONS)
    for name, v in (("corrector", corrector), ("clip", clip)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    outs = {"z": z, "e_out": e_out, "history": history}
    ins = {"pred": pred, "pred_uncond": pred_uncond, "noise": noise, "coef": coef}
    # Storage pointers cannot be traced; under torch.compile functionalization rejects aliased mutations itself.
    for oname, o in (() if torch.compiler.is_compiling() else outs.items()):
        for iname, t in {**outs, **ins}.items():
            if o is not None and t is not None and iname != oname and _overlap(o, t):
                raise ValueError(f"{oname} must not share memory with {iname} (the update writes {oname} in place)")
    if torch.is_grad_enabled():
        for name, t in {**outs, **ins}.items():
            if t is not None and t.requires_grad:
                raise ValueError(f"diffusion_update is not differentiable, but {name} requires grad: call it under "
                                 "torch.no_grad() (sampling does)")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.data_ptr() != sb.data_ptr():
        return False

    def span(t):
        lo = t.storage_offset() * t.element_size()
        hi = lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
        return lo, hi

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


@functools.cache  # an import statement per call costs about a tenth of an eager aten dispatch
def _kernels():
    # Imported on first use, not at module level: the kernel module imports triton, an optional dependency.
    from vdm_fast.kernels import diffusion_update as k

    return k


@torch.library.custom_op("vdm_fast::diffusion_update", mutates_args=("z", "history", "e_out"))
def _diffusion_update_op(z: torch.Tensor, pred: torch.Tensor, pred_uncond: torch.Tensor | None, coef: torch.Tensor,
                         noise: torch.Tensor | None, history: torch.Tensor | None, e_out: torch.Tensor, w: float,
                         prediction: str, corrector: bool, clip: bool, impl: str) -> None:
    _dispatch.check_impl(SPEC, impl)
    if z.numel() == 0:
        return
    # The kernel walks flat contiguous buffers: strided mutated tensors are updated through contiguous copies.
    zc, ec = z.contiguous(), e_out.contiguous()
    hc = history.contiguous() if history is not None else None
    with device_guard(z):
        _kernels().launch(zc, pred, pred_uncond, coef, noise, hc, ec, w=w, prediction=prediction,
                          corrector=corrector, clip=clip)
    for dst, src in ((z, zc), (e_out, ec), (history, hc)):
        if dst is not None and dst.data_ptr() != src.data_ptr():
            dst.copy_(src)


@_diffusion_update_op.register_fake
def _(z, pred, pred_uncond, coef, noise, history, e_out, w, prediction, corrector, clip, impl):
    return None
