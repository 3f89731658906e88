"""Sampling from a trained run: `vdm-fast sample --run runs/demo --num 4 --out samples.gif`.

Loads the run's latest checkpoint (EMA weights by default), draws `num` videos with the chosen sampler, optionally
extends them autoregressively (--extend-to 64: windows of the training length, each conditioned on the frames so far
by reconstruction guidance), and writes one file: gif, a frame-strip png, or mp4/webm (the `video` extra); a grid
when num > 1. Every option is checked, and the output path proved writable, before the checkpoint is loaded or a
step is sampled; each error is one line naming the option and what it allows.

From Python: `diffusion, config = load_run("runs/demo")`, then `generate(diffusion, shape, ...)` or
`diffusion.sample(shape, ...)`, and `write_outputs(videos, "out.gif")`.

Over several processes (`torchrun --nproc_per_node=N -m vdm_fast.sample --frame-parallel ...`), with the grid of
vdm_fast.parallel.mesh: --frame-parallel splits each video's frames over a group of K = --frame-parallel-size
processes (default: all; `frame_parallel`), and the world / K groups split the batch of every model call (the videos
and the two guidance branches; `batch_parallel`); --cfg-parallel puts the conditional and unconditional branches on
two processes (or two groups of K). Every process loads the checkpoint and runs the whole sampling loop with the same
generator seed, so all draw the same noise and hold the same videos, equal to one process's to fp32 rounding; only
rank 0 checks and writes the outputs and prints. On CUDA each rank captures one step in a CUDA graph (NCCL
collectives are capturable) and the ranks agree after the capture attempt (`all_ranks_ok` of the parallel wrappers):
every rank replays, or, if any capture failed, every rank finishes eagerly, so the collectives stay paired.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vdm_fast import checkpoint as ckpt
from vdm_fast import video_io
from vdm_fast._cli import Parser, check_device, finite_float, nonneg_int, positive_int, run_guarded
from vdm_fast.diffusion import SAMPLERS
from vdm_fast.ops.temporal_attention import MAX_T
from vdm_fast.parallel import batch_parallel, frame_parallel, mesh

STRIP_FRAMES = 16  # a README-sized strip; --strip-frames changes it
# What each sampler is, for --help; a sampler added to SAMPLERS without an entry here is listed by name.
SAMPLER_HELP = {
    "ancestral": "the paper's ancestral sampler (gamma 0.3)",
    "ddim": "deterministic DDIM (eta 0)",
    "pc": "predictor-corrector: ancestral + --corrector-steps Langevin steps",
    "dpmpp_2m": "DPM-Solver++(2M), deterministic, second order: good samples in few steps",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE, stochastic, second order",
    "dpmpp_3m": "DPM-Solver++(3M), deterministic, third order",
    "unipc": "UniPC-2, deterministic predictor-corrector with no extra model call",
}


def load_run(run, *, ema: bool = True, device: str | torch.device = "auto"):
    """(diffusion, config) from a run directory or a checkpoint directory; the EMA weights when `ema` and saved.
    config is the run's saved config plus `step` and `path` (the checkpoint read)."""
    from vdm_fast.diffusion import GaussianDiffusion
    from vdm_fast.model import Unet3D

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    c = ckpt.load(run, map_location="cpu", parts=("model", "ema") if ema else ("model",))  # --no-ema: no EMA read
    model = Unet3D.from_config(c.config["model"])
    if ema and c.ema is None:
        print(f"{c.path}: no EMA weights saved, using the raw weights", file=sys.stderr)
    model.load_state_dict(c.ema if ema and c.ema is not None else c.model)
    model = model.to(dev).eval().requires_grad_(False)
    config = dict(c.config, step=c.step, path=str(c.path), weights="EMA" if ema and c.ema is not None else "raw")
    return GaussianDiffusion(model, prediction=c.config["diffusion"]["prediction"]), config


