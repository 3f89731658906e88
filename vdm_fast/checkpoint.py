"""Checkpoints that never break, never unpickle and are verified before they are trusted.

Layout of a run directory (format 2)::

    run/checkpoints/step_00002000/model.safetensors      weights
                                 ema.safetensors        EMA weights (if saved)
                                 optimizer.safetensors  optimizer tensors (Adam moments, step counts) (if saved)
                                 optimizer.json         optimizer structure (param groups, hyper-parameters) (if saved)
                                 state.safetensors      other tensors (RNG states of every rank)
                                 state.json             {"format": 2, "step", "parts": [saved parts], "state": tree}
                                 config.json            model / diffusion / training config
                                 manifest.json          {"format": 2, "files": {name: {"size", "sha256"}}}, LAST
    run/checkpoints/latest                              "step_00002000\\n": the checkpoint to resume from

Invariants:

- Saving is atomic twice over: a step is written into a temporary directory ``.tmp-step_*`` beside the others, the
  manifest (size and SHA-256 of every other file) written last, the directory fsynced and renamed into place (a
  directory rename is atomic), and only then is `latest` replaced (`_fsutil.atomic_write_text`). A kill at any
  point leaves `latest` naming a complete checkpoint. Saving a step that exists (a resumed run) swaps the folders in
  one atomic exchange (`_fsutil.exchange`) where the OS has it, else in two renames. What a kill leaves behind is
  removed (or, for a killed two-rename swap, the old folder restored) by `clean_checkpoint_dir`, which
  `run_dir.clean_leftovers` calls at the start of a run; temp folders carry their maker's pid, and each save also
  sweeps those of processes no longer running (never a live writer's save in progress).
- Nothing is trusted on load. `latest` must hold one step folder name (``step_<digits>``: no separator, no "..", no
  absolute path) of a real directory (not a symlink) inside this `checkpoints/`; anything else is an error naming
  the file, and no other checkpoint is silently taken instead (no `latest` at all: the newest step folder). Every
  file a load reads is hashed and checked against the manifest; a part that was saved but is gone is refused unless
  the caller allows it (``allow_missing``: ema or optimizer, never model or state). `find_resume(run,
  last_good=True)` walks back from what `latest` names to the newest checkpoint that verifies, saying which it took
  and why.
- No NaN/Inf: `save` refuses (NonFiniteCheckpoint, before writing anything) model, EMA, optimizer or state tensors
  and optimizer hyper-parameters that are not finite, and `load` refuses a checkpoint holding any.
- Pruning is crash-safe: a step folder is renamed to a tombstone ``.trash-step_*`` (atomic: from then on it is not a
  checkpoint) before it is deleted; the newest checkpoint, the one `latest` names and `protect` are never pruned.
- Format 1 checkpoints (before manifests) still load: verification is skipped, and said once per folder.

Loading reads tensors with safetensors and structure with json: no pickle, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from vdm_fast._cli import say  # the default `log` of checkpoints and the run folder
from vdm_fast._fsutil import atomic_write_text, exchange, fsync_dir, is_atomic_temp, remove_via_tombstone

STEP_DIR = re.compile(r"^step_([0-9]+)\Z")  # ASCII digits, no trailing newline (as `$` would allow)
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)
PARTS = ("model", "ema", "optimizer", "state")
# The files of each part; config.json and state.json are read by every load.
PART_FILES = {"model": ("model.safetensors",), "ema": ("ema.safetensors",),
              "optimizer": ("optimizer.json", "optimizer.safetensors"), "state": ("state.safetensors",)}
ALWAYS = ("state.json", "config.json")
TMP_PREFIX, OLD_PREFIX, TRASH_PREFIX = ".tmp-", ".tmp-old-", ".trash-"
_MAX_POINTER = 4096  # a `latest` longer than this is not a step name: do not read a huge file to find out


class CheckpointError(ValueError):
    """A checkpoint (or the `latest` pointer) that cannot be trusted; the message names the file."""


class DanglingLatest(CheckpointError):
    """`latest` holds a well-formed step folder name, but that folder is gone (`target`)."""

    def __init__(self, target: Path, msg: str):
        super().__init__(msg)
        self.target = target


class NonFiniteCheckpoint(CheckpointError):
    """NaN or Inf in what a checkpoint would hold (on save) or holds (on load)."""


# ---------------------------------------------------------------------------------------------- nested state <-> files
def _join(prefix: str, k) -> str:
    return f"{prefix}.{k}" if prefix else str(k)


def flatten(obj, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "") -> tuple[object, dict]:
    """Split a nested structure (dicts, lists, tuples, tensors, JSON scalars) into a JSON tree and a flat dict of
    tensors; the tree holds {"__tensor__": key} where a tensor was, key being the dotted path. Dicts with non-string
    keys (an optimizer's state is keyed by parameter index) and tuples are tagged so that `unflatten` restores them
    exactly. Two tensors whose dotted paths coincide ({"a.b": t1, "a": {"b": t2}}, {7: t1, "7": t2}) would overwrite
    each other: ValueError naming the key."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        if key in tensors:
            raise ValueError(f"cannot store two tensors under the key {key!r}: dict keys collide once joined with "
                             "'.' (e.g. {'a.b': ..., 'a': {'b': ...}} or {7: ..., '7': ...})")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store dict key {k!r} of type {type(k).__name__} at {prefix or 'top level'}")
        items = [(k, flatten(v, tensors, _join(prefix, k))[0]) for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
            return dict(items), tensors
        return {"__dict__": [[k, v] for k, v in items]}, tensors
    if isinstance(obj, (list, tuple)):
        out = [flatten(v, tensors, _join(prefix, i))[0] for i, v in enumerate(obj)]
        return ({"__tuple__": out} if isinstance(obj, tuple) else out), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix or 'top level'} in a checkpoint "
                    "(tensors, dicts, lists, tuples, numbers, strings and None only)")


