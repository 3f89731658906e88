"""Unet3D: a training step (fwd+bwd, bf16 autocast) and a forward of the paper's UCF101 layout at base width 128,
on vdm_fast's ops against the same model on the reference ops, eager and under torch.compile; gradient checkpointing's
memory; the bytes a training step copies.

Targets (GPU): training step >= 1.6x reference eager and >= 1.2x torch.compile of the reference model, peak memory
<= 0.7x reference eager. On CPU only the tiny preset is timed (Triton's fast paths need a GPU there).

Gradient checkpointing (issue 15): bytes saved for backward by one training step (every tensor autograd keeps,
through torch.autograd.graph.saved_tensors_hooks, once per storage, parameters excluded) with and without, at the
ucf101 layout (levels 1,2,4,8, two blocks, attention at 32/16/8, 16x64x64) scaled down in width for the CPU; target
<= 0.35x. On a GPU also the step time and peak memory with and without, at base 128. Measured on CPU (2026-12-01):
reference ops 0.123x at base 16 and 0.125x at base 32 (1x3x16x64x64); the fast ops (Triton interpreter, too slow for
that shape) 0.229x at base 8 on 1x3x4x16x16, where the reference gives 0.126x: the fused backward saves less to begin
with.

Copies (issue 12 item 2): the bytes a training step writes in copy-like aten ops (copy_, clone / contiguous /
reshape copies, _to_copy, cat), seen by a TorchDispatchMode (the profiler records no shapes for cat's tensor list),
attributed to Unet3D.forward itself (outside every submodule), to the layers, and in backward to the autograd node.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from vdm_fast import backend
from vdm_fast.model import Unet3D
from vdm_fast.testing import CopyCounter

from .common import GPU, NOT_RUN_GPU, check_close, peak_memory_mb, row, time_ms

TRAIN_BATCH, FORWARD_BATCH, FRAMES, SIZE = 2, 1, 16, 64


def _model(device: str, **overrides) -> Unet3D:
    model = Unet3D.preset(**overrides).to(device)
    # Undo the zero init of the last convs, so the correctness check before timing compares non-zero outputs.
    for m in model.modules():
        if isinstance(m, nn.Conv3d) and m.weight.abs().max() == 0:
            m.reset_parameters()
    return model


def _inputs(model: Unet3D, batch: int, frames: int, size: int, device: str):
    x = torch.randn(batch, model.config.in_channels, frames, size, size, device=device)
    return x, torch.empty(batch, device=device).uniform_(-10, 10), torch.randn_like(x)


# name -> (backend mode, compiled?).
CONTENDERS = {"vdm_fast": ("auto", False), "reference eager": ("reference", False),
              "reference torch.compile": ("reference", True), "vdm_fast torch.compile": ("auto", True)}
# (ours, baseline) rows: the speedup is baseline_ms / ours_ms.
PAIRS = [("vdm_fast", "reference eager"), ("vdm_fast", "reference torch.compile"),
         ("vdm_fast torch.compile", "reference torch.compile")]


def _step(model: nn.Module, inputs, mode: str, compiled: bool, train: bool, dtype, device: str):
    x, logsnr, eps = inputs
    net = torch.compile(model) if compiled else model

    def step():
        with backend(mode), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            if not train:
                with torch.no_grad():
                    return net(x, logsnr)
            model.zero_grad(set_to_none=True)
            out = net(x, logsnr)
            (out.float() - eps).square().mean().backward()
            return out

    return step


def _measure(model, inputs, train: bool, dtype, device: str, quick: bool, names) -> dict[str, tuple]:
    """name -> (ms, peak MiB, output of one step). torch.compile resolves the dispatch when it traces and its cache
    does not key on the backend mode: each compiled contender is compiled fresh (after a reset) under its own mode."""
    results = {}
    for name in names:
        mode, compiled = CONTENDERS[name]
        if compiled:
            torch._dynamo.reset()
        step = _step(model, inputs, mode, compiled, train, dtype, device)
        out = step().detach().float()  # warm-up (and compilation), and the output to check
        results[name] = (time_ms(step, quick=quick), peak_memory_mb(step), out)
    return results


def _rows(op: str, shape, dtype, results: dict, note: str) -> list[dict]:
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    for name, (_, _, out) in results.items():
        check_close(name, out, results["vdm_fast"][2], tol)
    rows = []
    for ours, base in PAIRS:
        if ours in results and base in results:
            (ms, peak, _), (base_ms, base_peak, _) = results[ours], results[base]
            mem = f"peak {peak:.0f} vs {base_peak:.0f} MiB ({peak / base_peak:.2f}x)" if peak and base_peak else ""
            rows.append(row(op, shape, dtype, f"{ours} vs {base}", ms, baseline_ms=base_ms, peak_mb=peak,
                            note="; ".join(s for s in (mem, note) if s)))
    return rows


def _gpu_rows(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = _model("cuda", name="ucf101", base_channels=128)
    names = list(CONTENDERS)
    note = f"ucf101 layout, base 128 ({model.parameter_count() / 1e6:.0f}M params), bf16 autocast"
    train_in = _inputs(model, TRAIN_BATCH, FRAMES, SIZE, "cuda")
    rows = _rows("unet3d train step (fwd+bwd)", (TRAIN_BATCH, 3, FRAMES, SIZE, SIZE), dtype,
                 _measure(model, train_in, True, dtype, "cuda", quick, names), note)
    fwd_in = _inputs(model, FORWARD_BATCH, FRAMES, SIZE, "cuda")
    rows += _rows("unet3d forward", (FORWARD_BATCH, 3, FRAMES, SIZE, SIZE), dtype,
                  _measure(model, fwd_in, False, dtype, "cuda", quick, names), note)
    return rows


def _cpu_rows(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model = _model("cpu", name="tiny")
    c = model.config
    shape = (2, 3, c.num_frames, c.image_size, c.image_size)
    names = ["vdm_fast", "reference eager"]
    note = (f"tiny preset ({model.parameter_count() / 1e6:.2f}M params), fp32 on CPU: the auto backend runs the "
            f"reference there except compiled CPU code")
    rows = _rows("unet3d train step (fwd+bwd)", shape, torch.float32,
                 _measure(model, _inputs(model, 2, c.num_frames, c.image_size, "cpu"), True, torch.float32, "cpu",
                          quick, names), note)
    rows += _rows("unet3d forward", (1,) + shape[1:], torch.float32,
                  _measure(model, _inputs(model, 1, c.num_frames, c.image_size, "cpu"), False, torch.float32, "cpu",
                           quick, names), note)
    for op, batch in (("unet3d train step (fwd+bwd)", TRAIN_BATCH), ("unet3d forward", FORWARD_BATCH)):
        for ours, base in PAIRS:
            rows.append(row(op, (batch, 3, FRAMES, SIZE, SIZE), torch.bfloat16, f"{ours} vs {base}", None,
                            note=f"ucf101 layout, base 128: {NOT_RUN_GPU}"))
    return rows


# --- gradient checkpointing: bytes saved for backward -------------------------------------------------------------


def saved_for_backward_bytes(loss_fn, params: nn.Module | None = None) -> int:
    """Bytes autograd keeps for backward while loss_fn() builds its graph (each storage once; the storages of
    `params`' parameters, which live anyway, left out); then runs the backward, so the graph is also checked whole."""
    skip = {p.untyped_storage().data_ptr() for p in params.parameters()} if params is not None else set()
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[(s.device, s.data_ptr())] = s.nbytes()
        return t  # kept alive by the graph, so no address is reused while counted

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


def _ucf101_scaled(base: int, device: str) -> Unet3D:
    return _model(device, name="ucf101", base_channels=base, attn_head_dim=min(64, base),
                  norm_groups=min(32, base // 2), dropout=0.1)


def _checkpointing_rows(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    device, mode = ("cuda", "auto") if GPU else ("cpu", "reference")
    base = (64 if quick else 128) if GPU else (16 if quick else 32)
    batch = 2 if GPU else 1
    model = _ucf101_scaled(base, device).train()
    x, logsnr, eps = _inputs(model, batch, FRAMES, SIZE, device)
    dtype = torch.bfloat16 if GPU else torch.float32

    def loss_fn():
        with backend(mode), torch.autocast(device, dtype=dtype, enabled=GPU):
            return (model(x, logsnr).float() - eps).square().mean()

    saved, times, peaks = {}, {}, {}
    for enabled in (False, True):
        model._set_gradient_checkpointing(enabled)
        with backend(mode):
            saved[enabled] = saved_for_backward_bytes(loss_fn, model)
        if GPU:
            def step():
                model.zero_grad(set_to_none=True)
                loss_fn().backward()
            times[enabled] = time_ms(step, quick=quick)
            peaks[enabled] = peak_memory_mb(step)
    model._set_gradient_checkpointing(False)
    ratio = saved[True] / saved[False]
    note = (f"saved for backward {saved[True] / 2**20:.1f} vs {saved[False] / 2**20:.1f} MiB without: {ratio:.3f}x "
            f"(target <= 0.35x); ucf101 layout at base {base} ({model.parameter_count() / 1e6:.1f}M params), "
            f"{'bf16 autocast, vdm_fast ops' if GPU else 'fp32, reference ops (CPU)'}")
    if GPU:
        note += f"; peak {peaks[True]:.0f} vs {peaks[False]:.0f} MiB ({peaks[True] / peaks[False]:.2f}x)"
    r = row("unet3d train step, gradient checkpointing", (batch, 3, FRAMES, SIZE, SIZE), dtype,
            "checkpointing vs none", times.get(True), baseline_ms=times.get(False), peak_mb=peaks.get(True), note=note)
    r.update(saved_bytes=saved[True], baseline_saved_bytes=saved[False], saved_ratio=ratio)
    rows = [r]
    if not GPU:
        rows.append(row("unet3d train step, gradient checkpointing", (2, 3, FRAMES, SIZE, SIZE), torch.bfloat16,
                        "checkpointing vs none", None, note=f"peak memory and step time at base 128: {NOT_RUN_GPU}"))
    return rows


# --- copies made by a training step ---------------------------------------------------------------------------------

def copied_bytes_by_origin(model: nn.Module, step) -> collections.Counter:
    """{(phase, where, op): bytes} copied while step() runs (vdm_fast.testing.CopyCounter)."""
    with CopyCounter(model) as counter:
        step()
    return counter.by_origin


def _copy_rows(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    device, mode = ("cuda", "auto") if GPU else ("cpu", "reference")
    model = _model(device, name="ucf101", base_channels=128) if GPU else _model(device, name="tiny")
    c = model.config
    frames, size = (FRAMES, SIZE) if GPU else (c.num_frames, c.image_size)
    x, logsnr, eps = _inputs(model, TRAIN_BATCH, frames, size, device)

    def step():
        model.zero_grad(set_to_none=True)
        with backend(mode):
            (model(x, logsnr) - eps).square().mean().backward()

    step()
    counts = copied_bytes_by_origin(model, step)
    total = sum(counts.values())
    own = {k: v for k, v in counts.items() if k[:2] == ("forward", "top level") or k[1] == "CatBackward0"}
    unit = TRAIN_BATCH * c.base_channels * frames * size * size * x.element_size()  # conv_in's output
    by_kind: collections.Counter = collections.Counter()
    for (phase, where, op), b in counts.items():
        by_kind[f"{phase} {where.split(' ')[-1].strip('()') if phase == 'forward' else where} {op}"] += b
    top = ", ".join(f"{k} {b / 2**20:.2f}" for k, b in by_kind.most_common(4))
    note = (f"{total / 2**20:.2f} MiB per step = {total / unit:.1f}x conv_in's output; Unet3D.forward's own "
            f"{sum(own.values()) / 2**20:.2f} MiB (skip concatenations and the NDHWC layout of x and the output), "
            f"the rest inside the layers; largest (MiB): {top}; "
            f"{'vdm_fast ops, ucf101 base 128' if GPU else 'reference ops, tiny preset (CPU)'}")
    r = row("unet3d train step copies (fwd+bwd)", tuple(x.shape), x.dtype, "vdm_fast", None, note=note)
    r.update(copied_bytes=total, copied_bytes_model=sum(own.values()),
             copied_bytes_detail={" / ".join(k): v for k, v in counts.most_common()})
    return r and [r]


def run(quick: bool = False) -> list[dict]:
    return (_gpu_rows(quick) if GPU else _cpu_rows(quick)) + _checkpointing_rows(quick) + _copy_rows(quick)
