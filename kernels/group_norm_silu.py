"""Triton kernels of group_norm_silu: y = silu(group_norm(x) * (1 + scale) + shift), forward and backward.

Layout. x (B, C, *spatial) is read in place through strides as rows (b, g, f) of a Cg x S matrix: Cg = C / G channels
of the group, S spatial positions of frame f (F = T frames with per_frame on 5-D input, else F = 1 and S = all
positions). CL=False: positions are unit-stride (contiguous input); CL=True: channels are unit-stride
(channels_last / channels_last_3d). Every tile is [BLOCK_C channels, BLOCK_S positions]; y, dy and dx share x's strides.

One kernel per direction; its phase is a runtime argument (so one compiled config serves all three), chosen by `_plan`:
- phase 0, one program per row (when rows alone fill the GPU: B * G * F >= TARGET_PROGRAMS, e.g. per-frame video):
  a first sweep over the row takes its statistics, a second normalizes and stores. The second read of the row comes
  mostly from L2 (a row is at most a few hundred KB and only the resident programs' rows are live), so DRAM sees x
  read about once. Backward: a sweep for the per-channel sums of dz * xhat and dz, a second for dx.
- phase 1 + phase 2, rows cut along S into chunks (few, large rows): phase 1 writes each chunk's (mean, M2); phase 2
  merges the row's chunk partials in a fixed order (every program of the row gets bitwise the same mean and rstd)
  and normalizes its chunk. Backward: phase 1 writes per-channel and per-chunk sums, phase 2 merges them and writes dx.
- statistics: exact two-pass within each register tile, tiles and chunks merged with Chan et al.'s formula.
- parameter gradients: a small kernel reduces the per-(b, frame/chunk, c) partials over frames/chunks and batch in a
  fixed order. No atomics anywhere: re-runs are bitwise identical.

Statistics and all arithmetic are fp32; mean and rstd (B, G, F) fp32 are saved for the backward, which recomputes
the pre-activation from x instead of saving it. weight, bias, scale, shift enter as fp32 (absent ones are skipped by a
runtime flag, not a constexpr, so that one compiled kernel serves every combination).

Loops over runtime bounds are while loops: the interpreter (CI) cannot range() over a runtime scalar with NumPy >= 2.3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vdm_fast.kernels._compile import KernelConfig

# Tiles [BLOCK_C, BLOCK_S] per layout (CL=False: positions are unit-stride, CL=True: channels are); `_plan` takes the
# one that pads the row least, then the one with the longest unit-stride run. Tests shrink them (and raise
# TARGET_PROGRAMS) to run several tiles and several chunks per row on small shapes under the interpreter.
TILES = {False: ((1, 2048), (8, 256), (32, 64)), True: ((8, 256), (32, 64))}
NUM_WARPS = 8  # 8 elements of a 2048-element tile per thread: 40-128 registers, no spills (4 warps: up to 254)
MAX_CHUNKS = 256  # chunks per row, and the width of the vector the row's partials are merged with
TARGET_PROGRAMS = 512  # rows are cut into chunks until about this many programs run (132 SMs on an H100)
PARAM_BLOCK_R, PARAM_BLOCK_C = 16, 128
_NO_SPEC = ["has_w", "has_b", "has_scale", "has_shift", "silu", "phase"]


@triton.jit
def _row_coords(pid, G, F, stride_b, stride_c, stride_f, Cg):
    """Row pid = (b * G + g) * F + f -> (b, g, f) and the int64 offset of its first element."""
    f = pid % F
    bg = pid // F
    b = bg // G
    g = bg % G
    base = b.to(tl.int64) * stride_b + (g * Cg).to(tl.int64) * stride_c + f.to(tl.int64) * stride_f
    return b, g, f, base


@triton.jit
def _tile_offsets(c, s, stride_c, stride_s, CL: tl.constexpr):
    """Offsets of a [BLOCK_C, BLOCK_S] tile (int32: within one sample). The unit stride is explicit so that the
    compiler sees which axis is contiguous and vectorizes along it."""
    if CL:
        return c[:, None] + s[None, :] * stride_s
    else:
        return c[:, None] * stride_c + s[None, :]


@triton.jit
def _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, bidx, ch, cmask, C, has_w, has_b, has_scale, has_shift):
    """Per-channel fp32 (w_eff, b_eff, w, bias, 1 + scale) so that gn(x) * (1 + scale) + shift = xhat * w_eff + b_eff."""
    w = tl.full(ch.shape, 1.0, tl.float32)
    bias = tl.zeros(ch.shape, tl.float32)
    film = tl.full(ch.shape, 1.0, tl.float32)
    sh = tl.zeros(ch.shape, tl.float32)
    if has_w:
        w = tl.load(w_ptr + ch, mask=cmask, other=1.0)
    if has_b:
        bias = tl.load(b_ptr + ch, mask=cmask, other=0.0)
    if has_scale:
        film = 1.0 + tl.load(scale_ptr + bidx * C + ch, mask=cmask, other=0.0)
    if has_shift:
        sh = tl.load(shift_ptr + bidx * C + ch, mask=cmask, other=0.0)
    return w * film, bias * film + sh, w, bias, film


@triton.jit
def _act(z, silu):
    if silu:
        z = tl.fdiv(z, 1.0 + tl.exp(-z), ieee_rounding=False)  # approximate division: a few instructions
    return z


@triton.jit
def _act_grad(dy, z, silu):
    """dy * act'(z): silu'(z) = sig(z) * (1 + z * (1 - sig(z)))."""
    if silu:
        sig = tl.fdiv(1.0, 1.0 + tl.exp(-z), ieee_rounding=False)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit
def _chunk_stats(x_ptr, base, Cg, s_lo, s_hi, stride_c, stride_s,
                 CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of positions [s_lo, s_hi) of the row's Cg channels: exact two-pass within each tile, tiles
    merged with Chan et al.'s formula (no E[x^2] - E[x]^2 cancellation, whatever the mean)."""
    n_acc = tl.zeros([], tl.float32)
    mean_acc = tl.zeros([], tl.float32)
    m2_acc = tl.zeros([], tl.float32)
    c0 = tl.zeros([], tl.int32)
    while c0 < Cg:
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < Cg
        n_c = tl.minimum(Cg - c0, BLOCK_C)
        s0 = s_lo
        while s0 < s_hi:
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            x = tl.load(x_ptr + base + _tile_offsets(c, s, stride_c, stride_s, CL), mask=mask, other=0.0)
            x = x.to(tl.float32)
            n_t = (n_c * tl.minimum(s_hi - s0, BLOCK_S)).to(tl.float32)
            mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
            d = tl.where(mask, x - mean_t, 0.0)
            m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
            n_new = n_acc + n_t
            delta = mean_t - mean_acc
            mean_acc += delta * (n_t / n_new)
            m2_acc += m2_t + delta * delta * (n_acc * n_t / n_new)
            n_acc = n_new
            s0 += BLOCK_S
        c0 += BLOCK_C
    return n_acc, mean_acc, m2_acc


