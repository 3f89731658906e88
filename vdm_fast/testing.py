"""Numerical comparison shared by the tests and the benchmarks (one definition of relative error).

rel_err(out, ref) = ||out - ref||_2 / ||ref||_2, computed in fp64; the absolute norm ||out - ref||_2 where ref is all
zeros (a relative error of an all-zero reference is undefined); inf where out holds a NaN or an infinity, so that
every `err <= tol` comparison fails on non-finite output.
"""

from __future__ import annotations

import math

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in fp64 (inf for non-finite out); 0 for empty tensors."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return (out - ref).abs().max().item()
