"""The fast path's own host cost: each fused op with its Triton launches replaced by no-ops, in units of one eager aten
dispatch measured in the same run, and the bytes each layer copies.

Method: interleaved medians of CPU time. Every round times a few calls of each contender in turn (the eager unit, then
each op's paths), so that machine load shifts all of them alike, in the process's CPU time (`time.process_time`: the
host work itself, which is what is measured; wall time on a shared machine adds whatever other processes ran, and
made spreads of 200-1800% where CPU time gives tens of percent). The row's ms is the median over rounds of ours,
baseline_ms the median of the unit. The unit is one eager `F.group_norm` (forward; forward + backward for the op's
fwd+bwd rows) on a tensor so small that its compute is negligible. `speedup` is baseline / ours, so the op's cost in
units is its reciprocal, printed in the note beside the target.

Copies: bytes written by copy-like aten ops (vdm_fast.testing.CopyCounter: copy_, clone, cat, _to_copy, ...) in a
layer's forward + backward (launches no-op'd: the audit is of the launcher and autograd path, not the interpreter).

The ops are a table (`OPS`), one entry per op: its name, how to build inputs, which kernel-module attributes are the
launches to no-op, and its eager unit.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vdm_fast.testing import CopyCounter

from .common import GPU, row

ROUNDS_QUICK, ROUNDS_FULL = 15, 60
CALLS_PER_ROUND = 20


class _NoLaunch:
    """Stands in for a Triton JITFunction: `kernel[grid](*args, **kwargs)` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextlib.contextmanager
def no_launches(module, names: tuple[str, ...]):
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _NoLaunch())
        yield
    finally:
        for n, v in saved.items():
            setattr(module, n, v)


