"""Progress for long loops (sampling steps, training steps): a tqdm bar on a terminal, else a plain line every
`every_s` seconds (batch jobs and logs get one readable line, not carriage-return bar frames), and a closing line
when any was printed (a short loop stays silent).

VDM_FAST_PROGRESS_SECONDS sets the period of the plain lines (default 10; 0 prints one line per update).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


class PlainProgress:
    """The tqdm calls the loops use (update, close, set_postfix_str), written as plain lines."""

    def __init__(self, total: int, desc: str, every_s: float, file, unit: str = "steps"):
        self.total, self.desc, self.every_s, self.file, self.unit = total, desc, every_s, file, unit
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.perf_counter()
        self.closed = False
        self.printed = False

    def _line(self, now: float, final: bool = False) -> str:
        elapsed = now - self.t0
        head = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if final:
            text = f"{head} in {_seconds(elapsed)}"
        else:
            pct = 100.0 * self.n / self.total if self.total else 0.0
            left = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
            text = f"{head} ({pct:.0f}%), {_seconds(elapsed)} elapsed, about {_seconds(left)} left"
        return text + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.n < self.total:
            self.last, self.printed = now, True
            print(self._line(now), file=self.file, flush=True)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.printed:
                print(self._line(time.perf_counter(), final=True), file=self.file, flush=True)


def progress_bar(total: int, desc: str, *, enabled: bool = True, every_s: float | None = None, file=None,
                 unit: str = "steps"):
    """A tqdm bar on a terminal, PlainProgress elsewhere, a disabled tqdm (silent, same calls) when not enabled."""
    file = file if file is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, desc=desc, leave=False, file=file)
    if every_s is None:
        every_s = float(os.environ.get("VDM_FAST_PROGRESS_SECONDS", "10"))
    return PlainProgress(total, desc, every_s, file, unit)
