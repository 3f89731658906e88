"""pytest-benchmark view of the same measurements: `pytest benchmarks --benchmark-only` (not part of CI's tests).

Each benchmark module's rows are produced by `vdm-fast bench`; this file times the core ops through pytest-benchmark
for users who track results with its tooling (`--benchmark-autosave`, `--benchmark-compare`).
"""

from __future__ import annotations

import pytest
import torch

from vdm_fast import backend, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync(fn):
    def wrapped():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return wrapped


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_rel_pos_bias(benchmark, mode):
    table = torch.randn(32, 8, device=DEVICE)
    pos = torch.randint(0, 100, (8, 16), device=DEVICE)
    with backend(mode):
        benchmark(_sync(lambda: ops.rel_pos_bias(table, pos)))


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_group_norm_silu(benchmark, mode):
    x = torch.randn(2, 256, 16, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    scale, shift = torch.randn(2, 256, device=DEVICE, dtype=torch.bfloat16), torch.randn_like(x[:, :, 0, 0, 0])
    with backend(mode):
        benchmark(_sync(lambda: ops.group_norm_silu(x, 32, scale=scale, shift=shift, per_frame=True)))


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_temporal_attention(benchmark, mode):
    q, k, v = (torch.randn(8 * 64 * 64, 4, 16, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(4, 16, 16, device=DEVICE, dtype=torch.bfloat16)
    with backend(mode):
        benchmark(_sync(lambda: ops.temporal_attention(q, k, v, bias)))
