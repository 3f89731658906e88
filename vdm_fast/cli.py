"""The `vdm-fast` command line (also `python -m vdm_fast`)."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from vdm_fast.info import report

    print(report())
    return 0


def _bench(args) -> int:
    from vdm_fast.benchmarks.run import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdm-fast", description="Video Diffusion Models, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled extension, GPU, and the backend of each op")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="benchmarks against the baselines (see `vdm-fast bench --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark runner parses its own options
        return _bench(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
