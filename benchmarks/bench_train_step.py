"""The trainer's optimizer step (issue 15): eager, --compile (Inductor) and --cuda-graph (the whole step captured),
step time and what the host does per step.

Each contender is the trainer's own step object (`Trainer.train_step`: TrainStep, or train.graph.GraphedStep) on
real batches of the bouncing data (drawn before timing and cycled, so data loading is not timed), after warm-up
steps that also cover compilation and the graph's warm-up and capture. A step ends with the trainer's own host
synchronisation (the non-finite guard reads the loss and gradient norm), so wall-clock time per step is the step's
latency; `ms` is the median over the timed steps with its spread, `speedup` is eager's median over the contender's.

Also per step:
- host_ms: CPU time of the Python thread per step (time.thread_time). On a GPU this is the launch work the graph
  removes, plus whatever the driver spins while the host waits at the step's sync; on a CPU it is everything.
- aten_ops: aten operators dispatched per step (a TorchDispatchMode counts every one, forward, backward and AdamW):
  in eager mode about one kernel launch each on a GPU; a graphed step dispatches only its copy-in and the finite
  check. Not counted under --compile (Inductor's kernels do not go through the dispatcher one op at a time).

CPU rows: a small model (the tiny preset at base 16, 4x16x16 clips), fp32. --compile compiles C++ for minutes on a
2-core CPU: not run with --quick there. --cuda-graph needs a CUDA GPU: not run on a CPU (a row saying so).
GPU rows: the tiny preset (8x16x16, where launches dominate) and, without --quick, a mid-size model (base 64, 8x32x32),
bf16 autocast. Peak memory with and without gradient checkpointing is in bench_unet3d's checkpointing rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vdm_fast import backend
from vdm_fast.train import TrainConfig, Trainer

from .common import GPU, Timing, row

WARMUP_STEPS = 5  # > train.graph.WARMUP_STEPS + the capture
BATCHES = 4  # distinct batches cycled through the timed steps


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _configs(quick: bool) -> list[tuple[str, dict]]:
    common = dict(data="bouncing", workers=0, log_every=10**6, save_every=10**6, sample_every=0, progress=False,
                  ema_decay=0.999, warmup_steps=0)
    if not GPU:
        return [("tiny, base 16", dict(common, preset="tiny", overrides=dict(base_channels=16, attn_head_dim=16),
                                       frames=4, resolution=16, batch_size=2, device="cpu", precision="fp32"))]
    rows = [("tiny", dict(common, preset="tiny", batch_size=4, device="cuda"))]
    if not quick:
        rows.append(("tiny at base 64, 8x32x32", dict(common, preset="tiny", overrides=dict(base_channels=64),
                                                     frames=8, resolution=32, batch_size=4, device="cuda")))
    return rows


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _measure(cfg: TrainConfig, steps: int) -> dict:
    """{'ms': Timing, 'host_ms': float, 'aten_ops': int | None, 'trainer': description} of cfg's train_step."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(dataclasses.replace(cfg, out=out))
        try:
            it = iter(trainer.loader())
            batches = [next(it) for _ in range(BATCHES)]
            del it
            step_fn = trainer.train_step
            trainer.train_module.train()
            counter = itertools.count()
            for _ in range(WARMUP_STEPS):
                step_fn(batches[0], next(counter))
            _sync()
            times, host = [], []
            for i in range(steps):
                t0, c0 = time.perf_counter(), time.thread_time()
                step_fn(batches[i % BATCHES], next(counter))
                _sync()
                host.append((time.thread_time() - c0) * 1e3)
                times.append((time.perf_counter() - t0) * 1e3)
            ops = None
            if not cfg.compile:
                mode = _OpCounter()
                with mode:
                    step_fn(batches[0], next(counter))
                ops = mode.n
            captured = getattr(step_fn, "captured", None)
            return {"ms": Timing(times), "host_ms": Timing(host), "aten_ops": ops, "captured": captured,
                    "params": trainer.model.parameter_count()}
        finally:
            trainer.close()


def run(quick: bool = False) -> list[dict]:
    rows = []
    steps = 10 if quick else 40
    mode = "auto" if GPU else "reference"  # CPU: the reference ops (the fast ones are GPU kernels)
    for name, kw in _configs(quick):
        base = TrainConfig(**kw)
        shape = (base.batch_size, 3, base.frames or 8, base.resolution or 16, base.resolution or 16)
        dtype = torch.bfloat16 if GPU else torch.float32
        note0 = f"{name}, {'bf16 autocast' if GPU else 'fp32, reference ops'}, batch {base.batch_size}, AdamW + EMA"
        # (contender, options, why not run or "")
        contenders = [("eager", {}, ""),
                      ("torch.compile", dict(compile=True), "" if GPU or not quick else
                       "not run with --quick on a CPU: Inductor compiles C++ kernels for minutes there"),
                      ("cuda graph", dict(cuda_graph=True), "" if GPU else "not run: --cuda-graph needs a CUDA GPU")]
        eager = None
        for contender, extra, why in contenders:
            if why:
                rows.append(row("train step", shape, dtype, contender, None, note=f"{note0}; {why}"))
                continue
            torch._dynamo.reset()
            with backend(mode):
                r = _measure(dataclasses.replace(base, **extra), steps)
            eager = eager or r
            ops = f"{r['aten_ops']} aten ops/step" if r["aten_ops"] is not None else "aten ops not counted"
            note = (f"{note0} ({r['params'] / 1e6:.2f}M params); host {float(r['host_ms']):.2f} ms/step (thread CPU "
                    f"time), {ops}")
            if r["captured"] is not None:
                note += "; captured" if r["captured"] else "; NOT captured"
            out = row("train step", shape, dtype, contender, r["ms"],
                      baseline_ms=eager["ms"] if r is not eager else None, note=note)
            out.update(host_ms=float(r["host_ms"]), aten_ops=r["aten_ops"])
            rows.append(out)
    return rows
