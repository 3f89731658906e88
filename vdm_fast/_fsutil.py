"""The project's one atomic file write.

A reader of `path` sees either the old file or the complete new one, never a prefix, and after a crash (kill -9,
power loss) at most a hidden temp file is left beside it:

1. the new content goes into a temp file in the same directory (same filesystem, so the rename is atomic), named
   ``.<name>.tmp-<8 random chars><suffix>``: hidden, recognisable by `is_atomic_temp` (so `run_dir.clean_leftovers`
   can remove it after a kill), and ending in `path`'s own suffix so writers that pick a format by the suffix
   (pillow, matplotlib, imageio) still do;
2. the temp file is fsynced, given the permissions a plain ``open(path, "w")`` would have (0666 & ~umask; mkstemp
   makes 0600 files), and ``os.replace``d onto `path`;
3. the directory is fsynced, so the rename itself survives a power loss.

On an exception inside `atomic_path` the temp file is removed and `path` is untouched.

`exchange(a, b)` swaps two directory entries in one atomic step (Linux renameat2 RENAME_EXCHANGE), for replacing a
non-empty directory, which os.replace cannot do; where the kernel, libc or filesystem lacks it, it says so (returns
False) and the caller falls back to two renames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# ".<name>.tmp-<mkstemp's 8 chars><suffix>"; mkstemp draws from [a-z0-9_].
_TEMP = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}(\.[^.]*)?$")


def _as_path(path, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.name:
        raise ValueError(f"{name} must name a file, got {str(path)!r}")
    return path


def is_atomic_temp(name: str) -> bool:
    """Whether a file name is one `atomic_path` makes (a leftover when no write is in progress)."""
    return bool(_TEMP.match(name))


def fsync_dir(path) -> None:
    """fsync a directory, so that renames and new entries in it survive a power loss. Filesystems that cannot open or
    fsync a directory are skipped: the rename is still atomic there, only its durability is the filesystem's."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # a directory: "." is one too
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def remove_via_tombstone(path, tomb) -> None:
    """Remove `path` (a file or a folder) crash-safely: renamed to `tomb`, a name in the same folder, first (atomic:
    from then on `path` is gone as a whole), then deleted. A kill during the delete leaves only `tomb`, whose name
    says what it is (the caller's cleanup removes it)."""
    path, tomb = _as_path(path), _as_path(tomb, "tomb")
    os.replace(path, tomb)
    fsync_dir(tomb.parent)
    if tomb.is_dir() and not tomb.is_symlink():
        shutil.rmtree(tomb, ignore_errors=True)
    else:
        tomb.unlink(missing_ok=True)


def probe_writable(folder) -> None:
    """Create and remove a temp file in `folder`: OSError (as the OS says it) where the folder cannot take one.
    What a permission bit, a read-only mount or a full disk allow is only known by trying."""
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_path(path, *, make_parents: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix) to write to; on success it is fsynced and renamed onto `path`
    atomically, on an exception it is removed and `path` is left as it was. `make_parents`: create missing
    parent directories first."""
    path = _as_path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data, *, make_parents: bool = False) -> None:
    """Replace `path` with the bytes `data` atomically (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    with atomic_path(path, make_parents=make_parents) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str, *, encoding: str = "utf-8", make_parents: bool = False) -> None:
    """Replace `path` with `text` atomically (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding), make_parents=make_parents)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_renameat2 = None


def exchange(a, b) -> bool:
    """Atomically swap the entries `a` and `b` (both must exist) in one directory or filesystem; True if done, False
    where renameat2(RENAME_EXCHANGE) is unavailable (nothing changed then). Other failures raise OSError."""
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(_as_path(a, "a")), _AT_FDCWD, os.fsencode(_as_path(b, "b")),
                  _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this kernel or filesystem cannot exchange
        return False
    raise OSError(err, f"cannot exchange {str(a)!r} and {str(b)!r}: {os.strerror(err)}")
