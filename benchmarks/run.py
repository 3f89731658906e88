"""`vdm-fast bench`: time every kernel and the model against the baselines users would pick.

Ceilings first on a GPU (device copy bandwidth, bf16 matmul rate; a CPU has neither here), then each benchmark
module's rows (`bench_<name>.run(quick) -> rows`, auto-discovered). Each timing is a median of repeats with its
spread (common.py); the table shows the median, the spread and the speedup's range, flags noisy rows, and fits 120
columns (long names wrap, none is cut). Rows that need a CUDA GPU are one line on a CPU and stay in the JSON.

Results go to a folder the user picks (--out, default ./vdm-fast-bench in the working directory), named by date and
device, never overwriting: bench-<UTC date-time>-<device>.json (environment, settings and every row) and a .png plot
of the speedups (with the `plot` extra, matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import io
import json
import os
import pkgutil
import platform
import subprocess
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path

import torch

from vdm_fast._cli import Parser, positive_int, run_guarded
from vdm_fast._fsutil import atomic_write_bytes, probe_writable

from . import common

WIDTH = 120
DEFAULT_OUT = "vdm-fast-bench"
LAYOUT_WIDTH = 17
# (field, title, width, right-aligned): a row's cells wrap inside their column; the op names the group above.
COLUMNS = [("shape", "shape", 20, False), ("dtype", "dtype", 8, False), ("contender", "contender", 21, False),
           ("layout", "layout / note", LAYOUT_WIDTH, False), ("ms", "ms", 7, True), ("spread", "±%", 4, True),
           ("baseline_ms", "base ms", 7, True), ("speedup", "speedup (range)", 17, True),
           ("gbps", "GB/s", 5, True), ("threads", "thr", 3, True)]


def modules(name_filter: str = "") -> list[str]:
    import vdm_fast.benchmarks as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    wanted = [f.strip() for f in name_filter.split(",") if f.strip()]
    if not wanted:
        return names
    # In the filter's order (gpu_check.sh runs the headline benchmarks first), each name once.
    return list(dict.fromkeys(n for w in wanted for n in names if w in n))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Where the numbers come from. `cuda` is the CUDA runtime in use: None without a GPU, whatever torch was built
    for (that is `torch_cuda_build`)."""
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda, "cuda": torch.version.cuda if common.GPU else None,
        "gpu": common.GPU, "device": torch.cuda.get_device_name(0) if common.GPU else f"CPU ({_cpu_name()})",
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
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


def header(env: dict, quick: bool, repeats: int) -> str:
    if env.get("gpu"):
        where = f"{env['device']}, driver {env.get('driver') or '?'}, CUDA {env.get('cuda')}"
    else:
        # No CUDA version here: the one torch was built for is in the JSON (torch_cuda_build), not a device fact.
        n = env.get("threads")
        where = (f"{env['device']}, {env.get('cpu_count')} cores, {n} torch thread{'' if n == 1 else 's'}; "
                 "no CUDA GPU visible")
    versions = (f"torch {env['torch']}, triton {env.get('triton') or 'not installed'}, "
                f"{'--quick, ' if quick else ''}at least {repeats} repeats per timing, {env['date']}")
    return "\n".join(textwrap.wrap(f"vdm-fast bench on {where}", WIDTH) + [versions])


# ---------------------------------------------------------------------------------------------------------- table
def _num(v, width: int = 7) -> str:
    if v is None:
        return "-"
    for digits in (3, 2, 1):
        s = f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
        if len(s) <= width:
            return s
    return s


def _cells(r: dict) -> dict:
    sp = r.get("speedup")
    if sp is None:
        speedup = "-"
    elif r.get("speedup_low") is not None:
        speedup = f"{sp:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})"
    else:
        speedup = f"{sp:.2f}x"
    spreads = [v for v in (r.get("ms_spread"), r.get("baseline_ms_spread")) if v is not None]
    spread = f"{100 * max(spreads):.0f}" + ("!" if r.get("noisy") else "") if spreads else "-"
    layout = r.get("layout") or ""
    note = str(r.get("note") or "")
    if note == layout:
        note = ""
    if not layout and len(note) <= LAYOUT_WIDTH:  # a short note fits the column; a long one gets its own line
        layout, note = note, ""
    return {"shape": r.get("shape", ""), "dtype": r.get("dtype", ""), "contender": r.get("contender", ""),
            "layout": layout, "note": note, "ms": _num(r.get("ms")), "spread": spread,
            "baseline_ms": _num(r.get("baseline_ms")), "speedup": speedup, "gbps": _num(r.get("gbps"), 5),
            "threads": "-" if r.get("threads") is None else str(r["threads"])}


