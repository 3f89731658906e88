"""The run folder's side of crash safety: one trainer per folder, a log that survives kills, no leftovers.

Layout (beside `checkpoint`'s `checkpoints/`)::

    run/.lock        {"pid", "host", "since"}: who holds the run (an fcntl.flock, held for the run's life)
    run/log.jsonl    one JSON object per line, appended; fsynced at each checkpoint

Invariants:

- `RunLock`: the kernel releases an flock when its holder dies however it dies (kill -9 included), so a lock file
  whose record names a process but that can be locked is stale: it is taken over with a message. A lock that
  cannot be taken is live: `RunFolderLocked` names the folder and the holder's pid. The file is never deleted
  (deleting a lock file lets two processes lock two different inodes); releasing empties the record.
  A process forked while holding it (e.g. DataLoader workers) shares the lock until it exits.
  POSIX only (fcntl).
- The log is append-only (O_APPEND), each line one ``write`` finished or raised: a kill or a full disk can only
  leave the LAST line torn (cut short, or NUL bytes after a power loss). `read_log` drops such a line with a
  warning (a last line that parses but lost only its newline is a row); a bad line anywhere else is corruption, an
  error naming the file and line. `LogWriter` drops a torn last line before appending, and follows the file when
  `truncate_log` replaces it (atomically) under an open writer.
- `clean_leftovers` removes every temp file or folder a kill can leave: ``.tmp-step_*`` and ``.tmp-old-*`` step
  folders (restoring a step folder a killed re-save had moved aside), ``.trash-step_*`` pruning tombstones,
  ``.latest.*.tmp`` pointers, `_fsutil.atomic_path` temp files anywhere in the run folder (symlinks not followed),
  and the temp names of the writers before `_fsutil`. It refuses to run while another process holds the run's
  lock (that process's temp files are work in progress).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path

from vdm_fast import checkpoint as ckpt
from vdm_fast._fsutil import _as_path, atomic_write_text, is_atomic_temp

LOCK = ".lock"
LOG = "log.jsonl"
# Temp files of the writers before `_fsutil` existed (video_io's mkstemp ".<stem>.<8 chars><suffix>", the trainer's
# ".<stem>.tmp.png") and of video_io's writability probe (".probe-<8 chars>").
_OLD_TEMPS = re.compile(r"^(\..+\.([a-z0-9_]{8}\.(gif|png|mp4|webm|mkv|avi|mov)|tmp\.png)|\.probe-[a-z0-9_]{8})$")


class RunFolderLocked(ValueError):
    """Another live process holds the run folder."""


# ------------------------------------------------------------------------------------------------------------- lock
def _read_record(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        rec = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": True}
    return rec if isinstance(rec, dict) else {"unreadable": True}


def _holder(rec: dict) -> str:
    if not rec or rec.get("unreadable"):
        return "an unknown process"
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} (since {rec.get('since', '?')})"


def _alive_note(rec: dict) -> str:
    """Why a stale record may name a running process: the kernel reuses pids."""
    pid = rec.get("pid")
    if rec.get("host") != socket.gethostname() or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return " (it is no longer running)"
    except OSError:
        pass
    return f" (pid {pid} is running but holds no lock: another process reusing the pid of a trainer that died)"


class RunLock:
    """Hold `run_path` for this process: ``with RunLock(run): ...``. Creates the folder if needed. Raises
    RunFolderLocked (a ValueError) if another process holds it; takes over a stale lock left by a dead process,
    saying so through `log` (default: a line on stderr). `stale`: the dead holder's record when one was taken over."""

    def __init__(self, run_path, *, log=ckpt.say):
        self.run_path = _as_path(run_path, "run_path")
        self.path = self.run_path / LOCK
        self._log = log
        self._fd: int | None = None
        self.stale: dict | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{str(self.path)!r} is already held by this RunLock")
        if self.run_path.exists() and not self.run_path.is_dir():
            raise ValueError(f"run folder {str(self.run_path)!r} is a file, not a folder")
        self.run_path.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a `.lock` symlinked elsewhere would lock (and rewrite) some other file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                         0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot open the run lock {str(self.path)!r}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OSError(e.errno, f"cannot lock {str(self.path)!r}: {e.strerror}") from None
                rec = _read_record(fd)
                raise RunFolderLocked(f"{str(self.run_path)!r} is in use by another trainer: {_holder(rec)} holds "
                                      f"{str(self.path)!r}") from None
            rec = _read_record(fd)
            if rec:  # a record whose writer no longer holds the lock: it died without releasing
                self.stale = rec
                self._log(f"{str(self.path)!r}: taking over the stale lock of {_holder(rec)}, which no longer "
                          f"holds it{_alive_note(rec)}")
            data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data + b"\n", 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing releases the flock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record: a clean release, nothing to call stale next time
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _check_not_locked_by_other(run_path: Path) -> None:
    """RunFolderLocked if any RunLock holds the run (another process's, or one of this process's own: a probe
    cannot tell them apart, which is why clean_leftovers takes the caller's lock)."""
    lock = run_path / LOCK
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderLocked(f"{str(run_path)!r} is in use: {_holder(_read_record(fd))} holds {str(lock)!r}; "
                                  "its temp files are work in progress") from None
        raise
    finally:
        os.close(fd)  # also drops the shared probe lock


