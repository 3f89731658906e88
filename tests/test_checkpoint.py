"""Checkpoints: safetensors + JSON round trips, verified loads, a `latest` pointer that trusts nothing, no NaN, saves
and prunes that survive a kill at every stage, no pickle anywhere."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vdm_fast import _fsutil, run_dir
from vdm_fast import checkpoint as ckpt

ALL_FILES = {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "state.safetensors",
             "state.json", "config.json", "manifest.json"}


def _model_and_optimizer(steps: int = 2):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    return model, opt


def _save(run, step, model, opt, **kw):
    return ckpt.save(run, step, config={"model": {"width": 7}}, model=model.state_dict(),
                     ema={k: v * 0.5 for k, v in model.state_dict().items()}, optimizer=opt.state_dict(),
                     state={"rng": ckpt.rng_state(), "pos": (3, 4), "note": None}, **kw)


def _hidden(run) -> list[str]:
    return sorted(p.name for p in (Path(run) / "checkpoints").iterdir() if p.name.startswith("."))


def _assert_all_intact(run) -> list[int]:
    """Every step folder in the run is a whole, verified checkpoint; returns their steps."""
    steps = []
    for step, p in ckpt.step_dirs(Path(run) / "checkpoints"):
        assert ckpt.verify(p) is True, p
        assert {f.name for f in p.iterdir()} == ALL_FILES, p
        steps.append(step)
    return steps


def _to_format1(step_dir: Path) -> None:
    """Rewrite a step folder as the code before manifests wrote it (format 1: no manifest, no list of parts)."""
    meta = json.loads((step_dir / "state.json").read_text())
    (step_dir / "manifest.json").unlink()
    (step_dir / "state.json").write_text(json.dumps({"format": 1, "step": meta["step"], "state": meta["state"]}))


# ------------------------------------------------------------------------------------------------------ round trips
def test_flatten_roundtrip_exact():
    obj = {"a": torch.randn(3), "b": [1, 2.5, (True, None, "s")], 3: {"x": torch.arange(4)}, "__odd": float("inf")}
    tree, tensors = ckpt.flatten(obj)
    json.dumps(tree)  # the structure is plain JSON
    back = ckpt.unflatten(json.loads(json.dumps(tree)), tensors)
    assert set(back) == set(obj) and isinstance(back["b"][2], tuple) and back["__odd"] == float("inf")
    assert torch.equal(back["a"], obj["a"]) and torch.equal(back[3]["x"], obj[3]["x"])
    with pytest.raises(TypeError, match="cannot store a object at x"):
        ckpt.flatten({"x": object()})
    # Keys that differ but are not tensors' only names round-trip: {7: 1, "7": 2} is tagged, not merged.
    back = ckpt.unflatten(*ckpt.flatten({7: 1, "7": 2}))
    assert back == {7: 1, "7": 2} and set(map(type, back)) == {int, str}


@pytest.mark.parametrize("obj", [
    {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}},
    {"a": {"b": torch.zeros(1)}, "a.b": torch.ones(1)},
    {7: torch.ones(1), "7": torch.zeros(1)},
    {"x": [torch.ones(1)], "x.0": torch.zeros(1)},
    {"s": {1: torch.ones(1)}, "s.1": torch.zeros(1)},
    {"t": (torch.ones(1), {"0": torch.ones(1)}), "t.0": torch.zeros(1)},
])
def test_flatten_refuses_key_collisions(obj):
    with pytest.raises(ValueError, match="collide"):
        ckpt.flatten(obj)


def test_save_load_roundtrip_and_optimizer_continues_identically(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 2, model, opt)
    assert path.name == "step_00000002" and (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    c = ckpt.load(tmp_path)
    assert c.step == 2 and c.config == {"model": {"width": 7}} and c.state["pos"] == (3, 4) and c.state["note"] is None
    assert c.verified and c.saved == ckpt.PARTS
    for k, v in model.state_dict().items():
        assert torch.equal(c.model[k], v) and torch.equal(c.ema[k], v * 0.5)
    # A fresh model + optimizer loaded from the checkpoint takes bitwise the same next step as the original.
    model2, opt2 = _model_and_optimizer(0)
    model2.load_state_dict(c.model)
    opt2.load_state_dict(c.optimizer)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # Only safetensors, JSON and the pointer: nothing that unpickles. The manifest covers every other file.
    assert {p.name for p in path.iterdir()} == ALL_FILES
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == ckpt.FORMAT == 2 and set(manifest["files"]) == ALL_FILES - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64


def test_tied_weights_views_and_empty_tensors_roundtrip(tmp_path):
    a = torch.randn(5, 6)
    model = {"a": a, "tied": a, "row": a[1], "t": a.t(), "tail": torch.randn(9)[3:], "e1": torch.empty(0),
             "e2": torch.empty(0, 3), "h": torch.randn(4).half(), "i": torch.arange(5)}
    ckpt.save(tmp_path, 1, config={}, model=model)
    back = ckpt.load(tmp_path).model
    assert set(back) == set(model)
    for k, v in model.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert torch.equal(a, model["tied"])  # the caller's tensors are untouched


def test_rng_state_roundtrip(tmp_path):
    model, opt = _model_and_optimizer(0)
    _save(tmp_path, 0, model, opt)
    expected = torch.rand(5)
    ckpt.set_rng_state(ckpt.load(tmp_path).state["rng"])
    assert torch.equal(torch.rand(5), expected)


def test_latest_keep_and_resave(tmp_path):
    model, opt = _model_and_optimizer()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints")] == [3, 4]
    assert ckpt.find(tmp_path).name == "step_00000004"
    with torch.no_grad():
        model[0].weight.add_(1)
    _save(tmp_path, 4, model, opt, keep=2)  # the same step again (a resumed run): replaced whole
    assert torch.equal(ckpt.load(tmp_path).model["0.weight"], model[0].weight)
    assert ckpt.find(tmp_path / "checkpoints" / "step_00000003").name == "step_00000003"
    assert ckpt.find(tmp_path / "checkpoints").name == "step_00000004"
    assert not list((tmp_path / "checkpoints").glob(".*"))
    _assert_all_intact(tmp_path)


def test_parts_not_saved_are_none_and_bad_arguments(tmp_path):
    model, _ = _model_and_optimizer(0)
    ckpt.save(tmp_path, 1, config={}, model=model.state_dict())
    c = ckpt.load(tmp_path)
    assert c.saved == ("model", "state") and c.ema is None and c.optimizer is None and c.verified
    assert ckpt.load(tmp_path, parts=()).model is None
    with pytest.raises(ValueError, match="parts"):
        ckpt.load(tmp_path, parts=("weights",))
    with pytest.raises(ValueError, match="allow_missing"):
        ckpt.load(tmp_path, allow_missing=("everything",))
    with pytest.raises(ValueError, match="step"):
        ckpt.save(tmp_path, -1, config={}, model=model.state_dict())
    with pytest.raises(TypeError, match="step"):
        ckpt.save(tmp_path, 1.0, config={}, model=model.state_dict())
    with pytest.raises(ValueError, match="keep"):
        ckpt.save(tmp_path, 2, config={}, model=model.state_dict(), keep=-1)
    with pytest.raises(TypeError, match="model"):
        ckpt.save(tmp_path, 2, config={}, model=None)
    with pytest.raises(TypeError, match="ema"):
        ckpt.save(tmp_path, 2, config={}, model=model.state_dict(), ema={"w": 1.0})
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints")] == [1]


# ---------------------------------------------------------------------------------------------------- verification
def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[min(len(data) - 1, int(len(data) * where))] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", sorted(ALL_FILES - {"manifest.json"}))
def test_flipped_truncated_or_grown_file_is_refused_naming_it(tmp_path, name):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    path = _save(tmp_path, 2, model, opt)
    f = path / name
    original = f.read_bytes()
    for damage in (lambda: _flip(f, 0.0), lambda: _flip(f, 0.5), lambda: _flip(f, 1.0),
                   lambda: f.write_bytes(original[:-1]), lambda: f.write_bytes(original + b" ")):
        f.write_bytes(original)
        damage()
        with pytest.raises(ckpt.CheckpointError, match=f"{name}.*(SHA-256|bytes)"):
            ckpt.load(tmp_path)
        with pytest.raises(ckpt.CheckpointError, match=name):
            ckpt.verify(path)
    # --resume-from-last-good: the older intact one, and the choice is said.
    said = []
    assert ckpt.find_resume(tmp_path, last_good=True, log=said.append).name == "step_00000001"
    assert "step_00000001" in said[0] and name in said[0]
    # Without it: the newest, which then refuses to load.
    assert ckpt.find_resume(tmp_path).name == "step_00000002"


def test_corrupt_or_missing_manifest_is_refused(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    m = path / "manifest.json"
    good = m.read_bytes()
    for bad in (b"", b"{not json", b"[]", b'{"files": 3}', os.urandom(64)):
        m.write_bytes(bad)
        with pytest.raises(ckpt.CheckpointError, match="manifest.json"):
            ckpt.load(tmp_path)
    entries = json.loads(good)
    del entries["files"]["ema.safetensors"]
    m.write_text(json.dumps(entries))
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors.*not in the manifest"):
        ckpt.load(tmp_path)
    m.unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest.json.*missing"):
        ckpt.load(tmp_path)


@pytest.mark.parametrize("gone", [("model.safetensors",), ("ema.safetensors",), ("optimizer.json",),
                                  ("optimizer.safetensors",), ("optimizer.json", "optimizer.safetensors"),
                                  ("state.safetensors",), ("state.json",), ("config.json",)])
def test_missing_part_is_refused_unless_allowed(tmp_path, gone):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 3, model, opt)
    for name in gone:
        (path / name).unlink()
    with pytest.raises(ckpt.CheckpointError, match=gone[0].replace(".", r"\.") + ".*missing"):
        ckpt.load(tmp_path)
    part = "ema" if gone == ("ema.safetensors",) else "optimizer" if gone[0].startswith("optimizer") else None
    if part and (part == "ema" or len(gone) == 2):
        c = ckpt.load(tmp_path, allow_missing=(part,))
        assert getattr(c, part) is None and c.step == 3 and c.model is not None and c.verified
        other = "optimizer" if part == "ema" else "ema"
        assert getattr(c, other) is not None
    elif part:  # half an optimizer is never allowed: it would load a different state
        with pytest.raises(ckpt.CheckpointError, match="missing"):
            ckpt.load(tmp_path, allow_missing=("optimizer",))
    else:  # model and state cannot be allowed missing
        with pytest.raises(ValueError, match="allow_missing"):
            ckpt.load(tmp_path, allow_missing=("model", "state"))
    assert ckpt.find_resume(tmp_path).name == "step_00000003"  # found, then refused on load (above)
    with pytest.raises(FileNotFoundError, match="no intact checkpoint.*missing"):
        ckpt.find_resume(tmp_path, last_good=True)


def test_nonfinite_refused_on_save_and_on_load(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    sd = model.state_dict()
    nan_opt = opt.state_dict()
    nan_opt["state"] = {k: dict(v) for k, v in nan_opt["state"].items()}  # state_dict() shares the live dicts
    nan_opt["state"][0]["exp_avg"] = nan_opt["state"][0]["exp_avg"].clone().index_fill_(0, torch.tensor([1]),
                                                                                      float("nan"))
    beta_opt = opt.state_dict()
    beta_opt["param_groups"] = [dict(g, betas=(float("nan"), 0.9)) for g in beta_opt["param_groups"]]
    lr_opt = opt.state_dict()
    lr_opt["param_groups"] = [dict(g, lr=float("inf")) for g in lr_opt["param_groups"]]
    cases = [
        dict(model={**sd, "0.weight": sd["0.weight"].clone().fill_(float("inf"))}),
        dict(model={**sd, "0.bias": sd["0.bias"].to(torch.bfloat16).index_fill(0, torch.tensor([3]), float("nan"))}),
        dict(ema={k: v.clone().fill_(float("-inf")) for k, v in sd.items()}),
        dict(optimizer=nan_opt), dict(optimizer=beta_opt), dict(optimizer=lr_opt),
        dict(state={"x": torch.tensor([1.0, float("nan")])}),
    ]
    for kw in cases:
        args = dict(config={}, model=sd, optimizer=opt.state_dict(), ema=sd) | kw
        with pytest.raises(ckpt.NonFiniteCheckpoint, match="refusing to save step 2"):
            ckpt.save(tmp_path, 2, **args)
        assert ckpt.find(tmp_path).name == "step_00000001" and not _hidden(tmp_path)  # nothing written
    # NaN that reached the disk anyway (written by other code) is refused on load, naming the file.
    for kw, fname in zip(cases, ["model.safetensors", "model.safetensors", "ema.safetensors",
                                 "optimizer.safetensors", "optimizer.json", "optimizer.json", "state.safetensors"]):
        with monkeypatch.context() as m:
            m.setattr(ckpt, "_first_nonfinite_tensor", lambda t: None)
            m.setattr(ckpt, "_first_nonfinite_scalar", lambda t, w="": None)
            ckpt.save(tmp_path, 2, **(dict(config={}, model=sd, optimizer=opt.state_dict(), ema=sd) | kw))
        with pytest.raises(ckpt.NonFiniteCheckpoint, match=fname):
            ckpt.load(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_nonfinite_found_at_any_position_in_any_float_dtype(tmp_path, dtype):
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 4, 1000, 1022):  # first, middle, a vectorised block's tail, last
            t = torch.randn(31, 33).to(dtype).t()  # a strided view
            t[pos % 33, pos // 33] = bad
            with pytest.raises(ckpt.NonFiniteCheckpoint, match="'w'"):
                ckpt.save(tmp_path, 1, config={}, model={"ok": torch.zeros(3), "w": t})
    big = torch.full((7,), torch.finfo(dtype if not dtype.is_complex else torch.float32).max, dtype=dtype)
    ckpt.save(tmp_path, 1, config={}, model={"max": big, "i": torch.arange(3), "b": torch.ones(2, dtype=torch.bool),
                                             "empty": torch.empty(0, dtype=dtype)})
    assert torch.equal(ckpt.load(tmp_path).model["max"], big)


def test_format1_checkpoint_loads_unverified_said_once(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 4, model, opt)
    _to_format1(path)
    with pytest.warns(UserWarning, match="format 1.*without verification"):
        c = ckpt.load(tmp_path)
    assert not c.verified and c.step == 4 and c.saved == ckpt.PARTS and c.state["pos"] == (3, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(c.model[k], v) and torch.equal(c.ema[k], v * 0.5)
    assert c.optimizer["param_groups"][0]["betas"] == (0.8, 0.95)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load(tmp_path)  # said once
    # Half an optimizer, an unreadable file and a wrong step are still refused without a manifest.
    (path / "optimizer.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.json.*missing"):
        ckpt.load(tmp_path)
    (path / "optimizer.safetensors").unlink()
    assert ckpt.load(tmp_path).optimizer is None  # format 1 records no parts: none saved
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load(tmp_path)
    shutil.move(path, path.with_name("step_00000005"))
    with pytest.raises(ckpt.CheckpointError, match="names 'step_00000004', which does not exist"):
        ckpt.load(tmp_path, parts=())
    with pytest.raises(ckpt.CheckpointError, match="says step 4"):
        ckpt.load(tmp_path / "checkpoints" / "step_00000005", parts=())
    (path.with_name("step_00000005") / "state.json").write_text('{"format": 9, "step": 5}')
    with pytest.raises(ckpt.CheckpointError, match="unknown checkpoint format 9"):
        ckpt.load(tmp_path / "checkpoints" / "step_00000005")


FORMAT1 = Path(__file__).parent / "data" / "checkpoint_format1"


def _format1_reference():
    """The model and optimizer tests/data/checkpoint_format1 was written from (by the code before manifests)."""
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(6.0).reshape(2, 3) / 10)
        lin.bias.copy_(torch.tensor([0.5, -0.25]))
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    lin.weight.grad, lin.bias.grad = torch.ones(2, 3), torch.tensor([1.0, -1.0])
    opt.step()
    return lin, opt


def test_a_checkpoint_written_before_manifests_loads_and_continues(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FORMAT1, run)
    lin, opt = _format1_reference()
    with pytest.warns(UserWarning, match="format 1.*without verification"):
        c = ckpt.load(run)
    assert c.step == 3 and not c.verified and c.saved == ckpt.PARTS and c.config == {"model": {"in": 3, "out": 2}}
    assert c.state["pos"] == (3, 4) and c.state["note"] is None and torch.equal(c.state["t"], torch.tensor([1, 2, 3]))
    for k, v in lin.state_dict().items():  # one AdamW step recomputed here: CPUs may round it 1 ulp apart
        torch.testing.assert_close(c.model[k], v, rtol=0, atol=4e-9)
        torch.testing.assert_close(c.ema[k], v * 0.5, rtol=0, atol=4e-9)
    # Resumed, it takes the same next step, and its next save is format 2, verified.
    lin2 = torch.nn.Linear(3, 2)
    lin2.load_state_dict(c.model)
    opt2 = torch.optim.AdamW(lin2.parameters(), lr=1.0)
    opt2.load_state_dict(c.optimizer)
    for m, o in ((lin, opt), (lin2, opt2)):
        m.weight.grad, m.bias.grad = torch.full((2, 3), -0.5), torch.tensor([0.25, 2.0])
        o.step()
    for a, b in zip(lin.parameters(), lin2.parameters()):  # the same step to rounding (the states are 1 ulp apart)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-8)
    ckpt.save(run, 4, config=c.config, model=lin2.state_dict(), ema=c.ema, optimizer=opt2.state_dict(), state=c.state)
    c4 = ckpt.load(run)
    assert c4.step == 4 and c4.verified and torch.equal(c4.model["weight"], lin2.weight)
    assert ckpt.find_resume(run, last_good=True, log=lambda m: None).name == "step_00000004"


@pytest.mark.filterwarnings("ignore:.*format 1 checkpoint")
def test_hostile_json_in_an_unverified_checkpoint_is_a_clear_error(tmp_path):
    """Without a manifest (format 1) nothing vouches for the JSON: nesting, tensor keys and types are checked."""
    model, opt = _model_and_optimizer(0)
    path = _save(tmp_path, 1, model, opt)
    _to_format1(path)
    state = json.loads((path / "state.json").read_text())
    for tree in ("[" * 100000 + "]" * 100000, {"__tensor__": "nope"},
                 {"__dict__": [[1, 2, 3]]}, {"__tuple__": 5}):
        text = tree if isinstance(tree, str) else json.dumps(dict(state, state=tree))
        (path / "state.json").write_text(text)
        with pytest.raises(ckpt.CheckpointError, match="state.json"):
            ckpt.load(tmp_path, parts=("state",))
    for meta in ({"format": 1, "step": "1"}, {"format": 1, "step": -1}, {"format": 1}, [1],
                 {"format": 1, "step": True}):
        (path / "state.json").write_text(json.dumps(meta))
        with pytest.raises(ckpt.CheckpointError, match="state.json"):
            ckpt.load(tmp_path, parts=())


# ------------------------------------------------------------------------------------------------------- the pointer
def _hostile_pointers(tmp_path) -> list:
    other = tmp_path / "other"
    m2, o2 = _model_and_optimizer(0)
    foreign = _save(other, 1, m2, o2)
    return [
        b"../../other/checkpoints/step_00000001\n", str(foreign).encode(), str(foreign.parent).encode(),
        b"step_00000001/../step_00000001", b"./step_00000001", b"checkpoints/step_00000001", b"step_1/x",
        b"step_00000009\n",  # dangling: names nothing, and nothing else is taken
        b"\xeb\x9f\x00\xff" * 8, os.urandom(100), b"", b"\n", b"step_" + b"1" * 5000, b"step_-1", b"latest",
    ]


def test_hostile_latest_is_refused_with_no_substitution(tmp_path):
    model, opt = _model_and_optimizer()
    run = tmp_path / "run"
    _save(run, 1, model, opt)
    _save(run, 2, model, opt)
    latest = run / "checkpoints" / "latest"
    for content in _hostile_pointers(tmp_path):
        latest.write_bytes(content)
        calls = [ckpt.find, ckpt.load, ckpt.find_resume]
        if content != b"step_00000009\n":  # dangling but well-formed: last_good walks back from it (below)
            calls.append(lambda r: ckpt.find_resume(r, last_good=True))
        for call in calls:
            with pytest.raises(ckpt.CheckpointError, match="latest") as e:
                call(run)
            assert "\n" not in str(e.value) and len(str(e.value)) < 400 and "codec" not in str(e.value)
        assert ckpt.exists(run)
    # latest as a directory, a FIFO, a symlinked step folder pointing at another run: refused too.
    os.symlink(tmp_path / "other" / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000007")
    latest.write_text("step_00000007\n")
    with pytest.raises(ckpt.CheckpointError, match="not a real directory"):
        ckpt.load(run)
    assert [s for s, _ in ckpt.step_dirs(run / "checkpoints")] == [1, 2]  # the symlink is no checkpoint
    latest.unlink()
    os.mkfifo(latest)
    with pytest.raises(ckpt.CheckpointError, match="not a regular file"):
        ckpt.find(run)
    latest.unlink()
    latest.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="not a regular file"):
        ckpt.find(run)
    latest.rmdir()
    assert ckpt.find(run).name == "step_00000002"  # no pointer at all: the newest
    latest.write_text("step_00000001\n")  # a valid pointer to an older checkpoint is followed
    assert ckpt.load(run).step == 1
    # A save after a hostile pointer replaces it.
    latest.write_text("../../other/checkpoints/step_00000001")
    _save(run, 3, model, opt, keep=2)
    assert ckpt.load(run).step == 3 and [s for s, _ in ckpt.step_dirs(run / "checkpoints")] == [2, 3]


def test_find_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.find(tmp_path)
    assert not ckpt.exists(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.find_resume(tmp_path, last_good=True)
    model, opt = _model_and_optimizer(0)
    _save(tmp_path, 1, model, opt)
    _save(tmp_path, 2, model, opt)
    (tmp_path / "checkpoints" / "latest").unlink()  # lost pointer: the newest complete checkpoint
    assert ckpt.find(tmp_path).name == "step_00000002"
    for _, p in ckpt.step_dirs(tmp_path / "checkpoints"):
        (p / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no intact checkpoint.*step_00000002.*step_00000001"):
        ckpt.find_resume(tmp_path, last_good=True)


def test_last_good_walks_back_from_a_dangling_latest(tmp_path):
    model, opt = _model_and_optimizer(0)
    for s in (1, 2, 5):
        _save(tmp_path, s, model, opt, keep=0)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000005")  # latest names it
    (tmp_path / "checkpoints" / "step_00000002" / "ema.safetensors").unlink()
    with pytest.raises(ckpt.DanglingLatest, match="step_00000005.*does not exist"):
        ckpt.find_resume(tmp_path)
    said = []
    assert ckpt.find_resume(tmp_path, last_good=True, log=said.append).name == "step_00000001"
    assert "step_00000005 (does not exist)" in said[0] and "ema.safetensors" in said[0]


def test_last_good_never_goes_past_latest(tmp_path):
    """latest rewound to step 2 (a deliberate resume from there): newer folders are not candidates."""
    model, opt = _model_and_optimizer(0)
    for s in (1, 2, 3):
        _save(tmp_path, s, model, opt, keep=0)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")
    _flip(tmp_path / "checkpoints" / "step_00000002" / "config.json", 0.5)
    said = []
    assert ckpt.find_resume(tmp_path, last_good=True, log=said.append).name == "step_00000001"
    assert "config.json" in said[0]


# --------------------------------------------------------------------------------------------- kills at every stage
class _Killed(BaseException):
    """A simulated kill -9: a BaseException, so nothing on the way catches it."""


class _Killer:
    """Counts every filesystem effect a save or prune makes and 'kills' the process at effect number `at`: from
    then on every effect raises too, so no cleanup (a finally block) touches the disk, as after a real kill. A file
    being written at the kill is left half-written."""

    OS_FUNCS = ("replace", "rename", "unlink", "rmdir", "mkdir", "open", "fsync", "chmod", "ftruncate", "write")

    def __init__(self, monkeypatch, at: int):
        self.at, self.n, self.dead = at, 0, False
        real = {name: getattr(os, name) for name in self.OS_FUNCS}
        for name, fn in real.items():
            monkeypatch.setattr(os, name, self._wrap(fn))
        monkeypatch.setattr(shutil, "rmtree", self._wrap(_rmtree_with(real)))
        monkeypatch.setattr(ckpt, "exchange", self._wrap(ckpt.exchange))  # one atomic effect
        write_bytes = ckpt._write_bytes

        def torn_write(path, data):  # the kill can fall in the middle of a file
            self._tick(lambda: write_bytes(path, data[: len(data) // 2]))
            write_bytes(path, data)

        monkeypatch.setattr(ckpt, "_write_bytes", torn_write)

    def _tick(self, on_death=None):
        if self.dead:
            raise _Killed("already dead")
        self.n += 1
        if self.n == self.at:
            if on_death is not None:
                on_death()
            self.dead = True
            raise _Killed(f"killed at effect {self.n}")

    def _wrap(self, fn):
        def wrapped(*a, **k):
            self._tick()
            return fn(*a, **k)

        return wrapped


def _rmtree_with(real):
    """shutil.rmtree made of the (wrapped) os calls, so a kill can fall between two of its deletions."""

    def rmtree(path, ignore_errors=False, **_):
        path = Path(path)
        try:
            if path.is_dir() and not path.is_symlink():
                for child in sorted(path.iterdir()):
                    if child.is_dir() and not child.is_symlink():
                        rmtree(child)
                    else:
                        os.unlink(child)
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:
            if not ignore_errors:
                raise

    return rmtree


def _kill_at_every_stage(tmp_path, monkeypatch, setup, action, check):
    """Run `action` with a kill at effect 1, 2, ... until it completes; after each kill, `check` the folder, clean it
    as the next start does, `check` again and finish the action."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test here, and fsync is slow
    template = tmp_path / "template"
    setup(template)
    for at in range(1, 500):
        run = tmp_path / f"k{at}"
        shutil.copytree(template, run, symlinks=True)
        killer = None
        with monkeypatch.context() as m:
            killer = _Killer(m, at)
            try:
                action(run)
            except _Killed:
                pass
        if not killer.dead:
            assert at > 3, "the action made almost no filesystem effects: the killer sees nothing"
            check(run, killed=False)
            return at - 1
        check(run, killed=True)
        run_dir.clean_leftovers(run)
        assert _hidden(run) == [], (at, _hidden(run))
        check(run, killed=True)
        action(run)  # the next run's save goes through
        check(run, killed=False)
        shutil.rmtree(run)
    raise AssertionError("the action never completed")


