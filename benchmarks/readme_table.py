"""Regenerate the README's performance section from benchmarks/results/*.json (never typed by hand).

    python -m vdm_fast.benchmarks.readme_table README.md benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def render(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return ("No GPU results yet: no session so far was lent a GPU, so every speed goal of the kernel issues is "
                "unmeasured. `benchmarks/gpu_check.sh` produces them in one call on a GPU machine.")
    parts = []
    for f in files:
        data = json.loads(f.read_text())
        env = data["environment"]
        parts.append(f"**{env['device']}**, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env['torch']}, "
                     f"triton {env.get('triton')}, {env['date'][:10]}; copy bandwidth "
                     f"{_f(env.get('copy_bandwidth_gbps'), '.0f')} GB/s, bf16 matmul "
                     f"{_f(env.get('bf16_matmul_tflops'), '.0f')} TFLOP/s. Source: `{f.as_posix()}`.\n")
        parts.append("| op | shape | dtype | vs | ms | baseline ms | speedup | GB/s | % copy BW | note |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in data["rows"]:
            parts.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['contender']} | {_f(r['ms'], '.3f')} | "
                         f"{_f(r['baseline_ms'], '.3f')} | {_f(r['speedup'], '.2f')} | {_f(r['gbps'], '.0f')} | "
                         f"{_f(r['pct_copy_bw'], '.0f')} | {r.get('note', '')} |")
        parts.append("")
    return "\n".join(parts)


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
