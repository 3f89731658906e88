"""The kernels as the GPU would run them: the real-specialization compile report (kernels/_compile.py --real).

No GPU needed: the launchers run on CPU tensors of the U-Net's shapes and strides with a stub driver, the JIT's own
binder specializes each launch, and Triton compiles that for sm_80 and sm_90. Checked here: every entry kernel of
every kernel module is in the report for both archs, nothing failed, no spills, tensor-core instructions in the
matrix kernels, sound occupancy and width tables; and the capture itself records the JIT's specialization (integers
equal to 1 as constants, divisibility by 16 of pointers and integers) and reads load widths from the SASS correctly.
Compiled results are cached by a hash of source + specialization (VDM_FAST_COMPILE_CACHE), so reruns are fast.
"""

from __future__ import annotations

import ast
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
from helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
FIELDS = {"kernel", "case", "arch", "regs", "spills", "shared_bytes", "ctas_per_sm", "warps_per_sm", "ldg_bits",
          "stg_bits", "mma", "num_warps", "num_stages", "grid", "specialization"}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report():
    proc = run_python("-m", "vdm_fast.kernels._compile", "--real", "--json", env=_env(), timeout=1500)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [r for r in rows if "error" not in r], [r["error"] for r in rows if "error" in r]


def _jit_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    def is_jit(d):
        d = d.func if isinstance(d, ast.Call) else d
        return isinstance(d, ast.Attribute) and d.attr in ("jit", "autotune", "heuristics")

    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and any(map(is_jit, n.decorator_list))}


