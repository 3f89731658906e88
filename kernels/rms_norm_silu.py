"""Triton kernels of rms_norm_silu: y = act(x / max(||x||_C, eps) * sqrt(C) * w * (1 + scale) + shift), forward
and backward.

Math. Per position p = (b, s) (s runs over the folded spatial dims): rstd = 1 / max(sqrt(sum_c x^2), eps),
xhat = x * rstd, and per channel c of sample b: w_eff = gain * w[c] * (1 + scale[b, c]) (gain = sqrt(C)),
z = xhat * w_eff + shift[b, c], y = silu(z) (or z). Backward with dz = dy * act'(z), g = dz * w_eff:
dx = rstd * (g - xhat * sum_c(g * xhat)) where the norm was not clamped, dx = rstd * g where it was (F.normalize's
clamp_min passes no gradient to the norm there); per channel, sums over positions of dz * xhat and dz give dw,
dscale, dshift (`_bwd_params_kernel`). Clamped is read back from the saved rstd alone: rstd == 1 / eps, computed by
the same fp32 division in both kernels (a norm within an ulp of eps counts as clamped; torch lets the gradient through
at norm == eps exactly: a tie of measure zero).

Layout. x (B, C, *spatial) is read in place through strides as (B, C, S): CL=False (contiguous): positions are
unit-stride, `stride_outer` is the channel stride (S); CL=True (channels_last(_3d)): channels are unit-stride,
`stride_outer` is the position stride (C). y, dy, dx share x's strides (the launcher allocates y and dx in x's memory
format; an x or dy in another layout is copied once). A program's tile is [BLOCK_C channels, BLOCK_S positions]: the
whole channel vector of BLOCK_S positions.

Paths (chosen by `_make_plan`):
- ONCHIP (constexpr): all C channels of the tile in registers (next_pow2(C) * BLOCK_S <= the tile size): x (and dy)
  read from DRAM once.
- otherwise (C wider than a tile holds: no limit on C): channel chunks of BLOCK_C, two sweeps per position block
  (sum of squares, then normalize; backward: sum_c(g * xhat), then dx), the second sweep re-reading the program's
  own few KB from L1/L2. The backward keeps sum_c(g * xhat) of its positions in `dot` (B, S) fp32 between sweeps.
- Forward: one program per (sample, block of BLOCK_S positions). Backward: the position blocks of a sample are split
  among `progs` programs (contiguous runs), each accumulating its per-channel sums of dz * xhat and dz in registers
  and writing them once to `part` (B, progs, 2, C) fp32; `_bwd_params_kernel` reduces `part` over programs, then
  over samples, in a fixed order. No atomics: re-runs are bitwise identical.
- INT64 (constexpr): offsets within a sample in int64, for samples spanning 2^31 elements or more.

All arithmetic fp32; only rstd (B, *spatial) fp32 is saved for the backward, which recomputes xhat and z from x.
Parameters load in their own dtype and gradients store in it: no casts outside the kernels. Absent parameters and the
activation are bits of `opt_flags` (OPT_* below), a runtime argument, so one compiled kernel serves every combination.
Loops over runtime bounds are while loops: the interpreter (CI) cannot range() over a runtime scalar with NumPy >= 2.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from vdm_fast.kernels._activations import silu, silu_grad
from vdm_fast.kernels._common import TRITON_DTYPE_NAMES, cdiv, device_guard, next_pow2
from vdm_fast.kernels._compile import KernelConfig, film_norm_case

from vdm_fast.reference.group_norm_silu import memory_format

# opt_flags bits: which optional inputs are present, and the activation.
OPT_W, OPT_SCALE, OPT_SHIFT, OPT_SILU = 1, 2, 4, 8
# Register tile (elements): the forward holds x, the backward x and dy (half as many positions). Warps: TILE / (32 *
# ELEMS_PER_THREAD), at most MAX_WARPS (kernels/notes/rms_norm_silu.md: registers and spills per setting).
TILE, TILE_BWD = 4096, 2048
ELEMS_PER_THREAD, ELEMS_PER_THREAD_BWD = 16, 8
MAX_WARPS = 8
# Contiguous layout: at least this many consecutive positions per channel row of a tile (16 x 2 bytes = one 32-byte
# sector of bf16); channels_last needs none (the channel vector itself is the contiguous run).
MIN_BLOCK_S_CONTIGUOUS = 16
CHUNK_SPLIT_BWD = 2  # the chunked backward's tile: TILE_BWD / 2 (see _make_plan)
TARGET_PROGRAMS = 1056  # backward: about 8 programs per SM of a 132-SM GPU; fewer, longer ones write fewer partials
PARAM_BLOCK_R, PARAM_BLOCK_C = 16, 128


@triton.jit
def _tile_offsets(c, s, stride_outer, CL: tl.constexpr, INT64: tl.constexpr):
    """Offsets of a [BLOCK_C, BLOCK_S] tile from the sample's first element. The unit stride is a literal so that the
    compiler sees which axis is contiguous and vectorizes along it."""
    if INT64:
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    if CL:
        return c[:, None] + s[None, :] * stride_outer
    else:
        return c[:, None] * stride_outer + s[None, :]


@triton.jit
def _coefs(w_ptr, scale_ptr, shift_ptr, b, c, cmask, scale_stride_b, shift_stride_b, gain, opt_flags):
    """Per-channel fp32 (w_eff, shift, gain * w, 1 + scale) of sample b: z = xhat * w_eff + shift (0 where masked)."""
    w = tl.where(cmask, gain, 0.0)
    film = tl.full(c.shape, 1.0, tl.float32)
    sh = tl.zeros(c.shape, tl.float32)
    if opt_flags & 1:  # OPT_W
        w = w * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if opt_flags & 2:  # OPT_SCALE
        film = 1.0 + tl.load(scale_ptr + b.to(tl.int64) * scale_stride_b + c, mask=cmask, other=0.0).to(tl.float32)
    if opt_flags & 4:  # OPT_SHIFT
        sh = tl.load(shift_ptr + b.to(tl.int64) * shift_stride_b + c, mask=cmask, other=0.0).to(tl.float32)
    return w * film, sh, w, film


@triton.jit
def _act(z, opt_flags):
    if opt_flags & 8:  # OPT_SILU
        z = silu(z)
    return z


@triton.jit
def _act_grad(dy, z, opt_flags):
    """dy * act'(z)."""
    if opt_flags & 8:
        dy = silu_grad(dy, z)
    return dy


