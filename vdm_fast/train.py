"""The trainer: a Unet3D with GaussianDiffusion, on one device or many (DDP), resumable exactly.

    vdm-fast train --preset tiny --data bouncing --steps 2000 --out runs/demo
    python -m vdm_fast.train ...                                    (the same options)
    torchrun --nproc_per_node=8 -m vdm_fast.train ...               (DDP: NCCL on GPUs, gloo on CPU)

--batch-size is the global batch, split over the processes: the same command trains the same model on 1 or 8 GPUs
(to fp32 rounding). Every random draw of an example (clip, images, noise, t, guidance drop) comes from (seed, example
index) and the examples of a step from (seed, step), so the data never depends on worker processes or ranks, and
--resume continues the exact loss trajectory (model, EMA, optimizer, step and RNG states are all saved).
Only rank 0 writes checkpoints, samples, the log and the loss curve.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vdm_fast import checkpoint as ckpt
from vdm_fast.data import GlobalBatchSampler, TrainingItems, make_dataset, make_image_source


@dataclass
class TrainConfig:
    out: str = "runs/demo"
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # Unet3DConfig fields over the preset's
    prediction: str = "v"
    data: str = "bouncing"
    frames: int | None = None  # None: the preset's num_frames
    resolution: int | None = None  # None: the preset's image_size
    frameskip: int = 1
    channels: int = 3
    skip_short: bool = False
    image_frames: int = 0  # joint training: K independent images after the video frames
    image_data: str | None = None  # folder of images for them (default: frames of other training videos)
    class_cond: bool = False  # condition on the dataset's label (bouncing: the shape kind)
    cond_drop_prob: float = 0.1  # classifier-free guidance: drop the label this often (with class_cond)
    batch_size: int = 8  # global, split over processes
    steps: int = 2000
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0: off
    ema_decay: float = 0.999  # 0: no EMA
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    workers: int = 2
    threads: int = 0  # torch CPU threads per process (0: torch's default)
    device: str = "auto"
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    sample_every: int = 500  # 0: never (also at the end when > 0)
    sample_num: int = 4
    sample_steps: int = 64
    sampler: str = "ancestral"
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for name in ("batch_size", "steps", "frameskip", "log_every", "save_every", "sample_num", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# Options that define the model or the data layout: a resumed run must keep them.
FIXED_ON_RESUME = ("preset", "overrides", "prediction", "frames", "resolution", "channels", "image_frames",
                   "class_cond")
# Options that name this invocation: never taken from the saved config.
PER_INVOCATION = ("out", "resume")


# ------------------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); single process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if device_kind == "cuda":  # NCCL wants each process on its own GPU before the group forms
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def pick_device(cfg: TrainConfig, d: Dist | None = None) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but no CUDA GPU is visible")
        local = d.local_rank if d is not None else 0
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(kind)


# ---------------------------------------------------------------------------------------------------------------- EMA
class EMA:
    """An exponential moving average copy of a model, decay warmed up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [p for p in self.module.state_dict().values() if p.is_floating_point()]
        new = [p for p in model.state_dict().values() if p.is_floating_point()]
        torch._foreach_lerp_(ema, new, 1.0 - d)


# ------------------------------------------------------------------------------------------------------------ helpers
def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then constant (step = optimizer steps done)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def layout(cfg: TrainConfig) -> tuple[int, int]:
    """(frames, resolution) of the training clips: the options, else the overrides, else the preset's."""
    from vdm_fast.model import preset_config

    base = preset_config(cfg.preset)
    frames = cfg.frames or cfg.overrides.get("num_frames") or base.num_frames
    return frames, cfg.resolution or cfg.overrides.get("image_size") or base.image_size


def build_model(cfg: TrainConfig, num_classes: int):
    from vdm_fast.model import Unet3D

    overrides = dict(cfg.overrides)
    overrides["num_frames"], overrides["image_size"] = layout(cfg)
    overrides.setdefault("in_channels", cfg.channels)
    if cfg.class_cond:
        if num_classes < 1:
            raise ValueError(f"--class-cond: the data {cfg.data!r} has no labels")
        overrides["cond_dim"] = num_classes
    return Unet3D.preset(cfg.preset, **overrides)


