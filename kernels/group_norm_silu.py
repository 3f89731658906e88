"""Triton kernels of group_norm_silu: y = act(group_norm(x) * (1 + scale) + shift), forward and backward.

Math. For a group of Cg channels and S positions (one frame of it with per_frame), n = Cg * S,
mean = sum(x) / n, rstd = 1 / sqrt(sum((x - mean)^2) / n + eps), xhat = (x - mean) * rstd, and per channel c of sample
b: w_eff = w[c] * (1 + scale[b, c]), b_eff = bias[c] * (1 + scale[b, c]) + shift[b, c], z = xhat * w_eff + b_eff,
y = silu(z) (or z). Backward with dz = dy * act'(z), g = dz * w_eff:
dx = rstd * (g - mean_n(g) - xhat * mean_n(g * xhat)); per channel, sums over positions of dz * xhat and dz give
dw, dbias, dscale, dshift (`_bwd_params_kernel`).

Layout. x (B, C, *spatial) is read in place through strides as rows (b, group block, f): a group block is GPP
consecutive groups (GPP * Cg = CW channels) of frame f (F = T frames with per_frame on 5-D input, else F = 1 and S =
all positions). CL=False (contiguous): positions are unit-stride and `stride_outer` is the channel stride; CL=True
(channels_last(_3d)): channels are unit-stride and `stride_outer` is the position stride. y, dy, dx share x's strides
(the launcher allocates y and dx in x's layout and asserts it; an x or dy in another layout is copied once).
A program's tile is [BLOCK_C >= CW channels (one block of them when a group is wider), BLOCK_S positions].
GPP > 1 only in channels_last with narrow groups: 4 or 12 bf16 channels are 8 or 24 bytes per position, GPP = 2
makes them 16 or 48, so that every access is a full 128-bit vector. Alignment is provable to the compiler: CW is
`tl.multiple_of(..., CW_ALIGN)`, the strides are multiples of 16 in every U-Net case (Triton's divisibility attribute).

Paths (chosen by `_plan`; `phase` is a runtime argument so that one compiled kernel serves phases 0-2):
- ONCHIP (constexpr): the whole row is one register tile (up to ONCHIP_MAX elements forward, ONCHIP_MAX_BWD backward,
  which holds x and dy): x (and dy) read from DRAM exactly once; exact two-pass statistics on the tile.
- phase 0, rows too long for a tile, rows enough to fill the GPU: a persistent grid of at most L2_BYTES / 2 / row bytes
  programs, each sweeping its rows twice (statistics, then normalize): the resident set of rows is bounded by half the
  L2, so the second sweep hits L2.
- phase 1 + phase 2, few long rows: rows cut along S into chunks; phase 1 writes each chunk's (mean, M2), phase 2 merges
  a row's partials in a fixed order (every program of the row gets bitwise the same mean and rstd) and normalizes.
  The launcher runs them in waves of rows of at most L2_BYTES / 2, so phase 2 re-reads from L2; a row larger than
  that is read twice from DRAM (no grid-wide barrier exists without a cooperative launch).
- Statistics are exact two-pass within a tile, tiles and chunks merged with Chan et al.'s formula (no E[x^2] - E[x]^2
  cancellation, whatever the mean). All arithmetic fp32; mean and rstd (2, B, G, F) fp32 are saved for the backward,
  which recomputes z from x instead of saving it. No atomics: re-runs are bitwise identical.
- INT64 (constexpr): offsets within a sample in int64, for samples spanning 2^31 elements or more (video VAE decoders).

Parameters load in their own dtype and gradients store in it: no casts outside the kernels. Absent parameters and the
activation are bits of `opt_flags` (OPT_* below), a runtime argument, so one compiled kernel serves every combination.
Loops over runtime bounds are while loops: the interpreter (CI) cannot range() over a runtime scalar with NumPy >= 2.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from vdm_fast.kernels._activations import silu, silu_grad
from vdm_fast.kernels._common import TRITON_DTYPE_NAMES, cdiv, device_guard, next_pow2
from vdm_fast.kernels._compile import KernelConfig

from vdm_fast.reference.group_norm_silu import memory_format

# opt_flags bits: which optional inputs are present, and the activation.
OPT_W, OPT_B, OPT_SCALE, OPT_SHIFT, OPT_SILU = 1, 2, 4, 8, 16
# A row up to this many (padded) elements is held in registers: forward, 16-bit data with at most 16 channels a tile
# (half of it for fp32 or wider tiles); backward (x and dy), at most 8 channels a tile (half for wider). The limits
# are where sm_90 compiles of the U-Net cases stop spilling (kernels/notes/group_norm_silu.md).
ONCHIP_MAX = 32768
ONCHIP_MAX_BWD = 16384
# On-chip tiles: warps = tile / (32 * elements per thread), at most MAX_WARPS. sm_90 compiles of the real
# specialization (kernels/notes/group_norm_silu.md): 64 fp32 values a thread forward, 32 of x and 32 of dy backward
# fit 128-255 registers without spills; 32 warps (64 registers at most) spilled hundreds of times.
ELEMS_PER_THREAD, ELEMS_PER_THREAD_BWD = 64, 32
MAX_WARPS = 16
STREAM_TILE = 2048  # streaming paths: elements per tile (halved for the backward: x and dy)
STREAM_WARPS = 4  # with 2048-element tiles: 8 or 16 values a thread, 128-bit vectors (notes: spills per setting)
MAX_BLOCK_C = 1024  # wider groups (GroupNorm(1, C) of huge C) loop over channel blocks
MAX_CHUNKS = 256  # chunks per row, and the width of the vector the row's partials are merged with
TARGET_PROGRAMS = 528  # 4 programs per SM on a 132-SM GPU: fewer rows than this are cut into chunks
L2_BYTES, SMS = 50 * 2**20, 132  # an H100's L2 and SMs: used on the CPU; on a GPU the launcher reads its own
PARAM_BLOCK_R, PARAM_BLOCK_C = 16, 128
_NO_SPEC = ["opt_flags", "phase"]


@triton.jit
def _row_coords(row, group_blocks, frames, stride_b, stride_f, stride_outer, cw, CL: tl.constexpr):
    """Row = (b * group_blocks + gb) * frames + f -> (b, gb, f) and the int64 offset of its first element."""
    f = row % frames
    bgb = row // frames
    b = bgb // group_blocks
    gb = bgb % group_blocks
    base = b.to(tl.int64) * stride_b + f.to(tl.int64) * stride_f
    if CL:
        base += gb.to(tl.int64) * cw
    else:
        base += (gb * cw).to(tl.int64) * stride_outer
    return b, gb, f, base


@triton.jit
def _tile_offsets(c, s, stride_outer, CL: tl.constexpr, INT64: tl.constexpr):
    """Offsets of a [BLOCK_C, BLOCK_S] tile from the row's first element. The unit stride is a literal so that the
    compiler sees which axis is contiguous and vectorizes along it."""
    if INT64:
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    if CL:
        return c[:, None] + s[None, :] * stride_outer
    else:
        return c[:, None] * stride_outer + s[None, :]


@triton.jit
def _group_sum(v, gid, GPP: tl.constexpr):
    """Per channel: the sum of v over the channels of its group (gid: the channel's group within the block)."""
    if GPP == 1:
        return tl.zeros_like(v) + tl.sum(v, axis=0)
    out = tl.zeros_like(v)
    for j in tl.static_range(GPP):
        out = tl.where(gid == j, tl.sum(tl.where(gid == j, v, 0.0), axis=0), out)
    return out


@triton.jit
def _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, bidx, ch, cmask, scale_stride_b, shift_stride_b, opt_flags):
    """Per-channel fp32 (w_eff, b_eff, w, bias, 1 + scale) so that gn(x) * (1 + scale) + shift = xhat * w_eff + b_eff."""
    w = tl.full(ch.shape, 1.0, tl.float32)
    bias = tl.zeros(ch.shape, tl.float32)
    film = tl.full(ch.shape, 1.0, tl.float32)
    sh = tl.zeros(ch.shape, tl.float32)
    if opt_flags & 1:  # OPT_W
        w = tl.load(w_ptr + ch, mask=cmask, other=1.0).to(tl.float32)
    if opt_flags & 2:  # OPT_B
        bias = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if opt_flags & 4:  # OPT_SCALE
        film = 1.0 + tl.load(scale_ptr + bidx.to(tl.int64) * scale_stride_b + ch, mask=cmask, other=0.0).to(tl.float32)
    if opt_flags & 8:  # OPT_SHIFT
        sh = tl.load(shift_ptr + bidx.to(tl.int64) * shift_stride_b + ch, mask=cmask, other=0.0).to(tl.float32)
    return w * film, bias * film + sh, w, bias, film


