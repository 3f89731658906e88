"""Compile every Triton kernel for real GPUs on a machine without one, and read the machine code.

Two reports, neither needs a GPU (Triton compiles for a named target; cuobjdump, shipped with Triton, reads cubins):

- `--real` (the one CI checks): what the JIT really compiles. Each launch case (a kernel module's `compile_cases()`,
  else `default_cases()` here: the U-Net's headline layers at base widths 128 and 256, T = 16, in channels_last_3d
  with packed qkv views, plus the benchmark shapes) runs on CPU tensors of the real shapes and strides, with a stub
  driver active and `JITFunction.run` intercepted after specialization: the binder computes exactly what a launch on
  a GPU would (the signature, constexprs, the equal-to-1 integers made constants and the divisible-by-16 attributes
  of pointers and integers, num_warps, num_stages), and nothing is launched. Each distinct specialization is then
  compiled for sm_80 and sm_90 and read: registers, spills, shared memory, occupancy (CTAs and warps per SM from
  registers, shared memory and warps, at the A100 / H100 limits), global loads and stores by width in bits (SASS
  LDG/STG: .128, .64, 32 where no width is written, .U16/.S16, .U8/.S8; LDGSTS counted with the loads), the MMA
  kind (HGMMA, HMMA or none) and atomics. Results are cached by a hash of the kernel source, the specialization,
  the options, the arch and the Triton version (VDM_FAST_COMPILE_CACHE, default ~/.cache/vdm_fast/compile), so a
  rerun compiles only what changed.
- the default (`compile_configs()` of each kernel module): every configuration a launcher can pick, with plain i32
  integers (no specialization): broader, less exact.

    python -m vdm_fast.kernels._compile --real [--json | --markdown] [--filter CASE] [--arch 80 --arch 90] [--no-cache]
    python -m vdm_fast.kernels._compile [--json] [--filter NAME] [--arch ...]

Both exit 1 if anything failed. Run without TRITON_INTERPRET (an interpreted function cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler import ASTSource, make_backend
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction
from vdm_fast.kernels._common import cdiv

from vdm_fast import kernels as pkg
from vdm_fast._fsutil import atomic_write_text


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
    usage, sass = _cuobjdump_cubin(kernel.asm["cubin"])
    fields = _resource_usage(usage)
    return {
        "kernel": cfg.name, "arch": f"sm_{arch}", "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        "regs": fields["REG"], "stack": fields["STACK"], "local": fields["LOCAL"], "shared": kernel.metadata.shared,
        "spill_ops": read_sass(sass)["spill_ops"], "mma": _mma_kinds(sass), "expect_mma": cfg.expect_mma,
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



# ---------------------------------------------------------------------------------------------------- real report

# Per-SM limits (CUDA occupancy calculator, compute capability 8.0 and 9.0): registers, warps, resident CTAs, shared
# memory for CTAs (the driver reserves 1 KB of it per CTA), allocation granularities, and the SM count of the
# A100 SXM / H100 SXM (H200: the same SM).
ARCH_LIMITS = {
    80: dict(gpu="A100", sms=108, regs=65536, warps=64, ctas=32, smem=167936, smem_reserved=1024, reg_unit=256,
             smem_unit=128, max_regs_thread=255),
    90: dict(gpu="H100", sms=132, regs=65536, warps=64, ctas=32, smem=233472, smem_reserved=1024, reg_unit=256,
             smem_unit=128, max_regs_thread=255),
}
CACHE_VERSION = 1  # bump when the row format or the analysis changes


def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> dict[str, Any]:
    """Resident CTAs and warps per SM, and what limits them (registers, shared memory, warps or the CTA cap)."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = cdiv(max(regs, 1) * 32, lim["reg_unit"]) * lim["reg_unit"]
    by = {
        "regs": lim["regs"] // (regs_per_warp * num_warps),
        "smem": lim["smem"] // (cdiv(shared + lim["smem_reserved"], lim["smem_unit"]) * lim["smem_unit"]),
        "warps": lim["warps"] // num_warps,
        "ctas": lim["ctas"],
    }
    ctas = min(by.values())
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "occupancy": ctas * num_warps / lim["warps"],
            "limited_by": min(by, key=lambda k: (by[k], k != "regs"))}


_MEM = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)")