@triton.jit
def _rstd(sum_sq, eps):
    """1 / max(||x||, eps), F.normalize's clamp; the backward recognizes a clamped norm by rstd == 1 / eps."""
    return 1.0 / tl.maximum(tl.sqrt(sum_sq), eps)


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["opt_flags"])
def _fwd_kernel(
    x_ptr, y_ptr, rstd_ptr, w_ptr, scale_ptr, shift_ptr,
    C, S, s_blocks, stride_b, stride_outer, scale_stride_b, shift_stride_b, gain, eps, opt_flags,
    CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONCHIP: tl.constexpr, INT64: tl.constexpr,
):
    """Program (b * s_blocks + j): positions [j * BLOCK_S, (j + 1) * BLOCK_S) of sample b, all C channels.

    Strides (elements, of x and y alike): stride_b per sample, stride_outer the one non-unit stride (module
    docstring); scale_stride_b, shift_stride_b per sample of the (B, C) FiLM tensors (channels unit-stride).
    rstd: (B, S) fp32 out. gain = sqrt(C).
    """
    pid = tl.program_id(0)
    b = pid // s_blocks
    s = (pid % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    base = b.to(tl.int64) * stride_b
    rstd_offs = b.to(tl.int64) * S + s
    if ONCHIP:
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        mask = cmask[:, None] & smask[None, :]
        offs = _tile_offsets(c, s, stride_outer, CL, INT64)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = _rstd(tl.sum(x * x, axis=0), eps)
        tl.store(rstd_ptr + rstd_offs, rstd, mask=smask)
        w_eff, sh, _, _ = _coefs(w_ptr, scale_ptr, shift_ptr, b, c, cmask, scale_stride_b, shift_stride_b, gain,
                                 opt_flags)
        y = _act(x * rstd[None, :] * w_eff[:, None] + sh[:, None], opt_flags)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_S], tl.float32)
        c0 = tl.zeros([], tl.int32)
        while c0 < C:
            c = c0 + tl.arange(0, BLOCK_C)
            mask = (c < C)[:, None] & smask[None, :]
            x = tl.load(x_ptr + base + _tile_offsets(c, s, stride_outer, CL, INT64), mask=mask, other=0.0)
            x = x.to(tl.float32)
            sum_sq += tl.sum(x * x, axis=0)
            c0 += BLOCK_C
        rstd = _rstd(sum_sq, eps)
        tl.store(rstd_ptr + rstd_offs, rstd, mask=smask)
        c0 = tl.zeros([], tl.int32)
        while c0 < C:
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            mask = cmask[:, None] & smask[None, :]
            offs = _tile_offsets(c, s, stride_outer, CL, INT64)
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            w_eff, sh, _, _ = _coefs(w_ptr, scale_ptr, shift_ptr, b, c, cmask, scale_stride_b, shift_stride_b, gain,
                                     opt_flags)
            y = _act(x * rstd[None, :] * w_eff[:, None] + sh[:, None], opt_flags)
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
            c0 += BLOCK_C


