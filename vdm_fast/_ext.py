"""Loads the compiled extension vdm_fast._C, and says what it holds and what of it can run here.

The CUDA runtime is linked into _C statically, so the module imports on any machine; whether its CUDA code can run
depends on the driver, which the extension probes once (cudaDriverGetVersion, then the device count): a CUDA 13
runtime needs a driver for CUDA 13.0 or newer (R580+). Where it cannot, `devices()` omits "cuda", the dispatcher
runs the reference on CUDA tensors in auto mode (and says why when a backend is forced), and `vdm-fast info` prints
the reason.
"""

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


def cuda_probe() -> dict | None:
    """The extension's driver probe (once per process, in C++): runtime_version, driver_version (0 without a
    driver), device_count, error, and reason ("" when CUDA code can run); None for a build without CUDA code."""
    mod, _ = _load()
    if mod is None or not mod.with_cuda:
        return None
    return dict(mod.cuda_probe())


def cuda_unavailable_reason() -> str | None:
    """Why the extension's CUDA code cannot run here, or None when it can."""
    mod, err = _load()
    if mod is None:
        return err
    if not mod.with_cuda:
        return "vdm_fast._C was built without CUDA (nvcc was not found at build time, or VDM_FAST_BUILD_CUDA=0)"
    return cuda_probe()["reason"] or None


def devices() -> tuple[str, ...]:
    """Device types whose compiled code can run here: ("cpu",) or ("cpu", "cuda"); () if the module failed to
    import. "cuda" needs CUDA code in the build and a driver new enough for its statically linked runtime."""
    mod, _ = _load()
    if mod is None:
        return ()
    return ("cpu",) if cuda_unavailable_reason() else ("cpu", "cuda")


def why_not(device_type: str) -> str:
    """For the dispatcher: why the extension cannot run on device_type."""
    if device_type == "cuda" and (reason := cuda_unavailable_reason()):
        return reason if reason.startswith("vdm_fast._C") else f"vdm_fast._C cannot run CUDA code here: {reason}"
    mod, err = _load()
    return err if mod is None else f"vdm_fast._C has no {device_type} code"


def status() -> str:
    mod, err = _load()
    if mod is None:
        return err
    if not mod.with_cuda:
        return "built without CUDA (nvcc was not found at build time, or VDM_FAST_BUILD_CUDA=0)"
    built = f"CUDA code for sm_{', sm_'.join(mod.cuda_archs.split(';'))}, runtime {cuda_runtime_version()}"
    reason = cuda_unavailable_reason()
    return f"{built}; cannot run here: {reason}" if reason else built


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