@pytest.mark.parametrize("kind, exchange", [("new-step-and-prune", True), ("resave-latest-step", True),
                                            ("resave-latest-step", False)],
                         ids=["new-step-and-prune", "resave-exchange", "resave-two-renames"])
def test_kill_at_every_stage_of_a_save(tmp_path, monkeypatch, kind, exchange):
    model, opt = _model_and_optimizer()
    new = {k: v + 1 for k, v in model.state_dict().items()}
    step = 3 if kind == "new-step-and-prune" else 2
    if not exchange:
        monkeypatch.setattr(_fsutil, "exchange", lambda a, b: False)
        monkeypatch.setattr(ckpt, "exchange", lambda a, b: False)

    def setup(run):
        _save(run, 1, model, opt, keep=0)
        _save(run, 2, model, opt, keep=0)

    def action(run):
        ckpt.save(run, step, config={"model": {"width": 7}}, model=new, ema=new, optimizer=opt.state_dict(),
                  state={"rng": ckpt.rng_state()}, keep=2)

    def check(run, killed):
        steps = _assert_all_intact(run)
        c = ckpt.load(run)  # latest names a whole checkpoint at every stage (or, for the swap, after cleaning)
        is_new = torch.equal(c.model["0.weight"], new["0.weight"])
        assert c.step in (2, step) and (is_new or all(torch.equal(c.model[k], v)
                                                      for k, v in model.state_dict().items()))
        if kind == "new-step-and-prune":
            assert is_new == (c.step == 3)
        if not killed:
            assert is_new and c.step == step and steps == ([2, 3] if kind == "new-step-and-prune" else [1, 2])

    def check_lenient(run, killed):
        # The two-rename swap of latest's own step has one window where the step folder is aside: only the next
        # start (clean_leftovers) puts it back, and until then `latest` is refused, never replaced by another.
        try:
            check(run, killed)
        except ckpt.CheckpointError as e:
            assert killed and "does not exist" in str(e) and any(
                n.startswith(".tmp-old-") for n in _hidden(run))

    stages = _kill_at_every_stage(tmp_path, monkeypatch, setup, action,
                                  check if exchange or kind == "new-step-and-prune" else check_lenient)
    assert stages >= 20