@triton.jit
def _act(z, opt_flags):
    if opt_flags & 16:  # OPT_SILU
        z = silu(z)
    return z


@triton.jit
def _act_grad(dy, z, opt_flags):
    """dy * act'(z)."""
    if opt_flags & 16:
        dy = silu_grad(dy, z)
    return dy


@triton.jit
def _channels(c0, cw, group_channels, CW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel block c0: local channels c, their mask, and each one's group within the row's group block."""
    c = c0 + tl.arange(0, BLOCK_C)
    return c, c < cw, c // group_channels


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit
def _stream_stats(x_ptr, base, c, cmask, gid, s_lo, s_hi, stride_outer,
                  CL: tl.constexpr, INT64: tl.constexpr, GPP: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel: (count, mean, M2) of its group over positions [s_lo, s_hi) of this channel block, tile by tile:
    per-channel two-pass per tile, tiles merged with Chan's formula, then channels merged into groups."""
    n_pos = tl.zeros([], tl.float32)
    mean_c = tl.zeros(c.shape, tl.float32)
    m2_c = tl.zeros(c.shape, tl.float32)
    s0 = s_lo
    while s0 < s_hi:
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_hi)[None, :]
        x = tl.load(x_ptr + base + _tile_offsets(c, s, stride_outer, CL, INT64), mask=mask, other=0.0)
        x = x.to(tl.float32)
        n_t = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float32)
        mean_t = tl.sum(x, axis=1) / n_t
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        m2_t = tl.sum(d * d, axis=1)
        n_new = n_pos + n_t
        delta = mean_t - mean_c
        mean_c += delta * (n_t / n_new)
        m2_c += m2_t + delta * delta * (n_pos * n_t / n_new)
        n_pos = n_new
        s0 += BLOCK_S
    k = _group_sum(tl.where(cmask, 1.0, 0.0), gid, GPP)  # valid channels of each group in this block
    mean = _group_sum(tl.where(cmask, mean_c, 0.0), gid, GPP) / tl.maximum(k, 1.0)
    dm = tl.where(cmask, mean_c - mean, 0.0)
    m2 = _group_sum(tl.where(cmask, m2_c, 0.0) + n_pos * dm * dm, gid, GPP)
    return k * n_pos, mean, m2


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _store_stats(stats_ptr, b, gb, f, c, cmask, gid, mean, rstd, group_blocks, frames,
                 group_channels, GPP: tl.constexpr):
    """mean and rstd of each group of the block into stats (B, G, F, 2): from each group's first channel."""
    idx = (((b * group_blocks + gb) * GPP + gid) * frames + f) * 2
    first = cmask & (c % group_channels == 0)
    tl.store(stats_ptr + idx, mean, mask=first)
    tl.store(stats_ptr + idx + 1, rstd, mask=first)


@triton.jit
def _load_stats(stats_ptr, b, gb, f, gid, cmask, group_blocks, frames, GPP: tl.constexpr):
    """Per channel: its group's saved (mean, rstd) from stats (B, G, F, 2)."""
    idx = (((b * group_blocks + gb) * GPP + gid) * frames + f) * 2
    return tl.load(stats_ptr + idx, mask=cmask, other=0.0), tl.load(stats_ptr + idx + 1, mask=cmask, other=0.0)


