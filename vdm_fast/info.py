"""`vdm-fast info`: versions, what the compiled extension holds, the GPU, and which backend each op uses."""

from __future__ import annotations

import importlib
import pkgutil
import platform

import torch

import vdm_fast
from vdm_fast import _dispatch, _ext
from vdm_fast import ops as ops_pkg


def op_specs() -> dict[str, _dispatch.OpSpec]:
    """Every registered op's dispatch spec, by name."""
    specs = {}
    for mod in pkgutil.iter_modules(ops_pkg.__path__):
        spec = getattr(importlib.import_module(f"vdm_fast.ops.{mod.name}"), "SPEC", None)
        if isinstance(spec, _dispatch.OpSpec):
            specs[spec.name] = spec
    return specs


def report() -> str:
    try:
        import triton  # optional dependency: info must work on a machine without it

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    lines = [
        f"vdm_fast        {vdm_fast.__version__}",
        f"python          {platform.python_version()}",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton          {triton_version}" + ("  [TRITON_INTERPRET=1]" if _dispatch.interpreting() else ""),
        f"vdm_fast._C     {_ext.status()}",
        f"GPU             {gpu}",
        f"backend mode    {_dispatch.current_mode()}  (VDM_FAST_BACKEND or vdm_fast.backend(...))",
        "",
    ]
    rows = [(name, _dispatch.describe(spec, "cpu"), _dispatch.describe(spec, "cuda"))
            for name, spec in sorted(op_specs().items())]
    width = max([len("cpu tensors")] + [len(r[1]) for r in rows]) + 2
    lines.append(f"{'op':<20}{'cpu tensors':<{width}}cuda tensors")
    lines += [f"{name:<20}{cpu:<{width}}{cuda}" for name, cpu, cuda in rows]
    return "\n".join(lines)