def memory_widths(sass: str) -> tuple[dict[int, int], dict[int, int]]:
    """(loads, stores): width in bits -> count of global load / store instructions in the SASS."""
    loads, stores = Counter(), Counter()
    for op, mods in _MEM.findall(sass):
        parts = set(mods.strip(".").split(".")) if mods else set()
        width = 128 if "128" in parts else 64 if "64" in parts else 16 if parts & {"U16", "S16"} else (
            8 if parts & {"U8", "S8"} else 32)
        (stores if op == "STG" else loads)[width] += 1
    return dict(sorted(loads.items())), dict(sorted(stores.items()))


def read_sass(sass: str) -> dict[str, Any]:
    ldg, stg = memory_widths(sass)
    kinds = _mma_kinds(sass)
    return {
        "ldg_bits": ldg, "stg_bits": stg,
        "mma": "HGMMA" if "HGMMA" in kinds else "HMMA" if "HMMA" in kinds else (kinds[0] if kinds else "none"),
        "spill_ops": len(re.findall(r"\b(STL|LDL)\b", sass)),
        "atomics": len(re.findall(r"\b(ATOMG|ATOM|RED|REDG)\b", sass)),
        "barriers": len(re.findall(r"\bBAR\.SYNC\b|\bBAR\b", sass)),
    }


def _mma_kinds(sass: str) -> list[str]:
    return sorted(set(re.findall(r"\b(HGMMA|HMMA|QGMMA|IMMA)\b", sass)))


def _resource_usage(usage: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL from `cuobjdump --dump-resource-usage` (REG -1 if absent)."""
    fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return {"REG": fields.get("REG", -1), "STACK": fields.get("STACK", 0), "SHARED": fields.get("SHARED", 0),
            "LOCAL": fields.get("LOCAL", 0)}


def _cuobjdump_cubin(cubin: bytes) -> tuple[str, str]:
    """(resource usage, SASS) of a cubin, by the cuobjdump that Triton ships."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return usage, sass


@dataclass
class Launch:
    """One launch as the JIT specialized it: everything `triton.compile` needs, and the grid."""

    fn: JITFunction
    signature: dict[str, str]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    run_kwargs: dict[str, Any]  # the launch's options as given (num_warps, num_stages, ...), parsed per arch
    grid: tuple[int, ...] | None

    @property
    def kernel(self) -> str:
        return f"{self.fn.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.fn.__qualname__}"

    def options(self, arch: int):
        return make_backend(GPUTarget("cuda", arch, 32)).parse_options(dict(self.run_kwargs))

    def key(self, arch: int) -> str:
        """Hash of what determines the machine code: the kernel's source (with its callees), the specialization,
        the options, the arch, and the Triton version."""
        opts = self.options(arch).__dict__
        blob = json.dumps([CACHE_VERSION, triton.__version__, self.fn.cache_key, self.signature,
                           sorted((repr(k), repr(v)) for k, v in self.constexprs.items()),
                           sorted((repr(k), repr(v)) for k, v in self.attrs.items()),
                           sorted((k, repr(v)) for k, v in opts.items()), arch], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def specialization(self) -> dict[str, Any]:
        """For the report: the constexprs (integers equal to 1 appear here), and the arguments with attributes
        (tt.divisibility=16 for pointers and integers divisible by 16)."""
        names = self.fn.arg_names
        return {
            "constexprs": {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): _jsonable(v)
                           for k, v in self.constexprs.items()},
            "divisible_by_16": sorted(names[k[0]] for k, v in self.attrs.items()
                                      if isinstance(k, tuple) and len(k) == 1 and ["tt.divisibility", 16] in
                                      [list(a) for a in v]),
            "signature": {k: v for k, v in self.signature.items() if v != "constexpr"},
        }


def _jsonable(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)


class StubDriver(DriverBase):
    """A driver for a GPU that is not there: it names the target and a device and stream that are never used."""

    def __init__(self, arch: int = 90):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stub driver builds no launcher")

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the stub driver runs nothing")

    def get_current_device(self):
        return "vdm_fast_stub"  # a key of its own in each JITFunction's per-device caches

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Inside the block, launching any @triton.jit kernel records a Launch and runs nothing.

    The body of the replacement is JITFunction.run's own first half (triton 3.6: binder, then _pack_args), so the
    specialization is the JIT's, not a reimplementation of it. The backend is forced to "triton", and the dispatcher
    is told that the fast path can run on these CPU tensors (it otherwise allows that only under the interpreter);
    the kernels' own interpreting() stays False, so launchers take their GPU branches. An @triton.autotune kernel
    would try to benchmark its configs and fail on the stub's get_benchmarker (the package has none: its launchers
    pick configs from tables, which is what this report is for).
    """
    from vdm_fast import _dispatch  # the dispatcher sits above the kernels: imported when a capture runs

    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        device = triton_driver.active.get_current_device()
        _, _, _, backend, binder = self.device_caches[device]
        bound_args, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        g = grid(bound_args) if callable(grid) else grid
        launches.append(Launch(self, signature, constexprs, attrs, dict(kwargs),
                               tuple(int(x) for x in g) if g is not None else None))
        return None

    previous = triton_driver._active  # reset_active() would create the real driver, which needs a GPU
    triton_driver.set_active(StubDriver())
    try:
        with mock.patch.object(JITFunction, "run", run), mock.patch.object(_dispatch, "interpreting", lambda: True), \
                _dispatch.backend("triton"):
            yield launches
    finally:
        triton_driver._active = previous


def cache_dir() -> Path:
    return Path(os.environ.get("VDM_FAST_COMPILE_CACHE") or Path.home() / ".cache" / "vdm_fast" / "compile")


def compile_launch(launch: Launch, arch: int, *, use_cache: bool = True) -> dict[str, Any]:
    """The report row of one launch for one arch (from the cache when this exact specialization was compiled)."""
    path = cache_dir() / f"{launch.key(arch)}.json"
    if use_cache and path.exists():
        with contextlib.suppress(ValueError, OSError):
            return dict(json.loads(path.read_text()), cached=True)
    options = launch.options(arch)
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    usage, sass = _cuobjdump_cubin(compiled.asm["cubin"])
    fields = _resource_usage(usage)
    regs, shared = fields["REG"], int(compiled.metadata.shared)
    row = {"arch": f"sm_{arch}", "num_warps": options.num_warps, "num_stages": options.num_stages, "regs": regs,
           "local_bytes": fields["LOCAL"], "stack_bytes": fields["STACK"],
           "shared_bytes": shared, **read_sass(sass), **occupancy(regs, shared, options.num_warps, arch)}
    row["spills"] = row["spill_ops"]
    if use_cache:
        atomic_write_text(path, json.dumps(row), make_parents=True)  # a concurrent run never reads half a file
    return dict(row, cached=False)


def waves(grid: tuple[int, ...] | None, ctas_per_sm: int, arch: int) -> float | None:
    """Programs per full-GPU wave of resident CTAs (under 1: the GPU is not filled)."""
    if not grid or not ctas_per_sm:
        return None
    programs = 1
    for g in grid:
        programs *= g
    return programs / (ctas_per_sm * ARCH_LIMITS[arch]["sms"])


CaseList = list[tuple[str, Callable[[], Any]]]


def all_cases(name_filter: str = "") -> CaseList:
    """Each kernel module's compile_cases() where it has one, else its entry in default_cases()."""
    defaults = default_cases()
    cases: CaseList = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"vdm_fast.kernels.{mod.name}")
        own = getattr(module, "compile_cases", None)
        cases += own() if own is not None else defaults.get(mod.name, [])
    return [(n, f) for n, f in cases if name_filter in n]


