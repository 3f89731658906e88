"""temporal_attention: attention along the frame axis at every spatial position of a video, fused in Triton.

    out = softmax(q k^T * scale + bias, masked) v      per sequence and head, over T frames

Two entry points, one kernel pair:
- `temporal_attention(q, k, v, ...)`: (N, heads, T, d) views with any strides (SDPA's layout);
- `temporal_attention_packed(qkv, heads, ...)`: the qkv projection (B, T, S, 3 * heads * d) of a channels_last_3d
  activation (S = H * W positions), read in place; the output (B, T, S, heads * d) feeds the output projection as
  is, and the backward writes one packed gradient dqkv for the projection (no concatenation of dq, dk, dv).

Host path. A call's validation and launch arguments depend only on (shapes, strides, dtypes, devices, flags, scale):
they are computed once per such key (`_Entry`, holding the kernel plan) and looked up afterwards, so a repeated call
costs a dict lookup, two allocations (output, lse) and the launch. In eager mode the fast path is a
torch.autograd.Function that calls the launchers directly (or no autograd node at all when nothing needs a
gradient); under torch.compile it is the torch.library op with its fake, which Inductor keeps as an extern kernel.

Edge cases: N = 0, T = 0 or d = 0 return empty (or, for d = 0, zero-width) outputs and gradients on every path, as
SDPA does. Double backward (create_graph=True) recomputes the gradients through the reference on the saved inputs,
so second-order terms are exact; it is slower than the fused backward.

Reference: vdm_fast/reference/temporal_attention.py. Fast code: kernels/temporal_attention.py (vdm_fast.kernels).
Tests: tests/test_temporal_attention*.py. Notes: kernels/notes/temporal_attention.md.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from vdm_fast import _checks, _dispatch
from vdm_fast.reference.temporal_attention import joint_video_image_mask as _ref_joint_mask
from vdm_fast.reference.temporal_attention import temporal_attention as _reference
from vdm_fast.reference.temporal_attention import temporal_attention_packed as _reference_packed

# Triton 3.2 and 3.3 abort compiling the batched 3-D dots for the GPU (seen 2026-11-25; 3.4, 3.5, 3.6, 3.9 build
# them): on those versions "auto" runs the reference and "triton" raises, saying why.
SPEC = _dispatch.OpSpec("temporal_attention", triton=True, min_triton=(3, 4))
MAX_T = 128  # the whole T x T score tile of a sequence lives in one program's registers
MAX_D = 128
# Validated call signatures -> _Entry.
_CALLS = _dispatch.CallCache()


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v for N independent sequences of T frames.

    q, k, v: (N, heads, T, d), the layout of F.scaled_dot_product_attention, any strides (read in place).
    bias: float (heads, T, T) shared by all sequences, or (B, heads, T, T) per sample with N = B * S and sequences
        n*S .. n*S+S-1 belonging to sample n (rearrange 'b c t h w -> (b h w) ...'); it gets a gradient.
    mask: bool (T, T) or (B, T, T), True = may attend; a row with nothing allowed gives zeros.
    scale: default 1/sqrt(d). T <= 128, d <= 128. Softmax statistics in fp32.
    Returns (N, heads, T, d) in q's dtype (on the fast path stored as (N, T, heads, d) memory, a transposed view,
    so that the output projection reads it without a copy). The backward is deterministic (no atomics).
    """
    if torch.compiler.is_compiling():
        scale = _check(q, k, v, bias, mask, scale)
        impl = _dispatch.select(SPEC, q.device, q.dtype)
        if impl == "reference":
            return _reference(q, k, v, bias, mask, scale=scale)
        return torch.ops.vdm_fast.temporal_attention(q, k, v, bias, mask, scale, impl)[0]
    entry = _entry_4d(q, k, v, bias, mask, scale)
    impl = _dispatch.select(SPEC, q.device, q.dtype)
    if impl == "reference":
        return _reference(q, k, v, bias, mask, scale=entry.scale)
    bias_in, mask_in = entry.bias_mask(bias, mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _ATTENTION(q, k, v, bias, mask, bias_in, mask_in, entry)
    return entry.launcher().forward(entry.plan(), q, k, v, bias_in, mask_in)[0]


def temporal_attention_packed(
    qkv: torch.Tensor,
    heads: int,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Temporal attention on a packed qkv projection, read in place.

    qkv: (B, T, S, 3 * heads * d), any strides: at sample b, frame t, position s, the last dim holds q, k, v, each
        heads * d wide, heads-major ("(three heads d)", as video-diffusion-pytorch's to_qkv(...).chunk(3) and
        "(h d)" rearrange read it). A channels_last_3d activation x (B, C, T, H, W) gives it with no copy:
        `to_qkv(x.permute(0, 2, 3, 4, 1)).flatten(2, 3)`.
    bias: (heads, T, T) or (B, heads, T, T); mask: bool (T, T) or (B, T, T) (same meaning as temporal_attention).
    Returns (B, T, S, heads * d) contiguous, what the output projection takes; its gradient comes back as one
    (B, T, S, 3 * heads * d) tensor. Equals temporal_attention on the q, k, v views (sequence n = b * S + s).
    """
    if torch.compiler.is_compiling():
        scale = _check_packed(qkv, heads, bias, mask, scale)
        impl = _dispatch.select(SPEC, qkv.device, qkv.dtype)
        if impl == "reference":
            return _reference_packed(qkv, heads, bias, mask, scale=scale)
        return torch.ops.vdm_fast.temporal_attention_packed(qkv, heads, bias, mask, scale, impl)[0]
    entry = _entry_packed(qkv, heads, bias, mask, scale)
    impl = _dispatch.select(SPEC, qkv.device, qkv.dtype)
    if impl == "reference":
        return _reference_packed(qkv, heads, bias, mask, scale=entry.scale)
    mask_in = None if mask is None else mask.view(torch.uint8)
    if torch.is_grad_enabled() and (qkv.requires_grad or (bias is not None and bias.requires_grad)):
        return _PACKED_ATTENTION(qkv, bias, mask, mask_in, entry)
    return entry.launcher().forward(entry.plan(), qkv, qkv, qkv, bias, mask_in)[0]


def joint_video_image_mask(num_frames: int, num_video_frames: int, *, device=None) -> torch.Tensor:
    """(T, T) bool mask for joint image-video training: the first `num_video_frames` frames (the video) attend to
    each other, every later frame (an independent image) only to itself."""
    _checks.positive_int(num_frames, "num_frames")
    _checks.positive_int(num_video_frames, "num_video_frames", minimum=0)
    if num_video_frames > num_frames:
        raise ValueError(f"num_video_frames must be <= num_frames={num_frames}, got {num_video_frames}")
    return _ref_joint_mask(num_frames, num_video_frames, device=device)


# ----------------------------------------------------------------------------------------------- checks


def _check(q, k, v, bias, mask, scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(t, name, ndim=4, floating=True)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _checks.shape(t, name, q.shape, "q's (N, heads, T, d)")
    n, heads, frames, d = q.shape
    _check_sizes("q", frames, d)
    _check_bias_mask(bias, mask, heads, frames, n, "N", "sequences of q")
    _checks.same_device(q=q, k=k, v=v, bias=bias, mask=mask)
    return _check_scale(scale, d)


def _check_packed(qkv, heads, bias, mask, scale) -> float:
    _checks.tensor(qkv, "qkv", ndim=4, floating=True)
    _checks.positive_int(heads, "heads")
    batch, frames, _, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"qkv's last dim must be 3 * heads * d with heads={heads}, got {width}")
    d = width // (3 * heads)
    _check_sizes("qkv", frames, d)
    _check_bias_mask(bias, mask, heads, frames, batch, "B", "samples of qkv", exact=True)
    _checks.same_device(qkv=qkv, bias=bias, mask=mask)
    return _check_scale(scale, d)


def _check_sizes(name: str, frames: int, d: int) -> None:
    if frames > MAX_T:
        raise ValueError(f"{name} has T={frames} frames: temporal_attention takes T <= {MAX_T}")
    if d > MAX_D:
        raise ValueError(f"{name} has head dim d={d}: temporal_attention takes d <= {MAX_D}")


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _check_bias_mask(bias, mask, heads, frames, n, n_name, what, exact=False) -> None:
    if bias is not None:
        _checks.tensor(bias, "bias", ndim=(3, 4), floating=True)
        _check_groups(bias, "bias", (heads, frames, frames), n, "heads, T, T", n_name, what, exact)
    if mask is not None:
        _checks.tensor(mask, "mask", ndim=(2, 3), dtypes=(torch.bool,))
        _check_groups(mask, "mask", (frames, frames), n, "T, T", n_name, what, exact)


def _check_groups(t, name, tail, n, shape_name, n_name, what, exact) -> None:
    """t is shared (*tail) or per sample (B, *tail) with B dividing (exact: equal to) the n sequences / samples."""
    if tuple(t.shape[-len(tail):]) != tail or t.dim() not in (len(tail), len(tail) + 1):
        raise ValueError(f"{name} must have shape ({shape_name}) = {tail} or (B, {shape_name}), got {tuple(t.shape)}")
    if t.dim() == len(tail) + 1:
        b = t.shape[0]
        if exact and b not in (1, n):
            raise ValueError(f"{name} is per sample with B={b}, which must be 1 or the {n_name}={n} {what}")
        if b == 0 or n % b:
            raise ValueError(f"{name} is per sample with B={b}, which must divide the {n_name}={n} {what}")


# ----------------------------------------------------------------------------------------------- plans


class _Entry:
    """One validated call signature: the scale, the (sample, position) split of the sequences, and the kernel plan
    (built on the first fast call, so the reference path never imports Triton)."""

    __slots__ = ("scale", "kw", "_plan", "repeat_bias", "repeat_mask")

    def __init__(self, scale: float, kw: dict, repeat_bias: int = 1, repeat_mask: int = 1):
        self.scale, self.kw, self._plan = scale, kw, None
        self.repeat_bias, self.repeat_mask = repeat_bias, repeat_mask

    @staticmethod
    def launcher():
        return _kernels()

    def plan(self):
        if self._plan is None:
            self._plan = self.launcher().Plan(**self.kw, scale=self.scale)
        return self._plan

    def bias_mask(self, bias, mask):
        """bias / mask as the kernel reads them: mask as uint8 (a view); a per-sample tensor whose batch is not the
        plan's sample count (bias and mask per sample with different B) repeated to it (a small copy, only then)."""
        if self.repeat_bias > 1:
            bias = bias.repeat_interleave(self.repeat_bias, 0)
        if mask is not None:
            mask = mask.view(torch.uint8)
            if self.repeat_mask > 1:
                mask = mask.repeat_interleave(self.repeat_mask, 0)
        return bias, mask


@functools.cache  # an import statement per call costs about a tenth of an eager aten dispatch
def _kernels():
    # Imported on first use, not at module level: the kernel module imports triton, an optional dependency.
    from vdm_fast.kernels import temporal_attention as kern

    return kern


def _tail_strides(t, batched: int):
    """(b-stride or 0 when shared, then the rest) of a bias / mask."""
    return (t.stride(0) if t.dim() == batched else 0, *t.stride()[t.dim() - batched + 1:])


def _entry_4d(q, k, v, bias, mask, scale) -> _Entry:
    try:
        key = ("4d", type(scale), scale, *_dispatch.tensor_key(q, k, v, bias, mask))
    except AttributeError:  # not tensors: the checks say what is wrong
        key = None
    entry = _CALLS.get(key)
    if entry is not None:
        return entry
    scale = _check(q, k, v, bias, mask, scale)

    def build():
        n, heads, frames, d = q.shape
        b1 = bias.shape[0] if bias is not None and bias.dim() == 4 else 1
        b2 = mask.shape[0] if mask is not None and mask.dim() == 3 else 1
        batch = math.lcm(b1, b2)  # the kernel's samples: no program straddles two of either tensor's samples
        seqs = n // batch if batch else 0

        def split(t):  # (b, s, h, t, d) strides: n = b * S + s has the single stride t.stride(0)
            sn, sh, st, sd = t.stride()
            return (seqs * sn, sn, sh, st, sd)

        bias_info = None if bias is None else ((bias.stride(0) if b1 > 1 else 0, *bias.stride()[-3:])
                                               if b1 == batch or b1 == 1 else (heads * frames * frames, frames * frames,
                                                                              frames, 1))
        mask_info = None if mask is None else ((mask.stride(0) if b2 > 1 else 0, *mask.stride()[-2:])
                                               if b2 == batch or b2 == 1 else (frames * frames, frames, 1))
        kw = dict(packed=False, batch=batch, seqs=seqs, heads=heads, frames=frames, d=d, dtype=q.dtype,
                  inputs=(*split(q), *split(k), *split(v)), bias=bias_info, mask=mask_info,
                  bias_batch=batch if b1 > 1 else 1)  # the kernel's bias batch (after any repeat)
        return _Entry(scale, kw, repeat_bias=batch // b1 if b1 > 1 and b1 != batch else 1,
                      repeat_mask=batch // b2 if b2 > 1 and b2 != batch else 1)

    return _CALLS.put(key, build())


def _entry_packed(qkv, heads, bias, mask, scale) -> _Entry:
    try:
        key = ("packed", type(heads), heads, type(scale), scale, *_dispatch.tensor_key(qkv, bias, mask))
    except AttributeError:
        key = None
    entry = _CALLS.get(key)
    if entry is not None:
        return entry
    scale = _check_packed(qkv, heads, bias, mask, scale)

    def build():
        batch, frames, seqs, width = qkv.shape
        d = width // (3 * heads)
        sb, st, ss, sc = qkv.stride()
        kw = dict(packed=True, batch=batch, seqs=seqs, heads=heads, frames=frames, d=d, dtype=qkv.dtype,
                  inputs=(sb, ss, d * sc, st, sc) * 3,
                  bias=None if bias is None else _tail_strides(bias, 4) if bias.dim() == 3 or bias.shape[0] > 1
                  else (0, *bias.stride()[1:]),
                  mask=None if mask is None else _tail_strides(mask, 3) if mask.dim() == 2 or mask.shape[0] > 1
                  else (0, *mask.stride()[1:]),
                  bias_batch=bias.shape[0] if bias is not None and bias.dim() == 4 else 1)
        return _Entry(scale, kw)

    return _CALLS.put(key, build())


def _do_strides_4d(plan, grad_out):
    sn, sh, st, sd = grad_out.stride()
    return (plan.shape[1] * sn, sn, sh, st, sd)


def _do_strides_packed(plan, grad_out):
    sb, st, ss, sc = grad_out.stride()
    return (sb, ss, plan.d * sc, st, sc)


def _dbias(dbias, bias, repeat):
    """The kernel's fp32 (plan samples, heads, T, T) bias gradient in bias's shape and dtype."""
    if repeat > 1:
        dbias = dbias.view(-1, repeat, *dbias.shape[1:]).sum(1)
    if dbias.dim() != bias.dim():
        dbias = dbias.view(bias.shape)
    return dbias if dbias.dtype == bias.dtype else dbias.to(bias.dtype)


# ----------------------------------------------------------------------------------------------- eager autograd


class _Attention(torch.autograd.Function):
    """Eager mode: the launchers called directly (the torch.library op below serves torch.compile)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, bias_in, mask_in, entry):
        kern = entry.launcher()
        plan = entry.plan()
        out, lse = kern.forward(plan, q, k, v, bias_in, mask_in)
        ctx.save_for_backward(q, k, v, bias, mask, bias_in, mask_in, out, lse)
        ctx.entry = entry
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, bias_in, mask_in, out, lse = ctx.saved_tensors
        entry = ctx.entry
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through the reference
            return (*_reference_grads(lambda q, k, v, b: _reference(q, k, v, b, mask, scale=entry.scale),
                                      (q, k, v, bias), grad_out, ctx.needs_input_grad[:4]), None, None, None, None)
        kern, plan = entry.launcher(), entry.plan()
        grads, dbias = kern.backward(plan, grad_out, _do_strides_4d(plan, grad_out), q, k, v, out, lse, bias_in,
                                     mask_in, ctx.needs_input_grad[3])
        return (grads[0], grads[1], grads[2], None if dbias is None else _dbias(dbias, bias, entry.repeat_bias),
                None, None, None, None)


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, mask, mask_in, entry):
        kern = entry.launcher()
        out, lse = kern.forward(entry.plan(), qkv, qkv, qkv, bias, mask_in)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.entry, ctx.mask, ctx.mask_in = entry, mask, mask_in  # no gradient: plain attributes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias, out, lse = ctx.saved_tensors
        entry, mask, mask_in = ctx.entry, ctx.mask, ctx.mask_in
        plan = entry.plan()
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through the reference
            dqkv, dbias = _reference_grads(
                lambda x, b: _reference_packed(x, plan.heads, b, mask, scale=entry.scale), (qkv, bias), grad_out,
                ctx.needs_input_grad[:2])
            return dqkv, dbias, None, None, None
        grads, dbias = entry.launcher().backward(plan, grad_out, _do_strides_packed(plan, grad_out), qkv, qkv, qkv,
                                                 out, lse, bias, mask_in, ctx.needs_input_grad[1])
        return grads, None if dbias is None else _dbias(dbias, bias, 1), None, None, None


_ATTENTION = _dispatch.autograd_apply(_Attention)
_PACKED_ATTENTION = _dispatch.autograd_apply(_PackedAttention)


def _reference_grads(fn, inputs, grad_out, needs):
    """Gradients of fn(*inputs) against grad_out, recomputed from the saved inputs themselves (not detached copies),
    so that they are differentiable functions of the inputs and of grad_out: double backward."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    with torch.enable_grad():
        out = fn(*inputs)
        got = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    grads = [None] * len(inputs)
    for i, g in zip(wanted, got):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


# ----------------------------------------------------------------------------------------------- torch.library ops
# What torch.compile sees (one opaque op with a fake; Inductor runs it as an extern kernel). Eager calls skip these.


def _fake_out(shape_4d, like):
    n, heads, frames, d = shape_4d
    return like.new_empty(n, frames, heads, d).transpose(1, 2)


@torch.library.custom_op("vdm_fast::temporal_attention", mutates_args=())
def _temporal_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
    scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _dispatch.check_impl(SPEC, impl)
    entry = _entry_4d(q, k, v, bias, mask, scale)
    bias_in, mask_in = entry.bias_mask(bias, mask)
    return entry.launcher().forward(entry.plan(), q, k, v, bias_in, mask_in)


@_temporal_attention_op.register_fake
def _(q, k, v, bias, mask, scale, impl):
    n, heads, frames, _ = q.shape
    return _fake_out(q.shape, q), q.new_empty(n, heads, frames, dtype=torch.float32)


@torch.library.custom_op("vdm_fast::temporal_attention_backward", mutates_args=())
def _temporal_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    bias: torch.Tensor | None, mask: torch.Tensor | None, scale: float, bias_grad: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dqkv (3, N, heads, T, d) (one buffer: dq, dk, dv = dqkv[0], [1], [2]) and dbias (bias's shape and dtype;
    an empty tensor when there is no bias or it needs no gradient)."""
    _dispatch.check_impl(SPEC, impl)
    entry = _entry_4d(q, k, v, bias, mask, scale)
    bias_in, mask_in = entry.bias_mask(bias, mask)
    plan = entry.plan()
    grads, dbias = entry.launcher().backward(plan, grad_out, _do_strides_4d(plan, grad_out), q, k, v, out, lse,
                                             bias_in, mask_in, bias_grad)
    if dbias is None:
        return grads, q.new_empty(0)
    return grads, _dbias(dbias, bias, entry.repeat_bias)


@_temporal_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, bias, mask, scale, bias_grad, impl):
    n, heads, frames, d = q.shape
    grads = q.new_empty(3, n, frames, heads, d).transpose(2, 3)
    return grads, q.new_empty(bias.shape, dtype=bias.dtype) if bias is not None and bias_grad else q.new_empty(0)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask)
    ctx.scale, ctx.impl = scale, impl
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, bias, mask = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through the reference
        grads = _reference_grads(lambda q, k, v, b: _reference(q, k, v, b, mask, scale=ctx.scale), (q, k, v, bias),
                                 grad_out, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)
    grads, dbias = torch.ops.vdm_fast.temporal_attention_backward(
        grad_out, q, k, v, out, lse, bias, mask, ctx.scale, bias_grad, ctx.impl)
    return grads[0], grads[1], grads[2], (dbias if bias_grad else None), None, None, None


_temporal_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vdm_fast::temporal_attention_packed", mutates_args=())
def _temporal_attention_packed_op(
    qkv: torch.Tensor, heads: int, bias: torch.Tensor | None, mask: torch.Tensor | None, scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _dispatch.check_impl(SPEC, impl)
    entry = _entry_packed(qkv, heads, bias, mask, scale)
    return entry.launcher().forward(entry.plan(), qkv, qkv, qkv, bias, None if mask is None else mask.view(torch.uint8))


@_temporal_attention_packed_op.register_fake
def _(qkv, heads, bias, mask, scale, impl):
    batch, frames, seqs, width = qkv.shape
    return (qkv.new_empty(batch, frames, seqs, width // 3),
            qkv.new_empty(batch * seqs, heads, frames, dtype=torch.float32))


@torch.library.custom_op("vdm_fast::temporal_attention_packed_backward", mutates_args=())
def _temporal_attention_packed_backward_op(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, heads: int,
    bias: torch.Tensor | None, mask: torch.Tensor | None, scale: float, bias_grad: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dqkv (qkv's shape, contiguous) and dbias (bias's shape and dtype, or empty)."""
    _dispatch.check_impl(SPEC, impl)
    entry = _entry_packed(qkv, heads, bias, mask, scale)
    plan = entry.plan()
    grads, dbias = entry.launcher().backward(plan, grad_out, _do_strides_packed(plan, grad_out), qkv, qkv, qkv, out,
                                             lse, bias, None if mask is None else mask.view(torch.uint8), bias_grad)
    return grads, qkv.new_empty(0) if dbias is None else _dbias(dbias, bias, 1)


@_temporal_attention_packed_backward_op.register_fake
def _(grad_out, qkv, out, lse, heads, bias, mask, scale, bias_grad, impl):
    dbias = qkv.new_empty(bias.shape, dtype=bias.dtype) if bias is not None and bias_grad else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), dbias


def _setup_context_packed(ctx, inputs, output):
    qkv, heads, bias, mask, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, bias, mask)
    ctx.heads, ctx.scale, ctx.impl = heads, scale, impl
    ctx.mark_non_differentiable(lse)


def _backward_packed(ctx, grad_out, _grad_lse):
    qkv, out, lse, bias, mask = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through the reference
        dqkv, dbias = _reference_grads(lambda x, b: _reference_packed(x, ctx.heads, b, mask, scale=ctx.scale),
                                       (qkv, bias), grad_out, (ctx.needs_input_grad[0], ctx.needs_input_grad[2]))
        return dqkv, None, dbias, None, None, None
    dqkv, dbias = torch.ops.vdm_fast.temporal_attention_packed_backward(
        grad_out, qkv, out, lse, ctx.heads, bias, mask, ctx.scale, bias_grad, ctx.impl)
    return dqkv, None, (dbias if bias_grad else None), None, None, None


_temporal_attention_packed_op.register_autograd(_backward_packed, setup_context=_setup_context_packed)