@contextlib.contextmanager
def _fast_path_on_this_machine():
    """CUDA tensors where there is a GPU; else CPU tensors with the Triton backend forced (dispatch accepts CPU
    tensors only under TRITON_INTERPRET=1; no kernel runs here, the launches are no-ops)."""
    import vdm_fast

    old = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        with vdm_fast.backend("triton"):
            yield "cuda" if GPU else "cpu"
    finally:
        if not GPU:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Per-call milliseconds of each fn: (median over rounds, spread = (p90 - p10) / median)."""
    for fn in fns.values():  # warm-up: first calls pay allocator, autograd-engine and thread-pool start-up
        for _ in range(3 * CALLS_PER_ROUND):
            fn()
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(CALLS_PER_ROUND):
                fn()
            per_round[name].append((time.process_time() - t0) * 1e3 / CALLS_PER_ROUND)
    out = {}
    for name, ts in per_round.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        lo, hi = ts[len(ts) // 10], ts[-1 - len(ts) // 10]
        out[name] = (med, (hi - lo) / med if med else 0.0)
    return out


def copied_bytes(fn: Callable[[], object]) -> int:
    """Bytes written by copy-like aten ops while fn() runs (vdm_fast.testing.CopyCounter; the launches are no-ops,
    so every copy counted is the launcher's or autograd's)."""
    with CopyCounter() as counter:
        fn()
    return counter.bytes


# ------------------------------------------------------------------------------------------ group_norm_silu


def _gn_inputs(device, requires_grad):
    B, C, T, H, W, G = 2, 64, 2, 2, 2, 32  # tiny: the host path is what is timed
    x = torch.randn(B, C, T, H, W, device=device).contiguous(memory_format=torch.channels_last_3d)
    emb = torch.randn(B, 2 * C, device=device)
    scale, shift = emb.chunk(2, dim=1)  # as the U-Net's FiLM projection gives them: views, batch stride 2C
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    if requires_grad:
        for t in (x, emb, w, b):
            t.requires_grad_()
        scale, shift = emb.chunk(2, dim=1)
    return x, G, w, b, scale, shift


def _gn_call(inputs):
    from vdm_fast import ops

    x, G, w, b, scale, shift = inputs
    return ops.group_norm_silu(x, G, w, b, scale=scale, shift=shift, per_frame=True)


@dataclass(frozen=True)
class HostOp:
    name: str
    kernel_module: str  # vdm_fast.kernels.<name>
    launches: tuple[str, ...]  # its JITFunction attributes, no-op'd
    inputs: Callable  # (device, requires_grad) -> inputs
    call: Callable  # inputs -> output
    note: str
    layer_copies: Callable | None = None  # device -> (label, input bytes, copied bytes)


def _gn_layer_copies(device):
    from vdm_fast.layers import GroupNormSiLU

    layer = GroupNormSiLU(32, 64, per_frame=True).to(device)
    x, _, _, _, scale, shift = _gn_inputs(device, True)

    def step():
        y = layer(x, scale, shift)
        y.backward(torch.ones_like(y))

    step()
    return "GroupNormSiLU fwd+bwd (channels_last_3d, FiLM views)", x.numel() * x.element_size(), copied_bytes(step)


# ------------------------------------------------------------------------------------------ temporal_attention


def _ta_inputs(device, requires_grad):
    """The packed projection (B, T, H*W, 3 * heads * d) of a channels_last_3d activation and a shared fp32 bias,
    as TemporalAttention hands them to the op (tiny: the host path is what is timed)."""
    heads, frames, d = 2, 5, 8
    qkv = torch.randn(2, frames, 3, 3 * heads * d, device=device, requires_grad=requires_grad)
    bias = torch.randn(heads, frames, frames, device=device, requires_grad=requires_grad)
    return qkv, heads, bias


def _ta_call(inputs):
    from vdm_fast import ops

    qkv, heads, bias = inputs
    return ops.temporal_attention_packed(qkv, heads, bias)


def _ta_layer_copies(device):
    from vdm_fast.layers import TemporalAttention

    layer = TemporalAttention(64, heads=2, dim_head=32).to(device)
    x = torch.randn(2, 64, 8, 8, 8, device=device).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()

    def step():
        y = layer(x)
        y.backward(torch.ones_like(y))

    step()
    return "TemporalAttention fwd+bwd (channels_last_3d, packed qkv)", x.numel() * x.element_size(), copied_bytes(step)


OPS = [
    HostOp("group_norm_silu", "vdm_fast.kernels.group_norm_silu", ("_fwd_kernel", "_bwd_kernel", "_bwd_params_kernel"),
           _gn_inputs, _gn_call, "channels_last_3d, weight, bias, scale, shift (views), per_frame",
           _gn_layer_copies),
    HostOp("temporal_attention", "vdm_fast.kernels.temporal_attention", ("_fwd_kernel", "_bwd_kernel"),
           _ta_inputs, _ta_call, "ops.temporal_attention_packed: packed qkv of a channels_last_3d activation, shared "
           "bias", _ta_layer_copies),
]


def _unit_inputs(device, requires_grad):
    return torch.randn(1, 2, 2, device=device, requires_grad=requires_grad)


def run(quick: bool = False) -> list[dict]:
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host cost is dispatch, not compute: no intra-op thread pool noise in the unit
    try:
        with _fast_path_on_this_machine() as device:
            rows += _measure(rounds, device)
    finally:
        torch.set_num_threads(threads)
    return rows


def _measure(rounds: int, device: str) -> list[dict]:
    import importlib

    rows = []
    if True:
        u = _unit_inputs(device, False)
        ug = _unit_inputs(device, True)
        ones = torch.ones_like(ug)

        def unit_fwd():
            return F.group_norm(u, 1)

        def unit_fwd_bwd():
            torch.autograd.grad(F.group_norm(ug, 1), ug, ones)

        for op in OPS:
            module = importlib.import_module(op.kernel_module)
            with no_launches(module, op.launches):
                plain = op.inputs(device, False)
                grad = op.inputs(device, True)
                dy = torch.ones_like(op.call(grad))

                def fwd_nograd():
                    return op.call(plain)

                def fwd_grad():
                    return op.call(grad)

                wrt = [t for t in grad if isinstance(t, torch.Tensor) and t.requires_grad]

                def fwd_bwd():  # autograd.grad: no accumulation into .grad (an add per input) in the timing
                    torch.autograd.grad(op.call(grad), wrt, dy)

                t = interleaved_medians({"unit": unit_fwd, "unit_fb": unit_fwd_bwd, "fwd": fwd_nograd,
                                         "fwd_grad": fwd_grad, "fwd_bwd": fwd_bwd}, rounds)
                for label, key, unit, target in (("forward", "fwd", "unit", 5), ("forward, inputs need grad",
                                                  "fwd_grad", "unit", 5),
                                                 ("forward + backward", "fwd_bwd", "unit_fb", 3)):
                    ms, spread = t[key]
                    base = t[unit][0]
                    units = ms / base
                    unit_name = "F.group_norm fwd" if unit == "unit" else "F.group_norm fwd+bwd"
                    rows.append(row(f"host {op.name} {label}", "launches no-op'd", "float32", "vdm_fast host path",
                                    ms, baseline_ms=base,
                                    note=f"{units:.1f} units of eager {unit_name} (target <= {target}); spread "
                                         f"{spread:.0%}; {op.note}; {device}"))
                if op.layer_copies is not None:
                    label, in_bytes, copied = op.layer_copies(device)
                    rows.append(row(f"copies {op.name}", "launches no-op'd", "float32", label, None,
                                    note=f"{copied} bytes copied = {copied / in_bytes:.2f}x the input activation's "
                                         f"{in_bytes} bytes"))
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(r["op"], "|", r["ms"], "|", r["note"])
