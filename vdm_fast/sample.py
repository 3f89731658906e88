"""Sampling from a trained run: `vdm-fast sample --run runs/demo --num 4 --frames 16 --out samples.mp4`.

Loads the run's latest checkpoint (EMA weights by default), draws `num` videos with the chosen sampler, optionally
extends them autoregressively (--extend-to 64: windows of the training length, each conditioned on the frames so far
by reconstruction guidance), and writes one file: mp4/webm (a grid when num > 1), gif, or a frame-strip png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vdm_fast import checkpoint as ckpt


def load_run(run, *, ema: bool = True, device: str | torch.device = "auto"):
    """(diffusion, config) from a run directory or a checkpoint directory; the EMA weights when `ema` and saved."""
    from vdm_fast.diffusion import GaussianDiffusion
    from vdm_fast.model import Unet3D

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    c = ckpt.load(run, map_location="cpu", parts=("model", "ema"))
    model = Unet3D.from_config(c.config["model"])
    if ema and c.ema is None:
        print(f"{c.path}: no EMA weights saved, using the raw weights", file=sys.stderr)
    model.load_state_dict(c.ema if ema and c.ema is not None else c.model)
    model = model.to(dev).eval().requires_grad_(False)
    config = dict(c.config, step=c.step, path=str(c.path))
    return GaussianDiffusion(model, prediction=c.config["diffusion"]["prediction"]), config


def class_cond(labels, num: int, num_classes: int, device) -> torch.Tensor | None:
    """One-hot conditioning vectors: `labels` (ints, repeated to `num`), default 0, 1, 2, ... modulo num_classes."""
    if num_classes <= 0:
        if labels:
            raise ValueError("--label: this model was not trained with --class-cond")
        return None
    labels = list(labels) if labels else list(range(num))
    labels = [labels[i % len(labels)] for i in range(num)]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--label must be in [0, {num_classes}), got {bad[0]}")
    return F.one_hot(torch.tensor(labels), num_classes).float().to(device)


@torch.no_grad()
def generate(diffusion, shape, *, steps: int = 64, sampler: str = "ancestral", guidance: float = 0.0,
             labels=None, num_classes: int = 0, seed: int = 0, extend_to: int | None = None,
             window: int | None = None, overlap: int | None = None, corrector_steps: int | None = None,
             w_r: float | None = None, progress: bool = True) -> torch.Tensor:
    """(B, C, T, H, W) samples in [-1, 1]; with extend_to, extended autoregressively to that many frames."""
    model = diffusion.model
    dev = next(model.parameters()).device
    cond = class_cond(labels, shape[0], num_classes, dev)
    if guidance and cond is None:
        raise ValueError("--guidance needs a class-conditional model (trained with --class-cond)")
    kw = dict(steps=steps, sampler=sampler, generator=torch.Generator(dev).manual_seed(seed), progress=progress)
    if cond is not None:
        kw.update(cond=cond, guidance_weight=guidance)
    if sampler == "pc":
        kw["corrector_steps"] = corrector_steps or 1
    video = diffusion.sample(tuple(shape), **kw)
    if extend_to:
        if w_r is not None:
            kw["w_r"] = w_r
        video = diffusion.extend(video, extend_to, window=window or shape[2], overlap=overlap, **kw)
    return video


def write_outputs(videos: torch.Tensor, out, *, fps: float = 8, strip: bool | str | Path = False) -> list[Path]:
    """Write `videos` to `out` (by suffix) and, with `strip`, a frame-strip PNG (True: beside out, same stem)."""
    from vdm_fast import video_io

    out = Path(out)
    written = [video_io.write_video(out, videos, fps=fps)]
    if strip:
        path = out.with_suffix(".png") if strip is True else Path(strip)
        if path != out:
            written.append(video_io.write_frame_strip(path, videos, max_frames=16))
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", default="samples.mp4", help="output: .mp4/.webm (imageio-ffmpeg), .gif or .png strip "
                   "(default: samples.mp4)")
    p.add_argument("--num", type=int, default=4, help="videos to draw; several are tiled into a grid (default: 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: the training frames)")
    p.add_argument("--resolution", type=int, default=None, help="frame size (default: the training size)")
    p.add_argument("--sampler", default="ancestral", choices=("ancestral", "ddim", "pc"))
    p.add_argument("--steps", type=int, default=128, help="sampler steps (default: 128)")
    p.add_argument("--corrector-steps", type=int, default=None, help="Langevin steps per step for --sampler pc "
                   "(default: 1)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (class-conditional "
                   "models; default: 0)")
    p.add_argument("--label", type=int, action="append", default=None,
                   help="class label(s) for class-conditional models, repeated over the videos (default: 0, 1, ...)")
    p.add_argument("--extend-to", type=int, default=None, help="extend autoregressively to this many frames")
    p.add_argument("--window", type=int, default=None, help="frames per extension window (default: --frames)")
    p.add_argument("--overlap", type=int, default=None, help="frames each window conditions on (default: half)")
    p.add_argument("--w-r", type=float, default=None, help="reconstruction guidance weight for --extend-to")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: yes, when saved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's default)")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--strip", default=None, help="also write a frame-strip PNG here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    diffusion, config = load_run(args.run, ema=args.ema, device=args.device)
    mc, data = config["model"], config.get("data", {})
    frames = args.frames or data.get("frames") or mc["num_frames"]
    size = args.resolution or data.get("resolution") or mc["image_size"]
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.extend_to is not None and args.extend_to <= frames:
        raise ValueError(f"--extend-to ({args.extend_to}) must exceed --frames ({frames})")
    shape = (args.num, mc["in_channels"], frames, size, size)
    print(f"sampling {args.num} x {frames} frames of {size}x{size} from {config['path']} (step {config['step']}, "
          f"{'EMA' if args.ema else 'raw'} weights), {args.sampler} sampler, {args.steps} steps"
          + (f", extended to {args.extend_to} frames" if args.extend_to else ""), file=sys.stderr)
    videos = generate(diffusion, shape, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                      labels=args.label, num_classes=data.get("num_classes", 0), seed=args.seed,
                      extend_to=args.extend_to, window=args.window, overlap=args.overlap,
                      corrector_steps=args.corrector_steps, w_r=args.w_r, progress=args.progress)
    for path in write_outputs(videos, args.out, fps=args.fps, strip=args.strip or False):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vdm_fast.sample", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