# --------------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_terms(x_ptr, dy_ptr, base, offs, mask, rstd, w_eff, sh, opt_flags):
    """xhat, dz and g = dz * w_eff of a tile (0 where masked)."""
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = x * rstd[None, :]
    dz = _act_grad(dy, xhat * w_eff[:, None] + sh[:, None], opt_flags)
    return xhat, dz, dz * w_eff[:, None]


@triton.jit
def _dx(xhat, g, dot, rstd, inv_eps):
    """rstd * (g - xhat * dot), without the norm term where the norm was clamped (rstd == 1 / eps)."""
    dot = tl.where(rstd < inv_eps, dot, 0.0)
    return rstd[None, :] * (g - xhat * dot[None, :])


@triton.jit(do_not_specialize=["opt_flags"])
def _bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, rstd_ptr, part_ptr, dot_ptr, w_ptr, scale_ptr, shift_ptr,
    C, S, s_blocks, blocks_per_prog, progs, stride_b, stride_outer, scale_stride_b, shift_stride_b, gain, eps,
    opt_flags,
    CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONCHIP: tl.constexpr, INT64: tl.constexpr,
):
    """Program (b * progs + q): position blocks [q * blocks_per_prog, (q + 1) * blocks_per_prog) of sample b;
    sizes and strides as `_fwd_kernel` (x, dy, dx share them).

    part (B, progs, 2, C) fp32 out: the program's per-channel sums of dz * xhat, then of dz. dot (B, S) fp32:
    sum_c(g * xhat) per position between the two sweeps of the chunked path (unused ONCHIP).
    """
    pid = tl.program_id(0)
    b = pid // progs
    q = pid % progs
    base = b.to(tl.int64) * stride_b
    j = q * blocks_per_prog
    j_end = tl.minimum(j + blocks_per_prog, s_blocks)
    inv_eps = 1.0 / eps
    part_row = (b * progs + q).to(tl.int64) * 2 * C
    if ONCHIP:
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        w_eff, sh, _, _ = _coefs(w_ptr, scale_ptr, shift_ptr, b, c, cmask, scale_stride_b, shift_stride_b, gain,
                                 opt_flags)
        acc_a = tl.zeros([BLOCK_C], tl.float32)
        acc_z = tl.zeros([BLOCK_C], tl.float32)
        while j < j_end:
            s = j * BLOCK_S + tl.arange(0, BLOCK_S)
            smask = s < S
            mask = cmask[:, None] & smask[None, :]
            offs = _tile_offsets(c, s, stride_outer, CL, INT64)
            rstd = tl.load(rstd_ptr + b.to(tl.int64) * S + s, mask=smask, other=0.0)
            xhat, dz, g = _bwd_terms(x_ptr, dy_ptr, base, offs, mask, rstd, w_eff, sh, opt_flags)
            dx = _dx(xhat, g, tl.sum(g * xhat, axis=0), rstd, inv_eps)
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            acc_a += tl.sum(dz * xhat, axis=1)
            acc_z += tl.sum(dz, axis=1)
            j += 1
        tl.store(part_ptr + part_row + c, acc_a, mask=cmask)
        tl.store(part_ptr + part_row + C + c, acc_z, mask=cmask)
    else:
        # Sweep 1: sum_c(g * xhat) of each position of the program, kept in `dot`.
        while j < j_end:
            s = j * BLOCK_S + tl.arange(0, BLOCK_S)
            smask = s < S
            rstd = tl.load(rstd_ptr + b.to(tl.int64) * S + s, mask=smask, other=0.0)
            dot = tl.zeros([BLOCK_S], tl.float32)
            c0 = tl.zeros([], tl.int32)
            while c0 < C:
                c = c0 + tl.arange(0, BLOCK_C)
                cmask = c < C
                mask = cmask[:, None] & smask[None, :]
                w_eff, sh, _, _ = _coefs(w_ptr, scale_ptr, shift_ptr, b, c, cmask, scale_stride_b, shift_stride_b,
                                         gain, opt_flags)
                xhat, dz, g = _bwd_terms(x_ptr, dy_ptr, base, _tile_offsets(c, s, stride_outer, CL, INT64), mask,
                                         rstd, w_eff, sh, opt_flags)
                dot += tl.sum(g * xhat, axis=0)
                c0 += BLOCK_C
            tl.store(dot_ptr + b.to(tl.int64) * S + s, dot, mask=smask)
            j += 1
        # Sweep 2, channel chunk by channel chunk: dx, and the chunk's parameter sums over the program's positions.
        c0 = tl.zeros([], tl.int32)
        while c0 < C:
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            w_eff, sh, _, _ = _coefs(w_ptr, scale_ptr, shift_ptr, b, c, cmask, scale_stride_b, shift_stride_b,
                                     gain, opt_flags)
            acc_a = tl.zeros([BLOCK_C], tl.float32)
            acc_z = tl.zeros([BLOCK_C], tl.float32)
            j = q * blocks_per_prog
            while j < j_end:
                s = j * BLOCK_S + tl.arange(0, BLOCK_S)
                smask = s < S
                mask = cmask[:, None] & smask[None, :]
                offs = _tile_offsets(c, s, stride_outer, CL, INT64)
                rstd = tl.load(rstd_ptr + b.to(tl.int64) * S + s, mask=smask, other=0.0)
                dot = tl.load(dot_ptr + b.to(tl.int64) * S + s, mask=smask, other=0.0)
                xhat, dz, g = _bwd_terms(x_ptr, dy_ptr, base, offs, mask, rstd, w_eff, sh, opt_flags)
                tl.store(dx_ptr + base + offs, _dx(xhat, g, dot, rstd, inv_eps).to(dx_ptr.dtype.element_ty),
                         mask=mask)
                acc_a += tl.sum(dz * xhat, axis=1)
                acc_z += tl.sum(dz, axis=1)
                j += 1
            tl.store(part_ptr + part_row + c, acc_a, mask=cmask)
            tl.store(part_ptr + part_row + C + c, acc_z, mask=cmask)
            c0 += BLOCK_C