@triton.jit
def _merge_row_stats(pmean_ptr, pm2_ptr, pid, Cg, S, S_CHUNK, n_chunks, eps, P_BLOCK: tl.constexpr):
    """Mean and rstd of row pid from its chunks' (mean, M2), in one fixed order: the same bits in every program."""
    i = tl.arange(0, P_BLOCK)
    pmask = i < n_chunks
    m_i = tl.load(pmean_ptr + pid * n_chunks + i, mask=pmask, other=0.0)
    m2_i = tl.load(pm2_ptr + pid * n_chunks + i, mask=pmask, other=0.0)
    n_i = (Cg * tl.minimum(tl.maximum(S - i * S_CHUNK, 0), S_CHUNK)).to(tl.float32)
    n = (Cg * S).to(tl.float32)
    mean = tl.sum(n_i * m_i, axis=0) / n
    dm = m_i - mean
    m2 = tl.sum(m2_i + n_i * dm * dm, axis=0)
    return mean, 1.0 / tl.sqrt(m2 / n + eps)


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(
    x_ptr, y_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    C, G, Cg, F, S, S_CHUNK, n_chunks, stride_b, stride_c, stride_f, stride_s, eps,
    has_w, has_b, has_scale, has_shift, silu, phase,
    CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, P_BLOCK: tl.constexpr,
):
    """Program (row, chunk) of the forward. phase 0: the whole row (one chunk): stats, then normalize (the second
    read of the row mostly hits L2). phase 1: write the chunk's (mean, M2). phase 2: merge the row's partials, then
    normalize the chunk."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b, g, f, base = _row_coords(pid, G, F, stride_b, stride_c, stride_f, Cg)
    s_lo = chunk * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)
    if phase != 2:
        n, mean, m2 = _chunk_stats(x_ptr, base, Cg, s_lo, s_hi, stride_c, stride_s, CL, BLOCK_C, BLOCK_S)
        if phase == 1:
            tl.store(pmean_ptr + pid * n_chunks + chunk, mean)
            tl.store(pm2_ptr + pid * n_chunks + chunk, m2)
        rstd = 1.0 / tl.sqrt(m2 / n + eps)
    else:
        mean, rstd = _merge_row_stats(pmean_ptr, pm2_ptr, pid, Cg, S, S_CHUNK, n_chunks, eps, P_BLOCK)
    if phase != 1:
        if chunk == 0:
            tl.store(mean_ptr + pid, mean)
            tl.store(rstd_ptr + pid, rstd)
        c0 = tl.zeros([], tl.int32)
        while c0 < Cg:
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < Cg
            w_eff, b_eff, _, _, _ = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, g * Cg + c, cmask, C,
                                           has_w, has_b, has_scale, has_shift)
            a = (rstd * w_eff)[:, None]
            b_eff = b_eff[:, None]
            s0 = s_lo
            while s0 < s_hi:
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_hi)[None, :]
                offs = _tile_offsets(c, s, stride_c, stride_s, CL)
                x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                y = _act((x - mean) * a + b_eff, silu)  # x - mean first: exact for large means
                tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
                s0 += BLOCK_S
            c0 += BLOCK_C


# --------------------------------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr, rowsum_ptr,
    C, G, Cg, F, S, S_CHUNK, n_chunks, stride_b, stride_c, stride_f, stride_s, part_stride,
    has_w, has_b, has_scale, has_shift, silu, phase,
    CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, P_BLOCK: tl.constexpr,
):
    """Program (row, chunk) of the backward, with z = xhat * w_eff + b_eff, dz = dy * act'(z), g = dz * w_eff:
    dx = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat)).
    phase 0: the whole row: per-channel sums, then dx. phase 1: write the chunk's per-channel sums of dz * xhat and
    dz (part[0|1, b, f, chunk, c], for the parameter gradients) and its sums of g and g * xhat (rowsum[0|1, row,
    chunk]). phase 2: merge the row's rowsum in a fixed order, then dx of the chunk (phase 1 wrote part)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b, g, f, base = _row_coords(pid, G, F, stride_b, stride_c, stride_f, Cg)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    s_lo = chunk * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)
    n = (Cg * S).to(tl.float32)
    if phase != 2:
        part_row = ((b * F + f) * n_chunks + chunk) * C + g * Cg  # part: (2, B, F, n_chunks, C)
        acc_g = tl.zeros([], tl.float32)
        acc_gx = tl.zeros([], tl.float32)
        c0 = tl.zeros([], tl.int32)
        while c0 < Cg:
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < Cg
            w_eff, b_eff, _, _, _ = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, g * Cg + c, cmask, C,
                                           has_w, has_b, has_scale, has_shift)
            sum_dz_xhat = tl.zeros([BLOCK_C], tl.float32)
            sum_dz = tl.zeros([BLOCK_C], tl.float32)
            s0 = s_lo
            while s0 < s_hi:
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_hi)[None, :]
                offs = _tile_offsets(c, s, stride_c, stride_s, CL)
                x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                dz = _act_grad(dy, xhat * w_eff[:, None] + b_eff[:, None], silu)
                sum_dz_xhat += tl.sum(dz * xhat, axis=1)
                sum_dz += tl.sum(dz, axis=1)
                s0 += BLOCK_S
            tl.store(part_ptr + part_row + c, sum_dz_xhat, mask=cmask)
            tl.store(part_ptr + part_stride + part_row + c, sum_dz, mask=cmask)
            acc_g += tl.sum(w_eff * sum_dz, axis=0)
            acc_gx += tl.sum(w_eff * sum_dz_xhat, axis=0)
            c0 += BLOCK_C
        if phase == 1:
            tl.store(rowsum_ptr + pid * n_chunks + chunk, acc_g)  # rowsum: (2, rows, n_chunks)
            tl.store(rowsum_ptr + (tl.num_programs(0) + pid) * n_chunks + chunk, acc_gx)
        mean_g = acc_g / n
        mean_gx = acc_gx / n
    else:
        i = tl.arange(0, P_BLOCK)
        pmask = i < n_chunks
        mean_g = tl.sum(tl.load(rowsum_ptr + pid * n_chunks + i, mask=pmask, other=0.0), axis=0) / n
        gx_ptr = rowsum_ptr + (tl.num_programs(0) + pid) * n_chunks
        mean_gx = tl.sum(tl.load(gx_ptr + i, mask=pmask, other=0.0), axis=0) / n
    if phase != 1:
        c0 = tl.zeros([], tl.int32)
        while c0 < Cg:
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < Cg
            w_eff, b_eff, _, _, _ = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, g * Cg + c, cmask, C,
                                           has_w, has_b, has_scale, has_shift)
            s0 = s_lo
            while s0 < s_hi:
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_hi)[None, :]
                offs = _tile_offsets(c, s, stride_c, stride_s, CL)
                x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                dz = _act_grad(dy, xhat * w_eff[:, None] + b_eff[:, None], silu)
                dx = rstd * (dz * w_eff[:, None] - mean_g - xhat * mean_gx)
                tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                s0 += BLOCK_S
            c0 += BLOCK_C