def unflatten(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of `flatten`."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__tuple__"}:
            return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
        if set(tree) == {"__dict__"}:
            return {k: unflatten(v, tensors) for k, v in tree["__dict__"]}
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


# ------------------------------------------------------------------------------------------------------ file helpers
def write_text_atomic(path, text: str) -> None:
    """Replace `path` with `text` atomically (kept for callers of the old name; `_fsutil.atomic_write_text`)."""
    atomic_write_text(path, text)


def _write_bytes(path: Path, data: bytes) -> None:
    # Inside the temp step folder, which is itself renamed into place: a plain write + fsync is enough.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors that share storage (tied weights, views): clone exactly those, not every tensor
    # (a clone of each costs as much as the serialisation itself).
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    _write_bytes(path, safetensors.torch.save(out))


def _load_tensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device=str(device))
    except Exception as e:  # safetensors' own errors name no file
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from e


def _dump_json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True).encode()


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from None
    except RecursionError:  # hostile nesting
        raise CheckpointError(f"{str(path)!r} is nested too deeply to be a checkpoint's JSON") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, the files in parallel threads (hashlib releases the GIL): one stream hashes at about
    0.5-2 GB/s, and a big model's checkpoint holds several large files."""
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


# ------------------------------------------------------------------------------------------------------- finiteness
def _finite(t: torch.Tensor) -> bool:
    if t.is_complex():
        t = torch.view_as_real(t)
    # One min/max reduction (NaN propagates into both, an Inf shows in one): ~50x faster on CPU than
    # isfinite(t).all(), which materialises a bool tensor as large as t.
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _first_nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    for k, v in tensors.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not _finite(v):
            return k
    return None


def _first_nonfinite_scalar(tree, where: str = "") -> str | None:
    """The dotted path of the first NaN/Inf float in a `flatten` tree (optimizer hyper-parameters: lr, betas...)."""
    if isinstance(tree, float):
        return None if math.isfinite(tree) else (where or "top level")
    if isinstance(tree, dict):
        if set(tree) == {"__dict__"}:
            items = [(kv[0], kv[1]) for kv in tree["__dict__"] if isinstance(kv, list) and len(kv) == 2]
        elif set(tree) == {"__tuple__"}:
            items = list(enumerate(tree["__tuple__"]))
        else:
            items = list(tree.items())
    elif isinstance(tree, list):
        items = list(enumerate(tree))
    else:
        return None
    for k, v in items:
        if (bad := _first_nonfinite_scalar(v, _join(where, k))) is not None:
            return bad
    return None


