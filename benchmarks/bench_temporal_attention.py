"""Benchmark: fused temporal attention against the copy-bandwidth floor, the SDPA path and compiled FlexAttention.

    python benchmarks/bench_temporal_attention.py [--quick]

Rows (one per shape, pass and contender): `ms` is that contender's median time; for the other contenders
`baseline_ms` is ours and `speedup` = their ms / our ms (how many times faster the fused op is). For our own row
`gbps` counts q, k, v read once and out written once (forward), plus dout and out read and dq, dk, dv written
(backward), and `pct_copy_bw` compares it with a device-to-device copy of the same byte count.
Targets (issue): fwd >= 85% of copy bandwidth, >= 3x the SDPA path, >= 2x compiled FlexAttention; fwd+bwd >= 2.5x
the SDPA path and >= 1.5x FlexAttention. `vdm_fast packed` is the layer's entry point on the same bytes: the packed
projection (B, T, H*W, 3 * heads * d) of a channels_last_3d activation, one packed gradient.

Copy rows (any machine; on CPU the kernel launches are no-op'd, since the audit is of the layers' own path): the bytes
copy-like aten ops write (copy_, clone, cat, stack, _to_copy, scatters; vdm_fast.testing.CopyCounter) in one
forward + backward of TemporalAttention and SpatialAttention, channels_last_3d and contiguous input, as a multiple of
the input activation's bytes. Target (issue 12): TemporalAttention <= 0.25x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

OP = "temporal_attention"
FRAMES, DIM_HEAD = 16, 64
# (label, B, C, H, W, heads): video U-Net stages; the last is N = 2^20 sequences (past the 65,535 grid limit).
SHAPES = [
    ("B8 C256 T16 64x64 h4", 8, 256, 64, 64, 4),
    ("B8 C512 T16 32x32 h8", 8, 512, 32, 32, 8),
    ("N=2^20 T16 h1 d64", 256, 64, 64, 64, 1),
]


def _inputs(b, c, h, w, heads, dtype, device):
    """q, k, v as the TemporalAttention layer makes them: strided views of one channels-last qkv projection."""
    qkv = torch.randn(b, h, w, FRAMES, 3 * heads * DIM_HEAD, device=device, dtype=dtype)
    q, k, v = (t.reshape(b * h * w, FRAMES, heads, DIM_HEAD).transpose(1, 2) for t in qkv.chunk(3, -1))
    bias = torch.randn(heads, FRAMES, FRAMES, device=device, dtype=torch.float32)
    return q, k, v, bias


def contenders(q, k, v, bias) -> dict:
    """name -> f(q, k, v, bias) -> out (N, heads, T, d)."""
    import torch.nn.functional as F

    from vdm_fast.ops import temporal_attention, temporal_attention_packed

    def ours(q, k, v, bias):
        return temporal_attention(q, k, v, bias)

    def ours_packed(q, k, v, bias):
        # q is a view of the (B, H, W, T, 3 * heads * d) projection: its base, seen as the layer's (B, T, S, ...)
        # packed layout, holds the same bytes (the layer's real layout; only the sequence order differs).
        n, heads, frames, d = q.shape
        qkv = q.as_strided((1, frames, n, 3 * heads * d), (0, q.stride(2), q.stride(0), 1))
        out = temporal_attention_packed(qkv, heads, bias)
        return out.view(frames, n, heads, d).permute(1, 2, 0, 3)

    def sdpa_path(q, k, v, bias):
        # What a model does without the fused op: make the layout contiguous, SDPA with the bias as attn_mask
        # (the flash backend takes no bias: the efficient / math backend runs), and the layout back.
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias.to(q.dtype))
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def flex_compiled(q, k, v, bias):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

        return flex(q, k, v, score_mod=score_mod)

    fns = {"vdm_fast": ours, "vdm_fast packed": ours_packed, "sdpa_path": sdpa_path, "flex_compiled": flex_compiled}
    # The same path pinned to each SDPA backend that takes an additive bias, so a row says which one fails where.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION):
        def pinned(q, k, v, bias, backend=backend):
            with sdpa_kernel(backend):
                return sdpa_path(q, k, v, bias)

        fns[f"sdpa_path[{backend.name.lower()}]"] = pinned
    try:
        import xformers.ops as xops
    except ImportError:
        return fns

    def xformers_path(q, k, v, bias):
        # xformers wants (N, T, heads, d) and a bias of (N, heads, T, T) (broadcast by expand, no copy).
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        b = bias.to(q.dtype)[None].expand(q.shape[0], -1, -1, -1)
        return xops.memory_efficient_attention(qt, kt, vt, attn_bias=b).transpose(1, 2)

    fns["xformers"] = xformers_path
    return fns


def _bytes(q, backward: bool) -> int:
    tensor = q.numel() * q.element_size()
    return tensor * (4 + (5 if backward else 0))  # fwd: q k v out; bwd: q k v out dout read, dq dk dv written


def _copy_ms(nbytes: int, device) -> float:
    import triton

    half = nbytes // 2  # a copy reads and writes: nbytes in all
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")


def _time(fn, args, backward: bool):
    import triton

    q, k, v, bias = args
    if backward:
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        grad = torch.randn(q.shape, device=q.device, dtype=q.dtype)

        def step():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)
    else:
        def step():
            with torch.no_grad():
                fn(*args)
    step()  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = triton.testing.do_bench(step, return_mode="median")
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def _row(shape, dtype, contender, ms=None, baseline_ms=None, gbps=None, pct=None, peak_mb=None, note=""):
    speedup = (baseline_ms / ms) if ms and baseline_ms else None  # ms: ours, baseline_ms: the contender's
    return dict(op=OP, shape=shape, dtype=str(dtype).replace("torch.", ""), contender=contender, ms=ms,
                baseline_ms=baseline_ms, speedup=speedup, gbps=gbps, pct_copy_bw=pct, peak_mb=peak_mb, note=note)


# (label, B, C, T, H, W, heads): the U-Net's attention levels at base 128 (C = 256, 16x16) and base 256 (C = 512,
# 8x8), T = 16, d = 64; fp32 on CPU (the copies do not depend on the dtype's size relative to the input's).
COPY_SHAPES = [("B2 C256 T16 16x16 h4", 2, 256, 16, 16, 16, 4), ("B2 C512 T16 8x8 h8", 2, 512, 16, 8, 8, 8)]


def copy_rows(quick: bool) -> list[dict]:
    # vdm_fast.kernels imports Triton: only when the benchmark runs (as the module's other functions do).
    from vdm_fast.kernels import temporal_attention as kern

    import vdm_fast
    from vdm_fast.layers import SpatialAttention, TemporalAttention
    from vdm_fast.testing import CopyCounter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    saved_launch, saved_env = kern._launch, os.environ.get("TRITON_INTERPRET")
    if device == "cpu":
        kern._launch = lambda *a: None  # the layers' path only: the outputs stay uninitialized, their bytes count
        os.environ["TRITON_INTERPRET"] = "1"  # dispatch takes CPU tensors to the kernels only under the interpreter
    try:
        for label, b, c, frames, h, w, heads in COPY_SHAPES[:1] if quick else COPY_SHAPES:
            for cls in (TemporalAttention, SpatialAttention):
                layer = cls(c, heads=heads, dim_head=64).to(device)
                for channels_last in (True, False):
                    x = torch.randn(b, c, frames, h, w, device=device)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last_3d)
                    x.requires_grad_()
                    with vdm_fast.backend("triton") if device == "cpu" else contextlib.nullcontext():
                        y = layer(x)
                        g = torch.randn_like(y)
                        with CopyCounter() as counter:
                            layer(x).backward(g)
                    ratio = counter.bytes / (x.numel() * x.element_size())
                    target = " (target <= 0.25x)" if cls is TemporalAttention else ""
                    r = _row(f"{label} fwd+bwd {'channels_last_3d' if channels_last else 'contiguous'}",
                             torch.float32, f"copies {cls.__name__}",
                             note=f"{ratio:.3f}x the input's bytes copied{target}: {counter.bytes} B by "
                                  f"{sorted(set(counter.ops)) or 'nothing'}"
                                  + ("; launches no-op'd (CPU)" if device == "cpu" else ""))
                    r.update(copied_bytes=counter.bytes, copied_ratio=ratio)
                    rows.append(r)
    finally:
        kern._launch = saved_launch
        if device == "cpu":
            if saved_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved_env
    return rows


def run(quick: bool) -> list[dict]:
    dtype = torch.bfloat16
    shapes = SHAPES[:1] if quick else SHAPES
    if not torch.cuda.is_available():
        return copy_rows(quick) + [
            _row(s[0], dtype, c, note="not run: Triton kernels need a CUDA GPU")
            for s in shapes for c in ("vdm_fast", "vdm_fast packed", "vdm_fast vs sdpa_path",
                                      "vdm_fast vs flex_compiled")]
    from vdm_fast.ops import temporal_attention

    rows = []
    for label, b, c, h, w, heads in shapes:
        args = _inputs(b, c, h, w, heads, dtype, "cuda")
        with torch.no_grad():
            want = temporal_attention(*args)
        fns = contenders(*args)
        for backward in (False, True):
            shape = f"{label} {'fwd+bwd' if backward else 'fwd'}"
            nbytes = _bytes(args[0], backward)
            ours_ms, peak = _time(fns["vdm_fast"], args, backward)
            gbps = nbytes / ours_ms / 1e6
            copy_gbps = nbytes / _copy_ms(nbytes, "cuda") / 1e6
            rows.append(_row(shape, dtype, "vdm_fast", ours_ms, None, gbps, 100 * gbps / copy_gbps, peak))
            for name in [n for n in fns if n != "vdm_fast"]:
                if name == "vdm_fast packed":  # ours on the layer's entry point: its own row, same byte count
                    ms, peak = _time(fns[name], args, backward)
                    g = nbytes / ms / 1e6
                    rows.append(_row(shape, dtype, name, ms, None, g, 100 * g / copy_gbps, peak))
                    continue
                try:
                    with torch.no_grad():
                        err = ((fns[name](*args).float() - want.float()).norm() / want.float().norm()).item()
                    if not err < 2e-2:
                        rows.append(_row(shape, dtype, name, note=f"disagrees with ours: rel err {err:.2e}"))
                        continue
                    ms, peak = _time(fns[name], args, backward)
                    rows.append(_row(shape, dtype, f"vdm_fast vs {name}", ours_ms, ms, peak_mb=peak,
                                     note="peak_mb: theirs"))
                except Exception as e:  # e.g. SDPA's grid limit at N * heads >= 65,536, out of memory
                    rows.append(_row(shape, dtype, name, note=f"failed: {type(e).__name__}: {str(e)[:160]}"))
                torch.cuda.empty_cache()
        del args, want, fns
        torch.cuda.empty_cache()
    return rows + copy_rows(quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for r in run(parser.parse_args().quick):
        print(json.dumps(r))