def class_cond(labels, num: int, num_classes: int, device) -> torch.Tensor | None:
    """One-hot conditioning vectors: `labels` (ints, repeated to `num`), default 0, 1, 2, ... modulo num_classes."""
    if num_classes <= 0:
        if labels:
            raise ValueError("--label: this model was not trained with --class-cond")
        return None
    labels = list(labels) if labels else [i % num_classes for i in range(num)]
    labels = [labels[i % len(labels)] for i in range(num)]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--label must be in [0, {num_classes}), got {bad[0]}")
    return F.one_hot(torch.tensor(labels), num_classes).float().to(device)


@torch.no_grad()
def generate(diffusion, shape, *, steps: int = 64, sampler: str = "ancestral", guidance: float = 0.0,
             labels=None, num_classes: int = 0, seed: int = 0, extend_to: int | None = None,
             window: int | None = None, overlap: int | None = None, corrector_steps: int | None = None,
             w_r: float | None = None, progress: bool = True, cuda_graph: bool | None = None) -> torch.Tensor:
    """(B, C, T, H, W) samples in [-1, 1]; with extend_to, extended autoregressively to that many frames.
    cuda_graph: GaussianDiffusion.sample's (default: on for CUDA)."""
    model = diffusion.model
    dev = next(model.parameters()).device
    cond = class_cond(labels, shape[0], num_classes, dev)
    if guidance and cond is None:
        raise ValueError("--guidance needs a class-conditional model (trained with --class-cond)")
    kw = dict(steps=steps, sampler=sampler, generator=torch.Generator(dev).manual_seed(seed), progress=progress,
              cuda_graph=cuda_graph)
    if cond is not None:
        kw.update(cond=cond, guidance_weight=guidance)
    if sampler == "pc":
        kw["corrector_steps"] = 1 if corrector_steps is None else corrector_steps
    video = diffusion.sample(tuple(shape), **kw)
    if extend_to:
        if w_r is not None:
            kw["w_r"] = w_r
        video = diffusion.extend(video, extend_to, window=window or shape[2], overlap=overlap, **kw)
    return video


def write_outputs(videos: torch.Tensor, out, *, fps: float = 8, strip: bool | str | Path = False,
                  strip_frames: int | None = STRIP_FRAMES) -> list[Path]:
    """Write `videos` to `out` (by suffix) and, with `strip`, a frame-strip PNG (True: beside out, same stem) of at
    most `strip_frames` evenly spaced frames (None: all)."""
    out = Path(out)
    written = [video_io.write_video(out, videos, fps=fps)]
    if strip:
        path = out.with_suffix(".png") if strip is True else Path(strip)
        if path != out:
            written.append(video_io.write_frame_strip(path, videos, max_frames=strip_frames))
    return written


def _sampler_help() -> str:
    return "; ".join(f"{name}: {SAMPLER_HELP.get(name, name)}" for name in SAMPLERS)


