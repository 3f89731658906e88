"""Compile every Triton kernel for real GPUs on a machine without one, and read the cubins.

The interpreter (TRITON_INTERPRET=1) accepts code the GPU compiler rejects, so CI also compiles each kernel for sm_80
and sm_90 at the configurations the launchers use. Each kernel module lists those in `compile_configs()`; this
module compiles them and reads registers, spills and shared memory from the cubin with the cuobjdump that Triton ships.

    python -m vdm_fast.kernels._compile [--arch 80 --arch 90] [--filter NAME]   # prints a table; exit 1 on failure

Runs without TRITON_INTERPRET (a jit function must not be an interpreted one): tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vdm_fast import kernels as pkg


@dataclass
class KernelConfig:
    """One launch configuration of one kernel: the signature types and constexpr values the launcher passes."""

    name: str
    fn: Any  # a triton.JITFunction
    signature: dict[str, str]  # argument -> type ("*fp32", "i32", "fp32", "constexpr", ...)
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    expect_mma: bool = False  # a matrix kernel: its SASS must hold tensor-core instructions (HMMA / HGMMA)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(cfg: KernelConfig, arch: int) -> dict[str, Any]:
    sig = dict(cfg.signature)
    for k in cfg.constexprs:
        sig[k] = "constexpr"
    if "constexprs" in inspect.signature(ASTSource).parameters:
        src = ASTSource(fn=cfg.fn, signature=sig, constexprs=dict(cfg.constexprs))
    else:  # triton 3.2 names the argument `constants`
        src = ASTSource(fn=cfg.fn, signature=sig, constants=dict(cfg.constexprs))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "kernel": cfg.name, "arch": f"sm_{arch}", "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        "regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", 0)),
        "local": int(fields.get("LOCAL", 0)), "shared": kernel.metadata.shared,
        "spill_ops": len(re.findall(r"\b(STL|LDL)\b", sass)),
        "mma": sorted(set(re.findall(r"\b(HMMA|HGMMA|QGMMA|IMMA)\b", sass))),
        "expect_mma": cfg.expect_mma,
    }


def all_configs(name_filter: str = "") -> list[KernelConfig]:
    configs: list[KernelConfig] = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"vdm_fast.kernels.{mod.name}")
        if hasattr(module, "compile_configs"):
            configs += [c for c in module.compile_configs() if name_filter in c.name]
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 80, 90)")
    parser.add_argument("--filter", default="", help="only kernels whose config name contains this")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's jit functions cannot be compiled")
    rows, failures = [], []
    for cfg in all_configs(args.filter):
        for arch in args.arch or [80, 90]:
            try:
                rows.append(compile_one(cfg, arch))
            except Exception as e:  # report every failing config, not only the first
                failures.append(f"{cfg.name} sm_{arch}: {type(e).__name__}: {str(e)[:2000]}")
    if args.json:
        print(json.dumps({"rows": rows, "failures": failures}))
    else:
        print(f"{'kernel':<58}{'arch':<7}{'warps':>6}{'regs':>6}{'spills':>8}{'shared':>8}  mma")
        for r in rows:
            print(f"{r['kernel']:<58}{r['arch']:<7}{r['num_warps']:>6}{r['regs']:>6}{r['spill_ops']:>8}"
                  f"{r['shared']:>8}  {','.join(r['mma']) or '-'}")
        for f in failures:
            print("FAILED", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
