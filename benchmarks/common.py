"""Timing and bookkeeping shared by the benchmark modules (each `bench_<op>.py` has `run(quick) -> rows`).

A timing is the median of repeated runs after warm-up, returned as a `Timing`: a float (milliseconds, so modules use
it as a number) that also carries the repeats' min, quartiles, max and count, which `row` copies into the result.
GPU repeats are device-event timings (`triton.testing.do_bench`, every repeat kept); CPU repeats are wall-clock
runs of fn(), at least `settings.repeats` of them and more while a time budget lasts. A row's spread is the
interquartile range over the median; above NOISY_SPREAD the row is flagged as noisy (a busy machine, or an op too
short for the clock), because a speedup inside that spread is not a measurement. Every contender is checked against
ours before it is timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vdm_fast.testing import rel_err

GPU = torch.cuda.is_available()
NOT_RUN_GPU = "not run: Triton kernels need a CUDA GPU"


NOISY_SPREAD = 0.10  # interquartile range / median above which a timing is flagged


@dataclass
class Settings:
    """Set by `vdm-fast bench` (--repeats) before the modules run."""

    repeats: int = 7  # at least this many timed runs per CPU timing (GPU: do_bench's own count, always more)


settings = Settings()


class Timing(float):
    """A median in milliseconds that carries its repeats (min, q1, q3, max, n); arithmetic gives plain floats."""

    min: float
    q1: float
    q3: float
    max: float
    n: int

    def __new__(cls, samples):
        if isinstance(samples, (int, float)):  # a Triton whose do_bench ignores return_mode="all"
            samples = [samples]
        xs = sorted(float(x) for x in samples)
        if not xs:
            raise ValueError("Timing needs at least one sample")
        t = super().__new__(cls, statistics.median(xs))
        q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
        t.min, t.q1, t.q3, t.max, t.n = xs[0], q[0], q[2], xs[-1], len(xs)
        return t

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        return (self.q3 - self.q1) / float(self) if float(self) > 0 else 0.0


def time_ms(fn: Callable[[], Any], *, quick: bool = False, device: str | None = None) -> Timing:
    """Median milliseconds of fn() after warm-up, with the repeats' spread: device events on CUDA, wall clock on CPU."""
    device = device or ("cuda" if GPU else "cpu")
    if device == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 200)
        return Timing(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all"))
    fn()  # warm-up: first-call work (allocation, compilation) stays out of the numbers
    times = []
    budget = 0.5 if quick else 2.0
    cap = max(settings.repeats, 50)
    deadline = time.perf_counter() + budget
    while len(times) < settings.repeats or (time.perf_counter() < deadline and len(times) < cap):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


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


def _spread_fields(prefix: str, t) -> dict:
    if isinstance(t, Timing):
        return {f"{prefix}_min": t.min, f"{prefix}_q1": t.q1, f"{prefix}_q3": t.q3, f"{prefix}_max": t.max,
                f"{prefix}_repeats": t.n, f"{prefix}_spread": t.spread}
    return {f"{prefix}_min": None, f"{prefix}_q1": None, f"{prefix}_q3": None, f"{prefix}_max": None,
            f"{prefix}_repeats": None, f"{prefix}_spread": None}


def row(op: str, shape: Any, dtype: Any, contender: str, ms: float | None, *, baseline_ms: float | None = None,
        bytes_moved: float | None = None, peak_mb: float | None = None, note: str = "", layout: str | None = None,
        device: str | None = None) -> dict:
    """One result row. speedup = baseline_ms / ms (how many times faster ours is than the baseline).

    ms and baseline_ms given as Timings add their spread (`ms_min` ... `ms_spread`, `baseline_ms_*`); the speedup's
    range (`speedup_low`, `speedup_high`: baseline q1 / ours q3 and baseline q3 / ours q1) and `noisy` follow.
    `threads` is torch's intra-op thread count for CPU rows. Modules that build their own dicts get the same
    fields filled in by `normalize`.
    """
    gbps = bytes_moved / (ms * 1e-3) / 1e9 if (bytes_moved and ms) else None
    r = {
        "op": op, "shape": str(tuple(shape)) if isinstance(shape, (tuple, list)) else str(shape),
        "dtype": str(dtype).replace("torch.", ""), "contender": contender, "ms": ms, "baseline_ms": baseline_ms,
        "speedup": (baseline_ms / ms) if (baseline_ms and ms) else None, "gbps": gbps, "pct_copy_bw": None,
        "peak_mb": peak_mb, "note": note, "layout": layout, "device": device or ("cuda" if GPU else "cpu"),
    }
    r.update(_spread_fields("ms", ms))
    r.update(_spread_fields("baseline_ms", baseline_ms))
    return normalize(r)


def fwd_bwd_rows(op: str, contenders: dict[str, Callable], ours: str, inputs: tuple, shape, dtype, *,
                 fwd_bytes: int, bwd_bytes: int, layout: str, copy_bw: float | None, quick: bool,
                 tol: float) -> list[dict]:
    """An op's forward and backward against each contender on the same inputs: every contender's output and
    input gradients checked against ours (`contenders[ours]`) first, then forward (no grad) and backward timed,
    peak memory of the forward, and one row per (contender, direction), ours first."""
    y_ours = contenders[ours](*inputs)
    dy = torch.randn_like(y_ours)
    grads_ours = torch.autograd.grad(y_ours, inputs, dy)
    times = {}
    for name, fn in contenders.items():
        y = fn(*inputs)
        check_close(f"{name} forward", y, y_ours, tol)
        for g, go in zip(torch.autograd.grad(y, inputs, dy, retain_graph=True), grads_ours):
            check_close(f"{name} backward", g, go, tol)
        with torch.no_grad():
            t_fwd = time_ms(lambda: fn(*inputs), quick=quick)
        t_bwd = time_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), quick=quick)
        times[name] = (t_fwd, t_bwd)
    rows = []
    for name, (t_fwd, t_bwd) in times.items():
        for i, (direction, nbytes, t) in enumerate((("fwd", fwd_bytes, t_fwd), ("bwd", bwd_bytes, t_bwd))):
            mine = name == ours
            with torch.no_grad():
                peak = peak_memory_mb(lambda: contenders[name](*inputs)) if direction == "fwd" else None
            r = row(f"{op} {direction}", shape, dtype, name if mine else f"vdm_fast vs {name}", times[ours][i],
                    baseline_ms=None if mine else t, bytes_moved=nbytes, peak_mb=peak, layout=layout)
            if copy_bw and r["gbps"]:
                r["pct_copy_bw"] = 100 * r["gbps"] / copy_bw
            rows.append(r)
    return rows