def test_kill_at_every_stage_of_a_prune(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer(0)

    def setup(run):
        for s in (1, 2, 3, 4, 5):
            _save(run, s, model, opt, keep=0)
        (run / "checkpoints" / "latest").write_text("step_00000002\n")  # a rewound pointer: protected too

    def action(run):
        ckpt.prune(run, 1, protect=3)

    def check(run, killed):
        steps = _assert_all_intact(run)
        assert {2, 3, 5} <= set(steps) and ckpt.load(run).step == 2
        if not killed:
            assert steps == [2, 3, 5]

    assert _kill_at_every_stage(tmp_path, monkeypatch, setup, action, check) >= 6


def test_a_save_sweeps_only_dead_writers_leftovers(tmp_path):
    model, opt = _model_and_optimizer(0)
    _save(tmp_path, 1, model, opt)
    c = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    live = [c / ".tmp-step_00000009-1-abcdefgh", c / ".trash-step_00000008-1-0a1b2c3d",
            c / ".tmp-old-step_00000001-1-zzzzzzzz"]  # pid 1 always runs: another writer's save in progress
    gone = [c / f".tmp-step_00000009-{dead_pid}-abcdefgh", c / f".trash-step_00000007-{dead_pid}-0a1b2c3d",
            c / ".tmp-step_00000006-legacy"]
    for d in live + gone:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    pointer_tmp = c / ".latest.tmp-abcdefgh"  # no pid: left to the locked start
    pointer_tmp.write_text("step_00000009\n")
    _save(tmp_path, 2, model, opt)
    assert all(d.exists() for d in live) and not any(d.exists() for d in gone) and pointer_tmp.exists()
    assert ckpt.load(tmp_path).step == 2
    assert sorted(run_dir.clean_leftovers(tmp_path)) == sorted(map(str, live + [pointer_tmp]))
    assert _hidden(tmp_path) == []


def test_prune_protects_and_validates(tmp_path):
    model, opt = _model_and_optimizer(0)
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, opt, keep=0)
    with pytest.raises(ValueError, match="keep"):
        ckpt.prune(tmp_path, -1)
    assert ckpt.prune(tmp_path, 0) == []  # 0 keeps all, as save(keep=0) does
    with pytest.raises(TypeError, match="protect"):
        ckpt.prune(tmp_path, 1, protect=[1.5])
    p1 = tmp_path / "checkpoints" / "step_00000001"
    assert ckpt.prune(tmp_path, 1, protect=[p1]) == [tmp_path / "checkpoints" / f"step_0000000{s}" for s in (2, 3)]
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints")] == [1, 4]
    (tmp_path / "checkpoints" / "latest").write_bytes(os.urandom(9))  # protects nothing; the newest stays anyway
    assert ckpt.prune(tmp_path / "checkpoints", 1) == [p1]
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints")] == [4] and not _hidden(tmp_path)


