"""group_norm_silu: the fused Triton kernels against eager PyTorch and torch.compile of the same, forward and backward.

Eager: F.group_norm + FiLM + F.silu (per-frame statistics as the frames folded into the batch, which copies unless x is
channels_last_3d). Peers: Liger-Kernel's Triton GroupNorm (`pip install liger-kernel`; optional) with the FiLM and SiLU
left to eager PyTorch, as a user of it would write (its input must be contiguous (B, G, -1): channels_last and
per-frame folding copy first): the row's contender name says so. Bytes counted for the forward: x read once + y
written once; for the backward: x and dy read once + dx written once (the floor; the parameter gradients are
negligible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vdm_fast import backend, ops

from .common import GPU, NOT_RUN_GPU, copy_bandwidth_gbps, fwd_bwd_rows, row

# (shape, num_groups, per_frame, channels_last): the U-Net video blocks (per frame) and an image block.
SHAPES = [
    ((2, 256, 16, 64, 64), 32, True, False),
    ((2, 512, 16, 32, 32), 32, True, False),
    ((8, 320, 64, 64), 32, False, False),
    ((2, 256, 16, 64, 64), 32, True, True),
    ((2, 256, 16, 64, 64), 32, False, False),
]
TOL = 2e-2  # bf16 outputs


def eager(x, num_groups, weight, bias, scale, shift, per_frame):
    """The unfused PyTorch the op replaces."""
    B, C = x.shape[:2]
    if per_frame and x.dim() == 5:
        T = x.shape[2]
        frames = x.transpose(1, 2).reshape(B * T, C, *x.shape[3:])
        y = F.group_norm(frames, num_groups, weight, bias).reshape(B, T, C, *x.shape[3:]).transpose(1, 2)
    else:
        y = F.group_norm(x, num_groups, weight, bias)
    view = (B, C) + (1,) * (x.dim() - 2)
    return F.silu(y * (1 + scale.view(view)) + shift.view(view))


def _liger(num_groups, per_frame):
    """Liger-Kernel's GroupNorm (when installed) plus the eager remainder, or None."""
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except ImportError:
        return None

    def fn(x, weight, bias, scale, shift):
        B, C = x.shape[:2]
        if per_frame and x.dim() == 5:
            T = x.shape[2]
            frames = x.transpose(1, 2).reshape(B * T, C, *x.shape[3:]).contiguous()
            y = LigerGroupNormFunction.apply(frames, weight, bias, C, num_groups, 1e-5)
            y = y.reshape(B, T, C, *x.shape[3:]).transpose(1, 2)
        else:
            y = LigerGroupNormFunction.apply(x.contiguous(), weight, bias, C, num_groups, 1e-5).view(x.shape)
        view = (B, C) + (1,) * (x.dim() - 2)
        return F.silu(y * (1 + scale.view(view)) + shift.view(view))

    return fn


def _inputs(shape, channels_last, dtype, device):
    B, C = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    w = torch.randn(C, device=device, dtype=dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    s = torch.randn(B, C, device=device, dtype=dtype) * 0.1
    sh = torch.randn(B, C, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (x, w, b, s, sh)]


def _label(per_frame: bool, channels_last: bool) -> str:
    """The layout every row of a case carries, timed or not."""
    return f"{'cl' if channels_last else 'contig'}{', per_frame' if per_frame else ''}"


def _bench(shape, num_groups, per_frame, channels_last, quick, copy_bw) -> list[dict]:
    dtype = torch.bfloat16
    x, w, b, s, sh = inputs = _inputs(shape, channels_last, dtype, "cuda")
    fwd_bytes = 2 * x.numel() * x.element_size()
    bwd_bytes = 3 * x.numel() * x.element_size()
    label = _label(per_frame, channels_last)

    def ours(*t):
        with backend("triton"):
            return ops.group_norm_silu(t[0], num_groups, t[1], t[2], scale=t[3], shift=t[4], per_frame=per_frame)

    def plain(*t):
        return eager(*t[:1], num_groups, *t[1:], per_frame)

    compiled = torch.compile(plain)
    contenders = {"vdm_fast (triton)": ours, "eager": plain, "torch.compile": compiled}
    liger = _liger(num_groups, per_frame)
    if liger is not None:
        contenders["liger-kernel GroupNorm + eager FiLM/SiLU"] = liger
    return fwd_bwd_rows("group_norm_silu", contenders, "vdm_fast (triton)", inputs, shape, dtype, fwd_bytes=fwd_bytes,
                        bwd_bytes=bwd_bytes, layout=label, copy_bw=copy_bw, quick=quick, tol=TOL)


def run(quick: bool = False) -> list[dict]:
    shapes = SHAPES[:3] if quick else SHAPES
    if not GPU:
        return [row(f"group_norm_silu {d}", s[0], torch.bfloat16, "vdm_fast (triton)", None, note=NOT_RUN_GPU,
                    layout=_label(s[2], s[3]))
                for s in shapes for d in ("fwd", "bwd")]
    copy_bw = copy_bandwidth_gbps(quick)
    return [r for case in shapes for r in _bench(*case, quick, copy_bw)]


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
