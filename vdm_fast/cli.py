"""The `vdm-fast` command line (also `python -m vdm_fast`).

`vdm-fast` alone prints this help and exits 0; `vdm-fast --version` prints the version. Each subcommand is one
`Command` in COMMANDS: its help line, the module that declares its options (`add_arguments(parser)`) and runs it
(`run_from_args(args)`). Only the chosen command's module is imported, so `vdm-fast info` never pays for (or breaks
on) the training code. Every user error is one line, `vdm-fast <command>: error: ...`, with exit status 2 (see
vdm_fast/_cli.py); options are checked before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from vdm_fast import __version__
from vdm_fast._cli import Parser, check_device, fail, run_guarded

PROG = "vdm-fast"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # has add_arguments(parser) and run_from_args(args) -> int
    description: str = ""

    def load(self):
        return importlib.import_module(self.module)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`vdm-fast info` takes no options."""


def run_from_args(args: argparse.Namespace) -> int:
    """`vdm-fast info`."""
    from vdm_fast.info import report  # imports every op module: only for this command

    print(report())
    return 0


COMMANDS = [
    Command("info", "versions, compiled extension, GPU, and the backend of each op", __name__),
    Command("bench", "time every op and the model against the baselines (a table, JSON and a plot)",
            "vdm_fast.benchmarks.run", "Benchmarks: medians of repeated timings with their spread, against eager "
            "PyTorch, torch.compile and the other baselines a user would pick."),
    Command("train", "train a Unet3D video diffusion model (bouncing shapes or a folder of videos)", "vdm_fast.train",
            "Train a Unet3D with GaussianDiffusion. Also: python -m vdm_fast.train, and "
            "torchrun --nproc_per_node=N -m vdm_fast.train for DDP."),
    Command("sample", "draw videos from a trained run (gif, png frame strip, or mp4/webm with the video extra)",
            "vdm_fast.sample", "Sample videos from a run's latest checkpoint."),
]


def _chosen(argv: list[str]) -> Command | None:
    """The command named by the first argument that is not an option (None: none named)."""
    for a in argv:
        if not a.startswith("-"):
            return next((c for c in COMMANDS if c.name == a), None)
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the options of the command that `argv` names (all commands when argv is None)."""
    parser = Parser(prog=PROG, description="Video Diffusion Models, fast: fused kernels, a 3D U-Net, samplers.",
                    epilog=f"`{PROG} COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    chosen = None if argv is None else _chosen(argv)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help)
        if argv is None or c is chosen:
            c.load().add_arguments(p)
        p.set_defaults(command_spec=c)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    if not argv:
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    command: Command | None = getattr(args, "command_spec", None)
    if command is None:
        return fail(PROG, f"name a command: {', '.join(c.name for c in COMMANDS)} (see {PROG} --help)")
    prog = f"{PROG} {command.name}"
    if extra:  # argparse would blame the top-level parser
        return fail(prog, f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
    device = getattr(args, "device", None)
    if isinstance(device, str):  # checked before any work, for every command that takes --device
        try:
            check_device(device)
        except ValueError as e:
            return fail(prog, e)
    return run_guarded(prog, lambda: command.load().run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
