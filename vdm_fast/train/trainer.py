"""The trainer: a Unet3D with GaussianDiffusion, on one device or many (DDP), resumable exactly.

--batch-size is the global batch, split over the processes (and over --grad-accum micro-steps): the same command
trains the same model on 1 or 8 GPUs (to fp32 rounding). Every random draw of an example comes from (seed, example
index) and the examples of a step from (seed, step) (vdm_fast.data.stream), so the data never depends on worker
processes or ranks, and --resume continues the exact loss trajectory (train.resume saves everything it needs).
Only rank 0 writes checkpoints, samples, the log and the loss curve.

What keeps a run's work (issue 21): a step with a non-finite loss or gradient norm is skipped (train.step) and, after
--max-nonfinite-steps in a row, the run stops with `TrainingDiverged` before it writes anything (checkpoints are
never written with non-finite tensors, and pruning keeps the newest); SIGINT / SIGTERM finish the step, save and
exit 130 / 143 (train.interrupts); unreadable clips are replaced or name their file (`--skip-bad-data`); a frozen
DDP rank ends the job after --ddp-timeout (train.distributed).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Collection
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from vdm_fast import run_dir
from vdm_fast._cli import check_device, say
from vdm_fast.data import GlobalBatchSampler, TrainingItems, make_dataset, make_image_source
from vdm_fast.diffusion import GaussianDiffusion
from vdm_fast.model import Unet3D
from vdm_fast.train import distributed, frame_parallel, fsdp, graph, resume
from vdm_fast.train.config import TrainConfig, layout, model_config
from vdm_fast.train.ema import EMA
from vdm_fast.train.interrupts import StopSignals, ignore_in_workers
from vdm_fast.train.logs import LOSS_PNG, plot_losses, progress
from vdm_fast.train.monitor import Monitor, TrainingDiverged
from vdm_fast.train.samples import write_samples
from vdm_fast.train.step import TrainStep, make_scaler


class Trainer:
    """`Trainer(cfg, given=...)`: `given` names the options this invocation set (the others of a resumed run are the
    saved ones); None: all of cfg's. `run()` trains; `close()` releases the process group and the run folder."""

    def __init__(self, cfg: TrainConfig, *, given: Collection[str] | None = None):
        self.out, self.cfg, self.d = Path(cfg.out), cfg, distributed.Dist()
        self.lock = self.log = None
        try:
            self._setup(given)
        except BaseException:
            self.close(clean=False)
            raise

    def _setup(self, given) -> None:
        main = int(os.environ.get("RANK", "0")) == 0  # before the process group exists
        check_device(self.cfg.device)  # before the run folder is claimed (pick_device checks the resumed one)
        if main:
            self.lock = resume.claim(self.out)
        resume.prepare_new_run(self.out, self.cfg, main=main)
        # A resumed run's options are the saved ones (with those given on top): nothing below may read cfg before.
        self.cfg, self.resume_from = resume.resolve(self.out, self.cfg, given, main=main)
        cfg = self.cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.fsdp:
            fsdp.fully_shard_fn()  # this torch has FSDP2, else one line naming --fsdp
        frame_parallel.check_launch(cfg)
        self.d = distributed.setup_distributed(distributed.device_kind(cfg.device), cfg.ddp_timeout,
                                               group_of_one=cfg.fsdp or cfg.frame_parallel)
        grid = frame_parallel.setup(cfg, self.d) if cfg.frame_parallel else None  # d's data shard: the replica's
        self.device = distributed.pick_device(cfg.device, self.d)
        if cfg.cuda_graph:
            graph.check(cfg, self.device, self.d.world_size)  # one line naming --cuda-graph where it cannot run
        if cfg.batch_size % (self.d.data_world * cfg.grad_accum):
            raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of "
                             f"{'replicas' if grid else 'processes'} ({self.d.data_world}) times --grad-accum "
                             f"({cfg.grad_accum}): it is the global batch")
        self.local_batch = cfg.batch_size // self.d.data_world

        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        frames, size = layout(cfg)
        videos = make_dataset(cfg.data, size=size, frames=frames, frameskip=cfg.frameskip, seed=cfg.seed,
                              channels=cfg.channels, skip_short=cfg.skip_short, skip_bad=cfg.skip_bad_data)
        self.num_classes = getattr(videos, "num_classes", 0)
        images = make_image_source(cfg.image_data, videos, size, skip_bad=cfg.skip_bad_data) \
            if cfg.image_frames else None
        self.items = TrainingItems(videos, image_frames=cfg.image_frames, images=images, seed=cfg.seed,
                                   skip_bad=cfg.skip_bad_data)
        self.model = Unet3D(model_config(cfg, self.num_classes)).to(self.device)
        self.frames = self.model.config.num_frames
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if cfg.fsdp:  # in place, before the optimizer is built over the (now sharded) parameters
            fsdp.shard(self.model, self.device)
            if self.ema is not None:
                fsdp.shard(self.ema.module, self.device)
        self.diffusion = GaussianDiffusion(self.model, prediction=cfg.prediction)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.scaler = make_scaler(cfg, self.device)
        self.step, self.time_offset = 0, 0.0
        self.monitor = Monitor(cfg, self.d, self.out)
        self._t0, self._last_plot = time.time(), time.time()
        if self.resume_from is not None:
            resume.load(self, self.resume_from)
        elif cfg.resume and self.d.main:  # --resume with nothing saved yet: the old log must not be continued
            run_dir.truncate_log(self.out / run_dir.LOG, 0)
        # The compiled model shares the parameters; checkpoints and the EMA keep using the plain one.
        net = torch.compile(self.model) if cfg.compile else self.model
        self.train_module = GaussianDiffusion(net, prediction=cfg.prediction) if cfg.compile else self.diffusion
        if grid is not None:  # in DDP's place: gradients summed over each frame group, averaged over replicas
            self.train_module = frame_parallel.FrameParallelLoss(self.model, cfg.prediction, grid)
        elif self.d.world_size > 1 and not cfg.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DDP(self.train_module, device_ids=ids)
        if cfg.cuda_graph:  # after resume.load: a loaded AdamW takes the checkpoint's plain hyper-parameters
            graph.make_capturable(self.optimizer, self.device)
        self.train_step = TrainStep(cfg, self.d, self.device, self.train_module, self.model, self.optimizer,
                                    self.ema, self.scaler, self.num_classes, self.frames)
        if cfg.cuda_graph:
            self.train_step = graph.GraphedStep(self.train_step, self.diffusion)

    # ---- state ----------------------------------------------------------------------------------------------------
    def train_time(self) -> float:
        """Seconds of training of this run, all invocations together."""
        return round(self.time_offset + time.time() - self._t0, 3)

    def run_config(self) -> dict:
        """What checkpoints store as config.json: enough to rebuild and sample the model, and to resume."""
        cfg = self.cfg
        return {"model": self.model.config.to_dict(), "diffusion": {"prediction": cfg.prediction},
                "data": {"num_classes": self.num_classes if cfg.class_cond else 0, "frames": self.frames,
                         "resolution": self.model.config.image_size, "channels": cfg.channels},
                "train": dataclasses.asdict(cfg)}

    def save(self) -> Path | None:
        # Every rank checks its weights (all of them, or its FSDP shards) and all agree, so all stop together.
        modules = [("weights", self.model)] + ([("EMA weights", self.ema.module)] if self.ema else [])
        finite = [float(all(bool(torch.isfinite(fsdp.local(p)).all()) for p in m.state_dict().values()
                            if p.is_floating_point())) for _, m in modules]
        finite = distributed.all_min(self.d, torch.tensor(finite, device=self.device))
        for (what, _), ok in zip(modules, finite.tolist()):
            if not ok:
                raise TrainingDiverged(f"step {self.step}: the {what} are no longer finite although the loss and "
                                       f"gradient norm were: not saved; the newest checkpoint is "
                                       f"{self.monitor.newest_checkpoint() or 'none'}. Lower --lr, then --resume")
        path = resume.save(self)
        if path is not None and (self.step >= self.cfg.steps or time.time() - self._last_plot > 60):
            plot_losses(self.out / run_dir.LOG, self.out / LOSS_PNG)  # matplotlib takes ~1 s: not too often
            self._last_plot = time.time()
        return path

    def loader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.items), self.local_batch, rank=self.d.data_rank,
                                     world_size=self.d.data_world, start_step=self.step, seed=self.cfg.seed,
                                     infinite=self.items.infinite)
        w = self.cfg.workers
        # Its own generator: creating an iterator draws a worker base seed, which must not advance the global RNG
        # (that would shift dropout after a resume). The examples themselves never depend on it.
        return DataLoader(self.items, batch_sampler=sampler, num_workers=w, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if w > 0 else None,
                          worker_init_fn=ignore_in_workers if w > 0 else None,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, main = self.cfg, self.d.main
        if main:
            say(self.describe())
        mon = self.monitor
        result = {"losses": [], "step": self.step, "out": str(self.out), "interrupted": 0, "skipped": mon.skipped}
        if self.step >= cfg.steps:
            if main:
                say(f"already at step {self.step} >= --steps {cfg.steps}: nothing to do")
            return result
        self.log = run_dir.LogWriter(self.out / run_dir.LOG) if main else None
        bar = progress(cfg, self.step) if main else None
        t_last, steps_last = time.time(), self.step
        self._t0 = time.time()
        try:
            with StopSignals() as stop:
                it = iter(self.loader())
                self.train_module.train()
                while self.step < cfg.steps:
                    batch = next(it)
                    mon.check_batch(batch, self.step + 1)
                    r = self.train_step(batch, self.step)
                    self.step += 1
                    mon.after_step(self.step, r)
                    stopping = self._stop_requested(stop)
                    done = self.step >= cfg.steps
                    if self.step % cfg.log_every == 0 or done or self.step % cfg.save_every == 0 or stopping:
                        rows = mon.flush(self.log, self.train_time(), round(time.time(), 3))
                        result["losses"] += rows
                        now = time.time()
                        rate = (self.step - steps_last) * cfg.batch_size / max(now - t_last, 1e-9)
                        if bar is not None:
                            bar.set_postfix_str(f"loss {rows[-1][1]:.4f}, {rate:.1f} examples/s", refresh=False)
                            bar.update(self.step - steps_last)
                        t_last, steps_last = now, self.step
                    # No periodic save inside a non-finite streak: it would prune a checkpoint from before it.
                    if (self.step % cfg.save_every == 0 and not mon.in_a_row) or done or stopping:
                        path = self.save()
                    if stopping:
                        if main:
                            say(f"{stop.name} at step {self.step}: saved {path}; continue with: vdm-fast train "
                                 f"--out {self.out} --resume")
                        result["interrupted"] = stop.exit_code
                        break
                    if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                        self._samples()
        except TrainingDiverged:
            mon.flush(self.log, self.train_time(), round(time.time(), 3))  # the non-finite rows, for the record
            raise
        except RuntimeError as e:
            if self.d.world_size > 1 and distributed.is_timeout(e):
                raise distributed.timeout_error(self.d, f"step {self.step + 1}") from None
            raise
        finally:
            if bar is not None:
                bar.close()
            if self.log is not None:
                self.log.close()
                self.log = None
        result.update(step=self.step, skipped=mon.skipped)
        if main and not result["interrupted"]:
            last = result["losses"][-1][1] if result["losses"] else float("nan")
            say(f"done: step {self.step}, loss {last:.4f}, {time.time() - self._t0:.1f} s"
                 f"{f', {mon.skipped} non-finite steps skipped' if mon.skipped else ''}; checkpoints in "
                 f"{self.out / 'checkpoints'}")
        return result

    def _samples(self) -> None:
        """Preview videos on rank 0 (every rank calls it: under FSDP the weights are gathered first)."""
        module = self.ema.module if self.ema else self.model
        if fsdp.is_sharded(module):
            state = fsdp.model_state(module)  # a collective; the full weights reach rank 0 only
            if not self.d.main:
                return
            module = Unet3D(self.model.config).to(self.device).eval().requires_grad_(False)
            module.load_state_dict(state)
        if self.d.main:
            write_samples(self, module)

    def _stop_requested(self, stop: StopSignals) -> bool:
        """A signal on any rank stops every rank after the same step."""
        if self.d.world_size == 1:
            return stop.signum is not None
        go_on = distributed.all_min(self.d, torch.tensor([0.0 if stop.signum else 1.0], device=self.device))
        if not go_on.item() and stop.signum is None:
            stop.signum = signal.SIGTERM
        return not go_on.item()

    def describe(self) -> str:
        c, cfg = self.model.config, self.cfg
        n = self.model.parameter_count()
        accum = f" in {cfg.grad_accum} micro-steps" if cfg.grad_accum > 1 else ""
        parallel = " (FSDP: sharded)" if cfg.fsdp else " (DDP)" if self.d.world_size > 1 else ""
        if cfg.frame_parallel:
            parallel = f" (frame-parallel: {self.d.world_size // self.d.data_world} per clip x {self.d.data_world} " \
                       f"replica{'s' if self.d.data_world > 1 else ''})"
        return (f"vdm-fast train: {cfg.preset} Unet3D ({n / 1e6:.2f} M parameters, base {c.base_channels}, mults "
                f"{list(c.channel_mults)}), {cfg.prediction}-prediction, data {cfg.data}: {self.frames} frames"
                f"{f' + {cfg.image_frames} images' if cfg.image_frames else ''} of {c.image_size}x{c.image_size}, "
                f"batch {cfg.batch_size}{accum} over {self.d.world_size} process(es){parallel} on {self.device}, "
                f"{cfg.steps} steps from {self.step}, out {self.out}")

    def close(self, *, clean: bool = True) -> None:
        try:
            distributed.close(self.d, clean=clean)
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None


def train(cfg: TrainConfig, *, given: Collection[str] | None = None) -> dict:
    """Train per `cfg`; returns {"losses": [(step, loss), ...], "step": n, "out": dir, "interrupted": 0 or the exit
    code of the signal that stopped it, "skipped": non-finite steps} (losses on every rank). `given`: see Trainer."""
    trainer = Trainer(cfg, given=given)
    ok = False
    try:
        result = trainer.run()
        ok = True
        return result
    finally:
        trainer.close(clean=ok)