def real_report(archs: list[int], name_filter: str = "", use_cache: bool = True) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    memo: dict[tuple[str, int], dict] = {}  # one compile per specialization, also with the disk cache off
    for case, launch_fn in all_cases(name_filter):
        try:
            with capture() as launches, torch.no_grad() if case.endswith("_nograd") else contextlib.nullcontext():
                launch_fn()
        except Exception as e:  # a case that cannot even be launched is a failure of the report, listed
            failures.append(f"{case}: launch capture failed: {type(e).__name__}: {str(e)[:1000]}")
            continue
        if not launches:
            failures.append(f"{case}: launched no Triton kernel")
        seen = set()
        for launch in launches:
            for arch in archs:
                ident = (launch.key(arch), arch)
                if ident in seen:  # the same specialization launched twice in one case (chunked launches)
                    continue
                seen.add(ident)
                try:
                    if ident not in memo:
                        memo[ident] = compile_launch(launch, arch, use_cache=use_cache)
                    row = memo[ident]
                except Exception as e:  # report every failing compile, not only the first
                    failures.append(f"{case} {launch.kernel} sm_{arch}: {type(e).__name__}: {str(e)[:2000]}")
                    continue
                rows.append({"kernel": launch.kernel, "case": case, **row, "grid": list(launch.grid or ()),
                             "waves": waves(launch.grid, row["ctas_per_sm"], arch),
                             "specialization": launch.specialization()})
    return rows, failures