def _render_row(cells: dict) -> list[str]:
    wrapped = [textwrap.wrap(str(cells[k]), w, break_long_words=True, break_on_hyphens=False) or [""]
               for k, _, w, _ in COLUMNS]
    lines = []
    for i in range(max(len(c) for c in wrapped)):
        parts = []
        for (_, _, w, right), c in zip(COLUMNS, wrapped):
            s = c[i] if i < len(c) else ""
            parts.append(s.rjust(w) if right else s.ljust(w))
        lines.append(("  " + " ".join(parts)).rstrip())
    if cells.get("note"):
        lines += textwrap.wrap(cells["note"], WIDTH, initial_indent="    ", subsequent_indent="    ")
    return lines


def gpu_only_summary(rows: list[dict]) -> str:
    """One line (at most WIDTH columns) naming the ops whose rows need a CUDA GPU, or '' when there are none."""
    skipped = [r for r in rows if r.get("needs_gpu")]
    if not skipped:
        return ""
    ops = list(dict.fromkeys(r["op"].split()[0] for r in skipped))  # "group_norm_silu fwd" -> "group_norm_silu"
    head = f"{len(skipped)} rows need a CUDA GPU, not run here (kept in the JSON): "
    for k in range(len(ops), 0, -1):
        more = f" and {len(ops) - k} more" if k < len(ops) else ""
        line = head + ", ".join(ops[:k]) + more
        if len(line) <= WIDTH:
            return line
    return head.rstrip(": ")


def table(rows: list[dict]) -> str:
    """The rows grouped by op (the op's full name on its own line), GPU-only rows summarized at the end."""
    head = "  " + " ".join(t.rjust(w) if right else t.ljust(w) for _, t, w, right in COLUMNS)
    lines = [head.rstrip(), "-" * min(WIDTH, len(head))]
    shown = [common.normalize(r) for r in rows]
    shown = [r for r in shown if not r["needs_gpu"]]
    op = None
    for r in shown:
        if r["op"] != op:
            op = r["op"]
            lines += textwrap.wrap(op, WIDTH)
        lines += _render_row(_cells(r))
    noisy = sum(1 for r in shown if r["noisy"])
    if noisy:
        lines.append("")
        lines += textwrap.wrap(
            f"warning: {noisy} of {len(shown)} rows are noisy (marked !: the interquartile range of the repeats is "
            f"over {100 * common.NOISY_SPREAD:.0f}% of the median). A busy machine or a very short op; a speedup "
            "inside its range is no measurement. Rerun on an idle machine, with more --repeats or --threads 1.", WIDTH)
    summary = gpu_only_summary([common.normalize(r) for r in rows])
    if summary:
        lines += ["", summary]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- files
def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:60]


def result_stem(env: dict) -> str:
    """bench-<UTC date-time>-<device>: sorts by date, says where it was measured."""
    when = dt.datetime.fromisoformat(env["date"]).strftime("%Y%m%d-%H%M%S")
    return f"bench-{when}-{_slug(env['device'])}"


def check_out_dir(out: Path) -> Path:
    """Create `out` and prove it writable before any benchmark runs (ValueError naming --out otherwise)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} is not a writable folder: {e.strerror or e}") from None
    return out


def replace(path: Path, data: bytes) -> None:
    """Rewrite this run's own result file atomically (a temp file moved over it): a reader, or a run killed by its
    time cap, finds the previous complete version or the new one, never half a file."""
    atomic_write_bytes(path, data)


def write_new(path: Path, data: bytes) -> Path:
    """Write `data` to `path`, or to path-2, path-3, ... if it exists: never overwrites, never leaves half a file
    (a temp file in the same folder is linked into place, which fails rather than replaces)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        for i in range(1, 1000):
            target = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise FileExistsError(f"{path}: 999 results of the same name")
    finally:
        os.unlink(tmp)