@triton.jit
def _merge_chunks(part_ptr, row, n_positions, chunk_positions, n_chunks, n_row,
                  P_BLOCK: tl.constexpr):
    """Mean and M2 of a row from its chunks' (mean, M2) in part (rows, 2, n_chunks), in one fixed order: the same bits
    in every program of the row."""
    i = tl.arange(0, P_BLOCK)
    pmask = i < n_chunks
    m_i = tl.load(part_ptr + row * 2 * n_chunks + i, mask=pmask, other=0.0)
    m2_i = tl.load(part_ptr + (row * 2 + 1) * n_chunks + i, mask=pmask, other=0.0)
    frac_i = tl.minimum(tl.maximum(n_positions - i * chunk_positions, 0), chunk_positions).to(tl.float32)
    frac_i = frac_i / n_positions.to(tl.float32)  # chunk i's share of the row
    mean = tl.sum(frac_i * m_i, axis=0)
    dm = m_i - mean
    return mean, tl.sum(m2_i + n_row * frac_i * dm * dm, axis=0)


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(
    x_ptr, y_ptr, stats_ptr, part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    row_begin, row_end, group_blocks, group_channels, frames, n_positions, chunk_positions, n_chunks,
    stride_b, stride_f, stride_outer, scale_stride_b, shift_stride_b, eps, opt_flags, phase,
    CL: tl.constexpr, GPP: tl.constexpr, CW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ONCHIP: tl.constexpr, INT64: tl.constexpr, P_BLOCK: tl.constexpr,
):
    """Programs (rows from row_begin, strided by the grid; chunk) of the forward.

    Sizes: group_blocks = G / GPP, group_channels = Cg, frames = F, n_positions = S per row, chunk_positions = S per
    chunk (n_chunks of them). Strides (elements, of x and y alike): stride_b per sample, stride_f per frame (0 when
    F = 1), stride_outer the one non-unit stride of a row (see the module docstring); scale_stride_b, shift_stride_b:
    per sample of the (B, C) FiLM tensors (channels unit-stride). stats: (B, G, F, 2) (mean, rstd); part: (rows, 2,
    n_chunks) chunk means, then M2s (phases 1, 2). phase: 0 whole rows, 1 chunk statistics, 2 merge and normalize.
    rows [row_begin, row_end) run: one launch, or one wave of rows whose bytes fit in half the L2.
    """
    # The group block's width, provably a multiple of CW_ALIGN (maximum() gives the hint an operation to sit on: it is
    # cw itself, as CW_ALIGN divides cw): aligned group offsets and constant channel masks, so 128-bit accesses.
    cw = tl.multiple_of(tl.maximum(GPP * group_channels, CW_ALIGN), CW_ALIGN)
    n_row = (group_channels * n_positions).to(tl.float32)
    chunk = tl.program_id(1)
    s_lo = chunk * chunk_positions
    s_hi = tl.minimum(s_lo + chunk_positions, n_positions)
    row = row_begin + tl.program_id(0)
    while row < row_end:
        b, gb, f, base = _row_coords(row, group_blocks, frames, stride_b, stride_f, stride_outer, cw, CL)
        if ONCHIP:
            c, cmask, gid = _channels(0, cw, group_channels, CW_ALIGN, BLOCK_C)
            s = tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < n_positions)[None, :]
            offs = _tile_offsets(c, s, stride_outer, CL, INT64)
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            mean = _group_sum(tl.sum(x, axis=1), gid, GPP) / n_row
            d = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(_group_sum(tl.sum(d * d, axis=1), gid, GPP) / n_row + eps)
            _store_stats(stats_ptr, b, gb, f, c, cmask, gid, mean, rstd, group_blocks, frames,
                         group_channels, GPP)
            w_eff, b_eff, _, _, _ = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb * cw + c, cmask,
                                           scale_stride_b, shift_stride_b, opt_flags)
            y = _act(d * (rstd * w_eff)[:, None] + b_eff[:, None], opt_flags)
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            if phase != 2:
                # Statistics of [s_lo, s_hi) over every channel block (one block unless GPP == 1 and Cg > BLOCK_C).
                n = tl.zeros([BLOCK_C], tl.float32)
                mean = tl.zeros([BLOCK_C], tl.float32)
                m2 = tl.zeros([BLOCK_C], tl.float32)
                c0 = tl.zeros([], tl.int32)
                while c0 < cw:
                    c, cmask, gid = _channels(c0, cw, group_channels, CW_ALIGN, BLOCK_C)
                    n_k, mean_k, m2_k = _stream_stats(x_ptr, base, c, cmask, gid, s_lo, s_hi, stride_outer,
                                                      CL, INT64, GPP, BLOCK_S)
                    n, mean, m2 = _chan_merge(n, mean, m2, n_k, mean_k, m2_k)
                    c0 += BLOCK_C
                if phase == 1:  # GPP == 1: every channel holds the row's values; channel 0 writes them
                    first = tl.arange(0, BLOCK_C) == 0
                    zero = tl.arange(0, BLOCK_C) * 0
                    tl.store(part_ptr + row * 2 * n_chunks + chunk + zero, mean, mask=first)
                    tl.store(part_ptr + (row * 2 + 1) * n_chunks + chunk + zero, m2, mask=first)
                rstd = 1.0 / tl.sqrt(m2 / n_row + eps)
            else:
                mean_s, m2_s = _merge_chunks(part_ptr, row, n_positions, chunk_positions, n_chunks,
                                             n_row, P_BLOCK)
                mean = tl.zeros([BLOCK_C], tl.float32) + mean_s
                rstd = tl.zeros([BLOCK_C], tl.float32) + 1.0 / tl.sqrt(m2_s / n_row + eps)
            if phase != 1:
                c0 = tl.zeros([], tl.int32)
                while c0 < cw:
                    c, cmask, gid = _channels(c0, cw, group_channels, CW_ALIGN, BLOCK_C)
                    if chunk == 0:
                        if c0 == 0:
                            _store_stats(stats_ptr, b, gb, f, c, cmask, gid, mean, rstd, group_blocks,
                                         frames, group_channels, GPP)
                    w_eff, b_eff, _, _, _ = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb * cw + c, cmask,
                                                   scale_stride_b, shift_stride_b, opt_flags)
                    a = (rstd * w_eff)[:, None]
                    s0 = s_lo
                    while s0 < s_hi:
                        s = s0 + tl.arange(0, BLOCK_S)
                        mask = cmask[:, None] & (s < s_hi)[None, :]
                        offs = _tile_offsets(c, s, stride_outer, CL, INT64)
                        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                        y = _act((x - mean[:, None]) * a + b_eff[:, None], opt_flags)  # x - mean first: exact
                        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
                        s0 += BLOCK_S
                    c0 += BLOCK_C
        row += tl.num_programs(0)