def make_diffusion(model, prediction: str):
    from vdm_fast.diffusion import GaussianDiffusion

    return GaussianDiffusion(model, prediction=prediction)


def run_config(cfg: TrainConfig, model, num_classes: int) -> dict:
    """What checkpoints store as config.json: enough to rebuild and sample the model, and to resume."""
    return {"model": model.config.to_dict(), "diffusion": {"prediction": cfg.prediction},
            "data": {"num_classes": num_classes if cfg.class_cond else 0, "frames": model.config.num_frames,
                     "resolution": model.config.image_size, "channels": cfg.channels},
            "train": dataclasses.asdict(cfg)}


def autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Loss curve PNG from the log (raw and smoothed, log scale). False (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('loss curve skipped: matplotlib is not installed (pip install "vdm_fast[plot]")', file=sys.stderr)
        return False
    rows = read_log(log_path)
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
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


def read_log(log_path: Path) -> list[dict]:
    if not log_path.is_file():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def truncate_log(log_path: Path, step: int) -> None:
    """Drop entries after `step` (a resume from an older checkpoint replays them)."""
    rows = [r for r in read_log(log_path) if r["step"] <= step]
    ckpt.write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in rows))


def gather_rng(d: Dist) -> dict:
    """Every rank's RNG states, keyed by rank (a collective: all ranks call it)."""
    mine = ckpt.rng_state()
    if d.world_size == 1:
        return {"0": mine}
    out = [None] * d.world_size
    dist.all_gather_object(out, mine)
    return {str(r): s for r, s in enumerate(out)}