def entry_kernels() -> dict[str, set[str]]:
    """Per kernel module, its launchable kernels: @triton.jit functions no other @triton.jit function calls."""
    out = {}
    for path in sorted(KERNELS.glob("*.py")):
        if path.name.startswith("_"):
            continue
        jits = _jit_functions(ast.parse(path.read_text()))
        called = {c.func.id for f in jits.values() for c in ast.walk(f)
                  if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        if jits:
            out[path.stem] = {n for n in jits if n not in called}
    return out


def test_report_ran_without_failures(report):
    rows, failures = report
    assert not failures, "\n".join(failures)
    assert rows, "the report compiled nothing"


def test_every_entry_kernel_is_compiled_for_sm80_and_sm90(report):
    rows, _ = report
    have = {(r["kernel"], r["arch"]) for r in rows}
    kernels = entry_kernels()
    assert set(kernels) >= {"group_norm_silu", "temporal_attention", "diffusion_update"}, kernels
    missing = [f"{m}.{k} {a}" for m, ks in kernels.items() for k in sorted(ks) for a in ("sm_80", "sm_90")
               if (f"{m}.{k}", a) not in have]
    assert not missing, "not in the real report (no launch case reaches them): " + ", ".join(missing)


def test_unet_headline_cases_are_reported(report):
    rows, _ = report
    cases = {r["case"] for r in rows}
    for want in ("gn unet128", "gn unet256", "attn unet128", "attn unet256"):
        assert any(c.startswith(want) for c in cases), f"no {want} case in {sorted(cases)}"


def test_no_register_spills(report):
    rows, _ = report
    spilling = sorted({f"{r['kernel']} {r['arch']} [{r['case']}]: {r['spills']} spill ops, {r['regs']} registers, "
                       f"{r['stack_bytes']} B stack" for r in rows if r["spills"] or r["local_bytes"]})
    assert not spilling, "\n".join(spilling)


def test_matrix_kernels_use_tensor_cores(report):
    rows, _ = report
    dots = {p.stem for p in KERNELS.glob("*.py") if not p.name.startswith("_") and "tl.dot(" in p.read_text()}
    missing = sorted({f"{r['kernel']} {r['arch']}" for r in rows
                      if r["kernel"].split(".")[0] in dots and r["mma"] == "none"})
    assert not missing, "no HMMA/HGMMA in: " + ", ".join(missing)


def test_rows_are_sound(report):
    """Every row has the fields the issue names, and its numbers agree with each other."""
    from vdm_fast.kernels._compile import ARCH_LIMITS

    rows, _ = report
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        lim = ARCH_LIMITS[int(r["arch"][3:])]
        assert 0 < r["regs"] <= lim["max_regs_thread"]
        assert 1 <= r["ctas_per_sm"] <= lim["ctas"] and r["warps_per_sm"] == r["ctas_per_sm"] * r["num_warps"]
        assert r["warps_per_sm"] <= lim["warps"]
        assert r["ctas_per_sm"] * (r["shared_bytes"] + lim["smem_reserved"]) <= lim["smem"]
        assert r["ldg_bits"] and r["stg_bits"], f"{r['kernel']}: a kernel with no global load or store"
        assert all(int(w) in (8, 16, 32, 64, 128) and n > 0 for d in (r["ldg_bits"], r["stg_bits"])
                   for w, n in d.items())
        assert r["mma"] in ("HGMMA", "HMMA", "QGMMA", "IMMA", "none")


def test_occupancy_model():
    from vdm_fast.kernels._compile import occupancy

    # sm_90, 64 registers x 4 warps: 8 KB of registers per CTA -> 8 CTAs (register-bound), 32 warps.
    assert occupancy(64, 16896, 4, 90) == dict(ctas_per_sm=8, warps_per_sm=32, occupancy=0.5, limited_by="regs")
    # 70 registers round up to 72 (per-warp allocation in units of 256): 7 CTAs on sm_80.
    assert occupancy(70, 16896, 4, 80)["ctas_per_sm"] == 7
    # shared memory bound: 100 KB + 1 KB reserved per CTA -> 2 on sm_90 (228 KB), 1 on sm_80 (164 KB).
    assert occupancy(32, 100 * 1024, 4, 90)["ctas_per_sm"] == 2
    assert occupancy(32, 100 * 1024, 4, 80) == dict(ctas_per_sm=1, warps_per_sm=4, occupancy=1 / 16,
                                                    limited_by="smem")
    # warp bound: 32 warps per CTA -> 2 CTAs (64 warps per SM); CTA cap: tiny CTAs stop at 32 per SM.
    assert occupancy(16, 0, 32, 90)["ctas_per_sm"] == 2
    assert occupancy(16, 0, 1, 90) == dict(ctas_per_sm=32, warps_per_sm=32, occupancy=0.5, limited_by="ctas")


def test_memory_widths_from_sass():
    from vdm_fast.kernels._compile import memory_widths, read_sass

    sass = textwrap.dedent("""
        /*0100*/   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/   @P0 LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0120*/   LDG.E.64 R12, desc[UR4][R6.64] ;
        /*0130*/   LDG.E R14, desc[UR4][R6.64] ;
        /*0140*/   LDG.E.U16 R15, desc[UR4][R6.64] ;
        /*0150*/   LDG.E.S8 R16, desc[UR4][R6.64] ;
        /*0160*/   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0170*/   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0180*/   STG.E.U16 desc[UR4][R2.64], R4 ;
        /*0190*/   HMMA.16816.F32.BF16 R20, R4, R8, R20 ;
        /*01a0*/   STL [R1], R4 ;
        /*01b0*/   LDL R4, [R1] ;
        /*01c0*/   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R4 ;
    """)
    assert memory_widths(sass) == ({8: 1, 16: 1, 32: 1, 64: 1, 128: 3}, {16: 1, 128: 1})
    info = read_sass(sass)
    assert info["mma"] == "HMMA" and info["spill_ops"] == 2 and info["atomics"] == 1
    assert read_sass("HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ ;\nHMMA.16816 R1, R2, R3, R4 ;")["mma"] == "HGMMA"


CAPTURE_SCRIPT = '''
import json, sys, torch, triton, triton.language as tl
from vdm_fast.kernels import _compile

@triton.jit
def copy(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs * stride, tl.load(x_ptr + offs * stride, mask=m), mask=m)

buf = torch.empty(1 << 16, dtype=torch.bfloat16)
out = {}
with _compile.capture() as launches:
    copy[(4,)](buf[:4096], buf[8192:], 4096, 1, BLOCK=1024, num_warps=4)     # aligned, unit stride
    copy[(4,)](buf[1:4097], buf[8192:], 4095, 2, BLOCK=1024, num_warps=2)    # x off by 2 bytes, stride 2, n odd
for name, launch in zip(("aligned", "odd"), launches):
    row = _compile.compile_launch(launch, 90, use_cache=False)
    out[name] = dict(launch.specialization(), grid=list(launch.grid), num_warps=row["num_warps"],
                     ldg=row["ldg_bits"], stg=row["stg_bits"])
import os
os.environ["TRITON_INTERPRET"] = "1"  # the CLI refuses: interpreted functions cannot be compiled
try:
    _compile.main(["--real"])
except SystemExit as e:
    out["interpreter_exit"] = e.code
print(json.dumps(out))
'''


def test_capture_records_the_jits_specialization(tmp_path):
    """A copy kernel launched twice from CPU tensors: once aligned with unit stride and n = 4096, once with x two
    bytes off, stride 2 and n = 4095. The JIT makes stride == 1 a constant and marks 16-divisible pointers and
    integers; the aligned launch then loads and stores 128 bits at a time, the other cannot."""
    script = tmp_path / "capture_check.py"  # a file: triton.jit reads the kernel's source from it
    script.write_text(CAPTURE_SCRIPT)
    proc = run_python(str(script), env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    a, o = got["aligned"], got["odd"]
    assert a["constexprs"].get("stride") == 1 and a["constexprs"]["BLOCK"] == 1024
    assert "stride" not in o["constexprs"] and o["signature"]["stride"] == "i32"
    assert set(a["divisible_by_16"]) == {"x_ptr", "y_ptr", "n"}
    assert set(o["divisible_by_16"]) == {"y_ptr"}
    assert a["grid"] == [4, 1, 1][: len(a["grid"])] and a["num_warps"] == 4 and o["num_warps"] == 2
    assert set(map(int, a["ldg"])) == {128} and set(map(int, a["stg"])) == {128}, a
    assert max(map(int, o["ldg"])) < 128, o
    assert got["interpreter_exit"] == 2 and re.search(r"error: .*TRITON_INTERPRET", proc.stderr), proc.stderr[-2000:]
