"""The run folder: the one atomic write, the run lock (live, stale, across processes), a log that survives a torn
last line, truncation for resume, and the removal of every leftover a kill can leave."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vdm_fast import _fsutil, run_dir
from vdm_fast import checkpoint as ckpt
from vdm_fast._fsutil import atomic_path, atomic_write_bytes, atomic_write_text, is_atomic_temp


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


# ---------------------------------------------------------------------------------------------------- atomic write
def test_atomic_write_roundtrip_permissions_and_no_leftovers(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()  # what open(p, "w") gives, not mkstemp's 0600
    atomic_write_bytes(p, b"\x00\x01")
    atomic_write_bytes(p, bytearray(b"xy"))
    assert p.read_bytes() == b"xy" and os.listdir(tmp_path) == ["a.json"]
    atomic_write_text(tmp_path / "new" / "deep" / "b.txt", "b", make_parents=True)
    assert (tmp_path / "new" / "deep" / "b.txt").read_text() == "b"
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "c.txt", "c")
    with pytest.raises(TypeError, match="data"):
        atomic_write_bytes(p, "text")
    with pytest.raises(TypeError, match="text"):
        atomic_write_text(p, b"bytes")
    with pytest.raises(TypeError, match="path"):
        atomic_write_text(3, "x")
    with pytest.raises(ValueError, match="path"):
        atomic_write_text("", "x")
    assert p.read_bytes() == b"xy" and sorted(os.listdir(tmp_path)) == ["a.json", "new"]


def test_atomic_path_keeps_the_suffix_and_is_all_or_nothing(tmp_path):
    p = tmp_path / "loss.png"
    p.write_bytes(b"old")
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".") and tmp.exists()
        assert is_atomic_temp(tmp.name) and p.read_bytes() == b"old"  # nothing visible until the block ends
        tmp.write_bytes(b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["loss.png"]
    for exc in (RuntimeError("writer failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_path(p) as tmp:
                tmp.write_bytes(b"half")
                raise exc
        assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["loss.png"]
    # A failing rename (disk full, permissions) leaves the old file and no temp file.
    real = os.replace

    def failing(*a, **k):
        raise OSError(28, "No space left on device")

    os.replace = failing
    try:
        with pytest.raises(OSError, match="No space"):
            atomic_write_bytes(p, b"newer")
    finally:
        os.replace = real
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["loss.png"]
    # The writer may replace the temp file itself (matplotlib, pillow): that is what gets published.
    with atomic_path(tmp_path / "x") as tmp:
        tmp.unlink()
        tmp.write_text("rewritten")
    assert (tmp_path / "x").read_text() == "rewritten"


def test_is_atomic_temp_names():
    assert is_atomic_temp(".loss.png.tmp-ab_12cd3.png") and is_atomic_temp(".latest.tmp-abcdefgh")
    for name in ("loss.png", ".latest", ".lock", "step_00000001", ".tmp-step_00000001-x", ".a.tmp-abc.png",
                 "a.tmp-abcdefgh.png"):
        assert not is_atomic_temp(name), name


def test_exchange_swaps_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not _fsutil.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this kernel or filesystem")
    assert (tmp_path / "b" / "x").read_text() == "a" and not list((tmp_path / "a").iterdir())
    with pytest.raises(OSError):
        _fsutil.exchange(tmp_path / "a", tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------------- lock
_HOLDER = r"""
import sys, time, types
pkg = types.ModuleType("vdm_fast")  # only vdm_fast.run_dir and its imports: a fast start
pkg.__path__ = [sys.argv[2]]
sys.modules["vdm_fast"] = pkg
from vdm_fast.run_dir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run), str(Path(run_dir.__file__).parent)],
                            stdout=subprocess.PIPE, text=True, cwd=run.parent)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_live_and_stale_across_processes(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(run_dir.RunFolderLocked, match=f"{run}.*pid {proc.pid}") as e:
            run_dir.RunLock(run).acquire()
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
        with pytest.raises(run_dir.RunFolderLocked, match=f"pid {proc.pid}"):
            run_dir.clean_leftovers(run)  # another process's temp files are work in progress
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said = []
    with run_dir.RunLock(run, log=said.append) as lock:  # the kernel released the dead holder's flock
        assert lock.held and lock.stale["pid"] == proc.pid
        assert len(said) == 1 and f"pid {proc.pid}" in said[0] and "stale" in said[0] and "no longer running" in said[0]
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not lock.held and (run / ".lock").read_text() == ""  # a clean release leaves nothing stale
    said.clear()
    with run_dir.RunLock(run, log=said.append) as lock:
        assert lock.stale is None and said == []


def test_run_lock_in_one_process(tmp_path, capsys):
    run = tmp_path / "a" / "run"  # created with its parents
    first = run_dir.RunLock(run).acquire()
    with pytest.raises(run_dir.RunFolderLocked, match=f"pid {os.getpid()}"):
        run_dir.RunLock(run).acquire()  # a second trainer in the same process is refused too
    with pytest.raises(RuntimeError, match="already held"):
        first.acquire()
    with pytest.raises(ValueError, match="lock"):
        run_dir.clean_leftovers(run, lock=run_dir.RunLock(tmp_path))  # a lock that is not held, on another folder
    assert run_dir.clean_leftovers(run, lock=first) == []
    first.release()
    first.release()  # idempotent
    (run / ".lock").write_bytes(os.urandom(16))  # a garbled record from a dead holder
    with run_dir.RunLock(run):
        assert "unknown process" in capsys.readouterr().err
    with pytest.raises(TypeError, match="run_path"):
        run_dir.RunLock(None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_dir.RunLock(tmp_path / "file").acquire()
    (tmp_path / "sym").mkdir()
    os.symlink(tmp_path / "file", tmp_path / "sym" / ".lock")
    with pytest.raises(OSError, match="run lock"):
        run_dir.RunLock(tmp_path / "sym").acquire()
    assert (tmp_path / "file").read_text() == "x"


# -------------------------------------------------------------------------------------------------------------- log
def _rows(n):
    return [{"step": i, "loss": 1.0 / i, "note": "é"} for i in range(1, n + 1)]


def test_log_writer_and_read_log_roundtrip(tmp_path):
    p = tmp_path / "log.jsonl"
    assert run_dir.read_log(p) == []
    with run_dir.LogWriter(p) as log:
        for r in _rows(3):
            log.append(r)
        log.fsync()
        with pytest.raises(TypeError, match="row"):
            log.append([1, 2])
    with pytest.raises(ValueError, match="closed"):
        log.append({"step": 4})
    assert run_dir.read_log(p) == _rows(3)
    with run_dir.LogWriter(p) as log:  # reopening appends
        assert log.rows == 3
        log.append({"step": 4, "loss": float("nan")})
    rows = run_dir.read_log(p)
    assert len(rows) == 4 and rows[3]["loss"] != rows[3]["loss"]


def test_torn_last_line_dropped_at_every_cut(tmp_path):
    """A kill can cut the last line at any byte: every cut reads as the complete rows before it."""
    p = tmp_path / "log.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in _rows(2)).encode()
    last = (json.dumps(_rows(3)[2], ensure_ascii=False) + "\n").encode()  # é: cuts inside a UTF-8 character too
    for cut in range(1, len(last)):
        p.write_bytes(good + last[:cut])
        complete = cut == len(last) - 1  # only the newline is missing: the row is whole
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            rows = run_dir.read_log(p)
        assert rows == _rows(3) if complete else rows == _rows(2), cut
        assert len(w) == (0 if complete else 1) and (complete or "torn last line 3" in str(w[0].message))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with run_dir.LogWriter(p) as log:
                log.append({"step": 4})
        assert run_dir.read_log(p) == (_rows(3) if complete else _rows(2)) + [{"step": 4}], cut
    for tail in (b"\x00" * 50, b"\x00" * 10 + b"\n", b"[1, 2]", b"{\"step\": 3}}", b"\xff\xfe\n"):
        p.write_bytes(good + tail)  # NULs from a crash on a filesystem with delayed allocation, other garbage
        with pytest.warns(UserWarning, match="torn last line 3"):
            assert run_dir.read_log(p) == _rows(2)


def test_corrupt_line_elsewhere_is_an_error_naming_file_and_line(tmp_path):
    p = tmp_path / "log.jsonl"
    lines = [json.dumps(r) for r in _rows(4)]
    for bad in ("{oops", "[1]", "\udcff"):
        p.write_bytes("\n".join(lines[:2] + [bad] + lines[2:]).encode("utf-8", "surrogateescape") + b"\n")
        with pytest.raises(ValueError, match=r"log\.jsonl.*line 3 is corrupt"):
            run_dir.read_log(p)
        with pytest.raises(ValueError, match="line 3"):
            run_dir.LogWriter(p)
        with pytest.raises(ValueError, match="line 3"):
            run_dir.truncate_log(p, 2)
    p.write_text("\n" + lines[0] + "\n\n" + lines[1] + "\n\n")  # blank lines are not rows, nor corruption
    assert run_dir.read_log(p) == _rows(2)


def test_truncate_log_for_resume(tmp_path):
    p = tmp_path / "log.jsonl"
    assert run_dir.truncate_log(p, 3) == [] and not p.exists()
    p.write_text("".join(json.dumps(r) + "\n" for r in _rows(6)) + json.dumps({"event": "resumed"}) + "\n"
                 + '{"step": 7, "lo')
    with pytest.warns(UserWarning, match="torn"):
        kept = run_dir.truncate_log(p, 3)
    assert kept == _rows(3) + [{"event": "resumed"}] == run_dir.read_log(p)  # rows without a step are kept
    assert os.listdir(tmp_path) == ["log.jsonl"]
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="step"):
            run_dir.truncate_log(p, bad)
    # An open writer follows the replaced file instead of appending to the old, unlinked one.
    with run_dir.LogWriter(p) as log:
        log.append({"step": 4})
        run_dir.truncate_log(p, 3)
        log.append({"step": 4, "again": True})
    assert run_dir.read_log(p)[-1] == {"step": 4, "again": True} and len(run_dir.read_log(p)) == 5


# -------------------------------------------------------------------------------------------------------- leftovers
def test_clean_leftovers_removes_every_kind_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    model = {"w": torch.randn(3)}
    for s in (1, 2):
        ckpt.save(run, s, config={}, model=model, keep=0)
    c = run / "checkpoints"
    # What kills leave: a temp step folder, a tombstone, the old copy of a re-save (its step in place, so dropped),
    # temp pointers of the old and new writers, atomic_path temp files anywhere, the old writers' temp files.
    junk = [c / ".tmp-step_00000003-abc123", c / ".trash-step_00000000-17-deadbeef",
            c / ".tmp-old-step_00000002-xyz"]
    for d in junk:
        (d / "step_00000002" if d.name.startswith(".tmp-old") else d).mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    files = [c / ".latest.k2j3h4.tmp", c / ".latest.tmp-abcdefgh", run / ".log.jsonl.tmp-a1b2c3d4.jsonl",
             run / ".loss.png.tmp-zz_99zz9.png", run / ".loss.tmp.png",
             run / "samples" / ".step_5.gif.tmp-abcdefgh.gif", run / "samples" / ".step_5.k3j4h5g6.gif",
             run / "samples" / ".probe-x1y2z3w4"]
    (run / "samples").mkdir()
    for f in files:
        f.write_bytes(b"partial")
    # What must survive: checkpoints, the pointer, the log, samples, the lock, user files that merely look odd.
    keep = [run / "log.jsonl", run / "samples" / "step_5.gif", run / ".lock", run / "notes.tmp",
            run / ".hidden", run / "samples" / ".gitignore"]
    for f in keep:
        f.write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".a.png.tmp-abcdefgh.png").write_text("not ours")
    os.symlink(outside, run / "link")  # not followed
    removed = run_dir.clean_leftovers(run)
    assert sorted(removed) == sorted(map(str, junk + files))
    assert all(f.exists() for f in keep) and (outside / ".a.png.tmp-abcdefgh.png").exists()
    assert [s for s, _ in ckpt.step_dirs(c)] == [1, 2] and ckpt.load(run).step == 2
    assert sorted(p.name for p in c.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert run_dir.clean_leftovers(run) == []
    assert run_dir.clean_leftovers(tmp_path / "missing") == []


def test_clean_leftovers_restores_a_step_a_killed_resave_moved_aside(tmp_path):
    run = tmp_path / "run"
    ckpt.save(run, 5, config={}, model={"w": torch.ones(2)})
    c = run / "checkpoints"
    aside = c / ".tmp-old-step_00000005-q1w2e3"
    aside.mkdir()
    os.replace(c / "step_00000005", aside / "step_00000005")  # the kill fell between the two renames
    (c / ".tmp-step_00000005-r4t5y6").mkdir()  # and the new copy never got its name
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(run)  # until the next start: refused, nothing substituted
    done = run_dir.clean_leftovers(run)
    assert f"{c / 'step_00000005'} (restored)" in done
    assert ckpt.load(run).step == 5 and sorted(p.name for p in c.iterdir()) == ["latest", "step_00000005"]
