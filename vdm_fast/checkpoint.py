"""Checkpoints that never break and never unpickle.

Layout of a run directory::

    run/checkpoints/step_00002000/model.safetensors      weights
                                 ema.safetensors        EMA weights (optional)
                                 optimizer.safetensors  optimizer tensors (Adam moments, step counts)
                                 optimizer.json         optimizer structure (param groups, hyper-parameters)
                                 state.safetensors      other tensors (RNG states of every rank)
                                 state.json             step, data stream position, ... (anything JSON)
                                 config.json            model / diffusion / training config
    run/checkpoints/latest                              "step_00002000": the checkpoint to resume from

Saving is atomic twice over: a step is written into a temporary directory beside the others, flushed to disk, then
renamed into place (a directory rename is atomic), and only then is `latest` replaced (temp file + os.replace). A crash
at any point leaves `latest` naming a complete checkpoint, and leftover temporary directories are removed by the next
save. Loading reads tensors with safetensors and structure with json: no pickle, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"
FORMAT = 1


# ---------------------------------------------------------------------------------------------- nested state <-> files
def flatten(obj, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "") -> tuple[object, dict]:
    """Split a nested structure (dicts, lists, tuples, tensors, JSON scalars) into a JSON tree and a flat dict of
    tensors; the tree holds {"__tensor__": key} where a tensor was. Dicts with non-string keys (an optimizer's state
    is keyed by parameter index) and tuples are tagged so that `unflatten` restores them exactly."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        items = [(k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))[0]) for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
            return dict(items), tensors
        for k, _ in items:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"cannot store dict key {k!r} of type {type(k).__name__} at {prefix or 'top level'}")
        return {"__dict__": [[k, v] for k, v in items]}, tensors
    if isinstance(obj, (list, tuple)):
        out = [flatten(v, tensors, f"{prefix}.{i}" if prefix else str(i))[0] for i, v in enumerate(obj)]
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


# ------------------------------------------------------------------------------------------------------ atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path, text: str) -> None:
    """Replace `path` with `text` atomically: a temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write_bytes(Path(tmp), text.encode())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    # Clones break any storage sharing between entries, which safetensors refuses.
    _write_bytes(path, save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}))


def _load_tensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def _dump_json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True).encode()


# -------------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A loaded checkpoint. model / ema: state dicts; optimizer: an optimizer state_dict; state: anything saved."""

    path: Path
    step: int
    config: dict
    model: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    state: dict = field(default_factory=dict)


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place) under ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(out)


def _ckpt_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir, step: int, *, config: dict, model: dict[str, torch.Tensor], ema: dict | None = None,
         optimizer: dict | None = None, state: dict | None = None, keep: int | None = 3) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints atomically, point `latest` at it, and keep the newest `keep`
    (None or 0: all). Returns the step directory."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    ckpt_dir = _ckpt_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for p in ckpt_dir.glob(".tmp-*"):  # left by a save that crashed
        shutil.rmtree(p, ignore_errors=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_dir))
    try:
        _save_tensors(tmp / "model.safetensors", model)
        if ema is not None:
            _save_tensors(tmp / "ema.safetensors", ema)
        if optimizer is not None:
            tree, tensors = flatten(optimizer)
            _save_tensors(tmp / "optimizer.safetensors", tensors)
            _write_bytes(tmp / "optimizer.json", _dump_json(tree))
        tree, tensors = flatten(state or {})
        _save_tensors(tmp / "state.safetensors", tensors)
        _write_bytes(tmp / "state.json", _dump_json({"format": FORMAT, "step": step, "state": tree}))
        _write_bytes(tmp / "config.json", _dump_json(config))
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        final = ckpt_dir / name
        if final.exists():  # saving the same step again (e.g. after a resume): swap, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=ckpt_dir))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(ckpt_dir / LATEST, name + "\n")
    if keep is not None and keep > 0:
        for _, p in step_dirs(ckpt_dir)[:-keep]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


def find(path) -> Path:
    """The checkpoint directory `path` names: a step directory, a checkpoints directory or a run directory (then the
    one `latest` names, else the newest complete one). FileNotFoundError if there is none."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "state.json").is_file():
        return path
    ckpt_dir = path if path.name == "checkpoints" else _ckpt_dir(path)
    latest = ckpt_dir / LATEST
    if latest.is_file():
        target = ckpt_dir / latest.read_text().strip()
        if STEP_DIR.match(target.name) and target.is_dir():
            return target
    dirs = step_dirs(ckpt_dir)
    if dirs:
        return dirs[-1][1]
    raise FileNotFoundError(f"no checkpoint in {str(path)!r} (expected {str(ckpt_dir / LATEST)!r} or step_* dirs)")


def exists(run_dir) -> bool:
    try:
        find(run_dir)
        return True
    except FileNotFoundError:
        return False


def load(path, *, map_location="cpu", parts=("model", "ema", "optimizer", "state")) -> Checkpoint:
    """Load the checkpoint `find(path)` names; `parts` picks what to read (config and step always)."""
    d = find(path)
    meta = json.loads((d / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(d)!r}: unknown checkpoint format {meta.get('format')!r} (this code reads {FORMAT})")
    ck = Checkpoint(path=d, step=int(meta["step"]), config=json.loads((d / "config.json").read_text()))
    if "model" in parts:
        ck.model = _load_tensors(d / "model.safetensors", map_location)
    if "ema" in parts and (d / "ema.safetensors").is_file():
        ck.ema = _load_tensors(d / "ema.safetensors", map_location)
    if "optimizer" in parts and (d / "optimizer.json").is_file():
        ck.optimizer = unflatten(json.loads((d / "optimizer.json").read_text()),
                                 _load_tensors(d / "optimizer.safetensors", map_location))
    if "state" in parts:
        ck.state = unflatten(meta["state"], _load_tensors(d / "state.safetensors", "cpu"))
    return ck


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
