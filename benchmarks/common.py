"""Timing and bookkeeping shared by the benchmark modules.

GPU timings are medians of device-event timings after warm-up (`triton.testing.do_bench`, return_mode="median");
CPU timings are medians of wall-clock repeats. Every contender is checked against ours before it is timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from vdm_fast.testing import rel_err

GPU = torch.cuda.is_available()
NOT_RUN_GPU = "not run: Triton kernels need a CUDA GPU"


def time_ms(fn: Callable[[], Any], *, quick: bool = False, device: str | None = None) -> float:
    """Median milliseconds of fn() after warm-up: device events on CUDA, wall clock on CPU."""
    device = device or ("cuda" if GPU else "cpu")
    if device == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 200)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # warm-up: first-call work (allocation, compilation) stays out of the numbers
    times = []
    deadline = time.perf_counter() + (0.5 if quick else 2.0)
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory (MiB) allocated while fn() runs, above what was allocated before; None on CPU."""
    if not GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """A contender that disagrees with ours is not timed: raise with both names."""
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:.0e} against vdm_fast")


def row(op: str, shape: Any, dtype: Any, contender: str, ms: float | None, *, baseline_ms: float | None = None,
        bytes_moved: float | None = None, peak_mb: float | None = None, note: str = "") -> dict:
    """One result row. speedup = baseline_ms / ms (how many times faster ours is than the baseline)."""
    gbps = bytes_moved / (ms * 1e-3) / 1e9 if (bytes_moved and ms) else None
    return {
        "op": op, "shape": str(tuple(shape)) if isinstance(shape, (tuple, list)) else str(shape),
        "dtype": str(dtype).replace("torch.", ""), "contender": contender, "ms": ms, "baseline_ms": baseline_ms,
        "speedup": (baseline_ms / ms) if (baseline_ms and ms) else None, "gbps": gbps, "pct_copy_bw": None,
        "peak_mb": peak_mb, "note": note,
    }


def copy_bandwidth_gbps(quick: bool = False) -> float | None:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s); None without a GPU."""
    if not GPU:
        return None
    n = (256 if quick else 1024) * 2**20  # 1 GiB: many times the L2
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), quick=quick)
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(quick: bool = False) -> float | None:
    """bf16 matrix product rate on random data (TFLOP/s); None without a GPU."""
    if not GPU:
        return None
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, quick=quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12