def int_window(text: str) -> int:
    v = positive_int(text)
    if not 2 <= v <= MAX_T:
        raise argparse.ArgumentTypeError(f"must be in 2..{MAX_T}, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", default="samples.gif", help="output file, by extension: .gif, .png (a frame strip: one "
                   "row per video), or .mp4/.webm/.mkv/.mov/.avi (needs pip install \"vdm_fast[video]\") "
                   "(default: samples.gif)")
    p.add_argument("--num", type=positive_int, default=4, help="videos to draw; several are tiled into a grid "
                   "(default: 4)")
    p.add_argument("--frames", type=positive_int, default=None, help=f"frames per video, at most {MAX_T} in one "
                   "window; longer videos: --extend-to (default: the training frames)")
    p.add_argument("--resolution", type=positive_int, default=None, help="frame size (default: the training size)")
    p.add_argument("--sampler", default="ancestral", choices=SAMPLERS, metavar="{" + ",".join(SAMPLERS) + "}",
                   help=f"the sampling rule: {_sampler_help()} (default: ancestral)")
    p.add_argument("--steps", type=positive_int, default=128, help="sampler steps: more is slower and closer to the "
                   "model's distribution (default: 128)")
    p.add_argument("--corrector-steps", type=positive_int, default=None, help="Langevin steps after each step, "
                   "--sampler pc only (default: 1)")
    p.add_argument("--guidance", type=finite_float(minimum=0.0), default=0.0, help="classifier-free guidance "
                   "weight w >= 0 for class-conditional models: (1 + w) cond - w uncond (default: 0, none)")
    p.add_argument("--label", type=nonneg_int, action="append", default=None,
                   help="class label(s) for class-conditional models, repeated over the videos (default: 0, 1, ...)")
    p.add_argument("--extend-to", type=positive_int, default=None, help="extend autoregressively to this many frames "
                   "(more than --frames), window by window")
    p.add_argument("--window", type=int_window, default=None, help=f"frames per extension window, 2..{MAX_T} "
                   "(default: --frames)")
    p.add_argument("--overlap", type=positive_int, default=None, help="frames each window conditions on, fewer "
                   "than --window (default: half the window)")
    p.add_argument("--w-r", type=finite_float(minimum=0.0), default=None, help="reconstruction guidance weight for "
                   "--extend-to (default: the library's)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: yes, when saved)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (Inductor, the fast ops inside "
                   "as extern kernels): the first model calls compile, for minutes on a CPU; worth it for long runs "
                   "on a GPU. Not with --frame-parallel / --cfg-parallel")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of all the sampling noise: the same seed, "
                   "checkpoint and options give the same videos on the same device (default: 0)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if visible, else cpu), cpu, cuda or cuda:N "
                   "(default: auto)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads; on a small CPU machine 1 is "
                   "often fastest (default: 0, torch's default)")
    p.add_argument("--fps", type=finite_float(positive=True), default=8, help="frames per second of the written "
                   "video or gif (default: 8)")
    p.add_argument("--strip", default=None, help="also write a frame-strip PNG here (one row per video)")
    p.add_argument("--strip-frames", type=positive_int, default=STRIP_FRAMES, help="most frames in the strip, evenly "
                   f"spaced (default: {STRIP_FRAMES})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines "
                   "(a terminal gets a bar, a log a line every 10 s); the final line is printed either way")
    g = p.add_argument_group("several processes (torchrun --nproc_per_node=N -m vdm_fast.sample ...)")
    g.add_argument("--frame-parallel", action="store_true", help="split each video's frames over the processes "
                   "(or groups of --frame-parallel-size of them): videos too long or large for one GPU, exact; "
                   "every process loads the checkpoint, rank 0 writes")
    g.add_argument("--frame-parallel-size", type=positive_int, default=None, metavar="K", help="processes per video "
                   "with --frame-parallel; the world / K groups split each model call's batch (the videos and the "
                   "guidance branches) (default: all processes; with --cfg-parallel, half)")
    g.add_argument("--cfg-parallel", action="store_true", help="the conditional and unconditional branches of "
                   "--guidance on two processes (or two --frame-parallel groups), combined each step")