def plot(rows: list[dict], path: Path, title: str) -> str:
    """A bar per timed row (speedup, with its range as an error bar); returns what it did, in words."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or the 'plot' extra)"
    timed = [common.normalize(r) for r in rows]
    timed = [r for r in timed if r.get("speedup")]
    if not timed:
        return "no plot: no row has a speedup"
    labels = ["\n".join(textwrap.wrap(f"{r['op']} {r['shape']} {r['dtype']}: {r['contender']}"
                                      + (f" [{r['layout']}]" if r.get("layout") else ""), 60)) for r in timed]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(12, 0.25 * lines + 0.3 * len(timed) + 1.5))
    speedups = [r["speedup"] for r in timed]
    lo = [r["speedup"] - (r["speedup_low"] if r.get("speedup_low") is not None else r["speedup"]) for r in timed]
    hi = [(r["speedup_high"] if r.get("speedup_high") is not None else r["speedup"]) - r["speedup"] for r in timed]
    colors = ["tab:orange" if r["noisy"] else "tab:blue" for r in timed]
    ax.barh(range(len(timed)), speedups, xerr=[lo, hi], color=colors, capsize=2)
    ax.axvline(1.0, color="k", lw=0.8)
    if max(speedups) / min(speedups) > 20:  # 2x and 100x on one axis: a linear one flattens the small bars
        ax.set_xscale("log")
    ax.set_yticks(range(len(timed)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of vdm_fast: baseline time / our time (bar: median; whiskers: interquartile range; "
                  "orange: noisy)")
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # "tight": long labels are never clipped
    plt.close(fig)
    return f"plot {write_new(path, buf.getvalue())}"


# ----------------------------------------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer shapes and a shorter time budget per timing")
    p.add_argument("--filter", default="", help="comma-separated parts of benchmark names, e.g. group_norm,attention "
                   "(see --list)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON results and the plot; files are named by "
                   f"date and device and never overwritten (default: ./{DEFAULT_OUT})")
    p.add_argument("--repeats", type=positive_int, default=common.settings.repeats,
                   help=f"at least this many timed runs per CPU timing (default: {common.settings.repeats})")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's default; each CPU row records its count)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="write no plot")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")


def run_from_args(args: argparse.Namespace) -> int:
    names = modules(args.filter)
    if args.list:
        print("\n".join(names))
        return 0
    if not names:
        raise ValueError(f"--filter {args.filter!r} matches no benchmark; choose from: "
                         + ", ".join(n.removeprefix("bench_") for n in modules()))
    out = check_out_dir(Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    common.settings.repeats = args.repeats
    env = environment()
    print(header(env, args.quick, args.repeats))
    if common.GPU:
        copy_bw = common.copy_bandwidth_gbps(args.quick)
        tflops = common.matmul_tflops(args.quick)
        print(f"ceilings: device copy {copy_bw:.0f} GB/s (read + write), bf16 matmul {tflops:.0f} TFLOP/s")
    else:
        copy_bw = tflops = None
        print("\n".join(textwrap.wrap("ceilings: the device copy bandwidth and bf16 matmul rate are GPU ceilings, "
                                     "measured on a CUDA GPU only (null in the JSON here), so no row shows a % of "
                                     "copy bandwidth.", WIDTH)))
    env["copy_bandwidth_gbps"], env["bf16_matmul_tflops"] = copy_bw, tflops
    settings = {"quick": args.quick, "repeats": args.repeats, "threads": torch.get_num_threads(),
                "filter": args.filter, "noisy_spread": common.NOISY_SPREAD}
    rows: list[dict] = []

    def dump() -> bytes:
        return json.dumps({"environment": env, "quick": args.quick, "settings": settings, "rows": rows,
                           "complete": len(done) == len(names)}, indent=1).encode()

    # The file is claimed (by a unique name) before the first module and rewritten after each one, so a run cut
    # short (Ctrl-C, a time cap) keeps what it measured.
    done: list[str] = []
    path = write_new(out / f"{result_stem(env)}.json", dump())
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name.removeprefix('bench_')}", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(f"vdm_fast.benchmarks.{name}")
            new = mod.run(quick=args.quick)
        except ModuleNotFoundError as e:  # an optional package (triton, diffusers) missing: said plainly, no traceback
            new = [common.row(name.removeprefix("bench_"), "-", "-", "-", None,
                              note=f"not run: needs the {e.name} package, which is not installed here")]
        except Exception as e:  # a failing benchmark is reported as a row, never hidden
            traceback.print_exc()
            failure = f"FAILED: {type(e).__name__}: {e}"
            new = [common.row(name.removeprefix("bench_"), "-", "-", "-", None, note=failure)]
        for r in new:
            r = common.normalize(r)
            if copy_bw and r.get("gbps"):
                r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_bw
            rows.append(r)
        done.append(name)
        replace(path, dump())
    print(table(rows))
    made = "no plot (--no-plot)"
    if args.plot:
        made = plot(rows, path.with_suffix(".png"), f"vdm_fast on {env['device']} ({env['date'][:10]}), "
                    f"{'quick, ' if args.quick else ''}{torch.get_num_threads()} threads")
    print(f"wrote {path}\n{made}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="vdm-fast bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_guarded("vdm-fast bench", lambda: run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
