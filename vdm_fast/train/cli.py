"""`vdm-fast train` / `python -m vdm_fast.train` / `torchrun -m vdm_fast.train`: the options and their checks.

Defaults are SUPPRESSed in the namespace, so `given_options(args)` knows which options the command line set (a
resumed run keeps the saved value of the others); `--help` shows TrainConfig's defaults, once each. A bad value is
one line naming the option and exit 2: argparse's type checks (through vdm_fast._cli.Parser), then TrainConfig's
(ranges, --set keys and types, the model they describe). A run that diverged or lost a DDP peer is one line and
exit 1; SIGINT / SIGTERM save and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

from vdm_fast._cli import Parser, finite_float, nonneg_int, one_line, positive_int, run_guarded
from vdm_fast.diffusion import PREDICTIONS, SAMPLERS
from vdm_fast.model import PRESETS
from vdm_fast.train.config import PRECISIONS, TrainConfig
from vdm_fast.train.distributed import DistributedTimeout
from vdm_fast.train.monitor import TrainingDiverged
from vdm_fast.train.trainer import train

PROG = "vdm-fast train"
RUN_FAILED = 1


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE (a Unet3DConfig field), got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), _literal(v.strip())


def _betas(text: str) -> tuple[float, float]:
    try:
        b = tuple(float(v) for v in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0 <= v < 1 for v in b):  # nan fails the comparison too
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1) like 0.9,0.99, got {text!r}")
    return b


def _unit(text: str) -> float:
    v = finite_float(minimum=0.0)(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1), got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train options (see the module docstring)."""
    D = TrainConfig()
    S = argparse.SUPPRESS

    def opt(g, flag, name, type_, help_, default=None, **kw):
        shown = getattr(D, name) if default is None else default
        g.add_argument(flag, dest=name, type=type_, default=S, help=f"{help_} (default: {shown})", **kw)

    def flag(g, name_, name, help_):
        g.add_argument(name_, dest=name, action="store_true", default=S, help=help_)

    pos, nonneg, num = positive_int, nonneg_int, finite_float
    g = p.add_argument_group("model")
    opt(g, "--preset", "preset", str, f"Unet3D preset: {', '.join(PRESETS)} (tiny for CPU)", metavar="NAME")
    g.add_argument("--set", dest="overrides", action="append", type=_override, default=S, metavar="KEY=VALUE",
                   help="override a Unet3DConfig field, e.g. --set base_channels=16 --set channel_mults=1,2")
    opt(g, "--prediction", "prediction", str, "what the network predicts", choices=PREDICTIONS)
    flag(g, "--gradient-checkpointing", "gradient_checkpointing",
         "recompute each block's activations in backward (less memory, ~30%% more compute; same gradients)")
    flag(g, "--compile", "compile", "torch.compile the model (Inductor; the first steps compile): fewer, fused "
         "kernels, for any model size")
    flag(g, "--cuda-graph", "cuda_graph", "capture the whole training step (forward, backward, AdamW) in CUDA graphs "
         "after 3 warm-up steps and replay it: removes the host's launch cost, for small models whose steps are "
         "launch-bound; one CUDA process, static shapes, not with --compile, --fsdp, fp16 or "
         "--gradient-checkpointing")
    flag(g, "--fsdp", "fsdp", "shard weights, gradients, AdamW state and EMA over the torchrun processes (FSDP2, "
         "torch >= 2.6) instead of DDP: 20P/N bytes per GPU instead of 20P, for models whose optimizer state does not "
         "fit one GPU; same checkpoints, exact --resume")
    flag(g, "--frame-parallel", "frame_parallel", "split the frames of each clip over the torchrun processes (or "
         "groups of --frame-parallel-size): clips whose activations do not fit one GPU; gradients summed over each "
         "group, averaged over the groups; the same updates as one process, to rounding")
    opt(g, "--frame-parallel-size", "frame_parallel_size", pos, "processes per clip with --frame-parallel; the "
        "world / K groups are data-parallel replicas splitting --batch-size", "all processes", metavar="K")
    g = p.add_argument_group("data")
    opt(g, "--data", "data", str, "'bouncing' (generated on the fly) or a folder of videos / directories of frames")
    opt(g, "--frames", "frames", pos, "frames per clip", "the preset's")
    opt(g, "--resolution", "resolution", pos, "frame size", "the preset's")
    opt(g, "--frameskip", "frameskip", pos, "take every k-th frame of the source")
    opt(g, "--channels", "channels", int, "colour channels (bouncing only)", choices=(1, 3))
    flag(g, "--skip-short", "skip_short", "skip videos shorter than a clip instead of failing")
    opt(g, "--skip-bad-data", "skip_bad_data", nonneg, "tolerate up to N unreadable files: each clip that fails to "
        "read is replaced by the next readable one, and named in the log (0: stop, naming the file)", metavar="N")
    opt(g, "--image-frames", "image_frames", nonneg, "joint image-video training: K independent images per video")
    opt(g, "--image-data", "image_data", str, "folder of images for --image-frames", "frames of the --data videos")
    flag(g, "--class-cond", "class_cond", "condition on the data's label (bouncing: the shape kind), for guidance")
    opt(g, "--cond-drop-prob", "cond_drop_prob", _unit, "probability of dropping the label in training (CFG)")
    g = p.add_argument_group("optimisation")
    opt(g, "--batch-size", "batch_size", pos, "global batch, split over processes and --grad-accum micro-steps")
    opt(g, "--grad-accum", "grad_accum", pos, "micro-steps per optimizer step: the update of a K times larger batch "
        "in 1/K of the activation memory", metavar="K")
    opt(g, "--steps", "steps", pos, "train until this many optimizer steps")
    opt(g, "--lr", "lr", num(positive=True), "AdamW learning rate after warmup")
    opt(g, "--warmup-steps", "warmup_steps", nonneg, "linear learning-rate warmup")
    opt(g, "--weight-decay", "weight_decay", num(minimum=0.0), "AdamW weight decay")
    opt(g, "--betas", "betas", _betas, "AdamW betas", "0.9,0.99")
    opt(g, "--grad-clip", "grad_clip", num(minimum=0.0), "clip the gradient norm to this (0: off)")
    opt(g, "--ema-decay", "ema_decay", _unit, "EMA of the weights (0: off)")
    opt(g, "--precision", "precision", str, "auto: bf16 autocast on CUDA, fp32 on CPU; fp16: autocast with a "
        "GradScaler, for GPUs without bf16", choices=PRECISIONS)
    opt(g, "--max-nonfinite-steps", "max_nonfinite_steps", pos, "a step with a NaN/Inf loss or gradient norm is "
        "skipped; this many in a row stop the run (exit 1) before anything is saved", metavar="N")
    opt(g, "--seed", "seed", nonneg, "seed of the weights and of the data stream")
    g = p.add_argument_group("run")
    opt(g, "--out", "out", str, "run folder (checkpoints/, log.jsonl, loss.png, samples/); one trainer at a time")
    flag(g, "--resume", "resume", "continue the run in --out from its latest checkpoint, exactly")
    flag(g, "--resume-from-last-good", "resume_from_last_good",
         "with --resume: if the latest checkpoint fails verification, take the newest intact one")
    flag(g, "--reset-optimizer", "reset_optimizer",
         "with --resume: start AdamW afresh (and the EMA, if the checkpoint lacks it) instead of refusing")
    flag(g, "--overwrite", "overwrite", "start afresh in a non-empty --out (its run files are removed)")
    opt(g, "--workers", "workers", nonneg, "DataLoader worker processes")
    opt(g, "--device", "device", str, "auto, cpu, cuda or cuda:N")
    opt(g, "--threads", "threads", nonneg, "torch CPU threads per process (0: torch's default)")
    opt(g, "--ddp-timeout", "ddp_timeout", num(positive=True), "seconds a process waits for the others before the "
        "job stops (a frozen rank)", metavar="SECONDS")
    opt(g, "--log-every", "log_every", pos, "log the loss every N steps")
    opt(g, "--save-every", "save_every", pos, "checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)")
    opt(g, "--keep", "keep", nonneg, "keep the newest N checkpoints (0: all)")
    opt(g, "--sample-every", "sample_every", nonneg, "write sample videos every N steps and at the end (0: never)")
    opt(g, "--sample-num", "sample_num", pos, "videos per sample grid")
    opt(g, "--sample-steps", "sample_steps", pos, "sampler steps for those")
    opt(g, "--sampler", "sampler", str, "sampler for those", choices=SAMPLERS)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bar: a plain progress line every --progress-every seconds (also when stderr "
                   "is not a terminal)")
    opt(g, "--progress-every", "progress_every", num(positive=True), "seconds between plain progress lines",
        metavar="SECONDS")


def given_options(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields this command line set."""
    return {f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {name: getattr(args, name) for name in given_options(args)}
    if "overrides" in given:
        given["overrides"] = dict(given["overrides"])
    return TrainConfig(**given)


def run_from_args(args: argparse.Namespace) -> int:
    """Train; the exit status: 0, 130/143 after SIGINT/SIGTERM (saved), 1 for a run that diverged or lost a peer.
    User errors propagate as ValueError/TypeError/FileNotFoundError (one line and exit 2 from the caller)."""
    try:
        result = train(config_from_args(args), given=given_options(args))
    except (TrainingDiverged, DistributedTimeout) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return RUN_FAILED
    return result["interrupted"]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m vdm_fast.train", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_guarded(p.prog, lambda: run_from_args(args))