# --------------------------------------------------------------------------------------- default launch cases


class _Unprojected(torch.nn.Module):
    """Stands in for a layer's linear projection in a capture: the projection's output shape and layout, no matmul
    (the CPU would spend seconds on a product whose values the capture never reads)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_empty(*x.shape[:-1], self.out_features).requires_grad_()


def film_norm_case(layer_name: str, shape, channels_last: bool, film: bool = True, dtype=torch.bfloat16, args=(),
                   **kw):
    """A launch case: vdm_fast.layers.<layer_name>(*args, C, **kw) (a norm layer taking (x, scale, shift)) forward and
    backward on a (B, C, ...) `shape` input in `dtype`, channels_last(_3d) or contiguous, with (B, C) FiLM or none."""
    def run():
        from vdm_fast import layers  # the layers import the ops above the kernels: imported when the case runs

        B, C = shape[:2]
        layer = getattr(layers, layer_name)(*args, C, **kw).to(dtype)
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if channels_last else \
            torch.contiguous_format
        x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        scale = torch.empty(B, C, dtype=dtype).requires_grad_() if film else None
        shift = torch.empty(B, C, dtype=dtype).requires_grad_() if film else None
        y = layer(x, scale, shift)
        y.backward(torch.empty_like(y))
    return run


def _gn_case(shape, per_frame, channels_last, film=True, dtype=torch.bfloat16, groups=32):
    return film_norm_case("GroupNormSiLU", shape, channels_last, film, dtype, args=(groups,), per_frame=per_frame)


def _attention_case(batch, channels, size, heads, frames=16, dtype=torch.bfloat16, mask=False):
    def run():
        from vdm_fast.layers import TemporalAttention  # the layers import the kernels: imported when the case runs

        layer = TemporalAttention(channels, heads=heads, dim_head=channels // heads).to(dtype)
        layer.to_qkv = _Unprojected(3 * channels)  # the layer's own views of its packed qkv, without the matmuls
        layer.to_out = torch.nn.Identity()  # hidden == channels: the attention output flows straight to y
        x = torch.empty(batch, channels, frames, size, size, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d)
        y = layer(x, num_video_frames=frames // 2) if mask else layer(x)
        y.backward(torch.empty_like(y))
    return run


def _update_case(shape, **kw):
    def run():
        from vdm_fast import ops  # the op's public function sits above the kernels: imported when the case runs

        z, pred, e = torch.empty(shape), torch.empty(shape, dtype=kw.pop("pred_dtype", torch.float32)), \
            torch.empty(shape)
        extra = {k: torch.empty(shape, dtype=pred.dtype) if k == "pred_uncond" else torch.empty(shape)
                 for k in kw.pop("tensors", ())}
        if "history" in kw:
            extra["history"] = torch.empty(kw.pop("history"), *shape)
        ops.diffusion_update(z, pred, torch.zeros(8), e, **extra, **kw)
    return run


def default_cases() -> dict[str, CaseList]:
    """The U-Net's headline cases through its real layers (bf16, T = 16): GroupNorm+FiLM+SiLU per frame in
    channels_last_3d at base widths 128 and 256 (64x64, and the next level), temporal attention with packed qkv at
    the first attention level (32x32: 256 channels / 4 heads at base 128, 512 / 8 at base 256) and the joint
    image-video mask; fp32 at base 128 (a model without autocast); the sr-9x128 preset's head dim 128 at T = 9;
    plus the benchmarks' shapes (benchmarks/bench_*.py; not attention's N = 2^20, whose 6 GB qkv a capture on the
    CPU would have to allocate) and the samplers' update."""
    gn = [
        ("gn unet128 (2,128,16,64,64) cl3d per-frame film", _gn_case((2, 128, 16, 64, 64), True, True)),
        ("gn unet128 fp32 (2,128,16,64,64) cl3d per-frame film",
         _gn_case((2, 128, 16, 64, 64), True, True, dtype=torch.float32)),
        ("gn unet256 (2,256,16,64,64) cl3d per-frame film", _gn_case((2, 256, 16, 64, 64), True, True)),
        ("gn unet128 (2,256,16,32,32) cl3d per-frame film", _gn_case((2, 256, 16, 32, 32), True, True)),
        ("gn unet256 (2,512,16,32,32) cl3d per-frame film", _gn_case((2, 512, 16, 32, 32), True, True)),
        ("gn bench (2,256,16,64,64) contiguous per-frame", _gn_case((2, 256, 16, 64, 64), True, False)),
        ("gn bench (2,256,16,64,64) contiguous whole-sample", _gn_case((2, 256, 16, 64, 64), False, False)),
        ("gn bench (8,320,64,64) contiguous image", _gn_case((8, 320, 64, 64), False, False)),
    ]
    attn = [
        ("attn unet128 B2 C256 32x32 h4 d64 T16 packed", _attention_case(2, 256, 32, 4)),
        ("attn unet128 fp32 B2 C256 32x32 h4 d64 T16 packed", _attention_case(2, 256, 32, 4, dtype=torch.float32)),
        ("attn sr-9x128 B2 C512 32x32 h4 d128 T9 packed", _attention_case(2, 512, 32, 4, frames=9)),
        ("attn unet256 B2 C512 32x32 h8 d64 T16 packed", _attention_case(2, 512, 32, 8)),
        ("attn unet256 B2 C512 32x32 h8 d64 T16 packed joint-mask", _attention_case(2, 512, 32, 8, mask=True)),
        ("attn bench B8 C256 64x64 h4 d64 T16 packed", _attention_case(8, 256, 64, 4)),
    ]
    update = [
        ("update ancestral cfg clip noise (2,3,16,64,64)",
         _update_case((2, 3, 16, 64, 64), tensors=("pred_uncond", "noise"), guidance_weight=1.0, prediction="v",
                      clip=True)),
        ("update ddim (2,3,16,64,64)", _update_case((2, 3, 16, 64, 64), prediction="eps")),
    ]
    return {"group_norm_silu": gn, "temporal_attention": attn, "diffusion_update": update}


