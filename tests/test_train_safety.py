"""The trainer never loses good work (issue 21) and speaks one line per user error (issue 20): non-finite steps
skipped and the run stopped before a bad save, the run-folder lock, no interleaved logs, SIGINT/SIGTERM saves with
an exact resume, verified resumes, bad data skipped or named, a frozen DDP rank, option checks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from helpers import run_python
from test_train import TINY, TINY_ARGS, _free_port

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast import run_dir
from vdm_fast.cli import main as cli
from vdm_fast.diffusion import GaussianDiffusion
from vdm_fast.train import TrainConfig, TrainingDiverged, train


@pytest.fixture(autouse=True)
def _reference_backend():
    with vdm_fast.backend("reference"):
        yield


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# ------------------------------------------------------------------------------------------------ non-finite guard
def _nan_at(monkeypatch, steps: set[int]):
    """The loss of the given 1-based calls becomes NaN (as a diverging run's would)."""
    real, calls = GaussianDiffusion.loss, [0]

    def loss(self, *a, **kw):
        calls[0] += 1
        out = real(self, *a, **kw)
        return out * float("nan") if calls[0] in steps else out

    monkeypatch.setattr(GaussianDiffusion, "loss", loss)


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    clean = train(TrainConfig(out=str(tmp_path / "clean"), steps=2, **TINY))
    _nan_at(monkeypatch, {2})
    result = train(TrainConfig(out=str(tmp_path / "r"), steps=4, **TINY))
    assert result["skipped"] == 1 and result["step"] == 4
    assert result["losses"][0] == clean["losses"][0] and math.isnan(result["losses"][1][1])
    rows = _log(tmp_path / "r")
    assert [r["skipped"] for r in rows] == [0, 1, 1, 1]
    # The skipped step left weights, optimizer and EMA untouched: the checkpoint is finite and Adam took 3 steps.
    c = ckpt.load(tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in c.model.values())
    assert {float(s["step"]) for s in c.optimizer["state"].values()} == {3.0}
    assert c.state["skipped_steps"] == 1


def test_diverging_run_stops_before_saving_and_keeps_the_newest_finite_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "d"
    _nan_at(monkeypatch, set(range(4, 100)))
    code = cli(["train", *TINY_ARGS, "--steps", "20", "--save-every", "2", "--keep", "1", "--log-every", "1",
                "--out", str(out)])
    line = _err_line(capsys)
    assert code == 1
    assert "step 6" in line and "--max-nonfinite-steps 3" in line and "step_00000002" in line, line
    dirs = [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert dirs == ["step_00000002"], dirs  # step 4 fell in the streak: not saved, so step 2 was not pruned
    c = ckpt.load(out)
    assert all(torch.isfinite(v).all() for v in [*c.model.values(), *c.ema.values()])
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5, 6]  # the non-finite rows are logged


def test_nonfinite_weights_are_never_saved(tmp_path):
    from vdm_fast.train import Trainer

    t = Trainer(TrainConfig(out=str(tmp_path / "w"), steps=4, **TINY))  # saves at step 3
    real = t.train_step

    def step(batch, i):
        out = real(batch, i)
        if i == 1:  # after step 2: an update that overflowed the weights themselves
            with torch.no_grad():
                t.model.conv_out.bias.fill_(float("inf"))
        return out

    t.train_step = step
    with pytest.raises(TrainingDiverged, match="weights are no longer finite"):
        t.run()
    t.close(clean=False)
    assert not (tmp_path / "w" / "checkpoints").exists() or not ckpt.exists(tmp_path / "w")


def test_max_nonfinite_steps_option(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {1})
    with pytest.raises(TrainingDiverged, match="1 steps in a row"):
        train(TrainConfig(out=str(tmp_path / "m"), steps=3, max_nonfinite_steps=1, **TINY))


# --------------------------------------------------------------------------------- the run folder belongs to one run
def test_second_trainer_on_a_locked_folder_exits_2(tmp_path, capsys):
    out = tmp_path / "locked"
    with run_dir.RunLock(out):
        assert cli(["train", *TINY_ARGS, "--steps", "1", "--out", str(out)]) == 2
        line = _err_line(capsys)
        assert "in use by another trainer" in line and str(os.getpid()) in line
        assert not (out / "log.jsonl").exists()
    assert cli(["train", *TINY_ARGS, "--steps", "1", "--out", str(out)]) == 0  # released: the folder is usable


def test_new_run_into_a_used_folder_refuses_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(["train", *TINY_ARGS, "--steps", "1", "--out", str(out)]) == 2
    assert "not empty (notes.txt)" in _err_line(capsys)
    (out / "notes.txt").unlink()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    # --resume with no checkpoint yet: the old log must not be continued (it described another run).
    assert cli(["train", *TINY_ARGS, "--steps", "2", "--log-every", "1", "--out", str(out), "--resume"]) == 0
    first = _log(out)
    assert [r["step"] for r in first] == [1, 2] and all(r["loss"] != 9.0 for r in first)
    assert cli(["train", *TINY_ARGS, "--steps", "2", "--out", str(out)]) == 2
    assert "--overwrite" in _err_line(capsys)
    assert cli(["train", *TINY_ARGS, "--steps", "1", "--log-every", "1", "--out", str(out), "--overwrite"]) == 0
    assert [r["step"] for r in _log(out)] == [1]  # a fresh log, not appended to the old one
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step_00000001"]
    assert cli(["train", *TINY_ARGS, "--steps", "1", "--out", str(out), "--overwrite", "--resume"]) == 2


def test_a_torn_last_log_line_does_not_block_resume(tmp_path, capsys):
    out = tmp_path / "torn"
    assert cli(["train", *TINY_ARGS, "--steps", "2", "--log-every", "1", "--out", str(out)]) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.9')  # a kill or a full disk mid-write
    with pytest.warns(Warning, match="torn"):
        assert cli(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert [r["step"] for r in _log(out)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- interrupts
def _popen(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, VDM_FAST_BACKEND="reference")
    return subprocess.Popen([sys.executable, "-m", "vdm_fast", "train", *args], cwd=tempfile.gettempdir(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_after(proc: subprocess.Popen, log, step: int, sig: int, timeout: float = 240) -> tuple[int, str]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.is_file() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines() if x.strip()):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigint_and_sigterm_save_and_resume_exactly(tmp_path):
    out, ref = tmp_path / "sig", tmp_path / "whole"
    args = [*TINY_ARGS, "--threads", "1", "--steps", "8", "--log-every", "1", "--save-every", "100",
            "--set", "dropout=0.2"]  # dropout: the trajectory also depends on the restored RNG states
    whole = _popen([*args, "--out", str(ref)])  # uninterrupted, meanwhile (a subprocess too: same numerics)
    code, err = _interrupt_after(_popen([*args, "--out", str(out)]), out / "log.jsonl", 2, signal.SIGINT)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("SIGINT at step") and "--resume" in last and "Traceback" not in err, err
    stopped = ckpt.load(out, parts=()).step
    assert 2 <= stopped < 8
    code, err = _interrupt_after(_popen(["--out", str(out), "--resume", "--no-progress"]), out / "log.jsonl",
                                 stopped + 1, signal.SIGTERM)
    assert code == 143 and "SIGTERM at step" in err, err
    assert ckpt.load(out, parts=()).step > stopped
    assert run_python("-m", "vdm_fast", "train", "--out", str(out), "--resume", "--no-progress",
                      env=dict(os.environ, VDM_FAST_BACKEND="reference")).returncode == 0
    assert whole.wait(timeout=240) == 0, whole.communicate()[1]
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in _log(ref)]  # bitwise, across two interrupts
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[-1] > 0  # training time continues across the resumes


# ------------------------------------------------------------------------------------------ verified resume
def test_resume_refuses_corrupt_or_incomplete_checkpoints_unless_asked(tmp_path, capsys):
    out = tmp_path / "v"
    assert cli(["train", *TINY_ARGS, "--steps", "4", "--save-every", "2", "--keep", "0", "--out", str(out)]) == 0
    newest = out / "checkpoints" / "step_00000004"
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(blob))
    resume = ["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]
    assert cli(resume) == 2
    line = _err_line(capsys)
    assert "model.safetensors" in line and "--resume-from-last-good" in line, line
    assert cli([*resume, "--resume-from-last-good"]) == 0
    err = capsys.readouterr().err
    assert "step_00000002" in err and "skipped: step_00000004" in err
    (out / "checkpoints" / "step_00000006" / "optimizer.json").unlink()
    assert cli(["train", "--out", str(out), "--resume", "--steps", "7", "--no-progress"]) == 2
    assert "optimizer" in _err_line(capsys)
    assert cli(["train", "--out", str(out), "--resume", "--steps", "7", "--no-progress", "--reset-optimizer"]) == 0
    assert ckpt.load(out, parts=()).step == 7


# ---------------------------------------------------------------------------------------------------- bad data
def _png(path, level: int, size=(12, 12)) -> None:
    from PIL import Image

    Image.fromarray(np.full((*size, 3), level, np.uint8)).save(path)


def _corrupt_pixels(path) -> None:
    """Break a PNG's compressed pixels but keep its chunk CRCs valid: it passes a structure check, fails to decode."""
    import zlib

    b = bytearray(path.read_bytes())
    i = b.index(b"IDAT")
    n = int.from_bytes(b[i - 4:i], "big")
    b[i + 4:i + 4 + n] = bytes(n)  # zeros are no valid zlib stream
    b[i + 4 + n:i + 8 + n] = zlib.crc32(bytes(b[i:i + 4 + n])).to_bytes(4, "big")
    path.write_bytes(bytes(b))


def _clip_dir(root, name: str, n: int = 6) -> None:
    d = root / name
    d.mkdir(parents=True)
    for k in range(n):
        _png(d / f"{k:03d}.png", 20 * k)


def test_scan_reports_every_bad_file_at_once(tmp_path):
    pytest.importorskip("PIL")
    from vdm_fast.data import VideoFolder

    _clip_dir(tmp_path, "good")
    (tmp_path / "junk.gif").write_bytes(b"GIF89a not really")
    _clip_dir(tmp_path, "torn")
    torn = tmp_path / "torn" / "002.png"
    torn.write_bytes(torn.read_bytes()[:-20])
    _clip_dir(tmp_path, "mixed")
    _png(tmp_path / "mixed" / "004.png", 9, size=(12, 14))
    with pytest.raises(ValueError) as e:
        VideoFolder(tmp_path, 8, 4)
    msg = str(e.value)
    assert "3 of 4 videos" in msg and "\n" not in msg
    assert "junk.gif" in msg and "002.png" in msg and "mixes frame sizes" in msg and "004.png" in msg
    assert len(VideoFolder(tmp_path, 8, 4, skip_bad=3)) == 1


def test_unreadable_clip_is_replaced_recorded_and_resume_stays_exact(tmp_path, capsys):
    pytest.importorskip("PIL")
    data = tmp_path / "data"
    for name in ("a", "b", "c"):
        _clip_dir(data, name)
    _corrupt_pixels(data / "b" / "003.png")  # every 4-frame clip of b covers frame 3
    base = ["train", *TINY_ARGS, "--data", str(data), "--log-every", "1", "--save-every", "2"]
    assert cli([*base, "--steps", "3", "--out", str(tmp_path / "no")]) == 2
    line = _err_line(capsys)
    assert "003.png" in line and "--skip-bad-data" in line, line
    skip = [*base, "--skip-bad-data", "1"]
    assert cli([*skip, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    rows = _log(tmp_path / "whole")
    bad = [f for r in rows for f in r.get("bad_files", [])]
    assert bad == [str(data / "b" / "003.png")], rows
    assert list(ckpt.load(tmp_path / "whole", parts=("state",)).state["bad_files"]) == bad
    assert cli([*skip, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert cli([*skip, "--steps", "4", "--out", str(tmp_path / "split"), "--resume"]) == 0
    assert [r["loss"] for r in _log(tmp_path / "split")] == [r["loss"] for r in rows]


# ------------------------------------------------------------------------------------------------------- DDP
_FROZEN_RANK = """
import os, signal, sys
import vdm_fast.train.step as step
from vdm_fast.train import main
real = step.TrainStep.__call__
def frozen(self, batch, i):
    if i == 1 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    return real(self, batch, i)
step.TrainStep.__call__ = frozen
sys.exit(main(sys.argv[1:]))
"""


def test_a_frozen_ddp_rank_ends_the_job_within_the_timeout(tmp_path):
    port = _free_port()
    out = tmp_path / "ddp"
    args = [*TINY_ARGS, "--threads", "1", "--batch-size", "4", "--steps", "5", "--save-every", "1",
            "--ddp-timeout", "4", "--out", str(out)]
    procs = []
    for rank in range(2):
        env = dict(os.environ, VDM_FAST_BACKEND="reference", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", _FROZEN_RANK, *args], cwd=tempfile.gettempdir(),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        took = time.time() - t0
    finally:
        procs[1].kill()
        procs[1].communicate()
    last = err.strip().splitlines()[-1]
    assert procs[0].returncode == 1, err
    assert "--ddp-timeout (4 s)" in last and "--resume" in last, last
    assert took < 60
    assert ckpt.load(out, parts=()).step == 1  # the last save before the freeze is intact


# ------------------------------------------------------------------------------------------- one-line user errors
@pytest.mark.parametrize("args, named", [
    (["--set", "base_chanels=16"], "did you mean 'base_channels'"),
    (["--set", "attn_resolutions=4"], "list of integers"),
    (["--set", "base_channels=abc"], "base_channels must be an integer"),
    (["--set", "dropout=nan"], "dropout must be a finite number"),
    (["--set", "nope"], "KEY=VALUE"),
    (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--grad-clip", "nan"], "--grad-clip"), (["--betas", "0.9,1.5"], "--betas"),
    (["--frames", "0"], "--frames"), (["--resolution", "0"], "--resolution"), (["--keep", "-1"], "--keep"),
    (["--resolution", "15"], "image_size (15)"), (["--batch-size", "3", "--grad-accum", "2"], "--grad-accum"),
    (["--data", "Bouncing"], "did you mean 'bouncing'"), (["--preset", "tinny"], "did you mean 'tiny'"),
    (["--device", "cuda"], "--device cuda"), (["--device", "tpu"], "--device"),
    (["--ddp-timeout", "0"], "--ddp-timeout"), (["--resume-from-last-good"], "needs --resume"),
])
def test_user_errors_are_one_line_naming_the_option(tmp_path, capsys, args, named):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    try:
        code = cli(["train", *TINY_ARGS, "--steps", "1", "--out", str(tmp_path / "e"), *args])
    except SystemExit as e:  # argparse's own checks exit from parse_args
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err


def test_config_refuses_nonfinite_and_out_of_range_values_naming_the_option():
    for kw, name in ((dict(lr=float("inf")), "--lr"), (dict(lr=0.0), "--lr"), (dict(weight_decay=-1.0), "--weight"),
                     (dict(grad_clip=float("nan")), "--grad-clip"), (dict(ema_decay=1.0), "--ema-decay"),
                     (dict(frames=0), "--frames"), (dict(keep=-1), "--keep"), (dict(cond_drop_prob=math.nan), "cond"),
                     (dict(betas=(0.9, float("nan"))), "--betas"), (dict(steps=True), "--steps"),
                     (dict(sampler="ddpm"), "--sampler"), (dict(max_nonfinite_steps=0), "--max-nonfinite-steps")):
        with pytest.raises((ValueError, TypeError), match=name):
            TrainConfig(**kw)


def test_help_prints_each_default_once_and_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--grad-accum", "--precision", "--gradient-checkpointing", "--compile", "--max-nonfinite-steps",
                 "--skip-bad-data", "--ddp-timeout", "--resume-from-last-good", "--reset-optimizer", "--overwrite",
                 "--progress-every", "--no-progress"):
        assert flag in text, flag
    for entry in text.split(" --")[1:]:
        assert entry.count("(default:") <= 1, entry


def test_plain_progress_lines_without_a_terminal(tmp_path, capsys):
    assert cli(["train", *TINY_ARGS, "--steps", "3", "--log-every", "1", "--progress-every", "1e-9",
                "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "train: 1/3 steps" in err and "loss" in err and "train: 3/3 steps in" in err, err