# --------------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_channels(c0, cw, group_channels, stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb, f, group_blocks,
                  frames, scale_stride_b, shift_stride_b, opt_flags, CW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                  GPP: tl.constexpr):
    """A channel block [c0, c0 + BLOCK_C) of group block gb: its channels, mask, groups, mean and rstd, and the
    effective affine (w_eff, b_eff) of sample b."""
    c, cmask, gid = _channels(c0, cw, group_channels, CW_ALIGN, BLOCK_C)
    mean, rstd = _load_stats(stats_ptr, b, gb, f, gid, cmask, group_blocks, frames, GPP)
    w_eff, b_eff, _, _, _ = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb * cw + c, cmask, scale_stride_b,
                                   shift_stride_b, opt_flags)
    return c, cmask, gid, mean, rstd, w_eff, b_eff


@triton.jit
def _dz_tile(dy_ptr, x_ptr, base, c, cmask, s, s_end, stride_outer, mean, rstd, w_eff, b_eff, opt_flags,
             CL: tl.constexpr, INT64: tl.constexpr):
    """The tile (channels c, positions s < s_end): its offsets and mask, xhat and dz (0 where masked)."""
    mask = cmask[:, None] & (s < s_end)[None, :]
    offs = _tile_offsets(c, s, stride_outer, CL, INT64)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dz = _act_grad(dy, xhat * w_eff[:, None] + b_eff[:, None], opt_flags)
    return offs, mask, xhat, tl.where(mask, dz, 0.0)


@triton.jit
def _store_dx(dx_ptr, base, offs, mask, dz, xhat, rstd, w_eff, mean_g, mean_gx):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dz * w_eff, stored in dx's dtype."""
    dx = rstd[:, None] * (dz * w_eff[:, None] - mean_g[:, None] - xhat * mean_gx[:, None])
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, stats_ptr, part_ptr, rowsum_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    row_begin, row_end, group_blocks, group_channels, frames, n_positions, chunk_positions, n_chunks,
    stride_b, stride_f, stride_outer, scale_stride_b, shift_stride_b, opt_flags, phase,
    CL: tl.constexpr, GPP: tl.constexpr, CW_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ONCHIP: tl.constexpr, INT64: tl.constexpr, P_BLOCK: tl.constexpr,
):
    """Programs (rows, chunk) of the backward; sizes and strides as `_fwd_kernel` (x, dy, dx share them).

    part (B, F * n_chunks, 2, C): per-channel sums of dz * xhat, then of dz, per (sample, frame and chunk), for the
    parameter gradients. rowsum (rows, 2, n_chunks): per chunk, sums of g, then of g * xhat (phases 1, 2).
    phase 0 (or ONCHIP): whole rows; phase 1: chunk sums; phase 2: merge a row's chunk sums, then dx of the chunk.
    """
    # The group block's width, provably a multiple of CW_ALIGN (maximum() gives the hint an operation to sit on: it is
    # cw itself, as CW_ALIGN divides cw): aligned group offsets and constant channel masks, so 128-bit accesses.
    cw = tl.multiple_of(tl.maximum(GPP * group_channels, CW_ALIGN), CW_ALIGN)
    C = group_blocks * cw
    n_row = (group_channels * n_positions).to(tl.float32)
    chunk = tl.program_id(1)
    s_lo = chunk * chunk_positions
    s_hi = tl.minimum(s_lo + chunk_positions, n_positions)
    row = row_begin + tl.program_id(0)
    while row < row_end:
        b, gb, f, base = _row_coords(row, group_blocks, frames, stride_b, stride_f, stride_outer, cw, CL)
        part_row = ((b * frames + f) * n_chunks + chunk).to(tl.int64) * 2 * C + gb * cw
        if ONCHIP:
            c, cmask, gid, mean, rstd, w_eff, b_eff = _bwd_channels(
                0, cw, group_channels, stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb, f, group_blocks, frames,
                scale_stride_b, shift_stride_b, opt_flags, CW_ALIGN, BLOCK_C, GPP)
            offs, mask, xhat, dz = _dz_tile(dy_ptr, x_ptr, base, c, cmask, tl.arange(0, BLOCK_S), n_positions,
                                            stride_outer, mean, rstd, w_eff, b_eff, opt_flags, CL, INT64)
            sum_dz_xhat = tl.sum(dz * xhat, axis=1)
            sum_dz = tl.sum(dz, axis=1)
            tl.store(part_ptr + part_row + c, sum_dz_xhat, mask=cmask)
            tl.store(part_ptr + C + part_row + c, sum_dz, mask=cmask)
            mean_g = _group_sum(w_eff * sum_dz, gid, GPP) / n_row
            mean_gx = _group_sum(w_eff * sum_dz_xhat, gid, GPP) / n_row
            _store_dx(dx_ptr, base, offs, mask, dz, xhat, rstd, w_eff, mean_g, mean_gx)
        else:
            # Streaming (GPP == 1 unless one channel block holds the group block): mean and rstd per channel.
            if phase != 2:
                acc_g = tl.zeros([BLOCK_C], tl.float32)
                acc_gx = tl.zeros([BLOCK_C], tl.float32)
                c0 = tl.zeros([], tl.int32)
                while c0 < cw:
                    c, cmask, gid, mean, rstd, w_eff, b_eff = _bwd_channels(
                        c0, cw, group_channels, stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb, f, group_blocks,
                        frames, scale_stride_b, shift_stride_b, opt_flags, CW_ALIGN, BLOCK_C, GPP)
                    sum_dz_xhat = tl.zeros([BLOCK_C], tl.float32)
                    sum_dz = tl.zeros([BLOCK_C], tl.float32)
                    s0 = s_lo
                    while s0 < s_hi:
                        _, _, xhat, dz = _dz_tile(dy_ptr, x_ptr, base, c, cmask, s0 + tl.arange(0, BLOCK_S), s_hi,
                                                  stride_outer, mean, rstd, w_eff, b_eff, opt_flags, CL, INT64)
                        sum_dz_xhat += tl.sum(dz * xhat, axis=1)
                        sum_dz += tl.sum(dz, axis=1)
                        s0 += BLOCK_S
                    tl.store(part_ptr + part_row + c, sum_dz_xhat, mask=cmask)
                    tl.store(part_ptr + C + part_row + c, sum_dz, mask=cmask)
                    acc_g += _group_sum(w_eff * sum_dz, gid, GPP)
                    acc_gx += _group_sum(w_eff * sum_dz_xhat, gid, GPP)
                    c0 += BLOCK_C
                if phase == 1:  # GPP == 1: every channel holds the row's sums; channel 0 writes them
                    first = tl.arange(0, BLOCK_C) == 0
                    zero = tl.arange(0, BLOCK_C) * 0
                    tl.store(rowsum_ptr + row * 2 * n_chunks + chunk + zero, acc_g, mask=first)
                    tl.store(rowsum_ptr + (row * 2 + 1) * n_chunks + chunk + zero, acc_gx, mask=first)
                mean_g = acc_g / n_row
                mean_gx = acc_gx / n_row
            else:
                i = tl.arange(0, P_BLOCK)
                pmask = i < n_chunks
                sum_g = tl.sum(tl.load(rowsum_ptr + row * 2 * n_chunks + i, mask=pmask, other=0.0), axis=0)
                sum_gx = tl.sum(tl.load(rowsum_ptr + (row * 2 + 1) * n_chunks + i, mask=pmask, other=0.0), axis=0)
                mean_g = tl.zeros([BLOCK_C], tl.float32) + sum_g / n_row
                mean_gx = tl.zeros([BLOCK_C], tl.float32) + sum_gx / n_row
            if phase != 1:
                c0 = tl.zeros([], tl.int32)
                while c0 < cw:
                    c, cmask, gid, mean, rstd, w_eff, b_eff = _bwd_channels(
                        c0, cw, group_channels, stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, b, gb, f, group_blocks,
                        frames, scale_stride_b, shift_stride_b, opt_flags, CW_ALIGN, BLOCK_C, GPP)
                    s0 = s_lo
                    while s0 < s_hi:
                        offs, mask, xhat, dz = _dz_tile(dy_ptr, x_ptr, base, c, cmask, s0 + tl.arange(0, BLOCK_S), s_hi,
                                                        stride_outer, mean, rstd, w_eff, b_eff, opt_flags, CL, INT64)
                        _store_dx(dx_ptr, base, offs, mask, dz, xhat, rstd, w_eff, mean_g, mean_gx)
                        s0 += BLOCK_S
                    c0 += BLOCK_C
        row += tl.num_programs(0)