# ----------------------------------------------------------------------------------------------- real kill -9
_PRELUDE = r"""
import os, signal, sys, types
# Only vdm_fast.checkpoint and what it imports, not the whole package (torch.compile, triton...): a fast start.
pkg = types.ModuleType("vdm_fast")
pkg.__path__ = [sys.argv[2]]
sys.modules["vdm_fast"] = pkg
import torch
from vdm_fast import checkpoint as ckpt
run = sys.argv[1]
w = {f"w{i}": torch.full((64, 1024), float(i)) for i in range(8)}  # 2 MiB a part
def save(step):
    ckpt.save(run, step, config={"step": step}, model=w, ema=w, optimizer={"state": {}, "param_groups": []},
              state={"step": step}, keep=2)
"""
_STAGE_KILLER = _PRELUDE + r"""
kill_at, n = int(sys.argv[3]), [0]
def counted(fn):
    def wrapped(*a, **k):
        n[0] += 1
        if n[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9: no finally block, no cleanup runs
        return fn(*a, **k)
    return wrapped
for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "open", "fsync", "chmod"):
    setattr(os, name, counted(getattr(os, name)))
save(3)
print(n[0], flush=True)
"""
_LOOP_SAVER = _PRELUDE + r"""
print("ready", flush=True)
step = 0
while True:
    step += 1
    save(step)
"""