# ------------------------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.out = Path(cfg.out)
        # First of all: a resumed run's options are the saved ones (with those given on top), so nothing below may
        # read `cfg` before this.
        self.cfg = cfg
        self.resume_from = self._resume_checkpoint()
        cfg = self.cfg
        self.device_kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) \
            else cfg.device
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.d = setup_distributed(self.device_kind)
        self.device = pick_device(cfg, self.d)
        if cfg.batch_size % self.d.world_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                             f"({self.d.world_size}): it is the global batch")
        self.local_batch = cfg.batch_size // self.d.world_size

        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        frames, size = layout(cfg)
        videos = make_dataset(cfg.data, size=size, frames=frames, frameskip=cfg.frameskip, seed=cfg.seed,
                              channels=cfg.channels, skip_short=cfg.skip_short)
        self.num_classes = getattr(videos, "num_classes", 0)
        images = make_image_source(cfg.image_data, videos, size) if cfg.image_frames else None
        self.items = TrainingItems(videos, image_frames=cfg.image_frames, images=images, seed=cfg.seed)
        self.model = build_model(cfg, self.num_classes).to(self.device)
        self.frames = self.model.config.num_frames
        self.diffusion = make_diffusion(self.model, cfg.prediction)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step, self._last_plot = 0, time.time()
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.train_module = self.diffusion
        if self.d.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DDP(self.diffusion, device_ids=ids)

    # ---- resume ---------------------------------------------------------------------------------------------------
    def _resume_checkpoint(self) -> Path | None:
        cfg = self.cfg
        has = ckpt.exists(self.out)
        if not cfg.resume:
            if has:
                raise FileExistsError(f"{str(self.out)!r} already holds checkpoints: pass --resume to continue that "
                                      "run, or choose another --out")
            return None
        if not has:
            if int(os.environ.get("RANK", "0")) == 0:  # before the process group exists
                print(f"--resume: no checkpoint in {str(self.out)!r} yet, starting from step 0", file=sys.stderr)
            return None
        path = ckpt.find(self.out)
        saved = ckpt.load(path, parts=()).config["train"]
        self.cfg = merge_resumed(saved, cfg, getattr(cfg, "_given", None))
        return path

    def _load(self, path: Path) -> None:
        c = ckpt.load(path, map_location=self.device)
        self.model.load_state_dict(c.model)
        if self.ema is not None:
            self.ema.module.load_state_dict(c.ema if c.ema is not None else c.model)
            self.ema.updates = int(c.state.get("ema_updates", c.step))
        if c.optimizer is not None:
            self.optimizer.load_state_dict(c.optimizer)
        self.step = c.step
        rngs = c.state.get("rng", {})
        saved_world = int(c.state.get("world_size", 1))
        key = str(self.d.rank if saved_world == self.d.world_size else self.d.rank % max(1, saved_world))
        if key in rngs:
            ckpt.set_rng_state(rngs[key])
        if saved_world != self.d.world_size and self.d.main:
            print(f"resuming a {saved_world}-process run on {self.d.world_size}: the data stream continues but the "
                  "trajectory is no longer bitwise that of an uninterrupted run", file=sys.stderr)
        if self.d.main:
            truncate_log(self.out / "log.jsonl", self.step)
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    # ---- saving ---------------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        rng = gather_rng(self.d)  # collective: every rank takes part
        if not self.d.main:
            return None
        state = {"rng": rng, "world_size": self.d.world_size, "ema_updates": self.ema.updates if self.ema else 0,
                 "sampler": {"seed": self.cfg.seed, "next_step": self.step, "global_batch": self.cfg.batch_size}}
        path = ckpt.save(self.out, self.step, config=run_config(self.cfg, self.model, self.num_classes),
                         model=self.model.state_dict(), ema=self.ema.module.state_dict() if self.ema else None,
                         optimizer=self.optimizer.state_dict(), state=state, keep=self.cfg.keep)
        if self.step >= self.cfg.steps or time.time() - self._last_plot > 60:  # matplotlib takes ~1 s: not too often
            plot_losses(self.out / "log.jsonl", self.out / "loss.png")
            self._last_plot = time.time()
        return path

    def write_samples(self) -> None:
        from vdm_fast import sample as sampling

        module = self.ema.module if self.ema else self.model
        diffusion = make_diffusion(module, self.cfg.prediction)
        c = self.model.config
        shape = (self.cfg.sample_num, c.in_channels, self.frames, c.image_size, c.image_size)
        # fp32, no autocast: the sampler may capture CUDA graphs, and these few videos are cheap anyway.
        videos = sampling.generate(diffusion, shape, steps=self.cfg.sample_steps, sampler=self.cfg.sampler,
                                   num_classes=self.num_classes if self.cfg.class_cond else 0, seed=self.cfg.seed,
                                   progress=False)
        try:
            sampling.write_outputs(videos, self.out / "samples" / f"step_{self.step:08d}.gif", strip=True)
        except ImportError as e:  # no pillow: keep training, say why there are no sample files
            print(f"samples not written: {e}", file=sys.stderr)

    # ---- the loop -------------------------------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.items), self.local_batch, rank=self.d.rank,
                                     world_size=self.d.world_size, start_step=self.step, seed=self.cfg.seed,
                                     infinite=self.items.infinite)
        w = self.cfg.workers
        # Its own generator: creating an iterator draws a worker base seed, which must not advance the global RNG
        # (that would shift dropout after a resume). The examples themselves never depend on it.
        return DataLoader(self.items, batch_sampler=sampler, num_workers=w, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if w > 0 else None,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def train_step(self, batch: dict) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        x = batch["video"].to(dev, non_blocking=True)
        noise = batch["noise"].to(dev, non_blocking=True)
        t = batch["t_u"].to(dev, non_blocking=True)
        kw = {}
        if cfg.class_cond:
            kw["cond"] = F.one_hot(batch["label"].long(), self.num_classes).float().to(dev)
            kw["cond_mask"] = (batch["drop_u"] >= cfg.cond_drop_prob).to(dev)
        if cfg.image_frames:
            kw["num_video_frames"] = self.frames
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        with autocast(cfg, dev):
            loss = self.train_module(x, cond_drop_prob=0.0, t=t, noise=noise, **kw)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return loss.detach()

    def _flush(self, pending: list[tuple[int, torch.Tensor]], log, t_start: float) -> list[tuple[int, float]]:
        """Mean the pending losses over ranks (one collective for several steps) and log them on rank 0."""
        if not pending:
            return []
        losses = torch.stack([loss.float() for _, loss in pending])
        if self.d.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.d.world_size
        rows = [(s, v) for (s, _), v in zip(pending, losses.tolist())]
        if log is not None:
            now = time.time() - t_start
            for s, v in rows:
                log.write(json.dumps({"step": s, "loss": v, "lr": lr_at(self.cfg, s - 1), "time": round(now, 3)})
                          + "\n")
            log.flush()
        pending.clear()
        return rows

    def run(self) -> dict:
        cfg = self.cfg
        main = self.d.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            print(self.describe(), file=sys.stderr)
        if self.step >= cfg.steps:
            if main:
                print(f"already at step {self.step} >= --steps {cfg.steps}: nothing to do", file=sys.stderr)
            return {"losses": [], "step": self.step, "out": str(self.out)}
        log = open(self.out / "log.jsonl", "a") if main else None
        bar = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        history: list[tuple[int, float]] = []
        pending: list[tuple[int, torch.Tensor]] = []
        t_start, t_last, steps_last = time.time(), time.time(), self.step
        try:
            it = iter(self.loader())
            self.train_module.train()
            while self.step < cfg.steps:
                loss = self.train_step(next(it))
                pending.append((self.step, loss))
                done = self.step >= cfg.steps
                if self.step % cfg.log_every == 0 or done or self.step % cfg.save_every == 0:
                    rows = self._flush(pending, log, t_start)
                    history += rows
                    if bar is not None:
                        now = time.time()
                        rate = (self.step - steps_last) / max(now - t_last, 1e-9)
                        t_last, steps_last = now, self.step
                        bar.set_postfix(loss=f"{rows[-1][1]:.4f}", ex_s=f"{rate * cfg.batch_size:.1f}", refresh=False)
                        bar.update(self.step - bar.n)
                if self.step % cfg.save_every == 0 or done:
                    self.save()
                if main and cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                    self.write_samples()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if main:
            elapsed = time.time() - t_start
            last = history[-1][1] if history else float("nan")
            print(f"done: step {self.step}, loss {last:.4f}, {elapsed:.1f} s; checkpoints in "
                  f"{self.out / 'checkpoints'}", file=sys.stderr)
        return {"losses": history, "step": self.step, "out": str(self.out)}

    def describe(self) -> str:
        c, cfg = self.model.config, self.cfg
        n = self.model.parameter_count()
        return (f"vdm-fast train: {cfg.preset} Unet3D ({n / 1e6:.2f} M parameters, base {c.base_channels}, mults "
                f"{list(c.channel_mults)}), {cfg.prediction}-prediction, data {cfg.data}: {self.frames} frames"
                f"{f' + {cfg.image_frames} images' if cfg.image_frames else ''} of {c.image_size}x{c.image_size}, "
                f"batch {cfg.batch_size} over {self.d.world_size} process(es) on {self.device}, "
                f"{cfg.steps} steps from {self.step}, out {self.out}")

    def close(self) -> None:
        if self.d.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def merge_resumed(saved: dict, cfg: TrainConfig, given: set[str] | None) -> TrainConfig:
    """The config of a resumed run: the saved one, with the options given on this command line on top (all of cfg's
    when `given` is None, as in `train(TrainConfig(..., resume=True))`). Options that define the model or the data
    layout must not change."""
    given = set(f.name for f in dataclasses.fields(TrainConfig)) if given is None else set(given)
    merged = dict(saved)
    for f in dataclasses.fields(TrainConfig):
        new = getattr(cfg, f.name)
        if f.name in PER_INVOCATION:
            merged[f.name] = new
        elif f.name in given:
            old = saved.get(f.name)
            if f.name in FIXED_ON_RESUME and _norm(old) != _norm(new):
                raise ValueError(f"--resume: {f.name} was {old!r} in the saved run, got {new!r}; a resumed run keeps "
                                 "its model and data layout")
            merged[f.name] = new
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in merged.items() if k in known})


