"""What the loop watches between steps: the losses to log, the non-finite guard, and the bad files of the data.

- Losses stay on the device until a log row is due; then one all-reduce means the pending steps' losses over the
  ranks and rank 0 appends their rows (train.logs describes the row).
- Non-finite guard: a skipped step (train.step) is counted; `--max-nonfinite-steps` skipped in a row raise
  TrainingDiverged before the loop can reach a save, so no checkpoint of that stretch is written (and none could be
  non-finite: the weights did not change, and checkpoint.save refuses NaN/Inf). A scaler overflow of fp16 training is
  not counted: it is the scaler's normal search for its scale.
- Bad files: every file an example could not read (data.stream) is recorded once, with its message, in the log and
  the checkpoint; more of them than `--skip-bad-data` stop the run with BadDataError naming the last one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from vdm_fast import checkpoint as ckpt
from vdm_fast._cli import say
from vdm_fast.data import BadDataError
from vdm_fast.train.config import TrainConfig, lr_at
from vdm_fast.train.distributed import Dist


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run stopped without saving them."""


class Monitor:
    def __init__(self, cfg: TrainConfig, d: Dist, out: Path):
        self.cfg, self.d, self.out = cfg, d, out
        self.skipped, self.in_a_row = 0, 0  # restored from a checkpoint by train.resume
        self.bad_files: dict[str, str] = {}
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.new_bad: list[str] = []

    def newest_checkpoint(self) -> str:
        try:
            return str(ckpt.find(self.out))
        except (FileNotFoundError, ValueError):
            return ""

    # ---- bad data -------------------------------------------------------------------------------------------------
    def check_batch(self, batch: dict, step: int) -> None:
        """Record the batch's unreadable files; BadDataError beyond --skip-bad-data of them."""
        n = self.cfg.skip_bad_data
        for entry in (e for b in batch["bad"] for e in b.split("\n") if e):
            path, _, message = entry.partition("\t")
            if path in self.bad_files:
                continue
            self.bad_files[path] = message
            self.new_bad.append(path)
            if len(self.bad_files) > n:
                allow = f"more than --skip-bad-data {n} unreadable files" if n else \
                    "--skip-bad-data N replaces up to N unreadable files by the next readable clip"
                raise BadDataError(f"{message} (step {step}; {allow})", path)
            if self.d.main:
                say(f"step {step}: {message}: replaced by the next readable clip ({len(self.bad_files)} of "
                     f"--skip-bad-data {n})")

    # ---- the non-finite guard -------------------------------------------------------------------------------------
    def after_step(self, step: int, r) -> None:
        self.pending.append((step, r.loss))
        if r.applied or r.overflow:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        n = self.cfg.max_nonfinite_steps
        what = f"loss {float(r.loss):g}, gradient norm {r.grad_norm:g}"
        if self.in_a_row < n:
            if self.d.main:
                say(f"step {step}: non-finite {what}: update skipped ({self.in_a_row} in a row; the run stops at "
                     f"--max-nonfinite-steps {n})")
            return
        newest = self.newest_checkpoint() if self.d.main else ""
        kept = f"the newest checkpoint, {newest}, is finite" if newest else "no checkpoint was written"
        raise TrainingDiverged(f"step {step}: non-finite {what} for {n} steps in a row (--max-nonfinite-steps {n}): "
                               f"stopped without saving; {kept}. Lower --lr or set --grad-clip, then --resume")

    # ---- log rows -------------------------------------------------------------------------------------------------
    def flush(self, log, train_time: float, wall: float) -> list[tuple[int, float]]:
        """Mean the pending losses over ranks (one collective for several steps) and log them on rank 0."""
        if not self.pending:
            return []
        losses = torch.stack([loss.float() for _, loss in self.pending])
        if self.d.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.d.world_size
        rows = [(s, v) for (s, _), v in zip(self.pending, losses.tolist())]
        if log is not None:
            for s, v in rows:
                row = {"step": s, "loss": v, "lr": lr_at(self.cfg, s - 1), "time": train_time, "wall": wall,
                       "skipped": self.skipped}
                if self.new_bad:
                    row["bad_files"] = self.new_bad[:]
                    self.new_bad.clear()
                log.append(row)
        self.pending.clear()
        return rows