@triton.jit(do_not_specialize=_NO_SPEC[:4])
def _bwd_params_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, dw_ptr, db_ptr, dscale_ptr, dshift_ptr,
    B, C, R, part_stride,
    has_w, has_b, has_scale, has_shift,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Reduce part[0|1, b, r, c] (r: frames x chunks) over r, then over b, in a fixed order:
    dscale[b, c] = w * sum(dz * xhat) + bias * sum(dz), dshift = sum(dz), dw = sum_b (1 + scale) * sum(dz * xhat),
    db = sum_b (1 + scale) * sum(dz)."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    r = tl.arange(0, BLOCK_R)
    b = tl.zeros([], tl.int32)
    while b < B:
        _, _, w, bias, film = _coefs(w_ptr, b_ptr, scale_ptr, shift_ptr, b, ch, cmask, C,
                                     has_w, has_b, has_scale, has_shift)
        a_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        z_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        r0 = tl.zeros([], tl.int32)
        while r0 < R:
            rmask = (r0 + r < R)[:, None] & cmask[None, :]
            offs = (b * R + r0 + r)[:, None].to(tl.int64) * C + ch[None, :]
            a_acc += tl.load(part_ptr + offs, mask=rmask, other=0.0)
            z_acc += tl.load(part_ptr + part_stride + offs, mask=rmask, other=0.0)
            r0 += BLOCK_R
        sum_dz_xhat = tl.sum(a_acc, axis=0)
        sum_dz = tl.sum(z_acc, axis=0)
        if has_scale:
            tl.store(dscale_ptr + b * C + ch, w * sum_dz_xhat + bias * sum_dz, mask=cmask)
        if has_shift:
            tl.store(dshift_ptr + b * C + ch, sum_dz, mask=cmask)
        dw += film * sum_dz_xhat
        db += film * sum_dz
        b += 1
    if has_w:
        tl.store(dw_ptr + ch, dw, mask=cmask)
    if has_b:
        tl.store(db_ptr + ch, db, mask=cmask)