def needs_gpu(r: dict) -> bool:
    """A row that was not run because it needs a CUDA GPU (kept in the JSON, summarized in one line on CPU)."""
    note = str(r.get("note") or "")
    return r.get("ms") is None and "CUDA GPU" in note


def normalize(r: dict) -> dict:
    """Fill the fields every row has (a module may build its dict by hand): float values, spread, threads, noisy."""
    r = dict(r)
    for k in ("ms", "baseline_ms"):
        if isinstance(r.get(k), Timing) and f"{k}_spread" not in r:
            r.update(_spread_fields(k, r[k]))
        r.setdefault(f"{k}_spread", None)
        if r.get(k) is not None:
            r[k] = float(r[k])  # a Timing serializes as its median
    r.setdefault("note", "")
    r.setdefault("layout", None)
    r.setdefault("device", "cuda" if GPU else "cpu")
    r.setdefault("threads", torch.get_num_threads() if r["device"] == "cpu" else None)
    for k in ("baseline_ms", "speedup", "gbps", "pct_copy_bw", "peak_mb"):
        r.setdefault(k, None)
    lo = hi = None
    if r.get("speedup") and r.get("ms_q3") and r.get("baseline_ms_q1"):
        lo, hi = r["baseline_ms_q1"] / r["ms_q3"], r["baseline_ms_q3"] / r["ms_q1"]
    r.setdefault("speedup_low", lo)
    r.setdefault("speedup_high", hi)
    spreads = [v for v in (r.get("ms_spread"), r.get("baseline_ms_spread")) if v is not None]
    r["noisy"] = bool(spreads) and max(spreads) > NOISY_SPREAD
    r["needs_gpu"] = needs_gpu(r)
    return r


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
