#!/usr/bin/env bash
# One call on a lent GPU machine (torch, triton, pybind11, nvcc, no network): install, GPU tests, benchmarks, and a
# short table last. Usage (from the repo root): bash benchmarks/gpu_check.sh [--quick]
# Results land in $OUT (the device tool's output folder) or ./bench-results; commit them under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench-results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET VDM_FAST_BACKEND

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true

echo "== install (sm_90 only: a lease is short)"
VDM_FAST_CUDA_ARCHS="${VDM_FAST_CUDA_ARCHS:-90}" python3 -m pip install --no-build-isolation --no-deps -q -e . \
  2>&1 | tail -3 || { echo "INSTALL FAILED"; exit 1; }
python3 -m vdm_fast info

echo "== tests on the GPU (every op test runs its CUDA cases; gpu-marked big shapes too)"
timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_rel_pos_bias.py tests/test_group_norm_silu.py \
  tests/test_temporal_attention.py tests/test_unet3d.py tests/test_samplers.py 2>&1 | tee "$OUT_DIR/gpu-tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
timeout 900 python3 -m vdm_fast bench ${1:-} --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log" | tail -60

echo "== summary"
echo "tests exit code: $tests_rc"
python3 - "$OUT_DIR" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench-*.json")):
    d = json.loads(f.read_text()); e = d["environment"]
    print(f"{e['device']}  copy {e.get('copy_bandwidth_gbps') or 0:.0f} GB/s  bf16 mm {e.get('bf16_matmul_tflops') or 0:.0f} TFLOP/s")
    for r in d["rows"]:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        bw = f"{r['pct_copy_bw']:.0f}%" if r.get("pct_copy_bw") else "-"
        print(f"{r['op'][:26]:<27}{r['shape'][:22]:<23}{r['contender'][:30]:<31}{sp:>7} {bw:>5}  {r.get('note','')[:40]}")
PY
