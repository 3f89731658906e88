"""The `vdm-fast` command line (also `python -m vdm_fast`)."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from vdm_fast.info import report

    print(report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdm-fast", description="Video Diffusion Models, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled extension, GPU, and the backend of each op")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
