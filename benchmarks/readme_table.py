"""Regenerate the README's performance section from saved `vdm-fast bench` results (never typed by hand).

    python -m vdm_fast.benchmarks.readme_table README.md benchmarks/results

Every JSON file in the folder becomes one table under a line saying where and how it was measured; GPU files come
first, and without any the section says plainly that GPU speed is unmeasured. Rows that need a GPU and were not run
are counted, not listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NO_GPU = ("**GPU: unmeasured.** No run so far had a GPU, so every GPU speed goal is unmeasured. "
          "`bash benchmarks/gpu_check.sh` on a CUDA machine measures them in one call (about 8 minutes).")


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _is_gpu(data: dict) -> bool:
    env = data["environment"]
    return bool(env.get("gpu", not str(env.get("device", "")).startswith("CPU")))


def _needs_gpu(r: dict) -> bool:
    if "needs_gpu" in r:
        return bool(r["needs_gpu"])
    return r.get("ms") is None and "CUDA GPU" in str(r.get("note", ""))  # results written before the flag


def _speedup(r: dict) -> str:
    if r.get("speedup") is None:
        return "-"
    s = f"{r['speedup']:.2f}x"
    if r.get("speedup_low") is not None and r.get("speedup_high") is not None:
        s += f" ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})"
    return s + (" noisy" if r.get("noisy") else "")


def _n(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _ms(r: dict, key: str) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    q1, q3 = r.get(f"{key}_q1"), r.get(f"{key}_q3")
    return _n(v) + (f" ({_n(q1)}-{_n(q3)})" if q1 is not None and q3 is not None else "")


def _describe(f: Path, data: dict) -> str:
    env, settings = data["environment"], data.get("settings", {})
    quick = "`--quick`, " if data.get("quick") else ""
    reps = f"at least {settings['repeats']} repeats per timing, " if settings.get("repeats") else ""
    if _is_gpu(data):
        where = (f"**{env['device']}**, driver {env.get('driver')}, CUDA {env.get('cuda')}; device copy "
                 f"{_f(env.get('copy_bandwidth_gbps'), '.0f')} GB/s, bf16 matmul "
                 f"{_f(env.get('bf16_matmul_tflops'), '.0f')} TFLOP/s")
        timing = "times are medians of CUDA-event timings after warm-up"
    else:
        threads = settings.get("threads", env.get("threads"))
        where = (f"**{env['device']}**, {env.get('cpu_count') or '?'} cores, {threads} torch "
                 f"thread{'' if threads == 1 else 's'}")
        timing = "times are medians of wall-clock runs after warm-up"
    return (f"{where}; torch {env['torch']}, triton {env.get('triton')}, {env['date'][:10]}; {quick}{reps}{timing} "
            f"(in brackets: the interquartile range of the repeats). Source: `{f.as_posix()}`.\n")


def _table(data: dict) -> list[str]:
    # The speed comparisons. Rows without a baseline (sampler quality, copied bytes) and the host-cost rows (an op's
    # Python path against one eager aten call: a cost in those units, which a speedup column would misstate) stay
    # in the JSON.
    rows = [r for r in data["rows"] if not _needs_gpu(r) and r.get("speedup") is not None
            and not str(r["op"]).startswith("host ")]
    skipped = sum(1 for r in data["rows"] if _needs_gpu(r))
    other = len(data["rows"]) - len(rows) - skipped
    out = ["| op | shape | dtype | ours vs baseline | ms | baseline ms | speedup | GB/s | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "; ".join(str(s) for s in (r.get("layout"), r.get("note")) if s)
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['contender']} | {_ms(r, 'ms')} | "
                   f"{_ms(r, 'baseline_ms')} | {_speedup(r)} | {_f(r.get('gbps'), '.3g')} | {note} |")
    if skipped or other:
        out += ["", f"The JSON file has {other} more rows that are not speed comparisons (sampler quality, copied "
                f"bytes, the Python cost of a call) and {skipped} rows that need a CUDA GPU and were not run on this "
                "machine."]
    return out


def render(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []
    loaded = [(f, json.loads(f.read_text())) for f in files]
    gpu = [(f, d) for f, d in loaded if _is_gpu(d)]
    cpu = [(f, d) for f, d in loaded if not _is_gpu(d)]
    parts = ["Speedup is the baseline's time over ours: above 1 means vdm_fast is faster. Each row names the "
             "baseline it is measured against.", ""]
    if not gpu:
        parts += [NO_GPU, ""]
    for f, data in gpu + cpu:
        parts += [_describe(f, data)] + _table(data) + [""]
    return "\n".join(parts).rstrip()


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    readme, results = Path(argv[0] if argv else "README.md"), Path(argv[1] if len(argv) > 1 else "benchmarks/results")
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme} has no {START} ... {END} section", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(results)}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
