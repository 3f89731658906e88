"""What every command-line entry point shares (`vdm-fast`, `python -m vdm_fast.sample`, `vdm-fast bench`).

A user error is one line on stderr, `<prog>: error: <what is wrong and what is allowed>`, and exit status 2:
argparse's own errors (through `Parser`), the option types below, and the ValueError/TypeError the library raises
(through `run_guarded`). VDM_FAST_DEBUG=1 re-raises the library's error with its traceback, for a bug report.
Ctrl-C outside training (which handles it itself) prints one line and exits 130, the shell's code for SIGINT.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable


def say(msg: str) -> None:
    """One line for the user on stderr (stdout stays for what a command outputs): the CLIs' and the run's messages."""
    print(msg, file=sys.stderr)

USAGE_ERROR = 2
INTERRUPTED = 130
# Errors a user can cause: a bad option value the library rejects, a missing file or folder, a missing optional
# package. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)


def one_line(message) -> str:
    """Collapse a message onto one line (library messages may wrap)."""
    return " ".join(str(message).split())


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: argparse prints the whole usage block before the error line by default."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def fail(prog: str, message) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return USAGE_ERROR


def run_guarded(prog: str, func: Callable[[], int]) -> int:
    """func() with the library's user errors turned into one line and exit 2, Ctrl-C into one line and exit 130."""
    try:
        return func()
    except USER_ERRORS as e:
        if os.environ.get("VDM_FAST_DEBUG"):
            raise
        return fail(prog, e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


# ---------------------------------------------------------------------------------------------------- option types
# argparse prefixes an ArgumentTypeError with "argument --name:", so each message says only what is allowed.
def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {v}")
        return v

    parse.__name__ = f"int>={minimum}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def finite_float(*, minimum: float | None = None, positive: bool = False) -> Callable[[str], float]:
    """A finite float (nan and inf are bad input), optionally >= minimum or > 0."""
    want = "a finite number" + (" > 0" if positive else f" >= {minimum:g}" if minimum is not None else "")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if not math.isfinite(v) or (positive and v <= 0) or (minimum is not None and v < minimum):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v

    parse.__name__ = "float"
    return parse


def check_device(device: str, option: str = "--device") -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N' that exists here; ValueError naming the option otherwise."""
    import torch

    d = str(device).strip().lower()
    if d in ("auto", "cpu"):
        return d
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"{option} {device}: no CUDA GPU is visible (torch {torch.__version__}, {build}); "
                             f"use {option} cpu or auto")
        index = int(d[5:]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return d
    raise ValueError(f"{option} must be auto, cpu, cuda or cuda:N, got {device!r}")