# ----------------------------------------------------------------------------------------------------- launch


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    from vdm_fast.reference.group_norm_silu import memory_format

    return memory_format(x)


def _frames(x: torch.Tensor, per_frame: bool) -> int:
    return x.shape[2] if per_frame and x.dim() == 5 else 1


def _layout(t: torch.Tensor, per_frame: bool):
    """t as (B, C, F, S): (F, S, stride_b, stride_c, stride_f, stride_s, CL), or None where the spatial dims do not
    fold into one stride or neither channels nor positions are unit-stride."""
    F = _frames(t, per_frame)
    first = 3 if per_frame and t.dim() == 5 else 2  # dim 2 is the frames: its own stride
    dims = [d for d in range(first, t.dim()) if t.shape[d] != 1]
    S = 1
    for d in range(first, t.dim()):
        S *= t.shape[d]
    for a, b in zip(dims, dims[1:]):
        if t.stride(a) != t.stride(b) * t.shape[b]:
            return None
    stride_s = t.stride(dims[-1]) if dims else 1
    stride_f = t.stride(2) if first == 3 else 0
    C = t.shape[1]
    if S == 1 or stride_s == 1:
        cl = False
    elif C == 1 or t.stride(1) == 1:
        cl = True
    else:
        return None
    return F, S, t.stride(0), t.stride(1), stride_f, stride_s, cl