def check_parallel(args: argparse.Namespace) -> tuple[int, int]:
    """(K, R): processes per video and groups splitting the batch (1, 1 for one process), from the flags and
    torchrun's environment, before any process group exists."""
    world = mesh.env_world_size()
    flag = "--frame-parallel" if args.frame_parallel else "--cfg-parallel" if args.cfg_parallel else None
    if flag is not None and args.compile:
        raise ValueError(f"--compile with {flag}: the parallel wrappers' collectives are not traced by torch.compile "
                         "here; use one of the two")
    if args.frame_parallel_size is not None and not args.frame_parallel:
        raise ValueError("--frame-parallel-size is for --frame-parallel only")
    if flag is None:
        if world > 1:
            raise ValueError(f"{world} processes (torchrun) without --frame-parallel or --cfg-parallel would each draw "
                             "the same videos; add --frame-parallel (each video's frames split over them) or "
                             "--cfg-parallel (the guidance branches on two)")
        return 1, 1
    if not mesh.launched():
        raise ValueError(f"{flag} runs one sampling job over several processes: launch it with torchrun "
                         f"--nproc_per_node=N -m vdm_fast.sample {flag} ... (N processes, e.g. one per GPU)")
    if str(args.device).lower().startswith("cuda:") and world > 1:
        raise ValueError(f"--device {args.device}: with {flag} each process takes GPU LOCAL_RANK; use --device cuda "
                         "or auto (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if args.cfg_parallel and not args.guidance:
        raise ValueError("--cfg-parallel runs the two branches of classifier-free guidance on two processes: it needs "
                         "--guidance > 0")
    if not args.frame_parallel:
        if world != 2:
            raise ValueError(f"--cfg-parallel alone runs on 2 processes (one per branch), got {world}; add "
                             "--frame-parallel to split each branch's frames over more")
        return 1, 2
    if args.cfg_parallel and world % 2:
        raise ValueError(f"--cfg-parallel with --frame-parallel needs an even number of processes (two groups), "
                         f"got {world}")
    k = args.frame_parallel_size or (world // 2 if args.cfg_parallel else world)
    mesh.check_frame_size(k, world)
    if args.cfg_parallel and world != 2 * k:
        raise ValueError(f"--cfg-parallel with --frame-parallel-size {k} needs 2 x {k} processes, got {world}")
    return k, world // k


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the checkpoint is read: ValueError naming the option. The outputs are
    checked on the process that writes them (rank 0; the only one without torchrun)."""
    check_parallel(args)
    check_device(args.device)
    if mesh.env_rank() == 0:
        video_io.check_output(args.out, "--out")
    if args.strip:
        if Path(args.strip).suffix.lower() != ".png":
            raise ValueError(f"--strip {args.strip!r}: the frame strip is a .png file")
        if mesh.env_rank() == 0:
            video_io.check_output(args.strip, "--strip")
    if not Path(args.run).exists():
        raise FileNotFoundError(f"--run {args.run!r}: no such run or checkpoint directory")
    if args.frames is not None and args.frames > MAX_T:
        raise ValueError(f"--frames {args.frames}: one window holds at most {MAX_T} frames (temporal attention's "
                         f"limit); for a longer video sample a window and extend it, e.g. --frames 16 "
                         f"--extend-to {args.frames}")
    if args.corrector_steps is not None and args.sampler != "pc":
        raise ValueError(f"--corrector-steps is for --sampler pc only (got --sampler {args.sampler})")
    if args.extend_to is None:
        for name in ("window", "overlap", "w_r"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} is for --extend-to only")
    elif args.overlap is not None and args.window is not None and args.overlap >= args.window:
        raise ValueError(f"--overlap ({args.overlap}) must be fewer than --window ({args.window}) frames")


def check_run(args: argparse.Namespace, config: dict) -> tuple[int, int]:
    """What needs the run's config (read without its weights): (frames, size) after checking that the U-Net can
    halve the frame size, the window fits, --extend-to goes beyond the frames, and --label/--guidance fit."""
    mc, data = config["model"], config.get("data", {})
    frames = args.frames or data.get("frames") or mc["num_frames"]
    size = args.resolution or data.get("resolution") or mc["image_size"]
    mults = mc.get("channel_mults") or ()
    factor = 2 ** max(len(mults) - 1, 0)
    if size % factor:
        raise ValueError(f"--resolution {size}: must be a multiple of {factor} (this model halves the frame "
                         f"{len(mults) - 1} times)")
    window = args.window or frames
    if window > MAX_T:
        raise ValueError(f"--window {window}: at most {MAX_T} frames (temporal attention's limit)")
    if args.extend_to is not None and args.extend_to <= frames:
        raise ValueError(f"--extend-to ({args.extend_to}) must exceed --frames ({frames})")
    if args.extend_to is not None and args.overlap is not None and args.overlap >= window:
        raise ValueError(f"--overlap ({args.overlap}) must be fewer than the window's {window} frames")
    num_classes = data.get("num_classes", 0)
    class_cond(args.label, args.num, num_classes, "cpu")
    if args.guidance and not num_classes:
        raise ValueError("--guidance needs a class-conditional model (trained with --class-cond)")
    k, r = check_parallel(args)
    for what, t in (("--frames", frames), ("--window", window if args.extend_to else frames)):
        if t < k:
            raise ValueError(f"{what} {t}: fewer frames than the {k} processes that split each video "
                             f"(--frame-parallel{'-size' if args.frame_parallel_size else ''}); each needs a frame")
    branches = 2 if args.guidance else 1  # guidance: both branches in one model call
    if args.num * branches % r:
        raise ValueError(f"--num {args.num}: each model call's batch of {args.num * branches} does not split over the "
                         f"{r} process groups; use a multiple of {r // math.gcd(r, branches)}")
    return frames, size


def _device(requested: str, parallel: bool) -> str:
    """The device of this process: under torchrun, GPU LOCAL_RANK for auto/cuda on a CUDA machine."""
    if parallel and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return requested


def _parallelize(diffusion, args: argparse.Namespace, k: int, r: int) -> str:
    """diffusion's model wrapped for the grid (a collective: every process calls it); returns how, for the log."""
    layout = mesh.make_layout(k)
    model = diffusion.model
    if args.frame_parallel:
        model = frame_parallel(model, layout.frame_group)
    if r > 1:
        model = batch_parallel(model, layout.data_group)
    diffusion.model = model
    parts = ([f"frames over {k} processes"] if args.frame_parallel else []) + (
        [f"batch over {r} groups"] if r > 1 else [])
    return ", ".join(parts)


def run_from_args(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        saved = ckpt.load(args.run, parts=())  # config and step only: the weights load after every check
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--run {args.run!r}: {e}") from None
    frames, size = check_run(args, saved.config)
    k, r = check_parallel(args)
    parallel = args.frame_parallel or args.cfg_parallel
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = _device(args.device, parallel)
    created = parallel and not dist.is_initialized()
    if created:
        mesh.init_process_group(torch.device(device).type if device != "auto" else "cpu", timeout=1800.0)
    try:
        return _sample(args, frames, size, k, r, device, parallel)
    finally:
        if created:
            dist.destroy_process_group()


def _sample(args: argparse.Namespace, frames: int, size: int, k: int, r: int, device: str, parallel: bool) -> int:
    main = not parallel or dist.get_rank() == 0
    say = (lambda msg: print(msg, file=sys.stderr)) if main else (lambda msg: None)
    diffusion, config = load_run(args.run, ema=args.ema, device=device)
    how = _parallelize(diffusion, args, k, r) if parallel else ""
    if args.compile:
        # One run calls the model with one shape (extension windows: a second one), so the default (automatic
        # dynamic: a second shape recompiles once with its sizes symbolic) compiles once or twice. dynamic=True would
        # also make the layers' float attributes (eps) symbolic, which the ops' argument checks cannot take.
        diffusion.model = torch.compile(diffusion.model)
    mc, num_classes = config["model"], config.get("data", {}).get("num_classes", 0)
    dev = next(diffusion.model.parameters()).device
    shape = (args.num, mc["in_channels"], frames, size, size)
    threads = torch.get_num_threads()
    where = f"{dev}" + (f" x {dist.get_world_size()} processes ({how})" if parallel else "")
    say(f"sampling {args.num} x {frames} frames of {size}x{size} from {config['path']} (step {config['step']}, "
        f"{config['weights']} weights) on {where}, {threads} thread{'' if threads == 1 else 's'}, {args.sampler} "
        f"sampler, {args.steps} steps" + (f", extended to {args.extend_to} frames" if args.extend_to else ""))
    t0 = time.perf_counter()
    videos = generate(diffusion, shape, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                      labels=args.label, num_classes=num_classes, seed=args.seed,
                      extend_to=args.extend_to, window=args.window, overlap=args.overlap,
                      corrector_steps=args.corrector_steps, w_r=args.w_r, progress=args.progress and main,
                      cuda_graph=None)
    seconds = time.perf_counter() - t0
    if not main:
        return 0
    written = write_outputs(videos, args.out, fps=args.fps, strip=args.strip or False, strip_frames=args.strip_frames)
    total = videos.shape[2]
    if args.strip and total > args.strip_frames:
        say(f"{written[-1]}: the strip shows {args.strip_frames} of the {total} frames, evenly spaced "
            f"(--strip-frames {total} shows all)")
    say(f"sampled {args.num} video{'' if args.num == 1 else 's'} of {total} frames in {seconds:.1f} s; wrote "
        f"{', '.join(map(str, written))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m vdm_fast.sample", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_guarded(p.prog, lambda: run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