# -------------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A loaded checkpoint. model / ema: state dicts; optimizer: an optimizer state_dict; state: anything saved.
    saved: the parts the checkpoint holds; verified: whether its files were checked against a manifest."""

    path: Path
    step: int
    config: dict
    model: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    state: dict = field(default_factory=dict)
    saved: tuple[str, ...] = ()
    verified: bool = False


def _ckpt_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(ckpt_dir) -> list[tuple[int, Path]]:
    """Checkpoints renamed into place under ckpt_dir (real directories named step_<digits>), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
           if (m := STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()]
    return sorted(out)


OPTIONAL = ("ema", "optimizer")  # the parts a caller may go on without (a deliberate reset); never model or state


def _parts_arg(parts, name: str, choices=PARTS) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    for p in parts:
        if p not in choices:
            raise ValueError(f"{name} must hold parts among {choices}, got {p!r}")
    return parts


def save(run_dir, step: int, *, config: dict, model: dict[str, torch.Tensor], ema: dict | None = None,
         optimizer: dict | None = None, state: dict | None = None, keep: int | None = 3) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints atomically, point `latest` at it, and `prune` to the newest
    `keep` (None or 0: keep all). Returns the step directory. Raises NonFiniteCheckpoint, before writing anything,
    if a tensor or optimizer hyper-parameter is NaN or Inf."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise ValueError(f"keep must be None or an int >= 0 (0: keep all), got {keep!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    # Every check (types, finiteness, JSON-ability) runs before a byte reaches the disk: a refused save leaves no trace.
    files: dict[str, bytes | dict[str, torch.Tensor]] = {}
    parts = ["model"]
    blobs = {"model": model, "ema": ema}
    for part in ("model", "ema"):
        tensors = blobs[part]
        if tensors is None and part == "ema":
            continue
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise TypeError(f"{part} must be a dict of tensors (a state_dict)")
        if (bad := _first_nonfinite_tensor(tensors)) is not None:
            raise NonFiniteCheckpoint(f"refusing to save step {step}: {part} tensor {bad!r} holds NaN or Inf")
        files[f"{part}.safetensors"] = tensors
        if part == "ema":
            parts.append("ema")
    if optimizer is not None:
        tree, tensors = flatten(optimizer)
        if (bad := _first_nonfinite_tensor(tensors)) is not None:
            raise NonFiniteCheckpoint(f"refusing to save step {step}: optimizer tensor {bad!r} holds NaN or Inf")
        if (bad := _first_nonfinite_scalar(tree)) is not None:
            raise NonFiniteCheckpoint(f"refusing to save step {step}: optimizer value {bad!r} is NaN or Inf")
        files["optimizer.safetensors"], files["optimizer.json"] = tensors, _dump_json(tree)
        parts.append("optimizer")
    tree, tensors = flatten(state or {})
    if (bad := _first_nonfinite_tensor(tensors)) is not None:
        raise NonFiniteCheckpoint(f"refusing to save step {step}: state tensor {bad!r} holds NaN or Inf")
    parts.append("state")
    files["state.safetensors"] = tensors
    files["state.json"] = _dump_json({"format": FORMAT, "step": step, "parts": parts, "state": tree})
    files["config.json"] = _dump_json(config)

    ckpt_dir = _ckpt_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clean_checkpoint_dir(ckpt_dir, only_dead=True)  # leftovers of a save that was killed
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-{os.getpid()}-", dir=ckpt_dir))
    final = ckpt_dir / name
    try:
        for fname, content in files.items():
            if isinstance(content, dict):
                _save_tensors(tmp / fname, content)
            else:
                _write_bytes(tmp / fname, content)
        # Hashed from the disk, after every write: the manifest vouches for the bytes a load will read.
        digests = _sha256_all([tmp / f for f in files])
        manifest = {f: {"size": (tmp / f).stat().st_size, "sha256": h} for f, h in zip(files, digests)}
        _write_bytes(tmp / MANIFEST, _dump_json({"format": FORMAT, "files": manifest}))
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        if final.exists():  # the same step again (e.g. after a resume): swap in one step where the OS can
            if exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)  # now the old copy, already out of sight
            else:  # two renames: a kill between them leaves the old copy aside; clean_checkpoint_dir puts it back
                old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{name}-{os.getpid()}-", dir=ckpt_dir))
                os.replace(final, old / name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(ckpt_dir / LATEST, name + "\n")
    prune(run_dir, keep or 0, protect=final)
    return final


# ------------------------------------------------------------------------------------------------- finding a checkpoint
def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and (bool(STEP_DIR.match(path.name)) or any(
        (path / f).exists() for f in (MANIFEST, "state.json", "model.safetensors")))


def read_latest(ckpt_dir) -> Path | None:
    """The step folder `ckpt_dir/latest` names, None if there is no `latest`. CheckpointError (naming the file) for
    a pointer that is unreadable, is not one step folder name, or names a folder that is not a real directory here:
    nothing else is substituted for it."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    try:
        st = os.stat(latest)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{str(latest)!r} cannot be read ({e.strerror})") from None
    fix = "fix it or delete it (then the newest checkpoint is used)"
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read, a directory cannot be read
        raise CheckpointError(f"{str(latest)!r} is not a regular file: {fix}")
    if st.st_size > _MAX_POINTER:
        raise CheckpointError(f"{str(latest)!r} is {st.st_size} bytes, not a step folder name: {fix}")
    try:
        raw = latest.read_bytes()
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{str(latest)!r} is unreadable (not text, {len(raw)} bytes): {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{str(latest)!r} cannot be read ({e.strerror}): {fix}") from None
    if not STEP_DIR.match(text):
        raise CheckpointError(f"{str(latest)!r} holds {text[:80]!r}, not a step folder name (step_<digits>, no path): "
                              f"{fix}")
    target = ckpt_dir / text
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"{str(latest)!r} names {text!r}, which is not a real directory in {str(ckpt_dir)!r}")
    if not target.exists():
        raise DanglingLatest(target, f"{str(latest)!r} names {text!r}, which does not exist in {str(ckpt_dir)!r} "
                             f"(deleted, or a save was killed: clean_leftovers restores it); {fix}")
    return target


def find(path) -> Path:
    """The checkpoint directory `path` names: a step directory, a checkpoints directory or a run directory (then the
    one `latest` names, else the newest complete one). FileNotFoundError if there is none; CheckpointError for a
    `latest` that cannot be trusted (`read_latest`)."""
    path = Path(path)
    if path.name != "checkpoints" and _is_step_dir(path) and not (path / "checkpoints").is_dir():
        return path
    ckpt_dir = path if path.name == "checkpoints" else _ckpt_dir(path)
    target = read_latest(ckpt_dir)
    if target is not None:
        return target
    dirs = step_dirs(ckpt_dir)
    if dirs:
        return dirs[-1][1]
    raise FileNotFoundError(f"no checkpoint in {str(path)!r} (expected {str(ckpt_dir / LATEST)!r} or step_* dirs)")


def exists(run_dir) -> bool:
    """Whether `run_dir` holds a checkpoint (or a `latest` pointer, even an untrustworthy one)."""
    try:
        find(run_dir)
        return True
    except FileNotFoundError:
        return False
    except CheckpointError:
        return True


def find_resume(run, last_good: bool = False, *, log=say) -> Path:
    """The checkpoint to resume `run` from: the one `latest` names (else the newest). With last_good=True, the newest
    intact one at or before it (`verify`), saying which it took and why newer ones were skipped. FileNotFoundError if
    there is none (or none intact). CheckpointError for a `latest` that is not a step folder name, whatever
    last_good says; one naming a folder that is gone is an error too unless last_good (then the walk starts there)."""
    try:
        chosen = find(run)
    except DanglingLatest as e:
        if not last_good:
            raise
        chosen = e.target
    ckpt_dir = chosen.parent
    if not last_good:
        return chosen
    candidates = [p for s, p in reversed(step_dirs(ckpt_dir)) if s <= _step_of(chosen)]
    skipped = [] if chosen.exists() else [f"{chosen.name} (does not exist)"]
    for p in candidates:
        try:
            verify(p)
        except CheckpointError as e:
            skipped.append(f"{p.name} ({e})")
            continue
        if skipped:
            log(f"resuming from the last good checkpoint {str(p)!r}; skipped: " + "; ".join(skipped))
        else:
            log(f"resuming from {str(p)!r} (verified)")
        return p
    raise FileNotFoundError(f"no intact checkpoint in {str(ckpt_dir)!r}: " + "; ".join(skipped))


def _step_of(path: Path) -> int:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else sys.maxsize


# ---------------------------------------------------------------------------------------------------------- verifying
_WARNED_UNVERIFIED: set[str] = set()


def _meta(d: Path) -> dict:
    meta = _read_json(d / "state.json")
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{str(d / 'state.json')!r}: unknown checkpoint format {got!r} (this code reads "
                              f"{', '.join(map(str, READABLE_FORMATS))})")
    if isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"{str(d / 'state.json')!r}: step must be an int >= 0, got {meta.get('step')!r}")
    if (m := STEP_DIR.match(d.name)) and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"{str(d / 'state.json')!r} says step {meta['step']} but its folder is {d.name!r}")
    return meta


def _saved_parts(d: Path, meta: dict) -> tuple[str, ...]:
    if meta["format"] >= 2:
        parts = meta.get("parts")
        if not isinstance(parts, list) or "model" not in parts or "state" not in parts or not set(parts) <= set(PARTS):
            raise CheckpointError(f"{str(d / 'state.json')!r}: bad list of saved parts {parts!r}")
        return tuple(p for p in PARTS if p in parts)
    # Format 1 recorded nothing: a part is saved where any of its files is (a half-present part is then refused).
    return tuple(p for p in PARTS if p in ("model", "state") or any((d / f).exists() for f in PART_FILES[p]))


def verify(path, parts=PARTS, *, allow_missing=()) -> bool:
    """Check the files of checkpoint `path` that `parts` need (config.json and state.json always) against its
    manifest: present, regular files, sizes and SHA-256. True if verified, False for a format 1 checkpoint (no
    manifest: nothing to check against). CheckpointError naming the file otherwise. Saved parts in `allow_missing`
    may be absent (all their files gone); a present file is checked all the same."""
    d = find(path)
    parts, allow = _parts_arg(parts, "parts"), _parts_arg(allow_missing, "allow_missing", OPTIONAL)
    names = {n: "" for n in ALWAYS}  # file -> the part it belongs to

    def missing(n: str) -> CheckpointError:
        part = names[n]
        hint = f"; pass allow_missing=({part!r},) to go on without it" if part in ("ema", "optimizer") else ""
        return CheckpointError(f"{str(d / n)!r} is missing: the checkpoint lacks its {part or n}{hint}")

    def needed(meta: dict) -> list[str]:
        saved = _saved_parts(d, meta)
        for p in parts:
            if p not in saved:
                continue
            present = [f for f in PART_FILES[p] if (d / f).exists() or (d / f).is_symlink()]
            if not present and p in allow:
                continue
            names.update((f, p) for f in PART_FILES[p])
        return [n for n in names if n not in ALWAYS]

    if not (d / MANIFEST).exists() and not (d / MANIFEST).is_symlink():
        meta = _meta(d)
        if meta["format"] >= 2:
            raise CheckpointError(f"{str(d / MANIFEST)!r} is missing: the checkpoint cannot be verified")
        for n in [*ALWAYS, *needed(meta)]:
            if not (d / n).exists():
                raise missing(n)
        return False
    manifest = _read_json(d / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{str(d / MANIFEST)!r} holds no file list")

    def check(n: str) -> None:
        f = d / n
        entry = files.get(n)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{str(f)!r} is not in the manifest {str(d / MANIFEST)!r}")
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            raise missing(n) from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{str(f)!r} is not a regular file")
        if st.st_size != entry.get("size"):
            raise CheckpointError(f"{str(f)!r} has {st.st_size} bytes, the manifest says {entry.get('size')}")

    def check_all(batch: list[str]) -> None:
        for n in batch:  # the cheap checks first, for every file
            check(n)
        # Hashed on every call, never cached by (size, mtime): file times come from a coarse clock (a jiffy), so a
        # byte flipped just after a save could keep both.
        for n, h in zip(batch, _sha256_all([d / n for n in batch])):
            if h != files[n].get("sha256"):
                raise CheckpointError(f"{str(d / n)!r} fails verification: its SHA-256 differs from the manifest's "
                                      "(corrupted or modified)")

    check_all(list(ALWAYS))  # before state.json is parsed: a flipped byte there must read as corruption, not bad JSON
    check_all(needed(_meta(d)))
    return True


def load(path, *, map_location="cpu", parts=PARTS, allow_missing=()) -> Checkpoint:
    """Load the checkpoint `find(path)` names after `verify`ing the files `parts` need (config and step always).
    A part that was never saved comes back None; a saved part whose files are gone is an error unless it is in
    `allow_missing` (e.g. ("optimizer",) to reset Adam on purpose), then None with a message. CheckpointError for a
    checkpoint failing verification, NonFiniteCheckpoint for NaN/Inf in it, each naming the file."""
    d = find(path)
    parts, allow = _parts_arg(parts, "parts"), _parts_arg(allow_missing, "allow_missing", OPTIONAL)
    verified = verify(d, parts, allow_missing=allow)
    if not verified and str(d) not in _WARNED_UNVERIFIED:
        _WARNED_UNVERIFIED.add(str(d))
        warnings.warn(f"{str(d)!r} is a format 1 checkpoint (no manifest): loaded without verification",
                      stacklevel=2)
    meta = _meta(d)
    saved = _saved_parts(d, meta)
    ck = Checkpoint(path=d, step=int(meta["step"]), config=_read_json(d / "config.json"), saved=saved,
                    verified=verified)

    def absent(part: str) -> bool:
        if part not in saved:
            return True
        if any((d / f).exists() for f in PART_FILES[part]):
            return False
        # verify let it through: all its files are gone and the caller allowed that
        say(f"{str(d)!r}: its {part} is missing (allowed): going on without it")
        return True

    def checked(tensors: dict, fname: str) -> dict:
        if (bad := _first_nonfinite_tensor(tensors)) is not None:
            raise NonFiniteCheckpoint(f"{str(d / fname)!r}: tensor {bad!r} holds NaN or Inf")
        return tensors

    if "model" in parts:
        ck.model = checked(_load_tensors(d / "model.safetensors", map_location), "model.safetensors")
    if "ema" in parts and not absent("ema"):
        ck.ema = checked(_load_tensors(d / "ema.safetensors", map_location), "ema.safetensors")
    if "optimizer" in parts and not absent("optimizer"):
        tree = _read_json(d / "optimizer.json")
        if (bad := _first_nonfinite_scalar(tree)) is not None:
            raise NonFiniteCheckpoint(f"{str(d / 'optimizer.json')!r}: {bad!r} is NaN or Inf")
        tensors = checked(_load_tensors(d / "optimizer.safetensors", map_location), "optimizer.safetensors")
        ck.optimizer = _unflatten_checked(tree, tensors, d / "optimizer.json")
    if "state" in parts:
        tensors = checked(_load_tensors(d / "state.safetensors", "cpu"), "state.safetensors")
        ck.state = _unflatten_checked(meta.get("state", {}), tensors, d / "state.json")
    return ck


def _unflatten_checked(tree, tensors: dict, where: Path):
    try:
        return unflatten(tree, tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{str(where)!r} does not match its tensors ({type(e).__name__}: {e})") from None


# -------------------------------------------------------------------------------------------- pruning and leftovers
def _protected(ckpt_dir: Path, protect) -> set[Path]:
    if protect is None:
        protect = ()
    elif isinstance(protect, (str, os.PathLike, int)) and not isinstance(protect, bool):
        protect = (protect,)
    out = set()
    for p in protect:
        if isinstance(p, bool) or not isinstance(p, (str, os.PathLike, int)):
            raise TypeError(f"protect must be step numbers or paths, got {type(p).__name__}")
        out.add((ckpt_dir / f"step_{p:08d}") if isinstance(p, int) else Path(p))
    return {p.resolve() for p in out}


def prune(run, keep: int, protect: Path | int | Iterable | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints of `run` (0: keep all), crash-safely: each is renamed to a
    tombstone first (an atomic rename: a kill leaves it either a whole checkpoint or no checkpoint at all), then
    deleted. Never removes the newest checkpoint, the one `latest` names, nor `protect` (step folders or step
    numbers). Returns what was deleted."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be an int >= 0 (0: keep all), got {keep!r}")
    if keep == 0:
        return []
    run = Path(run)
    ckpt_dir = run if run.name == "checkpoints" else _ckpt_dir(run)
    keep_set = _protected(ckpt_dir, protect)
    try:
        if (target := read_latest(ckpt_dir)) is not None:
            keep_set.add(target.resolve())
    except CheckpointError:
        pass  # an untrustworthy pointer protects nothing, but pruning never touches the newest anyway
    removed = []
    for _, p in step_dirs(ckpt_dir)[:-keep]:
        if p.resolve() in keep_set:
            continue
        # the pid in the tombstone's name: see _owner_alive
        remove_via_tombstone(p, ckpt_dir / f"{TRASH_PREFIX}{p.name}-{os.getpid()}-{secrets.token_hex(4)}")
        removed.append(p)
    return removed


_TEMP_OWNER = re.compile(r"^\.(?:tmp-old-|tmp-|trash-)step_[0-9]+-([0-9]+)-[a-z0-9_]+\Z")


def _owner_alive(name: str) -> bool:
    """Whether the process that made temp entry `name` (its pid is in the name) may still be writing it."""
    m = _TEMP_OWNER.match(name)
    if not m:
        return False  # a name without a pid: written by code before pids were recorded
    pid = int(m.group(1))
    if pid == os.getpid():
        return False  # this process is not inside a save while it sweeps
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def clean_checkpoint_dir(ckpt_dir, *, only_dead: bool = False) -> list[str]:
    """Remove what a killed save or prune leaves in `ckpt_dir` (temp step folders, tombstones, temp pointer files),
    and put back a step folder that a killed re-save of the same step had moved aside. Returns the paths removed or
    restored. For a run no other process is writing (hold its `run_dir.RunLock`); `only_dead=True` (what every
    save does) touches only temp folders whose maker's pid, recorded in the name, is no longer running, so even two
    unlocked writers never delete each other's save in progress."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    done = []
    for p in sorted(ckpt_dir.iterdir()):
        name = p.name
        ours = name.startswith((TMP_PREFIX, TRASH_PREFIX))
        if ours and only_dead and _owner_alive(name):
            continue
        if name.startswith(OLD_PREFIX) and p.is_dir() and not p.is_symlink():
            for inner in p.iterdir():  # the old copy of a step whose new copy may not be in place yet
                if STEP_DIR.match(inner.name) and not (ckpt_dir / inner.name).exists():
                    os.replace(inner, ckpt_dir / inner.name)
                    done.append(f"{ckpt_dir / inner.name} (restored)")
        # Temp pointers carry no pid: only a sweep under the run's lock removes them.
        pointer = (name.startswith(f".{LATEST}.") and name.endswith(".tmp")) or is_atomic_temp(name)
        if ours or (pointer and not only_dead):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            done.append(str(p))
    if done:
        fsync_dir(ckpt_dir)
    return done


# --------------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's torch RNG states (CPU, and every CUDA device when CUDA is initialised)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
