"""Checkpoints: safetensors + JSON round trips, atomic saves that survive a crash, no pickle anywhere."""

from __future__ import annotations

import json

import pytest
import torch

from vdm_fast import checkpoint as ckpt


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


def test_flatten_roundtrip_exact():
    obj = {"a": torch.randn(3), "b": [1, 2.5, (True, None, "s")], 3: {"x": torch.arange(4)}, "__odd": float("inf")}
    tree, tensors = ckpt.flatten(obj)
    json.dumps(tree)  # the structure is plain JSON
    back = ckpt.unflatten(json.loads(json.dumps(tree)), tensors)
    assert set(back) == set(obj) and isinstance(back["b"][2], tuple) and back["__odd"] == float("inf")
    assert torch.equal(back["a"], obj["a"]) and torch.equal(back[3]["x"], obj[3]["x"])
    with pytest.raises(TypeError, match="cannot store a object at x"):
        ckpt.flatten({"x": object()})


def test_save_load_roundtrip_and_optimizer_continues_identically(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 2, model, opt)
    assert path.name == "step_00000002" and (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    c = ckpt.load(tmp_path)
    assert c.step == 2 and c.config == {"model": {"width": 7}} and c.state["pos"] == (3, 4) and c.state["note"] is None
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
    # Only safetensors, JSON and the pointer: nothing that unpickles.
    names = {p.name for p in path.iterdir()}
    assert names == {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
                     "state.safetensors", "state.json", "config.json"}


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


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 5, model, opt)
    real = ckpt._save_tensors

    def dying(path, tensors):
        if path.name == "optimizer.safetensors":
            real(path.with_name("optimizer.safetensors"), {"x": torch.zeros(1)})  # half-written state
            raise KeyboardInterrupt("killed mid-save")
        real(path, tensors)

    monkeypatch.setattr(ckpt, "_save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 10, model, opt)
    monkeypatch.setattr(ckpt, "_save_tensors", real)
    c = ckpt.load(tmp_path)
    assert c.step == 5 and not (tmp_path / "checkpoints" / "step_00000010").exists()
    # A crash after the step directory is in place but before `latest` moves: latest still names a whole checkpoint.
    monkeypatch.setattr(ckpt, "write_text_atomic", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        _save(tmp_path, 10, model, opt)
    monkeypatch.undo()
    assert ckpt.load(tmp_path).step == 5
    _save(tmp_path, 11, model, opt)  # the next save works and sweeps the leftovers
    assert ckpt.load(tmp_path).step == 11
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_find_falls_back_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.find(tmp_path)
    assert not ckpt.exists(tmp_path)
    model, opt = _model_and_optimizer(0)
    _save(tmp_path, 1, model, opt)
    _save(tmp_path, 2, model, opt)
    (tmp_path / "checkpoints" / "latest").unlink()  # lost pointer: the newest complete checkpoint
    assert ckpt.find(tmp_path).name == "step_00000002"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009\n")  # dangling pointer: same
    assert ckpt.find(tmp_path).name == "step_00000002"
    with pytest.raises(ValueError, match="step"):
        _save(tmp_path, -1, model, opt)