def _child(script: str, run: Path, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, str(run), str(Path(ckpt.__file__).parent), *map(str, args)],
                            stdout=subprocess.PIPE, text=True, cwd=run.parent, **kw)


def _check_after_kill(run: Path, steps=None) -> int:
    c = ckpt.load(run, parts=("model",))
    assert c.verified and c.config == {"step": c.step} and torch.equal(c.model["w3"], torch.full((64, 1024), 3.0))
    for _, p in ckpt.step_dirs(run / "checkpoints"):
        ckpt.verify(p)
    assert steps is None or c.step in steps
    run_dir.clean_leftovers(run)
    assert _hidden(run) == []
    return c.step


def test_real_kill_9_at_stages_of_a_save(tmp_path):
    """kill -9 (SIGKILL from inside, at the k-th filesystem effect) at stages spread over a save and its prune:
    the run loads, every step folder verifies, and the next start leaves nothing behind."""
    template = tmp_path / "template"
    w = {f"w{i}": torch.full((64, 1024), float(i)) for i in range(8)}
    for s in (1, 2):
        ckpt.save(template, s, config={"step": s}, model=w, ema=w, optimizer={"state": {}, "param_groups": []},
                  state={"step": s}, keep=2)
    shutil.copytree(template, tmp_path / "count")
    proc = _child(_STAGE_KILLER, tmp_path / "count", 10 ** 9)  # counts the effects of a whole save of step 3
    total = int(proc.communicate(timeout=120)[0])
    assert proc.returncode == 0 and total > 20 and _check_after_kill(tmp_path / "count") == 3
    for frac in (0.2, 0.6, 0.95):
        run = tmp_path / f"k{frac}"
        shutil.copytree(template, run)
        proc = _child(_STAGE_KILLER, run, max(1, int(total * frac)))
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        _check_after_kill(run, steps=(2, 3))


def test_real_kill_9_during_saves(tmp_path):
    """kill -9 from outside a process that saves in a loop, at a few moments."""
    run = tmp_path / "run"
    for delay in (0.05, 0.3):
        proc = _child(_LOOP_SAVER, run)
        try:
            assert proc.stdout.readline().strip() == "ready"
            t0 = time.time()
            while not ckpt.exists(run) and time.time() - t0 < 60:
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        _check_after_kill(run)
