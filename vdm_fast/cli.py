"""The `vdm-fast` command line (also `python -m vdm_fast`).

Each subcommand is one `_add_<name>(sub)` function that declares its parser and points it at its handler; adding a
command is adding one such function to COMMANDS.
"""

from __future__ import annotations

import argparse
import os
import sys

# Errors a user can cause (a missing folder, a bad option value, a missing optional package): one line, no traceback
# (VDM_FAST_DEBUG=1 shows it).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


def _info(args) -> int:
    from vdm_fast.info import report

    print(report())
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, compiled extension, GPU, and the backend of each op")
    p.set_defaults(func=_info)


def _bench(args) -> int:
    from vdm_fast.benchmarks.run import main as bench_main

    return bench_main(args.rest)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against the baselines (see `vdm-fast bench --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)


def _train(args) -> int:
    from vdm_fast.train import run_from_args

    return run_from_args(args)


def _add_train(sub) -> None:
    from vdm_fast.train import add_arguments

    p = sub.add_parser("train", help="train a Unet3D video diffusion model (bouncing shapes or a folder of videos)",
                       description="Train a Unet3D with GaussianDiffusion. Also: python -m vdm_fast.train, and "
                       "torchrun --nproc_per_node=N -m vdm_fast.train for DDP.")
    add_arguments(p)
    p.set_defaults(func=_train, user_errors=True)


def _sample(args) -> int:
    from vdm_fast.sample import run_from_args

    return run_from_args(args)


def _add_sample(sub) -> None:
    from vdm_fast.sample import add_arguments

    p = sub.add_parser("sample", help="draw videos from a trained run (mp4, gif or a png frame strip)",
                       description="Sample videos from a run's latest checkpoint.")
    add_arguments(p)
    p.set_defaults(func=_sample, user_errors=True)


COMMANDS = [_add_info, _add_bench, _add_train, _add_sample]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdm-fast", description="Video Diffusion Models, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark runner parses its own options
        return _bench(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    if not getattr(args, "user_errors", False):
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("VDM_FAST_DEBUG"):  # the traceback, for a bug rather than a user error
            raise
        print(f"vdm-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
