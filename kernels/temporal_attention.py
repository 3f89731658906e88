"""Fused temporal attention: softmax(q k^T * scale + bias, masked) v over T <= 128 frames, for N unbounded sequences.

Math, per sequence n and head h (T frames, head dim D): S = Q K^T * scale + bias[h] (masked entries -inf),
P = softmax(S) row-wise, O = P V; a row with nothing allowed gives O = 0. Softmax statistics in fp32, base 2 (scale
and the bias pre-multiplied by log2 e); the forward saves lse = log2-sum-exp per row for the backward, which
recomputes P and forms dV = P^T dO, dP = dO V^T, dS = P (dP - delta) with delta = rowsum(P * dP) = rowsum(dO * O)
(the first where the whole T x T tile is in registers, the second in the blocked path), dQ = dS K scale, dK = dS^T Q scale,
dbias = sum over the sequences of dS.

Layout. A sequence is addressed as (sample b, position s), n = b * S + s, with a stride for each, so both layouts the
op takes are read in place, q, k, v, dO through their own strides:
- 4-D views (N, heads, T, d), any strides: B is the per-sample bias / mask batch (or 1), S = N / B, b-stride
  S * n-stride (valid for any view: n has one stride);
- packed (PACKED=True): the projection qkv (B, T, S, 3 * heads * d) of a channels_last_3d activation (S = H * W),
  q, k, v at head offsets 0, heads, 2 * heads of the last dim; k and v are addressed from q's pointer and strides.
The tensors the launcher allocates share one layout, fixed by PACKED, so the kernels take no strides for them:
- PACKED=False: out (N, T, heads, d) memory (returned as the (N, heads, T, d) view the output projection reads as
  is); dq, dk, dv one buffer (3, N, T, heads, d);
- PACKED=True: out (B, T, S, heads * d); dqkv (B, T, S, 3 * heads * d), the projection's gradient, written once.
lse and the backward's delta scratch are (N, heads, T) fp32. Kernel arguments: sizes upper case (SEQS = S positions a
sample, T frames, HEADS, SEQ_BLOCKS, head dim D), strides s<tensor>_<dim> (sq_t: q's frame stride), only of tensors
whose strides can differ (q, k, v, dO, bias, mask); integers equal to 1 become constants in the JIT's specialization.

Grid: 1-D, program p -> (b, sequence block, head) with heads fastest, so consecutive programs read adjacent d-rows
of the packed projection. A program owns BN consecutive positions s of one sample and one head and never straddles
two samples, so a per-sample bias / mask tile is loaded once per key block and shared by its sequences. Small tiles:
BN = num_warps sequences, one a warp, the whole T x T score tile in registers as 3D tiles with a batched tl.dot.
Larger tiles: one sequence, BM query rows x BK keys a block, online softmax over the key blocks. Every load of a
block (q, k, v, bias, mask) is issued before its first dot.

Backward: each program writes the bias gradient summed over its sequences to its own partial slot; the launcher sums
the slots per sample in a fixed order: no atomics, bitwise reproducible. Design and history:
kernels/notes/temporal_attention.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vdm_fast.kernels._common import LOG2E, TRITON_DTYPE_NAMES, cdiv, device_guard, interpreting, next_pow2

_LOG2E = tl.constexpr(LOG2E)
# Cap on the backward's bias partials (fp32 elements, 64 MiB): bounds the scratch whatever N is.
MAX_PARTIAL_ELEMENTS = 1 << 24


@triton.jit
def _dot(a, b, TA: tl.constexpr, TB: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Batched a @ b over [BN, ., .] tiles (TA / TB: transpose that operand's last two dims), fp32 result.

    Triton puts every warp of a 3D dot on the batch dim, so the launcher uses BN = num_warps (one sequence a warp)
    or BN = 1; with BN = 1 the tiles are made 2D so that the warps split the rows instead of all repeating them.
    """
    if UPCAST:
        # Under the interpreter only: Triton 3.6 multiplies bf16 tiles as their raw uint16 bits. bf16 products are
        # exact in fp32, so fp32 operands compute the same dot the GPU's bf16 MMA does.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    prec: tl.constexpr = "ieee" if UPCAST else PREC
    if a.shape[0] == 1:
        a2 = tl.reshape(a, [a.shape[1], a.shape[2]])
        b2 = tl.reshape(b, [b.shape[1], b.shape[2]])
        if TA:
            a2 = tl.trans(a2)
        if TB:
            b2 = tl.trans(b2)
        c = tl.dot(a2, b2, input_precision=prec)
        return tl.reshape(c, [1, c.shape[0], c.shape[1]])
    if TA:
        a = tl.trans(a, 0, 2, 1)
    if TB:
        b = tl.trans(b, 0, 2, 1)
    return tl.dot(a, b, input_precision=prec)


