"""What a run shows while it trains: log.jsonl rows, the loss curve, and the progress bar or plain progress lines.

log.jsonl holds one JSON object per logged step: step, loss (the mean over ranks), lr, time (seconds of training
since the run's first step, continued across resumes), then wall (Unix time), skipped (non-finite steps so far) and,
when there were any, bad_files. Rows are appended through run_dir.LogWriter (a torn last line from a crash is dropped
when the file is reopened) and fsynced at each checkpoint; on resume the rows after the checkpoint's step are dropped,
so the log always describes one trajectory.

Progress (vdm_fast._progress): a tqdm bar when stderr is a terminal; otherwise (batch jobs, `--no-progress`) a plain
line every `--progress-every` seconds and one at the end.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from vdm_fast._fsutil import atomic_path
from vdm_fast._progress import PlainProgress, progress_bar
from vdm_fast.run_dir import read_log

LOSS_PNG = "loss.png"


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Loss curve PNG from the log (raw and smoothed, log scale). False (with a message) without matplotlib."""
    try:  # matplotlib: optional (the `plot` extra), and slow to import
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('loss curve skipped: matplotlib is not installed (pip install "vdm_fast[plot]")', file=sys.stderr)
        return False
    rows = [r for r in read_log(log_path) if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return True


def progress(cfg, start: int):
    """The loop's progress: a bar on a terminal (unless --no-progress), else a plain line every --progress-every
    seconds; `update(steps)`, `set_postfix_str(text)`, `close()`."""
    total, desc = cfg.steps - start, "train" if start == 0 else f"train (from step {start})"
    if not cfg.progress:
        return PlainProgress(total, desc, cfg.progress_every, sys.stderr)
    return progress_bar(total, desc, every_s=cfg.progress_every)