@triton.jit(do_not_specialize=["opt_flags"])
def _bwd_params_kernel(
    part_ptr, w_ptr, scale_ptr, shift_ptr, dw_ptr, dscale_ptr, dshift_ptr,
    n_samples, n_channels, n_partials, scale_stride_b, shift_stride_b, gain, opt_flags,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Reduce part[b, r, 0|1, c] over r (the programs of a sample), then over b, in a fixed order, with
    A = sum(dz * xhat), Z = sum(dz): dscale[b, c] = gain * w * A, dshift = Z, dw = gain * sum_b (1 + scale) * A.
    Gradients are written in their pointers' dtypes (their parameters'), dscale and dshift contiguous (B, C)."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < n_channels
    dw = tl.zeros([BLOCK_C], tl.float32)
    r = tl.arange(0, BLOCK_R)
    b = tl.zeros([], tl.int32)
    while b < n_samples:
        _, _, w, film = _coefs(w_ptr, scale_ptr, shift_ptr, b, ch, cmask, scale_stride_b, shift_stride_b, gain,
                               opt_flags)
        a_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        z_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        r0 = tl.zeros([], tl.int32)
        while r0 < n_partials:
            rmask = (r0 + r < n_partials)[:, None] & cmask[None, :]
            offs = (b * n_partials + r0 + r)[:, None].to(tl.int64) * 2 * n_channels + ch[None, :]
            a_acc += tl.load(part_ptr + offs, mask=rmask, other=0.0)
            z_acc += tl.load(part_ptr + n_channels + offs, mask=rmask, other=0.0)
            r0 += BLOCK_R
        sum_a = tl.sum(a_acc, axis=0)
        if opt_flags & 2:
            tl.store(dscale_ptr + b * n_channels + ch, (w * sum_a).to(dscale_ptr.dtype.element_ty), mask=cmask)
        if opt_flags & 4:
            tl.store(dshift_ptr + b * n_channels + ch, tl.sum(z_acc, axis=0).to(dshift_ptr.dtype.element_ty),
                     mask=cmask)
        dw += film * sum_a
        b += 1
    if opt_flags & 1:
        tl.store(dw_ptr + ch, (gain * dw).to(dw_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class Plan:
    """Everything about a launch that depends only on (shape, strides, dtype, direction): computed once per such
    key and cached (`_PLANS`), so that a call only allocates its outputs and launches."""

    fmt: torch.memory_format  # the outputs' memory format (x's, see reference.memory_format)
    strides: tuple[int, ...]  # the outputs' strides: x (and dy) must have them, else they are copied once
    copy_x: bool  # x is not in the outputs' layout (a view whose strides do not fold): one copy
    rstd_shape: tuple[int, ...]  # (B, *spatial)
    S: int
    s_blocks: int  # position blocks per sample
    progs: int  # backward: programs per sample
    blocks_per_prog: int  # backward: position blocks per program
    grid: tuple[int]
    strides_arg: tuple[int, int]  # stride_b, stride_outer
    constexprs: dict
    num_warps: int
    launch_kw: dict  # constexprs and num_warps, as the launch takes them (built once)

    @property
    def empty(self) -> bool:
        return self.grid[0] == 0 or self.S == 0


_PLANS: dict[tuple, Plan] = {}


def _layout(shape, strides):
    """(S, stride_b, stride_outer, CL) of compact strides viewed as (B, C, S)."""
    dims = [d for d in range(2, len(shape)) if shape[d] != 1]
    S = math.prod(shape[2:])
    if S == 0:  # nothing to launch: any layout will do
        return 0, strides[0], strides[1], False
    for a, b in zip(dims, dims[1:]):
        assert strides[a] == strides[b] * shape[b], (shape, strides)
    stride_s = strides[dims[-1]] if dims else 1
    C = shape[1]
    if S == 1 or stride_s == 1:
        return S, strides[0], strides[1], False
    assert C == 1 or strides[1] == 1, (shape, strides)
    return S, strides[0], stride_s, True


def _make_plan(shape, strides, dtype, backward: bool) -> Plan:
    probe = torch.empty(0, device="meta").as_strided(shape, strides)
    fmt = memory_format(probe)
    out_strides = out_layout(shape, fmt)
    same = all(n == 1 or a == b for n, a, b in zip(shape, strides, out_strides))
    S, sb, so, cl = _layout(shape, out_strides)
    B, C = shape[0], shape[1]
    span = sum((n - 1) * st for n, st in zip(shape[1:], out_strides[1:]))
    tile = TILE_BWD if backward else TILE
    min_bs = 1 if cl else MIN_BLOCK_S_CONTIGUOUS
    bc = next_pow2(C)
    onchip = bc * min_bs <= tile
    if onchip:
        bs = max(1, min(tile // bc, next_pow2(S)))
    else:
        # Chunks of min_bs positions; the backward's of half a tile, on as many warps as a full one: its two sweeps
        # keep x, dy, xhat, dz and g of a chunk live (a full tile spilled 12 times on sm_80 unspecialized).
        bs = min(min_bs, next_pow2(S))
        bc = tile // min_bs // (CHUNK_SPLIT_BWD if backward else 1)
    s_blocks = cdiv(S, bs)
    per_thread = ELEMS_PER_THREAD_BWD if backward else ELEMS_PER_THREAD
    elems = bc * bs if onchip else tile  # chunked: the warps of a full tile
    warps = max(1, min(MAX_WARPS, next_pow2(max(1, elems // (32 * per_thread)))))
    if backward:
        progs = max(1, min(s_blocks, cdiv(TARGET_PROGRAMS, max(B, 1))))
        blocks_per_prog = cdiv(s_blocks, progs)
        progs = cdiv(s_blocks, blocks_per_prog) if s_blocks else 1
        grid = (B * progs,)
    else:
        progs, blocks_per_prog = 1, 1
        grid = (B * s_blocks,)
    constexprs = dict(CL=cl, BLOCK_C=bc, BLOCK_S=bs, ONCHIP=onchip, INT64=span >= 2**31)
    return Plan(fmt=fmt, strides=tuple(out_strides), copy_x=not same, rstd_shape=(B, *shape[2:]), S=S,
                s_blocks=s_blocks, progs=progs, blocks_per_prog=blocks_per_prog, grid=grid, strides_arg=(sb, so),
                constexprs=constexprs, num_warps=warps, launch_kw=dict(constexprs, num_warps=warps))


def plan(x: torch.Tensor, backward: bool = False) -> Plan:
    key = (x.shape, x.stride(), x.dtype, backward)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _make_plan(tuple(x.shape), tuple(x.stride()), x.dtype, backward)
    return p


def out_layout(shape, fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides of the outputs the launcher allocates (y, dx): compact in x's memory format. With `empty_out`,
    the one place that decides it (the 64-bit test substitutes both: outputs sharing a huge-stride view's layout)."""
    return torch.empty(shape, device="meta").contiguous(memory_format=fmt).stride()


def empty_out(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """The launcher's allocation of y and dx, with the strides `out_layout` gives."""
    return torch.empty_like(x, memory_format=fmt)


def _vector(t: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A parameter as the kernels take it: channels unit-stride (copied only if not), and its batch stride."""
    if t is None:
        return dummy, 0
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        t = t.contiguous()
    return t, t.stride(0) if t.dim() == 2 else 0


def _flags(weight, scale, shift, silu) -> int:
    return ((OPT_W if weight is not None else 0) | (OPT_SCALE if scale is not None else 0)
            | (OPT_SHIFT if shift is not None else 0) | (OPT_SILU if silu else 0))


def forward(x, weight, scale, shift, eps, silu):
    """(y, rstd): y of x's shape, dtype and memory format; rstd (B, *spatial) fp32 for the backward."""
    p = plan(x)
    y = empty_out(x, p.fmt)
    rstd = torch.empty(p.rstd_shape, dtype=torch.float32, device=x.device)
    if p.empty or x.shape[1] == 0:
        return y, rstd.fill_(1.0 / eps if eps > 0 else float("inf"))  # the norm of no channels is 0: clamped
    if p.copy_x:
        x = x.contiguous(memory_format=p.fmt)
    assert y.stride() == p.strides, "y must share the layout the plan was made for"
    w, _ = _vector(weight, x)
    s, s_stride = _vector(scale, x)
    sh, sh_stride = _vector(shift, x)
    C = x.shape[1]
    with device_guard(x):
        _fwd_kernel[p.grid](x, y, rstd, w, s, sh, C, p.S, p.s_blocks, *p.strides_arg, s_stride, sh_stride,
                            math.sqrt(C), eps, _flags(weight, scale, shift, silu), **p.launch_kw)
    return y, rstd


def backward(dy, x, rstd, weight, scale, shift, eps, silu):
    """(dx, dweight, dscale, dshift): dx in x's layout, each parameter gradient contiguous in its parameter's dtype
    (None for an absent one)."""
    p = plan(x, backward=True)
    dx = empty_out(x, p.fmt)
    B, C = x.shape[:2]
    params = (weight, scale, shift)
    if p.empty or C == 0:  # sums over no elements (dx is empty too)
        return (dx, *(None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=x.device) for t in params))
    grads = [None if t is None else torch.empty(t.shape, dtype=t.dtype, device=x.device) for t in params]
    if p.copy_x:
        x = x.contiguous(memory_format=p.fmt)
    if any(n != 1 and a != b for n, a, b in zip(dy.shape, dy.stride(), p.strides)):
        dy = dy.contiguous(memory_format=p.fmt)  # e.g. the expanded gradient of a sum()
    assert dx.stride() == p.strides, "dx must share the layout the plan was made for"
    w, _ = _vector(weight, x)
    s, s_stride = _vector(scale, x)
    sh, sh_stride = _vector(shift, x)
    flags = _flags(weight, scale, shift, silu)
    part = torch.empty(B, p.progs, 2, C, dtype=torch.float32, device=x.device)
    dot = part if p.constexprs["ONCHIP"] else torch.empty(B, p.S, dtype=torch.float32, device=x.device)
    gain = math.sqrt(C)
    with device_guard(x):
        _bwd_kernel[p.grid](dy, x, dx, rstd, part, dot, w, s, sh, C, p.S, p.s_blocks, p.blocks_per_prog, p.progs,
                            *p.strides_arg, s_stride, sh_stride, gain, eps, flags, **p.launch_kw)
        if any(g is not None for g in grads):
            dw, ds, dsh = (part if g is None else g for g in grads)
            _bwd_params_kernel[(cdiv(C, PARAM_BLOCK_C),)](
                part, w, s, sh, dw, ds, dsh, B, C, p.progs, s_stride, sh_stride, gain, flags,
                BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C, num_warps=4)
    return (dx, *grads)


# ------------------------------------------------------------------------------------------- compile configs

# The U-Net's Block shapes (B = 2, T = 16; base width 128 and 256 at 64x64, the deeper levels narrower and wider) and
# the wide-channel chunked path: (shape, channels_last).
UNET_CASES = [((2, C, 16, hw, hw), cl) for C, hw in ((128, 64), (256, 64), (256, 32), (512, 32), (1024, 16))
              for cl in (True, False)]
_DATA_PTRS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")  # in x's dtype; parameters in theirs (here: x's), rest fp32


def _case_config(fn, name: str, dtype: torch.dtype, p: Plan) -> KernelConfig:
    dt = TRITON_DTYPE_NAMES[dtype]
    sig = {}
    for q in fn.params:
        if q.is_constexpr:
            continue
        if q.name.endswith("_ptr"):
            sig[q.name] = "*" + (dt if q.name in _DATA_PTRS or q.name[:-4] in ("w", "scale", "shift") else "fp32")
        else:
            sig[q.name] = "fp32" if q.name in ("eps", "gain") else "i32"
    return KernelConfig(name, fn, sig, dict(p.constexprs), num_warps=p.num_warps)


def compile_configs() -> list[KernelConfig]:
    """The (kernel, constexprs, warps) the launchers take on the U-Net cases (bf16; fp32 and fp16 on the base-width
    ones) and on a chunked case (C = 4096) per layout, with plain i32 integers; the real specialization is
    `python -m vdm_fast.kernels._compile --real` (its cases are `compile_cases()`)."""
    configs, seen = [], set()
    extra = [((2, 4096, 4, 8, 8), False), ((2, 4096, 4, 8, 8), True)]
    for dtype in TRITON_DTYPE_NAMES:
        cases = UNET_CASES if dtype == torch.bfloat16 else UNET_CASES[:4]
        for shape, cl in cases + extra:
            strides = torch.empty(shape, device="meta").contiguous(
                memory_format=torch.channels_last_3d if cl else torch.contiguous_format).stride()
            for fn, direction in ((_fwd_kernel, "fwd"), (_bwd_kernel, "bwd")):
                p = _make_plan(shape, strides, dtype, direction == "bwd")
                key = (direction, dtype, tuple(sorted(p.constexprs.items())), p.num_warps)
                if key in seen:
                    continue
                seen.add(key)
                c = p.constexprs
                name = (f"rms_norm_silu_{direction}_{TRITON_DTYPE_NAMES[dtype]}_{'cl' if c['CL'] else 'cf'}"
                        f"_c{c['BLOCK_C']}_s{c['BLOCK_S']}{'_onchip' if c['ONCHIP'] else ''}_w{p.num_warps}")
                configs.append(_case_config(fn, name, dtype, p))
    sig = _case_config(_bwd_params_kernel, "", torch.float32, _make_plan(
        (2, 8, 4), (32, 4, 1), torch.float32, True)).signature
    configs.append(KernelConfig("rms_norm_silu_bwd_params", _bwd_params_kernel, sig,
                                dict(BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C), num_warps=4))
    return configs


def _layer_case(shape, channels_last, film=True, dtype=torch.bfloat16):
    return film_norm_case("RMSNormSiLU", shape, channels_last, film, dtype)


def compile_cases():
    """The real launches for `python -m vdm_fast.kernels._compile --real`: the video-diffusion-pytorch 0.7 Block's
    norm (RMSNormSiLU with FiLM, bf16, T = 16) at base widths 128 and 256 in both layouts, a deeper level, fp32, and
    a chunked width."""
    return [
        ("rms unet128 (2,128,16,64,64) cl3d film", _layer_case((2, 128, 16, 64, 64), True)),
        ("rms unet128 (2,128,16,64,64) contiguous film", _layer_case((2, 128, 16, 64, 64), False)),
        ("rms unet128 fp32 (2,128,16,64,64) cl3d film",
         _layer_case((2, 128, 16, 64, 64), True, dtype=torch.float32)),
        ("rms unet256 (2,256,16,64,64) cl3d film", _layer_case((2, 256, 16, 64, 64), True)),
        ("rms unet256 (2,256,16,64,64) contiguous film", _layer_case((2, 256, 16, 64, 64), False)),
        ("rms unet256 (2,1024,16,16,16) cl3d film", _layer_case((2, 1024, 16, 16, 16), True)),
        ("rms unet256 (2,1024,16,16,16) contiguous film", _layer_case((2, 1024, 16, 16, 16), False)),
        ("rms wide (2,4096,4,8,8) cl3d film", _layer_case((2, 4096, 4, 8, 8), True)),
    ]
