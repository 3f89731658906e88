"""Loads the compiled extension vdm_fast._C, and says what it holds."""

from __future__ import annotations

import functools
from types import ModuleType

import torch


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        # the compiled extension: may be missing or unloadable (a source tree, a broken build), said by status()
        from vdm_fast import _C
    except ImportError as e:
        return None, f"vdm_fast._C failed to import: {e}. Reinstall with `pip install .` to build it."
    return _C, ""


def module() -> ModuleType:
    mod, err = _load()
    if mod is None:
        raise RuntimeError(err)
    return mod


def devices() -> tuple[str, ...]:
    """Device types with compiled code: ("cpu",) or ("cpu", "cuda"); () if the module failed to import."""
    mod, _ = _load()
    if mod is None:
        return ()
    return ("cpu", "cuda") if mod.with_cuda else ("cpu",)


def status() -> str:
    mod, err = _load()
    if mod is None:
        return err
    if not mod.with_cuda:
        return "built without CUDA (nvcc was not found at build time, or VDM_FAST_BUILD_CUDA=0)"
    return f"CUDA code for sm_{', sm_'.join(mod.cuda_archs.split(';'))}, runtime {cuda_runtime_version()}"


def cuda_runtime_version() -> str | None:
    mod, _ = _load()
    if mod is None or not mod.with_cuda:
        return None
    v = mod.cuda_runtime_version()
    return f"{v // 1000}.{(v % 1000) // 10}"


DTYPE_CODES = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}


def dtype_code(dtype) -> int:
    return DTYPE_CODES[str(dtype)]


def stream_of(t) -> int:
    """The current CUDA stream handle for t's device (0 on CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