# ------------------------------------------------------------------------------------------------------ leftovers
def clean_leftovers(run_path, *, lock: RunLock | None = None) -> list[str]:
    """Remove the temp files and folders killed saves, prunes and atomic writes left in `run_path` (see the module
    docstring); returns what was removed or restored. Pass the `lock` you hold on the folder; without one, the
    folder must not be locked by anyone (RunFolderLocked otherwise)."""
    run_path = _as_path(run_path, "run_path")
    if lock is not None and (not lock.held or lock.run_path.resolve() != run_path.resolve()):
        raise ValueError(f"lock must be a held RunLock on {str(run_path)!r}")
    if not run_path.is_dir():
        return []
    if lock is None:
        _check_not_locked_by_other(run_path)
    ckpt_dir = run_path / "checkpoints"
    done = ckpt.clean_checkpoint_dir(ckpt_dir)
    for root, dirs, files in os.walk(run_path):  # does not follow symlinks
        root = Path(root)
        dirs[:] = [d for d in dirs if root / d != ckpt_dir]  # cleaned above, by the checkpoints' own rules
        for name in files:
            if is_atomic_temp(name) or _OLD_TEMPS.match(name):
                (root / name).unlink(missing_ok=True)
                done.append(str(root / name))
    return done


# ------------------------------------------------------------------------------------------------------------ log
def _split_log(path: Path) -> tuple[list[dict], int, bool, str | None]:
    """(rows, byte length of the good prefix, whether that prefix ends in a newline, why the last line is torn or
    None). A last line that parses but lacks its newline is a row (the kill fell just before the newline)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, True, None
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    rows, pos = [], 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        end = pos + len(line) + (0 if last and not terminated else 1)
        if line.strip():
            try:
                row = json.loads(line.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except (UnicodeDecodeError, ValueError) as e:
                if last:
                    return rows, pos, True, f"line {i + 1} ({e})"
                raise ValueError(f"{str(path)!r}: line {i + 1} is corrupt ({e}); only a torn last line is dropped "
                                 "on its own") from None
            rows.append(row)
        pos = end
    return rows, pos, terminated or not lines, None


def read_log(path) -> list[dict]:
    """The rows of a JSON-lines log (a missing file: []). A torn last line (cut short by a kill or a full disk) is
    dropped with a warning; a corrupt line elsewhere is a ValueError naming the file and line."""
    path = _as_path(path)
    rows, _, _, torn = _split_log(path)
    if torn:
        warnings.warn(f"{str(path)!r}: dropping the torn last {torn}", UserWarning, stacklevel=2)
    return rows


def truncate_log(path, step: int) -> list[dict]:
    """Keep the rows with "step" <= `step` (a resume from step `step` replays the rest), atomically; a torn last
    line goes too. Rows without a "step" are kept. Returns the rows kept. Call it before opening a LogWriter."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    path = _as_path(path)
    if not path.exists():
        return []
    rows = [r for r in read_log(path) if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


class LogWriter:
    """Append JSON rows to `path`, one ``write`` each (a kill can tear only the last line). Opening a file whose last
    line is torn drops that line first (with a warning). `fsync()` at checkpoints makes the rows so far durable. If the
    file is replaced meanwhile (`truncate_log`), the next row goes to the new file."""

    def __init__(self, path):
        self.path = _as_path(path)
        rows, good, terminated, torn = _split_log(self.path)  # raises on corruption before the last line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()
        if torn:
            warnings.warn(f"{str(self.path)!r}: dropping the torn last {torn} before appending", UserWarning,
                          stacklevel=2)
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        if not terminated:  # a complete last row whose newline the kill cut off
            os.write(self._fd, b"\n")
        self.rows = len(rows)

    def append(self, row: dict) -> None:
        if self._fd is None:
            raise ValueError(f"{str(self.path)!r}: the LogWriter is closed")
        if not isinstance(row, dict):
            raise TypeError(f"row must be a dict, got {type(row).__name__}")
        line = (json.dumps(row) + "\n").encode()
        self._follow_replacement()
        view = memoryview(line)
        while view:  # os.write may write less than asked (signals, a full disk): finish the line or raise
            n = os.write(self._fd, view)
            view = view[n:]
        self.rows += 1

    def _follow_replacement(self) -> None:
        # truncate_log (or any atomic rewrite) replaces the file: appending to the old, unlinked inode would lose
        # every row from then on, silently. Follow the path instead.
        try:
            same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)

    def fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