@triton.jit(do_not_specialize=["opt_flags"])
def _bwd_params_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, dw_ptr, db_ptr, dscale_ptr, dshift_ptr,
    n_samples, n_channels, n_partials, scale_stride_b, shift_stride_b, opt_flags,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Reduce part[b, r, 0|1, c] (r: n_partials = frames x chunks) over r, then over b, in a fixed order:
    dscale[b, c] = w * sum(dz * xhat) + bias * sum(dz), dshift = sum(dz), dw = sum_b (1 + scale) * sum(dz * xhat),
    db = sum_b (1 + scale) * sum(dz). Gradients are written in their pointers' dtypes (their parameters'), dscale
    and dshift contiguous (B, C)."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < n_channels
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    r = tl.arange(0, BLOCK_R)
    b = tl.zeros([], tl.int32)
    while b < n_samples:
        _, _, w, bias, film = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, ch, cmask, scale_stride_b,
                                     shift_stride_b, opt_flags)
        a_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        z_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        r0 = tl.zeros([], tl.int32)
        while r0 < n_partials:
            rmask = (r0 + r < n_partials)[:, None] & cmask[None, :]
            offs = (b * n_partials + r0 + r)[:, None].to(tl.int64) * 2 * n_channels + ch[None, :]
            a_acc += tl.load(part_ptr + offs, mask=rmask, other=0.0)
            z_acc += tl.load(part_ptr + n_channels + offs, mask=rmask, other=0.0)
            r0 += BLOCK_R
        sum_dz_xhat = tl.sum(a_acc, axis=0)
        sum_dz = tl.sum(z_acc, axis=0)
        if opt_flags & 4:
            tl.store(dscale_ptr + b * n_channels + ch, (w * sum_dz_xhat + bias * sum_dz).to(
                dscale_ptr.dtype.element_ty), mask=cmask)
        if opt_flags & 8:
            tl.store(dshift_ptr + b * n_channels + ch, sum_dz.to(dshift_ptr.dtype.element_ty), mask=cmask)
        dw += film * sum_dz_xhat
        db += film * sum_dz
        b += 1
    if opt_flags & 1:
        tl.store(dw_ptr + ch, dw.to(dw_ptr.dtype.element_ty), mask=cmask)
    if opt_flags & 2:
        tl.store(db_ptr + ch, db.to(db_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class _Launch:
    """One kernel launch of a plan: rows [row_begin, row_end) on `grid` programs, in `phases` order."""

    grid: tuple[int, int]
    row_begin: int
    row_end: int


@dataclass(frozen=True)
class Plan:
    """Everything about a launch that depends only on (shape, strides, dtype, groups, per_frame, direction): computed
    once per such key and cached (`_PLANS`), so that a call only allocates its outputs and launches."""

    fmt: torch.memory_format  # the outputs' memory format (x's, see reference.memory_format)
    strides: tuple[int, ...]  # the outputs' strides: x (and dy) must have them, else they are copied once
    copy_x: bool  # x is not in the outputs' layout (a view whose strides do not fold): one copy
    stats_shape: tuple[int, int, int, int]  # (B, G, F, 2)
    rows: int
    n_chunks: int
    phases: tuple[int, ...]  # (0,): one pass over whole rows (ONCHIP or two sweeps); (1, 2): chunked
    launches: tuple[_Launch, ...]
    sizes: tuple[int, ...]  # group_blocks, group_channels, frames, n_positions, chunk_positions, n_chunks
    strides_arg: tuple[int, int, int]  # stride_b, stride_f, stride_outer
    constexprs: dict
    num_warps: int
    launch_kw: dict  # constexprs and num_warps, as the launch takes them (built once)

    @property
    def empty(self) -> bool:
        return self.rows == 0 or self.sizes[1] == 0 or self.sizes[3] == 0


_PLANS: dict[tuple, Plan] = {}


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(L2 bytes, SMs) of a GPU; L2_BYTES and SMS on the CPU (the interpreter), where only the plan's shape matters."""
    if device.type != "cuda":
        return L2_BYTES, SMS
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _LIMITS:
        props = torch.cuda.get_device_properties(key)
        _LIMITS[key] = (int(getattr(props, "L2_cache_size", L2_BYTES)), props.multi_processor_count)
    return _LIMITS[key]


_LIMITS: dict[int, tuple[int, int]] = {}


def _rows_layout(shape, strides, per_frame: bool):
    """(F, S, stride_b, stride_f, stride_outer, CL) of a tensor viewed as (B, C, F, S), or None where the spatial dims
    do not fold into one stride or neither channels nor positions are unit-stride."""
    F = shape[2] if per_frame and len(shape) == 5 else 1
    first = 3 if per_frame and len(shape) == 5 else 2  # per frame: dim 2 (frames) keeps its own stride
    dims = [d for d in range(first, len(shape)) if shape[d] != 1]
    S = 1
    for d in range(first, len(shape)):
        S *= shape[d]
    for a, b in zip(dims, dims[1:]):
        if strides[a] != strides[b] * shape[b]:
            return None
    stride_s = strides[dims[-1]] if dims else 1
    stride_f = strides[2] if first == 3 and F > 1 else 0
    C = shape[1]
    if S == 1 or stride_s == 1:
        return F, S, strides[0], stride_f, strides[1], False
    if C == 1 or strides[1] == 1:
        return F, S, strides[0], stride_f, stride_s, True
    return None


def _pow2_dividing(n: int, cap: int = 16) -> int:
    p = 1
    while p < cap and n % (2 * p) == 0:
        p *= 2
    return p


def _warps(tile: int, backward: bool) -> int:
    per_thread = ELEMS_PER_THREAD_BWD if backward else ELEMS_PER_THREAD
    return max(1, min(MAX_WARPS, next_pow2(max(1, tile // (32 * per_thread)))))


def _groups_per_program(Cg: int, G: int, elem: int, cl: bool) -> int:
    """Channels_last: the fewest consecutive groups whose channels make a multiple of 16 bytes (128-bit accesses)."""
    if not cl:
        return 1
    p = 1
    while (p * Cg * elem) % 16 and p < 8 and G % (2 * p) == 0 and next_pow2(2 * p * Cg) <= MAX_BLOCK_C:
        p *= 2  # a group block must be one channel block: the kernels reduce its groups within the tile
    return p if (p * Cg * elem) % 16 == 0 else 1


def _make_plan(shape, strides, dtype, num_groups: int, per_frame: bool, device: torch.device, backward: bool) -> Plan:
    probe = torch.empty(0, device="meta").as_strided(shape, strides)
    fmt = memory_format(probe)
    out_strides = out_layout(shape, strides, fmt)
    same = all(n == 1 or a == b for n, a, b in zip(shape, strides, out_strides))
    lay = _rows_layout(shape, out_strides, per_frame)
    assert lay is not None, (shape, out_strides)
    F, S, sb, sf, so, cl = lay
    B, C = shape[0], shape[1]
    G = num_groups
    Cg = C // G
    elem = torch.empty(0, dtype=dtype).element_size()
    span = sum((n - 1) * st for n, st in zip(shape[1:], out_strides[1:]))
    int64 = span >= 2**31
    l2, sms = _device_limits(device)
    limit = ONCHIP_MAX_BWD if backward else ONCHIP_MAX
    stream_tile = STREAM_TILE // 2 if backward else STREAM_TILE  # x and dy tiles: half the elements each
    tensors = 2 if backward else 1  # arrays a row sweep reads (x; x and dy)

    def tiles(gpp):
        cw = gpp * Cg
        bc = min(next_pow2(cw), MAX_BLOCK_C)
        narrow = bc <= (8 if backward else 16) and (backward or (elem <= 2 and gpp == 1))
        return cw, bc, next_pow2(cw) <= MAX_BLOCK_C and bc * next_pow2(S) <= (limit if narrow else limit // 2)

    gpp = _groups_per_program(Cg, G, elem, cl)
    cw, bc, onchip = tiles(gpp)
    if gpp > 1 and not onchip and tiles(1)[2]:
        gpp = 1
        cw, bc, onchip = tiles(1)
    rows = B * (G // gpp) * F
    row_bytes = tensors * cw * S * elem
    phases, n_chunks, chunk_positions = (0,), 1, S
    if onchip:
        bs = next_pow2(S)
        warps = _warps(bc * bs, backward)
        launches = (_Launch((rows, 1), 0, rows),)
    else:
        if gpp > 1 and rows < TARGET_PROGRAMS:  # streaming anyway: one group per program makes more programs
            gpp = 1
            cw, bc, _ = tiles(1)
            rows = B * G * F
            row_bytes = tensors * cw * S * elem
        resident = (l2 // 2) // max(row_bytes, 1)  # rows whose second sweep stays in L2
        if rows >= TARGET_PROGRAMS and resident >= sms:
            launches = (_Launch((min(rows, resident), 1), 0, rows),)
        else:  # few (or huge) rows: chunks along S, in waves of rows that fit in half the L2
            gpp = 1
            cw, bc, _ = tiles(1)
            rows = B * G * F
            row_bytes = tensors * cw * S * elem
            phases = (1, 2)
            bs_ = min(max(1, stream_tile // bc), next_pow2(S))
            n_chunks = max(1, min(cdiv(TARGET_PROGRAMS, max(rows, 1)), MAX_CHUNKS, cdiv(S, bs_)))
            chunk_positions = cdiv(cdiv(S, n_chunks), bs_) * bs_
            n_chunks = cdiv(S, chunk_positions)
            wave = max(1, (l2 // 2) // max(row_bytes, 1))
            launches = tuple(_Launch((min(wave, rows - r0), n_chunks), r0, min(rows, r0 + wave))
                             for r0 in range(0, rows, wave))
        bs = min(max(1, stream_tile // bc), next_pow2(S))
        warps = STREAM_WARPS
    assert gpp == 1 or next_pow2(cw) <= MAX_BLOCK_C, "a group block of several groups is one channel block"
    constexprs = dict(CL=cl, GPP=gpp, CW_ALIGN=_pow2_dividing(cw), BLOCK_C=bc, BLOCK_S=bs, ONCHIP=onchip,
                      INT64=int64, P_BLOCK=MAX_CHUNKS)
    return Plan(fmt=fmt, strides=tuple(out_strides), copy_x=not same, stats_shape=(B, G, F, 2), rows=rows,
                n_chunks=n_chunks, phases=phases, launches=launches,
                sizes=(G // gpp, Cg, F, S, chunk_positions, n_chunks), strides_arg=(sb, sf, so),
                constexprs=constexprs, num_warps=warps, launch_kw=dict(constexprs, num_warps=warps))


def plan(x: torch.Tensor, num_groups: int, per_frame: bool, backward: bool = False) -> Plan:
    key = (x.shape, x.stride(), x.dtype, x.device, num_groups, per_frame, backward)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _make_plan(tuple(x.shape), tuple(x.stride()), x.dtype, num_groups, per_frame, x.device,
                                     backward)
    return p


def out_layout(shape, strides, fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides of the outputs the launcher allocates (y, dx): compact in x's memory format. With `empty_out`,
    the one place that decides it (the 64-bit test substitutes both: outputs sharing a huge-stride view's layout)."""
    return torch.empty(shape, device="meta").contiguous(memory_format=fmt).stride()


def empty_out(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """The launcher's allocation of y and dx, with the strides `out_layout` gives."""
    return torch.empty_like(x, memory_format=fmt)


def _flags(weight, bias, scale, shift, silu) -> int:
    return ((OPT_W if weight is not None else 0) | (OPT_B if bias is not None else 0)
            | (OPT_SCALE if scale is not None else 0) | (OPT_SHIFT if shift is not None else 0)
            | (OPT_SILU if silu else 0))


def _needs_copy(t: torch.Tensor | None) -> bool:
    """A parameter the kernels cannot read in place: channels not unit-stride (copied once per call)."""
    return t is not None and t.stride(-1) != 1 and t.shape[-1] != 1


class Launcher:
    """What the launches of one call signature need besides its tensors: built once per signature (x's shape,
    strides, dtype and device; which parameters are present and their strides; groups, eps, activation, per_frame:
    the op caches it with its argument checks), so that a call only allocates its outputs and launches.

    Its plans are re-read when `_PLANS` is replaced (tests swap it with the tile limits they patch)."""

    __slots__ = ("num_groups", "eps", "silu", "per_frame", "flags", "copy", "scale_stride", "shift_stride",
                 "_plans", "_fwd", "_bwd")

    def __init__(self, x, num_groups, weight, bias, scale, shift, eps, silu, per_frame):
        self.num_groups, self.eps, self.silu, self.per_frame = num_groups, eps, silu, per_frame
        self.flags = _flags(weight, bias, scale, shift, silu)
        self.copy = tuple(_needs_copy(t) for t in (weight, bias, scale, shift))
        C = x.shape[1]
        # batch strides of the FiLM vectors as the kernels read them (after a copy: contiguous, C)
        self.scale_stride = 0 if scale is None else C if self.copy[2] else scale.stride(0)
        self.shift_stride = 0 if shift is None else C if self.copy[3] else shift.stride(0)
        self._plans, self._fwd, self._bwd = None, None, None

    def _plan(self, x, backward: bool) -> Plan:
        if self._plans is not _PLANS:
            self._plans, self._fwd, self._bwd = _PLANS, None, None
        p = self._bwd if backward else self._fwd
        if p is None:
            p = plan(x, self.num_groups, self.per_frame, backward)
            if backward:
                self._bwd = p
            else:
                self._fwd = p
        return p

    def _params(self, x, weight, bias, scale, shift):
        """The four parameter pointers (x stands in for an absent one: never read, OPT_* says so)."""
        if True in self.copy:
            weight, bias, scale, shift = (t.contiguous() if c else t
                                          for t, c in zip((weight, bias, scale, shift), self.copy))
        return (x if weight is None else weight, x if bias is None else bias, x if scale is None else scale,
                x if shift is None else shift)

    def forward(self, x, weight, bias, scale, shift):
        """(y, stats): y of x's shape, dtype and memory format; stats (B, G, F, 2) fp32 (mean, rstd)."""
        p = self._fwd if self._plans is _PLANS and self._fwd is not None else self._plan(x, False)
        y = empty_out(x, p.fmt)
        stats = torch.empty(p.stats_shape, dtype=torch.float32, device=x.device)
        if p.empty:
            return y, stats.fill_(float("nan"))  # the statistics of no elements (as torch's mean of nothing)
        if p.copy_x:
            x = x.contiguous(memory_format=p.fmt)
        assert y.stride() == p.strides, "y must share the layout the plan was made for"
        w, b, s, sh = self._params(x, weight, bias, scale, shift)
        part = (torch.empty((p.rows, 2, p.n_chunks), dtype=torch.float32, device=x.device) if p.phases != (0,)
                else stats)
        with device_guard(x):
            for phase in p.phases:
                for launch in p.launches:
                    _fwd_kernel[launch.grid](x, y, stats, part, w, b, s, sh, launch.row_begin, launch.row_end,
                                             *p.sizes, *p.strides_arg, self.scale_stride, self.shift_stride, self.eps,
                                             self.flags, phase, **p.launch_kw)
        return y, stats

    def backward(self, dy, x, stats, weight, bias, scale, shift):
        """(dx, dweight, dbias, dscale, dshift): dx in x's layout, each parameter gradient contiguous in its
        parameter's dtype (None for an absent one)."""
        p = self._bwd if self._plans is _PLANS and self._bwd is not None else self._plan(x, True)
        dx = empty_out(x, p.fmt)
        B, C = x.shape[:2]
        params = (weight, bias, scale, shift)
        if p.empty:  # sums over no elements
            return (dx, *(None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=x.device)
                          for t in params))
        # empty_like: about half the host time of torch.empty(t.shape, dtype=..., device=...)
        grads = [None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format) for t in params]
        if p.copy_x:
            x = x.contiguous(memory_format=p.fmt)
        if dy.stride() != p.strides and any(n != 1 and a != b for n, a, b in zip(dy.shape, dy.stride(), p.strides)):
            dy = dy.contiguous(memory_format=p.fmt)  # e.g. the expanded gradient of a sum()
        assert dx.stride() == p.strides, "dx must share the layout the plan was made for"
        w, b, s, sh = self._params(x, *params)
        F = p.stats_shape[2]
        part = torch.empty((B, F * p.n_chunks, 2, C), dtype=torch.float32, device=x.device)
        rowsum = (torch.empty((p.rows, 2, p.n_chunks), dtype=torch.float32, device=x.device) if p.phases != (0,)
                  else part)
        with device_guard(x):
            for phase in p.phases:
                for launch in p.launches:
                    _bwd_kernel[launch.grid](dy, x, dx, stats, part, rowsum, w, b, s, sh, launch.row_begin,
                                             launch.row_end, *p.sizes, *p.strides_arg, self.scale_stride,
                                             self.shift_stride, self.flags, phase, **p.launch_kw)
            if any(g is not None for g in grads):
                dw, db, ds, dsh = (part if g is None else g for g in grads)
                _bwd_params_kernel[(cdiv(C, PARAM_BLOCK_C),)](
                    part, w, b, s, sh, dw, db, ds, dsh, B, C, F * p.n_chunks, self.scale_stride, self.shift_stride,
                    self.flags, BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C, num_warps=4)
        return (dx, *grads)


def forward(x, num_groups, weight, bias, scale, shift, eps, silu, per_frame):
    """One call without a cached Launcher: (y, stats) as `Launcher.forward`."""
    return Launcher(x, num_groups, weight, bias, scale, shift, eps, silu, per_frame).forward(x, weight, bias, scale,
                                                                                             shift)


def backward(dy, x, stats, num_groups, weight, bias, scale, shift, silu, per_frame):
    """One call without a cached Launcher: the gradients as `Launcher.backward`."""
    return Launcher(x, num_groups, weight, bias, scale, shift, 0.0, silu, per_frame).backward(dy, x, stats, weight,
                                                                                              bias, scale, shift)


# ------------------------------------------------------------------------------------------- compile configs

# The U-Net's headline cases (per-frame GroupNorm of the residual blocks at 64 x 64, T = 16, 32 groups), both
# layouts and base widths, then each level's narrower and wider groups: (shape, num_groups, per_frame, channels_last).
UNET_CASES = [
    ((2, C, 16, hw, hw), 32, True, cl)
    for C, hw in ((128, 64), (256, 64), (256, 32), (384, 16), (512, 32), (512, 8), (896, 32), (1024, 16), (2048, 8))
    for cl in (True, False)
]
_DATA_PTRS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")  # in x's dtype; parameters in theirs (here: x's), rest fp32


def _case_config(fn, name: str, dtype: torch.dtype, p: Plan) -> KernelConfig:
    dt = TRITON_DTYPE_NAMES[dtype]
    sig = {}
    for q in fn.params:
        if q.is_constexpr:
            continue
        if q.name.endswith("_ptr"):
            sig[q.name] = "*" + (dt if q.name in _DATA_PTRS or q.name[:-4] in ("w", "b", "scale", "shift") else "fp32")
        else:
            sig[q.name] = "fp32" if q.name == "eps" else "i32"
    return KernelConfig(name, fn, sig, dict(p.constexprs), num_warps=p.num_warps)


def compile_configs() -> list[KernelConfig]:
    """The (kernel, constexprs, warps) the launchers take on the U-Net cases (bf16; fp32 and fp16 on the headline
    ones) and on a streaming and a chunked case per layout (phases are runtime), with plain i32 integers; the
    real specialization is `python -m vdm_fast.kernels._compile --real` (its cases run these launchers)."""
    configs, seen = [], set()
    extra = [((2, 64, 16, 64, 64), 1, False, False), ((2, 64, 16, 64, 64), 1, False, True),
             ((64, 256, 16, 64, 64), 32, True, False), ((64, 256, 16, 64, 64), 32, True, True)]
    for dtype in TRITON_DTYPE_NAMES:
        # bf16 (what the U-Net runs under autocast) on every case; fp32 and fp16 on the headline ones and the extras.
        cases = UNET_CASES if dtype == torch.bfloat16 else UNET_CASES[:4]
        for shape, G, per_frame, cl in cases + extra:
            strides = torch.empty(shape, device="meta").contiguous(
                memory_format=torch.channels_last_3d if cl else torch.contiguous_format).stride()
            for fn, direction in ((_fwd_kernel, "fwd"), (_bwd_kernel, "bwd")):
                p = _make_plan(shape, strides, dtype, G, per_frame, torch.device("meta"), direction == "bwd")
                key = (direction, dtype, tuple(sorted(p.constexprs.items())), p.num_warps)
                if key in seen:
                    continue
                seen.add(key)
                c = p.constexprs
                name = (f"group_norm_silu_{direction}_{TRITON_DTYPE_NAMES[dtype]}_{'cl' if c['CL'] else 'cf'}"
                        f"_g{c['GPP']}_c{c['BLOCK_C']}_s{c['BLOCK_S']}{'_onchip' if c['ONCHIP'] else ''}_w{p.num_warps}")
                configs.append(_case_config(fn, name, dtype, p))
    sig = _case_config(_bwd_params_kernel, "", torch.float32, _make_plan(
        (2, 8, 4), (32, 4, 1), torch.float32, 2, False, torch.device("meta"), True)).signature
    configs.append(KernelConfig("group_norm_silu_bwd_params", _bwd_params_kernel, sig,
                                dict(BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C), num_warps=4))
    return configs