def _norm(v):
    return json.loads(json.dumps(v))


def train(cfg: TrainConfig) -> dict:
    """Train per `cfg`; returns {"losses": [(step, loss), ...], "step": n, "out": dir} (losses on every rank)."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()


# ------------------------------------------------------------------------------------------------------ command line
def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (a Unet3DConfig field), got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), _literal(v.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train options. Defaults are SUPPRESSed so that `config_from_args` knows which were given (--resume keeps
    the saved value of the others); help shows TrainConfig's defaults."""
    D = TrainConfig()
    S = argparse.SUPPRESS

    def opt(g, flag, name, type_, help_, **kw):
        g.add_argument(flag, dest=name, type=type_, default=S, help=f"{help_} (default: {getattr(D, name)})", **kw)

    def flag(g, name_, name, help_, **kw):
        g.add_argument(name_, dest=name, action="store_true", default=S, help=help_, **kw)

    g = p.add_argument_group("model")
    opt(g, "--preset", "preset", str, "Unet3D preset (tiny for CPU; ucf101, bair, kinetics, text-small, sr-9x128)")
    g.add_argument("--set", dest="overrides", action="append", type=_override, default=S, metavar="KEY=VALUE",
                   help="override a Unet3DConfig field, e.g. --set base_channels=16 --set channel_mults=1,2")
    opt(g, "--prediction", "prediction", str, "what the network predicts", choices=("eps", "v", "x"))
    g = p.add_argument_group("data")
    opt(g, "--data", "data", str, "'bouncing' (generated on the fly) or a folder of videos / directories of frames")
    opt(g, "--frames", "frames", int, "frames per clip (None: the preset's)")
    opt(g, "--resolution", "resolution", int, "frame size (None: the preset's)")
    opt(g, "--frameskip", "frameskip", int, "take every k-th frame of the source")
    opt(g, "--channels", "channels", int, "1 or 3 (bouncing only)")
    flag(g, "--skip-short", "skip_short", "skip videos shorter than a clip instead of failing")
    opt(g, "--image-frames", "image_frames", int, "joint image-video training: K independent images per video")
    opt(g, "--image-data", "image_data", str, "folder of images for --image-frames (None: frames of the data)")
    flag(g, "--class-cond", "class_cond", "condition on the data's label (bouncing: the shape kind), for guidance")
    opt(g, "--cond-drop-prob", "cond_drop_prob", float, "probability of dropping the label in training (CFG)")
    g = p.add_argument_group("optimisation")
    opt(g, "--batch-size", "batch_size", int, "global batch, split over processes")
    opt(g, "--steps", "steps", int, "train until this many optimizer steps")
    opt(g, "--lr", "lr", float, "AdamW learning rate after warmup")
    opt(g, "--warmup-steps", "warmup_steps", int, "linear learning-rate warmup")
    opt(g, "--weight-decay", "weight_decay", float, "AdamW weight decay")
    opt(g, "--betas", "betas", lambda s: tuple(float(v) for v in s.split(",")), "AdamW betas, e.g. 0.9,0.99")
    opt(g, "--grad-clip", "grad_clip", float, "clip the gradient norm to this (0: off)")
    opt(g, "--ema-decay", "ema_decay", float, "EMA of the weights (0: off)")
    opt(g, "--precision", "precision", str, "bf16 autocast (auto: on CUDA only)", choices=("auto", "fp32", "bf16"))
    opt(g, "--seed", "seed", int, "seed of the weights and of the data stream")
    g = p.add_argument_group("run")
    opt(g, "--out", "out", str, "run directory (checkpoints/, log.jsonl, loss.png, samples/)")
    flag(g, "--resume", "resume", "continue the run in --out from its latest checkpoint, exactly")
    opt(g, "--workers", "workers", int, "DataLoader worker processes")
    opt(g, "--device", "device", str, "auto, cpu, cuda")
    opt(g, "--threads", "threads", int, "torch CPU threads per process (0: torch's default)")
    opt(g, "--log-every", "log_every", int, "log the loss every N steps")
    opt(g, "--save-every", "save_every", int, "checkpoint every N steps (and at the end)")
    opt(g, "--keep", "keep", int, "keep the newest N checkpoints (0: all)")
    opt(g, "--sample-every", "sample_every", int, "write sample videos every N steps and at the end (0: never)")
    opt(g, "--sample-num", "sample_num", int, "videos per sample grid")
    opt(g, "--sample-steps", "sample_steps", int, "sampler steps for those")
    opt(g, "--sampler", "sampler", str, "sampler for those", choices=("ancestral", "ddim", "pc"))
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "overrides" in given:
        given["overrides"] = dict(given["overrides"])
    cfg = TrainConfig(**given)
    cfg._given = set(given)  # which options the command line set (merge_resumed reads it)
    return cfg


def run_from_args(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vdm_fast.train", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TrainConfig", "Trainer", "EMA", "train", "add_arguments", "config_from_args", "main", "lr_at",
           "plot_losses"]