def _like(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """t with out's strides (a copy only where they differ on a dim longer than 1): kernels take one set of strides."""
    same = all(n == 1 or a == b for n, a, b in zip(out.shape, t.stride(), out.stride()))
    return t if same else t.contiguous(memory_format=_memory_format(out))


def _param(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return dummy if t is None else t.to(torch.float32).contiguous()


def _check_int32(x: torch.Tensor) -> None:
    span = sum((n - 1) * st for n, st in zip(x.shape[1:], x.stride()[1:]))
    if span >= 2**31:
        raise ValueError(f"group_norm_silu: one sample of x spans {span} elements; the Triton kernels index a sample "
                         "with int32 (at most 2**31 - 1)")


def _device(x: torch.Tensor):
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _plan(Cg: int, S: int, rows: int, cl: bool) -> dict:
    """Tile and chunks: one chunk per row (phase 0, one launch) when there are rows enough to fill the GPU, else
    each row cut along S into chunks (phase 1 then phase 2)."""
    want = min(_cdiv(TARGET_PROGRAMS, rows), MAX_CHUNKS)
    best = None
    for bc, bs in TILES[cl]:
        padded = _cdiv(Cg, bc) * bc * _cdiv(S, bs) * bs
        short = max(0, want - _cdiv(S, bs))
        key = (padded, short, -(bc if cl else bs))
        if best is None or key < best[0]:
            best = (key, bc, bs)
    _, bc, bs = best
    n_chunks = max(1, min(want, _cdiv(S, bs)))
    s_chunk = _cdiv(_cdiv(S, n_chunks), bs) * bs
    return dict(BLOCK_C=bc, BLOCK_S=bs, n_chunks=_cdiv(S, s_chunk), S_CHUNK=s_chunk)


def _setup(x: torch.Tensor, out: torch.Tensor, num_groups: int, per_frame: bool, weight, bias, scale, shift,
           dummy: torch.Tensor):
    B, C = x.shape[:2]
    F, S, sb, sc, sf, ss, cl = _layout(out, per_frame)
    Cg = C // num_groups
    rows = B * num_groups * F
    plan = _plan(Cg, S, rows, cl)
    args = dict(C=C, G=num_groups, Cg=Cg, F=F, S=S, S_CHUNK=plan["S_CHUNK"], n_chunks=plan["n_chunks"],
                stride_b=sb, stride_c=sc, stride_f=sf, stride_s=ss,
                has_w=int(weight is not None), has_b=int(bias is not None), has_scale=int(scale is not None),
                has_shift=int(shift is not None),
                CL=cl, BLOCK_C=plan["BLOCK_C"], BLOCK_S=plan["BLOCK_S"], P_BLOCK=MAX_CHUNKS, num_warps=NUM_WARPS)
    params = [_param(t, dummy) for t in (weight, bias, scale, shift)]
    return rows, plan["n_chunks"], params, args


def forward(x, num_groups, weight, bias, scale, shift, eps, silu, per_frame):
    """y, mean, rstd: y like x (its memory format), mean and rstd (B, G, F) fp32."""
    B = x.shape[0]
    y = torch.empty_like(x, memory_format=_memory_format(x))
    mean = torch.zeros(B, num_groups, _frames(x, per_frame), dtype=torch.float32, device=x.device)
    rstd = torch.zeros_like(mean)
    if y.numel() == 0:
        return y, mean, rstd
    x = _like(x, y)
    _check_int32(y)
    rows, n_chunks, params, args = _setup(x, y, num_groups, per_frame, weight, bias, scale, shift, mean)
    with _device(x):
        if n_chunks == 1:
            _fwd_kernel[(rows, 1)](x, y, mean, mean, mean, rstd, *params, **args, eps=eps, silu=int(silu), phase=0)
        else:
            pmean = torch.empty(rows, n_chunks, dtype=torch.float32, device=x.device)
            pm2 = torch.empty_like(pmean)
            for phase in (1, 2):
                _fwd_kernel[(rows, n_chunks)](x, y, pmean, pm2, mean, rstd, *params, **args, eps=eps, silu=int(silu),
                                              phase=phase)
    return y, mean, rstd


def backward(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, silu, per_frame):
    """(dx, dweight, dbias, dscale, dshift): each like its input (None for an absent one)."""
    B, C = x.shape[:2]
    dx = torch.empty_like(x, memory_format=_memory_format(x))
    grads = [None if t is None else torch.zeros(t.shape, dtype=torch.float32, device=x.device)
             for t in (weight, bias, scale, shift)]
    if dx.numel() != 0:
        x, dy = _like(x, dx), _like(dy, dx)
        _check_int32(dx)
        rows, n_chunks, params, args = _setup(x, dx, num_groups, per_frame, weight, bias, scale, shift, mean)
        F = args["F"]
        part = torch.empty(2, B, F, n_chunks, C, dtype=torch.float32, device=x.device)
        rowsum = torch.empty(2, rows, n_chunks, dtype=torch.float32, device=x.device) if n_chunks > 1 else mean
        with _device(x):
            for phase in (0,) if n_chunks == 1 else (1, 2):
                _bwd_kernel[(rows, n_chunks)](dy, x, dx, mean, rstd, *params, part, rowsum, **args,
                                              part_stride=part[0].numel(), silu=int(silu), phase=phase)
            if any(g is not None for g in grads):
                dw, db, ds, dsh = (mean if g is None else g for g in grads)
                flags = {k: args[k] for k in ("has_w", "has_b", "has_scale", "has_shift")}
                _bwd_params_kernel[(_cdiv(C, PARAM_BLOCK_C),)](
                    part, *params, dw, db, ds, dsh, B, C, F * n_chunks, part[0].numel(), **flags,
                    BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C, num_warps=4)
    grads = [g if g is None or t.dtype == torch.float32 else g.to(t.dtype)
             for g, t in zip(grads, (weight, bias, scale, shift))]
    return (dx, *grads)


# ------------------------------------------------------------------------------------------- compile configs

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DATA_PTRS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")  # in x's dtype; every other pointer is fp32


def _signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = "*" + (dtype if p.name in _DATA_PTRS else "fp32")
        else:
            sig[p.name] = "fp32" if p.name == "eps" else "i32"
    return sig


def compile_configs() -> list[KernelConfig]:
    """Every (kernel, dtype, layout, tile, warps) that `forward` and `backward` can launch (phases are runtime)."""
    configs = []
    for dt in _TYPES.values():
        for fn, name in ((_fwd_kernel, "fwd"), (_bwd_kernel, "bwd")):
            for cl, tiles in TILES.items():
                for bc, bs in tiles:
                    configs.append(KernelConfig(
                        f"group_norm_silu_{name}_{dt}_{'cl' if cl else 'cf'}_c{bc}_s{bs}", fn, _signature(fn, dt),
                        dict(CL=cl, BLOCK_C=bc, BLOCK_S=bs, P_BLOCK=MAX_CHUNKS), num_warps=NUM_WARPS))
    configs.append(KernelConfig("group_norm_silu_bwd_params", _bwd_params_kernel,
                                _signature(_bwd_params_kernel, "fp32"),
                                dict(BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C), num_warps=4))
    return configs
