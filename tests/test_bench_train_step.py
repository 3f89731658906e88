"""benchmarks/bench_train_step.py on a CPU (--quick): the eager step timed with its host cost and aten-op count, and
rows saying why --compile (Inductor compiles for minutes here) and --cuda-graph (needs a CUDA GPU) were not run."""

from __future__ import annotations

import torch
from vdm_fast.benchmarks import bench_train_step


def test_quick_cpu_rows():
    if torch.cuda.is_available():  # the GPU rows are gpu_check.sh's business
        return
    rows = {r["contender"]: r for r in bench_train_step.run(quick=True)}
    assert list(rows) == ["eager", "torch.compile", "cuda graph"]
    eager = rows["eager"]
    assert eager["ms"] > 0 and eager["ms_repeats"] == 10 and 0 < eager["host_ms"] <= eager["ms_max"] * 1.05
    # forward, backward, clipping, AdamW and EMA: thousands of aten ops for this small model, each a launch on a GPU
    assert eager["aten_ops"] > 500
    assert rows["torch.compile"]["ms"] is None and "not run with --quick" in rows["torch.compile"]["note"]
    assert rows["cuda graph"]["ms"] is None and rows["cuda graph"]["needs_gpu"]
