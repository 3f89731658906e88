"""The run folder over a run's life: claimed, checked, resumed from, saved to.

- A run folder belongs to one trainer: rank 0 holds `run_dir.RunLock` for the run's life (a second trainer on the
  same --out exits 2 with one line) and removes what killed writers left (`run_dir.clean_leftovers`).
- A new run needs an empty folder: a folder holding anything (an old run's checkpoints or log) is refused unless
  `--resume` (continue it) or `--overwrite` (its run files are removed first), so two runs never share a log.
- `--resume` takes the checkpoint `latest` names, verified against its manifest, or with `--resume-from-last-good`
  the newest intact one (saying which). Every part must be there: a missing optimizer or EMA state is an error, not
  a silent reset, unless `--reset-optimizer` (Adam restarts; the EMA restarts from the weights if it is missing).
- A checkpoint holds everything the exact trajectory needs: weights, EMA, optimizer, GradScaler, every rank's RNG
  states, the step (hence the data stream's position), the training time so far, the skipped steps and bad files.
  Under --fsdp the same files, gathered from the shards (train.fsdp): a checkpoint resumes with or without it.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Collection
from pathlib import Path

from vdm_fast import checkpoint as ckpt
from vdm_fast import run_dir
from vdm_fast._cli import say
from vdm_fast._fsutil import remove_via_tombstone
from vdm_fast.train import fsdp, graph
from vdm_fast.train.config import TrainConfig, merge_resumed
from vdm_fast.train.distributed import gather_rng
from vdm_fast.train.logs import LOSS_PNG

# What a run writes into its folder (what --overwrite removes; anything else is left alone).
RUN_ENTRIES = ("checkpoints", run_dir.LOG, LOSS_PNG, "samples")
_OVERWRITTEN = ".overwritten-"


def claim(out: Path) -> run_dir.RunLock:
    """Lock the run folder (creating it) and clean what killed writers left in it."""
    lock = run_dir.RunLock(out).acquire()
    try:
        for p in out.iterdir():
            if p.name.startswith(_OVERWRITTEN):  # an --overwrite that was killed while deleting
                shutil.rmtree(p, ignore_errors=True)
        run_dir.clean_leftovers(out, lock=lock)
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_new_run(out: Path, cfg: TrainConfig, *, main: bool) -> None:
    """A new run (no --resume): the folder must be empty, or --overwrite clears the run's own files."""
    if cfg.resume or not out.is_dir():
        return
    entries = sorted(p for p in out.iterdir() if p.name != run_dir.LOCK and not p.name.startswith(_OVERWRITTEN))
    if not entries:
        return
    if not cfg.overwrite:
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:4])
        more = f" and {len(entries) - 4} more" if len(entries) > 4 else ""
        raise FileExistsError(f"--out {str(out)!r} is not empty ({shown}{more}): pass --resume to continue that run, "
                              "--overwrite to start it afresh, or choose another --out")
    if not main:
        return
    removed = []
    for p in entries:
        if p.name in RUN_ENTRIES:
            # a kill during the delete leaves no half run behind, only a hidden leftover
            remove_via_tombstone(p, out / f"{_OVERWRITTEN}{p.name}-{secrets.token_hex(4)}")
            removed.append(p.name)
    if removed:
        say(f"--overwrite: removed {', '.join(removed)} of the previous run in {str(out)!r}")


def resolve(out: Path, cfg: TrainConfig, given: Collection[str] | None, *, main: bool
            ) -> tuple[TrainConfig, Path | None]:
    """(the run's config, the checkpoint to resume from or None)."""
    if not cfg.resume:
        return cfg, None
    if not ckpt.exists(out):
        if main:
            say(f"--resume: no checkpoint in {str(out)!r} yet, starting from step 0")
        return cfg, None
    path = ckpt.find_resume(out, last_good=cfg.resume_from_last_good, log=say if main else (lambda m: None))
    saved = ckpt.load(path, parts=()).config.get("train", {})
    return merge_resumed(saved, cfg, given), path


