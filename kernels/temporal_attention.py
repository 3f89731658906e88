"""Fused temporal attention: softmax(q k^T * scale + bias, masked) v over T <= 128 frames, for N unbounded sequences.

The work is memory-bound (T is tiny). A program owns BN sequences of one head (grid axis 0: sequence blocks, limit
2^31 - 1; axis 1: heads) and reads q, k, v, out and the gradients through their strides (views straight out of a
model's rearrange, no copy). Small tiles: BN = num_warps sequences, one a warp, the whole T x T score tile in
registers as 3D tiles with a batched tl.dot. Larger tiles: one sequence, BM query rows x BK keys a block, online
softmax over the key blocks. Softmax statistics in fp32, base 2.

Backward recomputes P from q, k and the forward's per-row log-sum-exp. Each program writes the bias gradient summed
over its sequences to its own partial slot (programs never straddle two samples of a per-sample bias); the launcher
sums the slots in a fixed order: no atomics, bitwise reproducible. Design and history: kernels/notes/temporal_attention.md.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Cap on the backward's bias partials (fp32 elements, 64 MiB): bounds the scratch whatever N is.
MAX_PARTIAL_ELEMENTS = 1 << 24


@triton.jit
def _ptrs(base, n, h, rows, cols, s_n, s_h, s_r, s_c):
    """Pointers of a [BN, R, C] tile: sequences n [BN,1,1] (int64), rows [1,R,1], cols [1,1,C] of head h."""
    return base + n * s_n + h * s_h + rows * s_r + cols * s_c


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
def _scores(q, k, n, h, rows, cols, n_ok, T, BIAS, MASK, S_BIAS, S_MASK,
            s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj, qk_scale,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scores in log2 units, [BN, BM, BT] fp32, -inf where attention is not allowed (padding, mask, absent n)."""
    s = _dot(q, k, False, True, PREC, UPCAST) * qk_scale
    ok = n_ok & (rows < T) & (cols < T)
    if HAS_BIAS:
        b = tl.load(BIAS + (n // S_BIAS) * s_bb + h * s_bh + rows * s_bi + cols * s_bj, mask=ok, other=0.0)
        s += b.to(tl.float32) * LOG2E
    if HAS_MASK:
        allowed = tl.load(MASK + (n // S_MASK) * s_mb + rows * s_mi + cols * s_mj, mask=ok, other=0)
        ok = ok & (allowed != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _load_rows(X, n, h, rows, d_col, s_n, s_h, s_t, s_d, ok):
    return tl.load(_ptrs(X, n, h, rows, d_col, s_n, s_h, s_t, s_d), mask=ok, other=0.0)


@triton.jit
def _store_rows(X, n, h, rows, d_col, s_n, s_h, s_t, s_d, x, ok):
    tl.store(_ptrs(X, n, h, rows, d_col, s_n, s_h, s_t, s_d), x.to(X.dtype.element_ty), mask=ok)


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, MASK, OUT, LSE,
    s_qn, s_qh, s_qt, s_qd, s_kn, s_kh, s_kt, s_kd, s_vn, s_vh, s_vt, s_vd, s_on, s_oh, s_ot, s_od,
    s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj,
    N, T, D, S_BIAS, S_MASK, qk_scale,
    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i, h): sequences i*BN .. i*BN+BN-1 of head h. Passes of BM query rows; within a pass, blocks of BK
    keys with an online softmax (one block up to T = BK: then it is the plain softmax). Blocks past T are masked."""
    h = tl.program_id(1)
    n1 = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    n = n1[:, None, None]  # [BN,1,1]
    n_ok = n < N
    d_col = tl.arange(0, BD)[None, None, :]
    d_ok = d_col < D
    for m0 in range(0, BT, BM):
        rows = m0 + tl.arange(0, BM)[None, :, None]
        row_ok = n_ok & (rows < T) & d_ok
        q = _load_rows(Q, n, h, rows, d_col, s_qn, s_qh, s_qt, s_qd, row_ok)
        m = tl.full([BN, BM], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BN, BM], dtype=tl.float32)
        acc = tl.zeros([BN, BM, BD], dtype=tl.float32)
        for j0 in range(0, BT, BK):
            keys = j0 + tl.arange(0, BK)[None, :, None]
            key_ok = n_ok & (keys < T) & d_ok
            k = _load_rows(K, n, h, keys, d_col, s_kn, s_kh, s_kt, s_kd, key_ok)
            v = _load_rows(V, n, h, keys, d_col, s_vn, s_vh, s_vt, s_vd, key_ok)
            cols = j0 + tl.arange(0, BK)[None, None, :]
            s = _scores(q, k, n, h, rows, cols, n_ok, T, BIAS, MASK, S_BIAS, S_MASK,
                        s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
            m_new = tl.maximum(m, tl.max(s, 2))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: p = 0, not NaN
            p = tl.math.exp2(s - shift[:, :, None])
            alpha = tl.math.exp2(m - shift)  # 0 on the first block (m = -inf)
            l = l * alpha + tl.sum(p, 2)
            acc = acc * alpha[:, :, None] + _dot(p.to(v.dtype), v, False, False, PREC, UPCAST)
            m = m_new
        has = l > 0  # a row with nothing allowed gives 0 (no division by its l = 0 either)
        inv = tl.where(has, 1.0 / tl.where(has, l, 1.0), 0.0)
        _store_rows(OUT, n, h, rows, d_col, s_on, s_oh, s_ot, s_od, acc * inv[:, :, None], row_ok)
        lse = tl.where(has, m + tl.math.log2(tl.where(has, l, 1.0)), 0.0)
        r2 = m0 + tl.arange(0, BM)[None, :]
        tl.store(LSE + (n1[:, None] * tl.num_programs(1) + h) * T + r2, lse, mask=(n1[:, None] < N) & (r2 < T))


@triton.jit
def _bwd_kernel(
    Q, K, V, O, DO, LSE, DELTA, BIAS, MASK, DQ, DK, DV, DBP,
    s_qn, s_qh, s_qt, s_qd, s_kn, s_kh, s_kt, s_kd, s_vn, s_vh, s_vt, s_vd, s_on, s_oh, s_ot, s_od,
    s_gn, s_gh, s_gt, s_gd, s_dqn, s_dqh, s_dqt, s_dqd, s_dkn, s_dkh, s_dkt, s_dkd, s_dvn, s_dvh, s_dvt, s_dvd,
    s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj,
    N, T, D, S_BIAS, S_MASK, S_GROUP, BLOCKS, PID0, scale, qk_scale,
    BN: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (p - PID0, h) handles sequence block p % BLOCKS of group p // BLOCKS (a group: S_GROUP sequences, one
    sample of a per-sample bias, else all N) and writes its bias-gradient partial, summed over its BN sequences,
    to DBP[p - PID0, h]. No loop over sequence blocks: a persistent loop made LLVM hoist every tile's addresses
    out of it and spill."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    prog = pid + PID0
    g = prog // BLOCKS
    group_end = tl.minimum((g + 1).to(tl.int64) * S_GROUP, N)
    n1 = g.to(tl.int64) * S_GROUP + (prog % BLOCKS) * BN + tl.arange(0, BN).to(tl.int64)
    n = n1[:, None, None]
    n_ok = n < group_end
    d_col = tl.arange(0, BD)[None, None, :]
    d_ok = d_col < D
    dbp = DBP + (pid * heads + h).to(tl.int64) * T * T
    if BM == BT:
        # The whole T x T tile at once: one pass computes everything.
        t_row = tl.arange(0, BT)[None, :, None]
        t_col = tl.arange(0, BT)[None, None, :]
        ok = n_ok & (t_row < T) & d_ok
        q = _load_rows(Q, n, h, t_row, d_col, s_qn, s_qh, s_qt, s_qd, ok)
        k = _load_rows(K, n, h, t_row, d_col, s_kn, s_kh, s_kt, s_kd, ok)
        v = _load_rows(V, n, h, t_row, d_col, s_vn, s_vh, s_vt, s_vd, ok)
        do = _load_rows(DO, n, h, t_row, d_col, s_gn, s_gh, s_gt, s_gd, ok)
        o = _load_rows(O, n, h, t_row, d_col, s_on, s_oh, s_ot, s_od, ok)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)  # rowsum(dO * O), [BN, BT]
        r2 = tl.arange(0, BT)[None, :]
        lse = tl.load(LSE + (n1[:, None] * heads + h) * T + r2, mask=(n1[:, None] < group_end) & (r2 < T), other=0.0)
        s = _scores(q, k, n, h, t_row, t_col, n_ok, T, BIAS, MASK, S_BIAS, S_MASK,
                    s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
        p = tl.math.exp2(s - lse[:, :, None])  # 0 where not allowed, and in fully masked rows
        dv = _dot(p.to(do.dtype), do, True, False, PREC, UPCAST)
        _store_rows(DV, n, h, t_row, d_col, s_dvn, s_dvh, s_dvt, s_dvd, dv, ok)
        dp = _dot(do, v, False, True, PREC, UPCAST)
        ds = p * (dp - delta[:, :, None])  # dL/d(score), fp32
        dq = _dot(ds.to(k.dtype), k, False, False, PREC, UPCAST) * scale
        _store_rows(DQ, n, h, t_row, d_col, s_dqn, s_dqh, s_dqt, s_dqd, dq, ok)
        dk = _dot(ds.to(q.dtype), q, True, False, PREC, UPCAST) * scale
        _store_rows(DK, n, h, t_row, d_col, s_dkn, s_dkh, s_dkt, s_dkd, dk, ok)
        if BIAS_GRAD:
            r = tl.arange(0, BT)[:, None]
            c = tl.arange(0, BT)[None, :]
            tl.store(dbp + r * T + c, tl.sum(ds, 0), mask=(r < T) & (c < T))
    else:
        # Blocks of BM rows x BM keys, so no tile outgrows the registers. Pass 1, per row block: delta (saved for
        # pass 2), dq over the key blocks, and each (rows, keys) block of the bias partial, written once.
        for i0 in range(0, BT, BM):
            rows = i0 + tl.arange(0, BM)[None, :, None]
            row_ok = n_ok & (rows < T) & d_ok
            q = _load_rows(Q, n, h, rows, d_col, s_qn, s_qh, s_qt, s_qd, row_ok)
            do = _load_rows(DO, n, h, rows, d_col, s_gn, s_gh, s_gt, s_gd, row_ok)
            o = _load_rows(O, n, h, rows, d_col, s_on, s_oh, s_ot, s_od, row_ok)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)
            r2 = i0 + tl.arange(0, BM)[None, :]
            stat = (n1[:, None] * heads + h) * T + r2
            stat_ok = (n1[:, None] < group_end) & (r2 < T)
            tl.store(DELTA + stat, delta, mask=stat_ok)
            lse = tl.load(LSE + stat, mask=stat_ok, other=0.0)
            dq = tl.zeros([BN, BM, BD], dtype=tl.float32)
            for j0 in range(0, BT, BM):
                keys = j0 + tl.arange(0, BM)[None, :, None]
                key_ok = n_ok & (keys < T) & d_ok
                k = _load_rows(K, n, h, keys, d_col, s_kn, s_kh, s_kt, s_kd, key_ok)
                v = _load_rows(V, n, h, keys, d_col, s_vn, s_vh, s_vt, s_vd, key_ok)
                cols = j0 + tl.arange(0, BM)[None, None, :]
                s = _scores(q, k, n, h, rows, cols, n_ok, T, BIAS, MASK, S_BIAS, S_MASK,
                            s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
                p = tl.math.exp2(s - lse[:, :, None])
                ds = p * (_dot(do, v, False, True, PREC, UPCAST) - delta[:, :, None])
                dq += _dot(ds.to(k.dtype), k, False, False, PREC, UPCAST)
                if BIAS_GRAD:
                    r = i0 + tl.arange(0, BM)[:, None]
                    c = j0 + tl.arange(0, BM)[None, :]
                    tl.store(dbp + r * T + c, tl.sum(ds, 0), mask=(r < T) & (c < T))
            _store_rows(DQ, n, h, rows, d_col, s_dqn, s_dqh, s_dqt, s_dqd, dq * scale, row_ok)
        tl.debug_barrier()  # pass 2 reads the delta this CTA wrote in pass 1
        # Pass 2, per key block: dk and dv over the row blocks.
        for j0 in range(0, BT, BM):
            keys = j0 + tl.arange(0, BM)[None, :, None]
            key_ok = n_ok & (keys < T) & d_ok
            k = _load_rows(K, n, h, keys, d_col, s_kn, s_kh, s_kt, s_kd, key_ok)
            v = _load_rows(V, n, h, keys, d_col, s_vn, s_vh, s_vt, s_vd, key_ok)
            cols = j0 + tl.arange(0, BM)[None, None, :]
            dk = tl.zeros([BN, BM, BD], dtype=tl.float32)
            dv = tl.zeros([BN, BM, BD], dtype=tl.float32)
            for i0 in range(0, BT, BM):
                rows = i0 + tl.arange(0, BM)[None, :, None]
                row_ok = n_ok & (rows < T) & d_ok
                q = _load_rows(Q, n, h, rows, d_col, s_qn, s_qh, s_qt, s_qd, row_ok)
                do = _load_rows(DO, n, h, rows, d_col, s_gn, s_gh, s_gt, s_gd, row_ok)
                r2 = i0 + tl.arange(0, BM)[None, :]
                stat = (n1[:, None] * heads + h) * T + r2
                stat_ok = (n1[:, None] < group_end) & (r2 < T)
                lse = tl.load(LSE + stat, mask=stat_ok, other=0.0)
                delta = tl.load(DELTA + stat, mask=stat_ok, other=0.0)
                s = _scores(q, k, n, h, rows, cols, n_ok, T, BIAS, MASK, S_BIAS, S_MASK,
                            s_bb, s_bh, s_bi, s_bj, s_mb, s_mi, s_mj, qk_scale, HAS_BIAS, HAS_MASK, PREC, UPCAST)
                p = tl.math.exp2(s - lse[:, :, None])
                dv += _dot(p.to(do.dtype), do, True, False, PREC, UPCAST)
                ds = p * (_dot(do, v, False, True, PREC, UPCAST) - delta[:, :, None])
                dk += _dot(ds.to(q.dtype), q, True, False, PREC, UPCAST)
            _store_rows(DK, n, h, keys, d_col, s_dkn, s_dkh, s_dkt, s_dkd, dk * scale, key_ok)
            _store_rows(DV, n, h, keys, d_col, s_dvn, s_dvh, s_dvt, s_dvd, dv, key_ok)


# ----------------------------------------------------------------------------------------------- launch


def _blocks(frames: int, d: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(frames)), max(16, triton.next_power_of_2(d))


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
    (False, 16, 32): (4, 16, 4), (False, 16, 64): (4, 16, 4), (False, 16, 128): (1, 16, 8),
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


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _bias_mask_args(bias, mask, q, n):
    """fp32 bias and uint8 mask (both tiny), their strides (0 over a shared tensor's batch) and group sizes."""
    heads, frames = q.shape[1], q.shape[2]
    if bias is None:
        b, b_strides, s_bias = q.new_empty(1, dtype=torch.float32), (0, 0, 0, 0), 1
    else:
        b = bias.float()
        b4 = b if b.dim() == 4 else b[None].expand(1, heads, frames, frames)
        b_strides = (b4.stride(0) if b.dim() == 4 else 0, *b4.stride()[1:])
        s_bias = n // b.shape[0] if b.dim() == 4 else max(n, 1)
    if mask is None:
        m, m_strides, s_mask = q.new_empty(1, dtype=torch.uint8), (0, 0, 0), 1
    else:
        m = mask.view(torch.uint8)
        m3 = m if m.dim() == 3 else m[None]
        m_strides = (m3.stride(0) if m.dim() == 3 else 0, *m3.stride()[1:])
        s_mask = n // m.shape[0] if m.dim() == 3 else max(n, 1)
    return b, b_strides, s_bias, m, m_strides, s_mask


def forward(q, k, v, bias, mask, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """out (N, heads, T, d) and lse (N, heads, T) fp32 contiguous, written in place."""
    n, heads, frames, d = q.shape
    bt, bd = _blocks(frames, d)
    cfg = fwd_config(bt, bd, q.dtype)
    b, b_strides, s_bias, m, m_strides, s_mask = _bias_mask_args(bias, mask, q, n)
    grid = (triton.cdiv(n, cfg["BN"]), heads)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _fwd_kernel[grid](
            q, k, v, b, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *b_strides, *m_strides,
            n, frames, d, s_bias, s_mask, scale * 1.4426950408889634,
            BN=cfg["BN"], BM=cfg["BM"], BK=cfg["BK"], BT=bt, BD=bd, HAS_BIAS=bias is not None,
            HAS_MASK=mask is not None, PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def backward(grad_out, q, k, v, out, lse, bias, mask, scale: float, dq, dk, dv, dbias) -> None:
    """dq, dk, dv written in place; dbias (bias's shape, fp32) gets the fixed-order sum of the per-program partials.

    Each program writes one partial (heads, T, T); they are summed per group (sample) with torch.sum, in launches of
    at most MAX_PARTIAL_ELEMENTS partial elements, so the scratch stays bounded whatever N is.
    """
    n, heads, frames, d = q.shape
    bt, bd = _blocks(frames, d)
    cfg = bwd_config(bt, bd, q.dtype)
    b, b_strides, s_bias, m, m_strides, s_mask = _bias_mask_args(bias, mask, q, n)
    bias_grad = bias is not None
    # Groups: one per sample of a per-sample bias (a program's partial then belongs to one sample), else one.
    groups = bias.shape[0] if bias_grad and bias.dim() == 4 else 1
    s_group = n // groups
    blocks = triton.cdiv(s_group, cfg["BN"])
    delta = torch.empty(n, heads, frames, dtype=torch.float32, device=q.device) if cfg["BM"] < bt else lse
    cap = max(1, MAX_PARTIAL_ELEMENTS // (heads * frames * frames)) if bias_grad else 1 << 30
    partials = torch.empty((min(cap, groups * blocks), heads, frames, frames) if bias_grad else (1,),
                           dtype=torch.float32, device=q.device)
    acc = dbias.view(groups, heads, frames, frames) if bias_grad else None

    def launch(first: int, count: int) -> None:
        _bwd_kernel[(count, heads)](
            q, k, v, out, grad_out, lse, delta, b, m, dq, dk, dv, partials,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(),
            *dv.stride(), *b_strides, *m_strides,
            n, frames, d, s_bias, s_mask, s_group, blocks, first, scale, scale * 1.4426950408889634,
            BN=cfg["BN"], BM=cfg["BM"], BT=bt, BD=bd, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
            BIAS_GRAD=bias_grad, PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if not bias_grad:
            launch(0, groups * blocks)
        elif blocks <= cap:  # whole groups per launch
            per = cap // blocks
            for g0 in range(0, groups, per):
                gs = min(per, groups - g0)
                launch(g0 * blocks, gs * blocks)
                torch.sum(partials[: gs * blocks].view(gs, blocks, heads, frames, frames), 1, out=acc[g0:g0 + gs])
        else:  # a group spans launches: add each launch's sum in launch order
            acc.zero_()
            for g in range(groups):
                for b0 in range(0, blocks, cap):
                    cnt = min(cap, blocks - b0)
                    launch(g * blocks + b0, cnt)
                    acc[g] += partials[:cnt].sum(0)


# ----------------------------------------------------------------------------------------------- compile check

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CONSTEXPRS = {"BN", "BM", "BK", "BT", "BD", "HAS_BIAS", "HAS_MASK", "BIAS_GRAD", "PREC", "UPCAST"}
_FIXED = {"BIAS": "*fp32", "MASK": "*u8", "LSE": "*fp32", "DELTA": "*fp32", "DBP": "*fp32", "qk_scale": "fp32", "scale": "fp32"}
_DATA = {"Q", "K", "V", "O", "DO", "OUT", "DQ", "DK", "DV"}


def _signature(fn, dtype: torch.dtype) -> dict[str, str]:
    """Pointers to q's dtype for the data tensors, fp32 bias / lse / partials, u8 mask, i32 sizes and strides."""
    return {a: _FIXED.get(a, "*" + _TY[dtype] if a in _DATA else "i32") for a in fn.arg_names
            if a not in _CONSTEXPRS and not (a.startswith("s_") and a[-1] in "dj")}


# fp32 backward with d > 64 spills a few registers on sm_80 (5 to 34 spill ops) in every configuration tried (see the
# notes): left out of the CI check until it is restructured; all other launch configurations are in it.
SPILLING = {("bwd", torch.float32, bt, 128) for bt in (16, 32, 64, 128)}


def compile_configs(full: bool = False):
    """The launch configurations for the CI compile check (sm_80 / sm_90): every tile (BT, BD) of bf16 and fp32 with
    bias and mask on, plus the other flag combinations and fp16 at the headline tile (T = 16, d = 64); the flags and
    fp16 only remove code or rename the type. `full=True`: every (dtype, tile, flags) the launchers can use."""
    from vdm_fast.kernels._compile import KernelConfig

    flags_all = ((True, True), (True, False), (False, True), (False, False))
    wanted = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bt in (16, 32, 64, 128):
            for bd in (16, 32, 64, 128):
                for flags in flags_all:
                    headline = bt == 16 and bd == 64 and dtype != torch.float32
                    if full or headline or (dtype != torch.float16 and flags == (True, True)):
                        wanted.append((dtype, bt, bd, flags))
    configs = []
    for dtype, bt, bd, (has_bias, has_mask) in wanted:
        common = dict(BT=bt, BD=bd, HAS_BIAS=has_bias, HAS_MASK=has_mask, PREC=_prec(dtype), UPCAST=False)
        tag = f"{_TY[dtype]}_t{bt}_d{bd}{'_bias' if has_bias else ''}{'_mask' if has_mask else ''}"
        for kind, fn, cfg in (("fwd", _fwd_kernel, fwd_config(bt, bd, dtype)),
                              ("bwd", _bwd_kernel, bwd_config(bt, bd, dtype))):
            if (kind, dtype, bt, bd) in SPILLING and not full:
                continue
            # The launch specializes unit strides (Triton's JIT does for ints equal to 1): the common case,
            # contiguous head dim and contiguous last dim of bias / mask, is what is checked.
            unit = {a: 1 for a in fn.arg_names if a.startswith("s_") and a[-1] in "dj"}
            const = dict(common, BN=cfg["BN"], BM=cfg["BM"], **unit)
            if kind == "fwd":
                const["BK"] = cfg["BK"]
            else:
                const["BIAS_GRAD"] = has_bias
            configs.append(KernelConfig(
                name=f"temporal_attention_{kind}_{tag}", fn=fn, signature=_signature(fn, dtype), constexprs=const,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], expect_mma=True))
    return configs
