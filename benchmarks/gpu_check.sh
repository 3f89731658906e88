#!/usr/bin/env bash
# One call on a lent GPU machine (torch, triton, pybind11, nvcc; no network), finishing inside a global deadline
# (GPU_CHECK_SECONDS, default 480 = 8 minutes, install included), in this order, each phase capped by `timeout`:
#   1. device: nvidia-smi's name, driver, memory and clocks
#   2. install: the extension for sm_90 only (VDM_FAST_CUDA_ARCHS=90), `pip install --no-build-isolation --no-deps -e .`
#   3. gpu tests: pytest -m gpu (the big shapes), then the op test files, whose CUDA cases run on the GPU
#   4. headline benchmarks: group_norm_silu, temporal_attention, the U-Net step (`vdm-fast bench`)
#   5. other benchmarks: the rest, for whatever time is left (the bench rewrites its JSON after each module, so a
#      phase cut by its cap keeps the rows it measured)
#   6. summary, LAST (the device tool returns the output's tail): phases, test result, a short table of the rows
# Everything lands in $OUT (the device tool's output folder) or ./bench-results: install.log, gpu-tests.log,
# bench.log, bench-<date>-<device>.json per bench phase and gpu_check.json (device, phases, exit codes); at most 8
# files, as the device tool returns. Commit the JSON files under benchmarks/results/ (README's table reads them).
#
# Usage, from anywhere: bash benchmarks/gpu_check.sh [--dry-run] [--full]
#   --dry-run  on any machine, GPU or not: every phase's command with a tiny cap and no install (the install phase
#              only checks that pybind11 and setuptools import), pytest collecting instead of running, the bench
#              with --quick --repeats 1. Tested in CI (tests/test_bench_harness.py).
#   --full     full-size benchmark shapes instead of --quick
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY=0
QUICK="--quick"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --full) QUICK="" ;;
    *) echo "gpu_check.sh: error: unknown option $arg (allowed: --dry-run, --full)" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT:-bench-results}"
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: error: cannot create $OUT_DIR" >&2; exit 2; }
export PYTHONUNBUFFERED=1 VDM_FAST_CUDA_ARCHS="${VDM_FAST_CUDA_ARCHS:-90}"
unset TRITON_INTERPRET VDM_FAST_BACKEND
PY="${PYTHON:-python3}"

START=$(date +%s)
TOTAL="${GPU_CHECK_SECONDS:-480}"
RESERVE=15  # kept for the summary
if [ "$DRY" = 1 ]; then
  # Phase caps: install, gpu-marked tests, op tests, headline bench, other bench.
  CAPS=(10 10 10 20 8)
else
  CAPS=(180 60 150 120 400)
fi
PHASES_JSON=""

left() { echo $((START + TOTAL - RESERVE - $(date +%s))); }

# run_phase NAME CAP LOG CMD...: the command under `timeout min(CAP, time left)`; records rc, seconds, cut.
run_phase() {
  local name="$1" cap="$2" log="$3" rem t0 rc secs cut before
  shift 3
  rem=$(left)
  [ "$rem" -lt "$cap" ] && cap="$rem"
  echo "== $name (cap ${cap} s, $(($(date +%s) - START)) s into the check)"
  if [ "$cap" -le 0 ]; then
    echo "skipped: the global deadline (${TOTAL} s) is reached"
    PHASES_JSON="$PHASES_JSON{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"cut\": true},"
    return 0
  fi
  t0=$(date +%s)
  before=$(wc -c <"$log" 2>/dev/null || echo 0)
  timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  cut=false
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then cut=true; echo "cut by its cap after ${secs} s"; fi
  tail -c +$((before + 1)) "$log" | tail -n 15  # this phase's output only (phases share a log)
  echo "-- $name: exit $rc in ${secs} s"
  PHASES_JSON="$PHASES_JSON{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"cut\": $cut},"
  return 0
}

echo "== device"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT_DIR/install.log"
else
  echo "no nvidia-smi: no NVIDIA driver here" | tee "$OUT_DIR/install.log"
fi