def load(trainer, path: Path) -> None:
    """Restore `trainer` from checkpoint `path` (see the module docstring for what is refused)."""
    cfg = trainer.cfg
    # --reset-optimizer: the optimizer files are not read at all (whatever is left of them), the EMA may be gone.
    parts = ("model", "ema", "state") if cfg.reset_optimizer else ckpt.PARTS
    allow = ("ema",) if cfg.reset_optimizer else ()
    try:
        # Under FSDP on the CPU: a full copy of the optimizer state on every GPU is what sharding avoids.
        c = ckpt.load(path, map_location="cpu" if cfg.fsdp else trainer.device, parts=parts, allow_missing=allow)
    except ckpt.CheckpointError as e:
        if "lacks its optimizer" in str(e) or "lacks its ema" in str(e):
            hint = "; --reset-optimizer resumes without it"
        elif not cfg.resume_from_last_good:
            hint = "; --resume-from-last-good resumes from the newest intact checkpoint"
        else:
            hint = ""
        raise ckpt.CheckpointError(f"{str(e).split('; pass allow_missing')[0]}{hint}") from None
    fsdp.load_model_state(trainer.model, c.model)
    saved_cfg = c.config.get("train", {})
    if c.optimizer is not None and not cfg.reset_optimizer:
        fsdp.load_optimizer_state(trainer.model, trainer.optimizer, c.optimizer)
    elif not cfg.reset_optimizer:
        raise ckpt.CheckpointError(f"{str(path)!r} holds no optimizer state: --reset-optimizer starts AdamW afresh")
    if trainer.ema is not None:
        if c.ema is None and saved_cfg.get("ema_decay", 0) > 0 and not cfg.reset_optimizer:
            raise ckpt.CheckpointError(f"{str(path)!r} holds no EMA weights although the run kept an EMA: "
                                       "--reset-optimizer restarts the EMA from the weights")
        fsdp.load_model_state(trainer.ema.module, c.ema if c.ema is not None else c.model)
        trainer.ema.updates = int(c.state.get("ema_updates", c.step)) if c.ema is not None else 0
    if trainer.scaler is not None and "scaler" in c.state:
        trainer.scaler.load_state_dict(c.state["scaler"])
    trainer.step = c.step
    trainer.monitor.skipped = int(c.state.get("skipped_steps", 0))
    trainer.monitor.bad_files = dict(c.state.get("bad_files", {}))
    d = trainer.d
    rngs = c.state.get("rng", {})
    saved_world = int(c.state.get("world_size", 1))
    key = str(d.rank if saved_world == d.world_size else d.rank % max(1, saved_world))
    if key in rngs:
        ckpt.set_rng_state(rngs[key])
    if d.main:
        if saved_world != d.world_size:
            say(f"resuming a {saved_world}-process run on {d.world_size}: the data stream continues but the "
                 "trajectory is no longer bitwise that of an uninterrupted run")
        logged = run_dir.truncate_log(trainer.out / run_dir.LOG, trainer.step)
        trainer.time_offset = float(c.state.get("train_time", logged[-1].get("time", 0.0) if logged else 0.0))
        say(f"resumed from {path} at step {trainer.step}")


def save(trainer) -> Path | None:
    """Checkpoint the trainer's state (a collective: every rank calls it; rank 0 writes)."""
    rng = gather_rng(trainer.d)
    # Under FSDP these gather the shards (collectives: every rank takes part; the full copies reach rank 0 only).
    model = fsdp.model_state(trainer.model)
    ema = fsdp.model_state(trainer.ema.module) if trainer.ema else None
    # Plain hyper-parameters (a --cuda-graph run's AdamW has a tensor lr): the checkpoint resumes with or without it.
    optimizer = graph.portable_optimizer_state(fsdp.optimizer_state(trainer.model, trainer.optimizer))
    if not trainer.d.main:
        return None
    cfg = trainer.cfg
    state = {"rng": rng, "world_size": trainer.d.world_size,
             "ema_updates": trainer.ema.updates if trainer.ema else 0,
             "sampler": {"seed": cfg.seed, "next_step": trainer.step, "global_batch": cfg.batch_size},
             "train_time": trainer.train_time(), "skipped_steps": trainer.monitor.skipped,
             "bad_files": trainer.monitor.bad_files}
    if trainer.scaler is not None:
        state["scaler"] = trainer.scaler.state_dict()
    if trainer.log is not None:
        trainer.log.fsync()  # the rows up to this checkpoint survive a power loss with it
    return ckpt.save(trainer.out, trainer.step, config=trainer.run_config(), model=model, ema=ema,
                     optimizer=optimizer, state=state, keep=cfg.keep)
