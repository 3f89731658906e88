"""rel_pos_bias: the compiled extension against its PyTorch reference, forward and backward."""

from __future__ import annotations

import torch

from vdm_fast import backend, ops

from .common import GPU, check_close, row, time_ms

# (batch of per-sample positions or None for shared, frames, heads): the U-Net's and an extension step's shapes.
SHAPES = [(None, 16, 8), (8, 16, 8), (None, 64, 8), (4, 128, 16)]


def _case(batch, frames, heads, device, dtype):
    table = torch.randn(32, heads, device=device, dtype=dtype, requires_grad=True)
    pos = torch.randint(0, 200, (frames,) if batch is None else (batch, frames), device=device)
    return table, pos


def _bench(batch, frames, heads, device, dtype, quick) -> list[dict]:
    table, pos = _case(batch, frames, heads, device, dtype)
    shape = (batch or 1, heads, frames, frames)
    out_bytes = table.element_size() * shape[0] * heads * frames * frames
    with backend("auto"):
        ours = ops.rel_pos_bias(table, pos)
    with backend("reference"):
        check_close("reference", ops.rel_pos_bias(table, pos), ours, 0.0)
    grad = torch.randn_like(ours)

    def fwd(mode):
        with backend(mode), torch.no_grad():
            return ops.rel_pos_bias(table, pos)

    def fwd_bwd(mode):
        with backend(mode):
            table.grad = None
            ops.rel_pos_bias(table, pos).backward(grad)

    contender = "vdm_fast._C vs reference"
    rows = []
    for name, fn, nbytes in (("fwd", fwd, out_bytes), ("fwd+bwd", fwd_bwd, 3 * out_bytes)):
        ms_ours, ms_ref = time_ms(lambda: fn("auto"), quick=quick), time_ms(lambda: fn("reference"), quick=quick)
        rows.append(row(f"rel_pos_bias {name}", shape, dtype, contender, ms_ours, baseline_ms=ms_ref,
                        bytes_moved=nbytes))
    return rows


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if GPU else "cpu"
    dtype = torch.bfloat16 if GPU else torch.float32
    return [r for case in (SHAPES[:2] if quick else SHAPES) for r in _bench(*case, device, dtype, quick)]