@triton.jit
def _program(SEQS, HEADS, SEQ_BLOCKS, pid, BN: tl.constexpr):
    """Program pid -> sample b (int64 scalar), head h, positions s [BN, 1, 1] (int64) and their validity."""
    h = pid % HEADS
    rest = pid // HEADS
    b = (rest // SEQ_BLOCKS).to(tl.int64)
    s = ((rest % SEQ_BLOCKS).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64))[:, None, None]
    return b, h, s, s < SEQS


@triton.jit
def _own_row(b, s, h, t, SEQS, T, HEADS, ROW, D: tl.constexpr, PACKED: tl.constexpr):
    """Element offset of row t of (b, s, h) in a launcher-allocated tensor whose rows hold ROW elements."""
    if PACKED:
        return ((b * T + t) * SEQS + s) * ROW + h * D
    return (((b * SEQS + s) * T + t) * HEADS + h) * D


@triton.jit
def _block_scores(q, k, bias, allowed, ok, qk_scale, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scores in log2 units, fp32, -inf where attention is not allowed (padding, mask, absent sequence)."""
    sc = _dot(q, k, False, True, PREC, UPCAST) * qk_scale
    if HAS_BIAS:
        sc += bias.to(tl.float32) * _LOG2E
    if HAS_MASK:
        ok = ok & (allowed != 0)
    return tl.where(ok, sc, float("-inf"))


@triton.jit
def _tile_scores(q, k, bias_at, mask_at, rows, cols, sbias_i, sbias_j, smask_i, smask_j, tile_ok, s_ok, qk_scale,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """`_block_scores` of the (rows, cols) tile, its bias and mask loaded through their strides."""
    bias = tl.load(bias_at + rows * sbias_i + cols * sbias_j, mask=tile_ok, other=0.0) if HAS_BIAS else 0.0
    allowed = tl.load(mask_at + rows * smask_i + cols * smask_j, mask=tile_ok, other=0) if HAS_MASK else 1
    return _block_scores(q, k, bias, allowed, s_ok & tile_ok, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, MASK, OUT, LSE,
    sq_b, sq_s, sq_h, sq_t, sq_d, sk_b, sk_s, sk_h, sk_t, sk_d, sv_b, sv_s, sv_h, sv_t, sv_d,
    sbias_b, sbias_h, sbias_i, sbias_j, smask_b, smask_i, smask_j,
    SEQS, T, HEADS, SEQ_BLOCKS, qk_scale,
    D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Passes of BM query rows; within a pass, blocks of BK keys with an online softmax (one block up to T = BK:
    then it is the plain softmax). Blocks past T are masked."""
    b, h, s, s_ok = _program(SEQS, HEADS, SEQ_BLOCKS, tl.program_id(0), BN)
    d_col = tl.arange(0, BD)[None, None, :]
    d_ok = d_col < D
    q_at = Q + b * sq_b + s * sq_s + h * sq_h + d_col * sq_d
    if PACKED:  # k and v: the next two groups of heads in q's row
        k_at = q_at + HEADS * sq_h
        v_at = k_at + HEADS * sq_h
        sk_t = sq_t
        sv_t = sq_t
    else:
        k_at = K + b * sk_b + s * sk_s + h * sk_h + d_col * sk_d
        v_at = V + b * sv_b + s * sv_s + h * sv_h + d_col * sv_d
    bias_at = BIAS + b * sbias_b + h * sbias_h
    mask_at = MASK + b * smask_b
    for m0 in range(0, BT, BM):
        rows = m0 + tl.arange(0, BM)[None, :, None]
        row_ok = s_ok & (rows < T) & d_ok
        q = tl.load(q_at + rows * sq_t, mask=row_ok, other=0.0)
        m = tl.full([BN, BM], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BN, BM], dtype=tl.float32)
        acc = tl.zeros([BN, BM, BD], dtype=tl.float32)
        for j0 in range(0, BT, BK):
            keys = j0 + tl.arange(0, BK)[None, :, None]
            cols = j0 + tl.arange(0, BK)[None, None, :]
            key_ok = s_ok & (keys < T) & d_ok
            tile_ok = (rows < T) & (cols < T)  # [1, BM, BK]: the bias / mask tile is the same for all BN sequences
            k = tl.load(k_at + keys * sk_t, mask=key_ok, other=0.0)
            v = tl.load(v_at + keys * sv_t, mask=key_ok, other=0.0)
            sc = _tile_scores(q, k, bias_at, mask_at, rows, cols, sbias_i, sbias_j, smask_i, smask_j, tile_ok, s_ok,
                              qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
            m_new = tl.maximum(m, tl.max(sc, 2))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: p = 0, not NaN
            p = tl.math.exp2(sc - shift[:, :, None])
            alpha = tl.math.exp2(m - shift)  # 0 on the first block (m = -inf)
            l = l * alpha + tl.sum(p, 2)
            acc = acc * alpha[:, :, None] + _dot(p.to(v.dtype), v, False, False, PREC, UPCAST)
            m = m_new
        has = l > 0  # a row with nothing allowed gives 0 (no division by its l = 0 either)
        inv = tl.where(has, 1.0 / tl.where(has, l, 1.0), 0.0)
        o_at = OUT + _own_row(b, s, h, rows, SEQS, T, HEADS, HEADS * D, D, PACKED) + d_col
        tl.store(o_at, (acc * inv[:, :, None]).to(OUT.dtype.element_ty), mask=row_ok)
        lse = tl.where(has, m + tl.math.log2(tl.where(has, l, 1.0)), 0.0)
        lse_at = LSE + ((b * SEQS + s) * HEADS + h) * T + rows  # [BN, BM, 1]
        tl.store(tl.reshape(lse_at, [BN, BM]), lse, mask=tl.reshape(s_ok & (rows < T), [BN, BM]))


@triton.jit
def _bwd_kernel(
    Q, K, V, O, DO, LSE, DELTA, BIAS, MASK, DQKV, PARTIALS,
    sq_b, sq_s, sq_h, sq_t, sq_d, sk_b, sk_s, sk_h, sk_t, sk_d, sv_b, sv_s, sv_h, sv_t, sv_d,
    sbias_b, sbias_h, sbias_i, sbias_j, smask_b, smask_i, smask_j,
    KV_STEP, SEQS, T, HEADS, SEQ_BLOCKS, scale, qk_scale, PID0, sdo_b, sdo_s, sdo_h, sdo_t, sdo_d,
    D: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program pid of this launch is program pid + PID0 of the grid (the launcher splits the grid to bound the bias
    partials); it writes its bias-gradient partial, summed over its BN sequences, to PARTIALS[pid]. No loop over
    sequence blocks: a persistent loop made LLVM hoist every tile's addresses out of it and spill. dq, dk, dv of an
    element lie KV_STEP elements apart in DQKV (packed: heads * d, one row; else N * T * heads * d)."""
    pid = tl.program_id(0)
    b, h, s, s_ok = _program(SEQS, HEADS, SEQ_BLOCKS, pid + PID0, BN)
    d_col = tl.arange(0, BD)[None, None, :]
    d_ok = d_col < D
    q_at = Q + b * sq_b + s * sq_s + h * sq_h + d_col * sq_d
    if PACKED:
        k_at = q_at + HEADS * sq_h
        v_at = k_at + HEADS * sq_h
        sk_t = sq_t
        sv_t = sq_t
        grad_row = 3 * HEADS * D
    else:
        k_at = K + b * sk_b + s * sk_s + h * sk_h + d_col * sk_d
        v_at = V + b * sv_b + s * sv_s + h * sv_h + d_col * sv_d
        grad_row = HEADS * D
    do_at = DO + b * sdo_b + s * sdo_s + h * sdo_h + d_col * sdo_d
    bias_at = BIAS + b * sbias_b + h * sbias_h
    mask_at = MASK + b * smask_b
    stat_at = ((b * SEQS + s) * HEADS + h) * T  # [BN, 1, 1]: lse / delta rows of (b, s, h)
    partial = PARTIALS + pid.to(tl.int64) * T * T
    if BM == BT:
        # The whole T x T tile at once: one pass computes everything. All loads first, then the dots.
        t_row = tl.arange(0, BT)[None, :, None]
        t_col = tl.arange(0, BT)[None, None, :]
        ok = s_ok & (t_row < T) & d_ok
        tile_ok = (t_row < T) & (t_col < T)
        q = tl.load(q_at + t_row * sq_t, mask=ok, other=0.0)
        k = tl.load(k_at + t_row * sk_t, mask=ok, other=0.0)
        v = tl.load(v_at + t_row * sv_t, mask=ok, other=0.0)
        do = tl.load(do_at + t_row * sdo_t, mask=ok, other=0.0)
        stat_ok = tl.reshape(s_ok & (t_row < T), [BN, BT])
        lse = tl.load(tl.reshape(LSE + stat_at + t_row, [BN, BT]), mask=stat_ok, other=0.0)
        bias = tl.load(bias_at + t_row * sbias_i + t_col * sbias_j, mask=tile_ok, other=0.0) if HAS_BIAS else 0.0
        allowed = tl.load(mask_at + t_row * smask_i + t_col * smask_j, mask=tile_ok, other=0) if HAS_MASK else 1
        sc = _block_scores(q, k, bias, allowed, s_ok & tile_ok, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
        p = tl.math.exp2(sc - lse[:, :, None])  # 0 where not allowed, and in fully masked rows
        g_at = DQKV + _own_row(b, s, h, t_row, SEQS, T, HEADS, grad_row, D, PACKED) + d_col
        dv = _dot(p.to(do.dtype), do, True, False, PREC, UPCAST)
        tl.store(g_at + 2 * KV_STEP, dv.to(DQKV.dtype.element_ty), mask=ok)
        dp = _dot(do, v, False, True, PREC, UPCAST)
        # rowsum(dO * O) = rowsum(P * dP): formed from this tile, O is not read, and dS is exactly 0 where the
        # softmax gradient vanishes (T = 1) rather than the rounding difference of two ways to sum the same thing.
        delta = tl.sum(p * dp, 2)
        ds = p * (dp - delta[:, :, None])  # dL/d(score), fp32
        dq = _dot(ds.to(k.dtype), k, False, False, PREC, UPCAST) * scale
        tl.store(g_at, dq.to(DQKV.dtype.element_ty), mask=ok)
        dk = _dot(ds.to(q.dtype), q, True, False, PREC, UPCAST) * scale
        tl.store(g_at + KV_STEP, dk.to(DQKV.dtype.element_ty), mask=ok)
        if BIAS_GRAD:
            r = tl.arange(0, BT)[:, None]
            c = tl.arange(0, BT)[None, :]
            tl.store(partial + r * T + c, tl.sum(ds, 0), mask=(r < T) & (c < T))
    else:
        # Blocks of BM rows x BM keys, so no tile outgrows the registers. Pass 1, per row block: delta (saved for
        # pass 2), dq over the key blocks, and each (rows, keys) block of the bias partial, written once.
        for i0 in range(0, BT, BM):
            rows = i0 + tl.arange(0, BM)[None, :, None]
            row_ok = s_ok & (rows < T) & d_ok
            stat_ok = tl.reshape(s_ok & (rows < T), [BN, BM])
            stat = tl.reshape(stat_at + rows, [BN, BM])
            q = tl.load(q_at + rows * sq_t, mask=row_ok, other=0.0)
            do = tl.load(do_at + rows * sdo_t, mask=row_ok, other=0.0)
            o = tl.load(O + _own_row(b, s, h, rows, SEQS, T, HEADS, HEADS * D, D, PACKED) + d_col, mask=row_ok,
                        other=0.0)
            lse = tl.load(LSE + stat, mask=stat_ok, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)
            tl.store(DELTA + stat, delta, mask=stat_ok)
            dq = tl.zeros([BN, BM, BD], dtype=tl.float32)
            for j0 in range(0, BT, BM):
                keys = j0 + tl.arange(0, BM)[None, :, None]
                cols = j0 + tl.arange(0, BM)[None, None, :]
                key_ok = s_ok & (keys < T) & d_ok
                tile_ok = (rows < T) & (cols < T)
                k = tl.load(k_at + keys * sk_t, mask=key_ok, other=0.0)
                v = tl.load(v_at + keys * sv_t, mask=key_ok, other=0.0)
                sc = _tile_scores(q, k, bias_at, mask_at, rows, cols, sbias_i, sbias_j, smask_i, smask_j, tile_ok,
                                  s_ok, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
                p = tl.math.exp2(sc - lse[:, :, None])
                ds = p * (_dot(do, v, False, True, PREC, UPCAST) - delta[:, :, None])
                dq += _dot(ds.to(k.dtype), k, False, False, PREC, UPCAST)
                if BIAS_GRAD:
                    r = i0 + tl.arange(0, BM)[:, None]
                    c = j0 + tl.arange(0, BM)[None, :]
                    tl.store(partial + r * T + c, tl.sum(ds, 0), mask=(r < T) & (c < T))
            g_at = DQKV + _own_row(b, s, h, rows, SEQS, T, HEADS, grad_row, D, PACKED) + d_col
            tl.store(g_at, (dq * scale).to(DQKV.dtype.element_ty), mask=row_ok)
        tl.debug_barrier()  # pass 2 reads the delta this CTA wrote in pass 1
        # Pass 2, per key block: dk and dv over the row blocks.
        for j0 in range(0, BT, BM):
            keys = j0 + tl.arange(0, BM)[None, :, None]
            cols = j0 + tl.arange(0, BM)[None, None, :]
            key_ok = s_ok & (keys < T) & d_ok
            k = tl.load(k_at + keys * sk_t, mask=key_ok, other=0.0)
            v = tl.load(v_at + keys * sv_t, mask=key_ok, other=0.0)
            dk = tl.zeros([BN, BM, BD], dtype=tl.float32)
            dv = tl.zeros([BN, BM, BD], dtype=tl.float32)
            for i0 in range(0, BT, BM):
                rows = i0 + tl.arange(0, BM)[None, :, None]
                row_ok = s_ok & (rows < T) & d_ok
                tile_ok = (rows < T) & (cols < T)
                stat_ok = tl.reshape(s_ok & (rows < T), [BN, BM])
                stat = tl.reshape(stat_at + rows, [BN, BM])
                q = tl.load(q_at + rows * sq_t, mask=row_ok, other=0.0)
                do = tl.load(do_at + rows * sdo_t, mask=row_ok, other=0.0)
                lse = tl.load(LSE + stat, mask=stat_ok, other=0.0)
                delta = tl.load(DELTA + stat, mask=stat_ok, other=0.0)
                sc = _tile_scores(q, k, bias_at, mask_at, rows, cols, sbias_i, sbias_j, smask_i, smask_j, tile_ok,
                                  s_ok, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
                p = tl.math.exp2(sc - lse[:, :, None])
                dv += _dot(p.to(do.dtype), do, True, False, PREC, UPCAST)
                ds = p * (_dot(do, v, False, True, PREC, UPCAST) - delta[:, :, None])
                dk += _dot(ds.to(q.dtype), q, True, False, PREC, UPCAST)
            g_at = DQKV + _own_row(b, s, h, keys, SEQS, T, HEADS, grad_row, D, PACKED) + d_col
            tl.store(g_at + KV_STEP, (dk * scale).to(DQKV.dtype.element_ty), mask=key_ok)
            tl.store(g_at + 2 * KV_STEP, dv.to(DQKV.dtype.element_ty), mask=key_ok)


# ----------------------------------------------------------------------------------------------- launch


def _blocks(frames: int, d: int) -> tuple[int, int]:
    return max(16, next_pow2(frames)), max(16, next_pow2(d))


# Launch configurations, per (fp32?, BT, BD), read off the compile table (regs, spills on sm_80 and sm_90; see
# kernels/notes/temporal_attention.md): the largest blocks that compile without spills. BN = 4 (one sequence a warp,
# 3D dots) where a whole T x T tile is small; else BN = 1 and BM x BK blocks. fp32 tiles take twice the registers
# (and tf32x3 dots more). bd = 16 uses bd = 32's entry.
# forward: (BN, BM, BK, num_warps)
_FWD = {
    (False, 16, 32): (1, 16, 16, 4), (False, 16, 64): (4, 16, 16, 4), (False, 16, 128): (1, 16, 16, 4),
    (False, 32, 32): (4, 32, 32, 4), (False, 32, 64): (1, 32, 32, 4), (False, 32, 128): (1, 32, 32, 4),
    (False, 64, 32): (1, 32, 16, 4), (False, 64, 64): (1, 32, 32, 4), (False, 64, 128): (1, 32, 16, 4),
    (False, 128, 32): (1, 32, 16, 4), (False, 128, 64): (1, 32, 32, 4), (False, 128, 128): (1, 32, 16, 4),
    (True, 16, 32): (4, 16, 16, 4), (True, 16, 64): (1, 16, 16, 4), (True, 16, 128): (1, 16, 16, 4),
    (True, 32, 32): (1, 32, 32, 4), (True, 32, 64): (1, 32, 32, 4), (True, 32, 128): (1, 16, 16, 8),
    (True, 64, 32): (1, 32, 32, 8), (True, 64, 64): (1, 32, 32, 8), (True, 64, 128): (1, 16, 16, 8),
    (True, 128, 32): (1, 32, 32, 8), (True, 128, 64): (1, 32, 32, 8), (True, 128, 128): (1, 16, 16, 4),
}
# backward: (BN, BM, num_warps); BM == BT: one pass over the whole tile, else the two-pass blocked path.
_BWD = {
    (False, 16, 32): (4, 16, 4), (False, 16, 64): (4, 16, 4), (False, 16, 128): (1, 16, 4),
    (False, 32, 32): (1, 32, 4), (False, 32, 64): (1, 32, 8), (False, 32, 128): (1, 16, 8),
    (False, 64, 32): (1, 32, 8), (False, 64, 64): (1, 32, 8), (False, 64, 128): (1, 16, 8),
    (False, 128, 32): (1, 32, 8), (False, 128, 64): (1, 32, 8), (False, 128, 128): (1, 16, 8),
    (True, 16, 32): (1, 16, 4), (True, 16, 64): (1, 16, 8), (True, 16, 128): (1, 16, 8),
    (True, 32, 32): (1, 16, 4), (True, 32, 64): (1, 16, 8), (True, 32, 128): (1, 16, 8),
    (True, 64, 32): (1, 16, 4), (True, 64, 64): (1, 16, 8), (True, 64, 128): (1, 16, 8),
    (True, 128, 32): (1, 16, 4), (True, 128, 64): (1, 16, 8), (True, 128, 128): (1, 16, 8),
}


def fwd_config(bt: int, bd: int, dtype: torch.dtype) -> dict:
    bn, bm, bk, warps = _FWD[(dtype == torch.float32, bt, max(bd, 32))]
    return dict(BN=bn, BM=bm, BK=bk, num_warps=warps, num_stages=1)


def bwd_config(bt: int, bd: int, dtype: torch.dtype) -> dict:
    bn, bm, warps = _BWD[(dtype == torch.float32, bt, max(bd, 32))]
    return dict(BN=bn, BM=bm, num_warps=warps, num_stages=1)


def _prec(dtype: torch.dtype) -> str:
    # fp32: three tf32 MMAs per product (Triton's split-precision "tf32x3"), ~fp32 accurate on tensor cores;
    # plain tf32 would miss the 1e-4 tolerance. fp16 / bf16 ignore it.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch(kernel, grid: tuple[int], args: tuple, meta: dict) -> None:
    """Every launch goes through here (tests and the host-path benchmark wrap or stub it), on q's (args[0]) GPU."""
    if args[0].is_cuda:
        with device_guard(args[0]):
            kernel[grid](*args, **meta)
    else:  # the interpreter: no device to select (and no context manager to pay for)
        kernel[grid](*args, **meta)


class Plan:
    """Everything about a call that depends only on (shapes, strides, dtypes, flags): grids, constexprs, the integer
    arguments, output shapes. Built once per such key by the op (vdm_fast/ops/temporal_attention.py), so a call
    computes nothing but its pointers.

    `inputs`: q, k, v strides as (b, s, h, t, d) each (packed: q's, with k and v addressed from it). `bias` /
    `mask`: None or (strides (b, h, i, j) / (b, i, j), b-stride 0 when shared). Outputs: see the module docstring.
    """

    __slots__ = ("packed", "shape", "heads", "frames", "d", "dtype", "has_bias", "has_mask", "bias_batch",
                 "out_shape", "out_view", "grad_shape", "fwd_grid", "fwd_args", "fwd_meta", "bwd_args", "bwd_meta",
                 "bwd_grid", "seq_blocks", "needs_delta", "partials_shape", "one_launch", "scale", "lse_shape")

    def __init__(self, *, packed: bool, batch: int, seqs: int, heads: int, frames: int, d: int, dtype: torch.dtype,
                 inputs: tuple, bias: tuple | None, mask: tuple | None, bias_batch: int, scale: float):
        n = batch * seqs
        self.packed, self.shape, self.heads, self.frames, self.d = packed, (batch, seqs), heads, frames, d
        self.dtype, self.has_bias, self.has_mask, self.bias_batch, self.scale = (
            dtype, bias is not None, mask is not None, bias_batch, scale)
        self.lse_shape = (n, heads, frames)
        if packed:
            self.out_shape, self.out_view = (batch, frames, seqs, heads * d), None
            self.grad_shape = (batch, frames, seqs, 3 * heads * d)
        else:
            self.out_shape, self.out_view = (n, frames, heads, d), (1, 2)
            self.grad_shape = (3, n, frames, heads, d)
        bt, bd = _blocks(frames, d)
        fwd = fwd_config(bt, bd, dtype)
        bias_strides = bias if bias is not None else (0, 0, 0, 0)
        mask_strides = mask if mask is not None else (0, 0, 0)
        flags = dict(D=d, BT=bt, BD=bd, PACKED=packed, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                     PREC=_prec(dtype), UPCAST=dtype == torch.bfloat16 and interpreting())
        blocks = cdiv(seqs, fwd["BN"])
        self.fwd_grid = (batch * blocks * heads,)
        qk_scale = scale * LOG2E
        self.fwd_args = (*inputs, *bias_strides, *mask_strides, seqs, frames, heads, blocks, qk_scale)
        self.fwd_meta = dict(flags, BN=fwd["BN"], BM=fwd["BM"], BK=fwd["BK"], num_warps=fwd["num_warps"],
                             num_stages=fwd["num_stages"])
        bwd = bwd_config(bt, bd, dtype)
        self.seq_blocks = cdiv(seqs, bwd["BN"])
        self.needs_delta = bwd["BM"] < bt  # the two-pass path keeps delta in a scratch between its passes
        kv_step = heads * d if packed else n * frames * heads * d
        # Up to PID0 (the first program of a launch), then dO's strides, known only in the backward.
        self.bwd_args = (*inputs, *bias_strides, *mask_strides, kv_step, seqs, frames, heads, self.seq_blocks, scale,
                         qk_scale)
        meta = dict(flags, BN=bwd["BN"], BM=bwd["BM"], num_warps=bwd["num_warps"], num_stages=bwd["num_stages"])
        self.bwd_meta = {False: dict(meta, BIAS_GRAD=False), True: dict(meta, BIAS_GRAD=True)}
        programs = batch * heads * self.seq_blocks
        self.bwd_grid = (programs,)
        cap = max(heads, MAX_PARTIAL_ELEMENTS // max(1, frames * frames))  # programs whose partials fit the cap
        self.one_launch = programs <= cap
        self.partials_shape = (min(cap, programs), frames, frames)


def forward(plan: Plan, q, k, v, bias, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """out (plan.out_shape, viewed (N, heads, T, d) for the 4-D API) and lse (N, heads, T) fp32."""
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=q.device)
    if out.numel():
        _launch(_fwd_kernel, plan.fwd_grid, (q, k, v, q if bias is None else bias, q if mask is None else mask, out,
                                             lse, *plan.fwd_args), plan.fwd_meta)
    return (out.transpose(1, 2) if plan.out_view else out), lse


def backward(plan: Plan, grad_out, do_strides: tuple, q, k, v, out, lse, bias, mask,
             bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient buffer (dqkv, or (3, N, heads, T, d) views) and dbias (fp32, (bias_batch, heads, T, T)) or None.

    Each program writes one bias partial (T, T); they are summed per (sample, head) in a fixed order (torch.sum), in
    launches of at most MAX_PARTIAL_ELEMENTS partial elements, so the scratch stays bounded whatever N is.
    """
    # The kernel addresses out, lse and the gradient buffer by the layout this module allocates them in (no strides
    # passed): out and lse must be the forward's own, unchanged.
    assert (out.transpose(1, 2) if plan.out_view else out).is_contiguous() and lse.is_contiguous(), "not forward's"
    grads = torch.empty(plan.grad_shape, dtype=q.dtype, device=q.device)
    bias_grad = bias_grad and bias is not None
    partials = torch.empty(plan.partials_shape if bias_grad else (1,), dtype=torch.float32, device=q.device)
    ptrs = (q, k, v, out, grad_out, lse, torch.empty_like(lse) if plan.needs_delta else lse,
            q if bias is None else bias, q if mask is None else mask, grads, partials)
    meta = plan.bwd_meta[bias_grad]
    dbias = None
    if grads.numel() == 0:
        if bias_grad:
            dbias = torch.zeros((plan.bias_batch, plan.heads, plan.frames, plan.frames), dtype=torch.float32,
                                device=q.device)
    elif not bias_grad or plan.one_launch:
        _launch(_bwd_kernel, plan.bwd_grid, (*ptrs, *plan.bwd_args, 0, *do_strides), meta)
        if bias_grad:
            dbias = _sum_partials(plan, partials, plan.shape[0])
    else:
        with device_guard(q):  # the partial sums between launches run on q's GPU too
            dbias = _backward_in_chunks(plan, ptrs, do_strides, meta, partials)
    if not plan.packed:
        grads = grads.transpose(2, 3)  # (3, N, heads, T, d) views of (3, N, T, heads, d) memory
    return grads, dbias


def _sum_partials(plan: Plan, partials: torch.Tensor, samples: int) -> torch.Tensor:
    """(samples, heads, T, T) per-sample sums or (1, heads, T, T) for a shared bias, of `samples` whole samples'
    partials (program order: sample, sequence block, head)."""
    heads, frames = plan.heads, plan.frames
    count = samples * plan.seq_blocks * heads
    rows = partials if partials.shape[0] == count else partials[:count]
    if plan.bias_batch == 1:
        return rows.view(-1, heads, frames, frames).sum(0, keepdim=True)
    return rows.view(samples, plan.seq_blocks, heads, frames, frames).sum(1)


def _backward_in_chunks(plan: Plan, ptrs, do_strides, meta, partials) -> torch.Tensor:
    """The bias partials exceed the cap: launches of whole samples, or of parts of one sample, each summed in
    launch order (a fixed order: still bitwise reproducible)."""
    batch, heads, frames, blocks = plan.shape[0], plan.heads, plan.frames, plan.seq_blocks
    per_sample = heads * blocks  # programs of one sample
    cap = partials.shape[0]

    def launch(first: int, count: int) -> None:
        _launch(_bwd_kernel, (count,), (*ptrs, *plan.bwd_args, first, *do_strides), meta)

    dbias = torch.zeros((plan.bias_batch, heads, frames, frames), dtype=torch.float32, device=partials.device)
    if per_sample <= cap:  # whole samples per launch
        per = cap // per_sample
        for b0 in range(0, batch, per):
            nb = min(per, batch - b0)
            launch(b0 * per_sample, nb * per_sample)
            sums = _sum_partials(plan, partials, nb)
            if plan.bias_batch == 1:  # shared bias: every sample adds to it, in launch order
                dbias += sums
            else:
                dbias[b0:b0 + nb] = sums
    else:  # a sample spans launches
        rows = cap // heads  # sequence blocks per launch
        for b in range(batch):
            for r0 in range(0, blocks, rows):
                cnt = min(rows, blocks - r0)
                launch(b * per_sample + r0 * heads, cnt * heads)
                dbias[b if plan.bias_batch > 1 else 0] += partials[: cnt * heads].view(cnt, heads, frames,
                                                                                     frames).sum(0)
    return dbias


# ----------------------------------------------------------------------------------------------- compile check

_CONSTEXPRS = {"D", "BN", "BM", "BK", "BT", "BD", "PACKED", "HAS_BIAS", "HAS_MASK", "BIAS_GRAD", "PREC", "UPCAST"}
_FP32 = {"BIAS", "LSE", "DELTA", "PARTIALS", "qk_scale", "scale"}
_DATA = {"Q", "K", "V", "O", "DO", "OUT", "DQKV"}


def _signature(fn, dtype: torch.dtype, unit: set[str]) -> dict[str, str]:
    """Pointers to q's dtype for the data tensors, fp32 bias / lse / partials, u8 mask, i32 sizes and strides."""
    def ty(a):
        if a in _FP32:
            return ("*fp32" if a.isupper() else "fp32")
        if a == "MASK":
            return "*u8"
        return "*" + TRITON_DTYPE_NAMES[dtype] if a in _DATA else "i32"
    return {a: ty(a) for a in fn.arg_names if a not in _CONSTEXPRS and a not in unit}


# fp32 backward with d > 64 spills a few registers on sm_80 (5 to 34 spill ops) in every configuration tried (see the
# notes): left out of the CI check until it is restructured; all other launch configurations are in it.
SPILLING = {("bwd", torch.float32, bt, 128) for bt in (16, 32, 64, 128)}


def compile_configs(full: bool = False):
    """The launch configurations for the CI compile check (sm_80 / sm_90): every tile (BT, BD) of bf16 and fp32 with
    bias and mask on, plus the other flag combinations and fp16 at the headline tile (T = 16, d = 64), and the
    U-Net's packed-qkv views (PACKED=True) at the headline tile; the flags and fp16 only remove code or rename the
    type. `full=True`: every (dtype, tile, flags) the launchers can use."""
    from vdm_fast.kernels._compile import KernelConfig

    flags_all = ((True, True), (True, False), (False, True), (False, False))
    wanted = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bt in (16, 32, 64, 128):
            for bd in (16, 32, 64, 128):
                for flags in flags_all:
                    headline = bt == 16 and bd == 64 and dtype != torch.float32
                    if full or headline or (dtype != torch.float16 and flags == (True, True)):
                        wanted.append((dtype, bt, bd, flags, False))
                    if headline and flags[0]:  # the layer: packed qkv and a bias, with and without the mask
                        wanted.append((dtype, bt, bd, flags, True))
    configs = []
    for dtype, bt, bd, (has_bias, has_mask), packed in wanted:
        common = dict(D=bd, BT=bt, BD=bd, PACKED=packed, HAS_BIAS=has_bias, HAS_MASK=has_mask, PREC=_prec(dtype),
                      UPCAST=False)
        tag = (f"{TRITON_DTYPE_NAMES[dtype]}_t{bt}_d{bd}{'_bias' if has_bias else ''}{'_mask' if has_mask else ''}"
               f"{'_packed' if packed else ''}")
        for kind, fn, cfg in (("fwd", _fwd_kernel, fwd_config(bt, bd, dtype)),
                              ("bwd", _bwd_kernel, bwd_config(bt, bd, dtype))):
            if (kind, dtype, bt, bd) in SPILLING and not full:
                continue
            # The JIT specializes integers equal to 1 as constants: the common case (contiguous head dim, contiguous
            # last dim of bias / mask) is what is checked.
            unit = {a for a in fn.arg_names if a.startswith("s") and a[-2:] in ("_d", "_j")}
            const = dict(common, BN=cfg["BN"], BM=cfg["BM"], **{a: 1 for a in unit})
            if kind == "fwd":
                const["BK"] = cfg["BK"]
            else:
                const["BIAS_GRAD"] = has_bias
            configs.append(KernelConfig(
                name=f"temporal_attention_{kind}_{tag}", fn=fn, signature=_signature(fn, dtype, unit),
                constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], expect_mma=True))
    return configs