def markdown(rows: list[dict]) -> str:
    """The report as a markdown table (kernels/notes/compile_report.md)."""
    fmt = lambda d: ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"  # noqa: E731
    lines = ["| case | kernel | arch | warps | stages | regs | spills | smem B | CTAs/SM | warps/SM | waves | "
             "LDG bits: count | STG bits: count | MMA |", "|" + " --- |" * 14]
    for r in rows:
        w = f"{r['waves']:.2f}" if r["waves"] is not None else "-"
        lines.append(f"| {r['case']} | {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['regs']} | {r['spills']} | {r['shared_bytes']} | {r['ctas_per_sm']} | {r['warps_per_sm']} | "
                     f"{w} | {fmt(r['ldg_bits'])} | {fmt(r['stg_bits'])} | {r['mma']} |")
    return "\n".join(lines)


def _print_real(rows: list[dict]) -> None:
    print(f"{'case':<58}{'kernel':<34}{'arch':<7}{'warps':>5}{'regs':>5}{'spill':>6}{'smem':>7}{'cta/sm':>7}"
          f"{'waves':>7}  {'ldg bits':<22}{'stg bits':<18}mma")
    for r in rows:
        w = f"{r['waves']:.2f}" if r["waves"] is not None else "-"
        fmt = lambda d: ",".join(f"{k}:{v}" for k, v in d.items()) or "-"  # noqa: E731
        print(f"{r['case'][:57]:<58}{r['kernel'][:33]:<34}{r['arch']:<7}{r['num_warps']:>5}{r['regs']:>5}"
              f"{r['spills']:>6}{r['shared_bytes']:>7}{r['ctas_per_sm']:>7}{w:>7}  {fmt(r['ldg_bits']):<22}"
              f"{fmt(r['stg_bits']):<18}{r['mma']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="compile the launchers' real specializations")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCH_LIMITS),
                        help="compute capability, e.g. 90 (default: 80 and 90)")
    parser.add_argument("--filter", default="", help="only cases (--real) or configs whose name contains this")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--markdown", action="store_true", help="--real: print a markdown table")
    parser.add_argument("--no-cache", action="store_true", help="--real: compile everything again")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's jit functions cannot be compiled")
    archs = args.arch or [80, 90]
    if args.real:
        rows, failures = real_report(archs, args.filter, use_cache=not args.no_cache)
        if args.json:
            print(json.dumps(rows + [{"error": f} for f in failures]))
        elif args.markdown:
            print(markdown(rows))
        else:
            _print_real(rows)
        for f in failures:
            print("FAILED", f, file=sys.stderr)
        return 1 if failures else 0
    rows, failures = [], []
    for cfg in all_configs(args.filter):
        for arch in archs:
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
