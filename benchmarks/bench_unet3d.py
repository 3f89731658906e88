"""Unet3D: a training step (fwd+bwd, bf16 autocast) and a forward of the paper's UCF101 layout at base width 128,
on vdm_fast's ops against the same model on the reference ops, eager and under torch.compile.

Targets (GPU): training step >= 1.6x reference eager and >= 1.2x torch.compile of the reference model, peak memory
<= 0.7x reference eager. On CPU only the tiny preset is timed (Triton's fast paths need a GPU there).
"""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast import backend
from vdm_fast.model import Unet3D

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


def run(quick: bool = False) -> list[dict]:
    return _gpu_rows(quick) if GPU else _cpu_rows(quick)
