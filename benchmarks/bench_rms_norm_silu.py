"""rms_norm_silu: the fused Triton kernels against eager PyTorch and torch.compile of the same, forward and backward.

Eager: video-diffusion-pytorch 0.7's Block after its conv, as its source reads: `F.normalize(x, dim=1) * dim ** 0.5 *
gamma`, then `x * (scale + 1) + shift`, then SiLU (gamma (C, 1, 1, 1), FiLM (B, C, 1, 1, 1)). Bytes counted for the
forward: x read once + y written once; for the backward: x and dy read once + dx written once (the floor; rstd and
the parameter gradients are negligible). On a machine without a GPU the Triton rows say so; the CPU rows check the
reference against the eager formula and time both (what `auto` runs on CPU is the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vdm_fast import backend, ops
from vdm_fast import reference as ref

from .common import GPU, NOT_RUN_GPU, check_close, copy_bandwidth_gbps, fwd_bwd_rows, row, time_ms

# (shape, channels_last): the 0.7 U-Net's Blocks at base width 128 and 256 (64x64, T = 16), a deeper level, and the
# first level in the contiguous layout a model without channels_last runs.
SHAPES = [
    ((2, 128, 16, 64, 64), True),
    ((2, 256, 16, 32, 32), True),
    ((2, 1024, 16, 8, 8), True),
    ((2, 128, 16, 64, 64), False),
    ((2, 256, 16, 32, 32), False),
]
CPU_SHAPES = [((2, 64, 4, 16, 16), True), ((2, 64, 4, 16, 16), False)]
TOL = 2e-2  # bf16 outputs


def eager(x, gamma, scale, shift):
    """The unfused PyTorch the op replaces: video-diffusion-pytorch 0.7's RMSNorm and the rest of Block.forward."""
    C = x.shape[1]
    y = F.normalize(x, dim=1) * C ** 0.5 * gamma.view(C, 1, 1, 1)
    y = y * (scale[:, :, None, None, None] + 1) + shift[:, :, None, None, None]
    return F.silu(y)


def _inputs(shape, channels_last, dtype, device):
    B, C = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(C, device=device, dtype=dtype)
    s = torch.randn(B, C, device=device, dtype=dtype) * 0.1
    sh = torch.randn(B, C, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (x, g, s, sh)]


def _label(channels_last: bool) -> str:
    return "cl3d" if channels_last else "contig"


def _bench(shape, channels_last, quick, copy_bw) -> list[dict]:
    dtype = torch.bfloat16
    inputs = _inputs(shape, channels_last, dtype, "cuda")
    x = inputs[0]
    fwd_bytes = 2 * x.numel() * x.element_size()
    bwd_bytes = 3 * x.numel() * x.element_size()
    label = _label(channels_last)

    def ours(*t):
        with backend("triton"):
            return ops.rms_norm_silu(t[0], t[1], scale=t[2], shift=t[3])

    contenders = {"vdm_fast (triton)": ours, "eager": eager, "torch.compile": torch.compile(eager)}
    return fwd_bwd_rows("rms_norm_silu", contenders, "vdm_fast (triton)", inputs, shape, dtype, fwd_bytes=fwd_bytes,
                        bwd_bytes=bwd_bytes, layout=label, copy_bw=copy_bw, quick=quick, tol=TOL)


def _cpu_rows(shape, channels_last, quick) -> list[dict]:
    """The reference (what auto runs on CPU) checked against the eager formula in fp32, both timed."""
    inputs = [t.detach() for t in _inputs(shape, channels_last, torch.float32, "cpu")]
    x, g, s, sh = inputs
    want = eager(*inputs)
    got = ref.rms_norm_silu(x, g, scale=s, shift=sh)
    check_close("reference forward", want, got, 1e-5)
    t_ref = time_ms(lambda: ref.rms_norm_silu(x, g, scale=s, shift=sh), quick=quick, device="cpu")
    t_eager = time_ms(lambda: eager(*inputs), quick=quick, device="cpu")
    return [row("rms_norm_silu fwd", shape, torch.float32, "vdm_fast reference vs eager", t_ref,
                baseline_ms=t_eager, layout=_label(channels_last), device="cpu",
                note="CPU: the reference path (checked against eager to 1e-5)")]


def run(quick: bool = False) -> list[dict]:
    shapes = SHAPES[:3] if quick else SHAPES
    if not GPU:
        rows = [row(f"rms_norm_silu {d}", s[0], torch.bfloat16, "vdm_fast (triton)", None, note=NOT_RUN_GPU,
                    layout=_label(s[1]))
                for s in shapes for d in ("fwd", "bwd")]
        return rows + [r for case in CPU_SHAPES for r in _cpu_rows(*case, quick)]
    copy_bw = copy_bandwidth_gbps(quick)
    return [r for case in shapes for r in _bench(*case, quick, copy_bw)]


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
