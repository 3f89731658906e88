"""--cuda-graph (issue 15, train.graph): what runs without a GPU, and the real capture on one.

On CPU: the refusals (one line naming --cuda-graph, exit 2), the static buffers' copy-in (shapes and constants
checked, the same memory every step), the AdamW round trip (capturable with a device-tensor lr, saved with plain
hyper-parameters that a run without --cuda-graph loads), the graph-safe loss (`loss_given`: no checks, no sync, the
loss bitwise), and the step's orchestration with a stand-in for the capture that runs the captured function at each
replay: warm-up steps eager, capture once, replay after, the non-finite skip leaving weights, AdamW and EMA alone,
the same trajectory as the eager trainer, --grad-accum included.

On a CUDA GPU (`gpu`-marked): the real capture against the eager trainer, losses and weights to fp32 rounding."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import TINY, TINY_ARGS
from test_train import _change_err as change_err
from test_train import _params as params

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.cli import main as cli
from vdm_fast.diffusion import GaussianDiffusion
from vdm_fast.train import TrainConfig, Trainer, graph, train
from vdm_fast.train.step import TrainStep, set_lr

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _reference_backend():
    with vdm_fast.backend("reference"):
        yield


# ----------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("options, words", [
    (dict(), "CUDA device"), (dict(fsdp=True), "one process"), (dict(precision="fp16"), "GradScaler"),
    (dict(compile=True), "reduce-overhead"), (dict(gradient_checkpointing=True), "torch.utils.checkpoint")])
def test_refusals_name_the_reason(options, words):
    cfg = TrainConfig(cuda_graph=True, **options)
    device = CPU if not options else torch.device("cuda")
    with pytest.raises(ValueError, match=f"^--cuda-graph: .*{words}"):
        graph.check(cfg, device)
    assert graph.refusal(TrainConfig(cuda_graph=True), "cuda") == ""
    assert "one process" in graph.refusal(TrainConfig(cuda_graph=True), "cuda", world_size=2)


def test_cli_refuses_cuda_graph_on_cpu_in_one_line(tmp_path, capsys):
    assert cli(["train", *TINY_ARGS, "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "r"),
                "--cuda-graph"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph" in err[0] and "CUDA device" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(TypeError, match="--cuda-graph"):
        TrainConfig(cuda_graph=1)


def test_train_help_documents_cuda_graph_and_compile(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--cuda-graph" in text and "warm-up" in text and "--compile" in text and "Inductor" in text


# ------------------------------------------------------------------------------------------------ static inputs
def _inputs(b=4, frames=2):
    return {"x": torch.randn(b, 3, frames, 4, 4), "t": torch.rand(b, dtype=torch.float64),
            "noise": torch.randn(b, 3, frames, 4, 4), "cond_mask": torch.rand(b) > 0.5, "cond_drop_prob": 0.0}


def test_static_inputs_copy_in_keeps_the_memory_and_checks_shapes():
    first = _inputs()
    s = graph.StaticInputs(first, CPU)
    assert s.constants == {"cond_drop_prob": 0.0} and set(s.buffers) == {"x", "t", "noise", "cond_mask"}
    ptrs = {k: v.data_ptr() for k, v in s.buffers.items()}
    for k, v in s.buffers.items():
        assert torch.equal(v, first[k]) and v.data_ptr() != first[k].data_ptr()  # a copy, not the host tensor
    second = _inputs()
    s.copy_in(second, step=5)
    assert {k: v.data_ptr() for k, v in s.buffers.items()} == ptrs  # what the graph reads: the same memory
    assert all(torch.equal(s.buffers[k], second[k]) for k in ptrs)
    (x,), kw = s.micro(slice(2, 4))
    assert x.data_ptr() == ptrs["x"] + 2 * x[0].numel() * 4 and torch.equal(kw["t"], second["t"][2:])
    assert kw["cond_drop_prob"] == 0.0

    with pytest.raises(ValueError, match=r"^--cuda-graph: step 6: x has shape and dtype \(4, 3, 3, 4, 4\).*fixed"):
        s.copy_in(_inputs(frames=3), step=6)
    with pytest.raises(ValueError, match=r"step 7: t has .*float32.*float64"):
        s.copy_in({**second, "t": second["t"].float()}, step=7)
    with pytest.raises(ValueError, match=r"step 8: cond_drop_prob is 0.1"):
        s.copy_in({**second, "cond_drop_prob": 0.1}, step=8)
    with pytest.raises(ValueError, match=r"step 9: the step's inputs are"):
        s.copy_in({k: v for k, v in second.items() if k != "cond_mask"}, step=9)
    assert all(torch.equal(s.buffers[k], second[k]) for k in ptrs)  # a refused copy-in wrote nothing


def test_host_inputs_are_the_eager_steps_inputs_on_the_host(tmp_path):
    t = Trainer(TrainConfig(out=str(tmp_path / "h"), steps=1, class_cond=True, image_frames=1, **TINY))
    try:
        batch = next(iter(t.loader()))
        host = graph.host_inputs(t.train_step, batch)
        (x,), kw = t.train_step._inputs(batch, slice(None))
        assert host.keys() == {"x", *kw}
        assert torch.equal(host["x"], x) and host["num_video_frames"] == t.frames
        for k, v in kw.items():
            assert torch.equal(host[k], v) if isinstance(v, torch.Tensor) else host[k] == v
            assert not isinstance(v, torch.Tensor) or host[k].device.type == "cpu"
    finally:
        t.close()


def test_loss_given_is_the_loss_without_its_checks():
    model = torch.nn.Conv3d(3, 3, 1)
    d = GaussianDiffusion(lambda z, logsnr, cond=None, cond_mask=None: model(z) * logsnr[:, None, None, None, None])
    x, t, noise = torch.randn(2, 3, 2, 4, 4), torch.rand(2, dtype=torch.float64), torch.randn(2, 3, 2, 4, 4)
    assert torch.equal(d.loss(x, t=t, noise=noise), d.loss_given(x, t, noise))
    with pytest.raises(ValueError, match="x"):
        d.loss(x * float("nan"), t=t, noise=noise)  # the checks stay in loss()


# --------------------------------------------------------------------------------------------------- AdamW state
def test_capturable_adamw_state_round_trips_to_plain_hyperparameters():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    graph.make_capturable(opt, CPU)
    g = opt.param_groups[0]
    lr_tensor = g["lr"]
    assert isinstance(lr_tensor, torch.Tensor) and g["capturable"] and float(lr_tensor) == pytest.approx(1e-3)
    set_lr(opt, 5e-4)
    assert g["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(5e-4)  # filled in place: the graph reads it
    assert all(s["step"].dtype == torch.float32 for s in opt.state.values())
    saved = graph.portable_optimizer_state(opt.state_dict())
    assert saved["param_groups"][0]["lr"] == pytest.approx(5e-4) and saved["param_groups"][0]["capturable"] is False
    json.dumps(saved["param_groups"])  # the checkpoint's optimizer.json
    assert opt.param_groups[0]["lr"] is lr_tensor  # the live optimizer is untouched
    plain = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    plain.load_state_dict(saved)
    assert isinstance(plain.param_groups[0]["lr"], float) and not plain.param_groups[0]["capturable"]
    assert graph.portable_optimizer_state({}) == {}  # FSDP ranks other than 0


# -------------------------------------------------------------------------- the orchestration, capture stood in
@pytest.fixture
def stand_in(monkeypatch):
    """Capture records fn without running it; each replay runs it (on CPU tensors). AdamW stays capturable=False
    (torch's capturable AdamW runs on accelerators only) but keeps the tensor lr."""
    captured = []

    def capture(fn, pool):
        captured.append(fn)
        return fn

    def make_capturable(optimizer, device):
        real_make_capturable(optimizer, device)
        for g in optimizer.param_groups:
            g["capturable"] = False

    real_make_capturable = graph.make_capturable
    monkeypatch.setattr(graph, "capture", capture)
    monkeypatch.setattr(graph, "new_pool", lambda: None)
    monkeypatch.setattr(graph, "refusal", lambda *a, **k: "")
    monkeypatch.setattr(graph, "make_capturable", make_capturable)
    return captured


def _eager_calls(monkeypatch) -> list[int]:
    calls, real = [], TrainStep.__call__

    def call(self, batch, step):
        calls.append(step)
        return real(self, batch, step)

    monkeypatch.setattr(TrainStep, "__call__", call)
    return calls


@pytest.mark.parametrize("accum", [1, 2])
def test_graphed_step_follows_the_eager_trajectory(tmp_path, monkeypatch, stand_in, accum):
    kw = dict(TINY, steps=6, batch_size=4, grad_accum=accum, grad_clip=0.5, ema_decay=0.9)
    eager = Trainer(TrainConfig(out=str(tmp_path / "e"), **kw))
    init = params(eager.model)
    ref = eager.run()
    eager.close()
    calls = _eager_calls(monkeypatch)
    t = Trainer(TrainConfig(out=str(tmp_path / "g"), cuda_graph=True, **kw))
    assert isinstance(t.train_step, graph.GraphedStep)
    assert isinstance(t.optimizer.param_groups[0]["lr"], torch.Tensor)
    ptrs = []
    real_copy_in = graph.StaticInputs.copy_in

    def copy_in(self, inputs, step):
        real_copy_in(self, inputs, step)
        ptrs.append(self.buffers["x"].data_ptr())

    monkeypatch.setattr(graph.StaticInputs, "copy_in", copy_in)
    result = t.run()
    t.close()
    # Steps 1-3 eager (warm-up), then one capture of each graph and a replay per step.
    assert calls == [0, 1, 2] and len(stand_in) == 2
    assert t.train_step.replays == 3 and len(set(ptrs)) == 1 and len(ptrs) == 3
    losses = torch.tensor([v for _, v in result["losses"]])
    torch.testing.assert_close(losses, torch.tensor([v for _, v in ref["losses"]]), rtol=1e-6, atol=0)
    a, b = ckpt.load(tmp_path / "e"), ckpt.load(tmp_path / "g")
    assert change_err(b.model, a.model, init) < 1e-5  # the fp32 lr tensor against the float lr: rounding only
    assert change_err(b.ema, a.ema, init) < 1e-5
    # Saved with plain hyper-parameters: the graphed run's checkpoint resumes without --cuda-graph.
    group = b.optimizer["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    monkeypatch.undo()
    more = train(TrainConfig(out=str(tmp_path / "g"), resume=True, **{**kw, "steps": 7}))
    assert [s for s, _ in more["losses"]] == [7]


def test_graphed_step_skips_a_non_finite_step_untouched(tmp_path, stand_in):
    t = Trainer(TrainConfig(out=str(tmp_path / "n"), cuda_graph=True, ema_decay=0.9, **{**TINY, "steps": 5}))
    calls = [0]

    def inf_on_replay_2(grad):  # backward 5 is the second replay (3 warm-up steps, then replays)
        calls[0] += 1
        return grad * float("inf") if calls[0] == 5 else grad

    t.model.conv_out.weight.register_hook(inf_on_replay_2)
    seen = {}
    real = t.train_step.__call__

    def step(batch, i):
        out = real(batch, i)
        adam = {k: v.clone() for k, v in t.optimizer.state[t.model.conv_out.weight].items()}
        seen[i] = (out, params(t.model), params(t.ema.module), adam)
        return out

    t.train_step = step
    result = t.run()
    t.close()
    before, skipped = seen[3], seen[4]
    assert before[0].applied and not skipped[0].applied and result["skipped"] == 1
    assert not torch.isfinite(torch.tensor(skipped[0].grad_norm))
    for i in (1, 2, 3):  # weights, EMA and AdamW state as before the skipped step
        assert all(torch.equal(before[i][k], skipped[i][k]) for k in before[i]), i
    assert float(skipped[3]["step"]) == 4.0
    assert len(result["losses"]) == 5


# ------------------------------------------------------------------------------------------------ the real capture
@pytest.mark.gpu
@pytest.mark.parametrize("accum, precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_cuda_graph_training_matches_eager_on_gpu(tmp_path, accum, precision):
    kw = dict(TINY, steps=7, batch_size=4, grad_accum=accum, grad_clip=0.5, ema_decay=0.9, device="cuda",
              precision=precision, save_every=100)
    with vdm_fast.backend("auto"):
        eager = Trainer(TrainConfig(out=str(tmp_path / "e"), **kw))
        init = params(eager.model)
        ref = eager.run()
        eager.close()
        t = Trainer(TrainConfig(out=str(tmp_path / "g"), cuda_graph=True, **kw))
        result = t.run()
        t.close()
    assert t.train_step.captured and t.train_step.replays == 4
    tol = 1e-5 if precision == "fp32" else 2e-2  # bf16: capturable AdamW's rounding moves later bf16 casts
    losses = torch.tensor([v for _, v in result["losses"]])
    torch.testing.assert_close(losses, torch.tensor([v for _, v in ref["losses"]]), rtol=tol, atol=1e-6)
    a, b = ckpt.load(tmp_path / "e"), ckpt.load(tmp_path / "g")
    err = change_err(b.model, a.model, init)
    assert err < (1e-4 if precision == "fp32" else 5e-2), err
    assert sum(not torch.equal(init[k].cpu(), v.cpu()) for k, v in b.model.items()) > len(init) // 2  # it trained