if [ "$DRY" = 1 ]; then
  run_phase "install" "${CAPS[0]}" "$OUT_DIR/install.log" \
    "$PY" -c "import pybind11, setuptools; print('would run: pip install --no-build-isolation --no-deps --no-index -e . (VDM_FAST_CUDA_ARCHS=$VDM_FAST_CUDA_ARCHS)')"
else
  run_phase "install" "${CAPS[0]}" "$OUT_DIR/install.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
fi
"$PY" -m vdm_fast info >>"$OUT_DIR/install.log" 2>&1 && grep -E "^(torch|triton|vdm_fast._C|GPU) " "$OUT_DIR/install.log"

OP_TESTS=(tests/test_rel_pos_bias.py tests/test_group_norm_silu.py tests/test_temporal_attention.py)
for f in tests/test_temporal_attention_packed.py tests/test_op_contract.py tests/test_rms_norm_silu.py; do [ -f "$f" ] && OP_TESTS+=("$f"); done
# A test file that cannot be collected there (a peer package missing) must not stop the others.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --maxfail=5 --continue-on-collection-errors)
if [ "$DRY" = 1 ]; then
  PYTEST+=(--collect-only)
elif "$PY" -c "import xdist" >/dev/null 2>&1; then
  PYTEST+=(-n 4 --dist loadfile)  # 16 cores there: four files compile their kernels at once
fi
run_phase "gpu tests: pytest -m gpu" "${CAPS[1]}" "$OUT_DIR/gpu-tests.log" "${PYTEST[@]}" -m gpu tests
run_phase "gpu tests: op test files on cuda" "${CAPS[2]}" "$OUT_DIR/gpu-tests.log" "${PYTEST[@]}" -m "not gpu" \
  "${OP_TESTS[@]}"

BENCH=("$PY" -m vdm_fast bench --no-plot --out "$OUT_DIR")
[ -n "$QUICK" ] && BENCH+=("$QUICK")
[ "$DRY" = 1 ] && BENCH+=(--repeats 1)
run_phase "headline benchmarks" "${CAPS[3]}" "$OUT_DIR/bench.log" "${BENCH[@]}" \
  --filter group_norm_silu,temporal_attention,unet3d
run_phase "other benchmarks" "${CAPS[4]}" "$OUT_DIR/bench.log" "${BENCH[@]}" \
  --filter rel_pos_bias,rms_norm_silu,sampling,host_path,patch,train_step

echo "== summary ($(($(date +%s) - START)) s of ${TOTAL} s)"
"$PY" - "$OUT_DIR" "[${PHASES_JSON%,}]" "$DRY" <<'PY'
import json, pathlib, sys

out, phases, dry = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
files = sorted(out.glob("bench-*.json"))
device, rows = None, []
for f in files:
    d = json.loads(f.read_text())
    device = device or d["environment"]["device"]
    rows += d["rows"]
summary = {"dry_run": dry, "device": device or "unknown (no bench result)", "phases": phases,
           "results": [f.name for f in files]}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
for p in phases:
    state = "skipped" if p["rc"] is None else ("CUT" if p["cut"] else ("ok" if p["rc"] == 0 else f"exit {p['rc']}"))
    print(f"{p['name']:<36} {state:<8} {p['seconds']:>4} s")
print(f"device: {summary['device']}")
timed = [r for r in rows if r.get("speedup")]
for r in timed:
    rng = f"{r['speedup_low']:.2f}-{r['speedup_high']:.2f}" if r.get("speedup_low") is not None else ""
    bw = f"{r['pct_copy_bw']:.0f}% bw" if r.get("pct_copy_bw") else ""
    flag = "noisy" if r.get("noisy") else ""
    name = f"{r['op']} [{r['layout']}]" if r.get("layout") else r["op"]
    print(f"{name[:40]:<41}{r['shape'][:20]:<21}{r['contender'][:28]:<29}{r['speedup']:>6.2f}x {rng:<11} "
          f"{bw:<8}{flag}"[:120])
untimed = len(rows) - len(timed)
print(f"{len(timed)} rows with a speedup, {untimed} without (not run or no baseline); JSON: "
      + (", ".join(summary["results"]) or "none"))
PY
