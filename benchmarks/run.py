"""`vdm-fast bench`: measure every kernel and the model against the baselines users would pick.

Ceilings first (copy bandwidth, bf16 matmul rate), then each benchmark module's rows; prints a table, writes a JSON
file (device, driver, versions, date, every number) and a PNG plot of the speedups.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import pkgutil
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from . import common

COLUMNS = [("op", 24), ("shape", 22), ("dtype", 9), ("contender", 34), ("ms", 9), ("baseline_ms", 11),
           ("speedup", 8), ("gbps", 8), ("pct_copy_bw", 8), ("peak_mb", 9)]


def modules(name_filter: str = "") -> list[str]:
    import vdm_fast.benchmarks as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    wanted = [f.strip() for f in name_filter.split(",") if f.strip()]
    return [n for n in names if not wanted or any(w in n for w in wanted)]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if common.GPU else f"CPU ({_cpu_name()})",
        "driver": None, "triton": None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if common.GPU:
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def _fmt(v, width: int) -> str:
    if v is None:
        s = "-"
    elif isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    else:
        s = str(v)
    return s[:width].ljust(width)


def table(rows: list[dict]) -> str:
    head = " ".join(name.ljust(w) for name, w in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        line = " ".join(_fmt(r.get(name), w) for name, w in COLUMNS)
        lines.append(line + (f"  {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: install matplotlib, the 'plot' extra)")
        return False
    timed = [r for r in rows if r.get("speedup")]
    if not timed:
        return False
    labels = [f"{r['op']} {r['shape']} vs {r['contender']}"[:70] for r in timed]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(timed) + 1.5))
    ax.barh(range(len(timed)), [r["speedup"] for r in timed], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(timed)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of vdm_fast (baseline time / our time)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdm-fast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--filter", default="", help="comma-separated benchmark names, e.g. group_norm,attention")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON file and the plot")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = modules(args.filter)
    if args.list:
        print("\n".join(names))
        return 0
    if not names:
        parser.error(f"--filter {args.filter!r} matches no benchmark (see --list)")
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}")
    if not common.GPU:
        print("No CUDA GPU here: the Triton kernels need one, so their rows say 'not run'. What runs on CPU runs "
              "(the reference ops, the compiled CPU code, the tiny model); those numbers are CPU timings.")
    copy_bw = common.copy_bandwidth_gbps(args.quick)
    tflops = common.matmul_tflops(args.quick)
    env["copy_bandwidth_gbps"], env["bf16_matmul_tflops"] = copy_bw, tflops
    if copy_bw:
        print(f"ceilings: device copy {copy_bw:.0f} GB/s (read + write), bf16 matmul {tflops:.0f} TFLOP/s")
    rows: list[dict] = []
    try:
        from tqdm import tqdm

        progress = tqdm(names, desc="bench", disable=not sys.stderr.isatty())
    except ImportError:
        progress = names
    for name in progress:
        try:
            mod = importlib.import_module(f"vdm_fast.benchmarks.{name}")
            new = mod.run(quick=args.quick)
        except Exception as e:  # a failing benchmark is reported as a row, never hidden
            traceback.print_exc()
            failure = f"FAILED: {type(e).__name__}: {e}"
            new = [common.row(name.removeprefix("bench_"), "-", "-", "-", None, note=failure)]
        for r in new:
            if copy_bw and r.get("gbps"):
                r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_bw
        rows += new
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "quick": args.quick, "rows": rows}, indent=1))
    made = plot(rows, out / f"{stem}.png", f"vdm_fast on {env['device']} ({env['date'][:10]})")
    print(f"wrote {out / (stem + '.json')}" + (f" and {out / (stem + '.png')}" if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
