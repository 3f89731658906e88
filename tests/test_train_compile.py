"""`vdm-fast train --compile` with the real Inductor backend (issue 15): the compiled run's losses and weights equal the
eager run's to fp32 rounding, the model compiles to one graph (no graph break) on the first step and never again
(no recompilation on later steps: the weights change, the shapes do not), and checkpoints keep the plain keys.

Inductor compiles C++ for its kernels on a CPU with the system compiler, dozens of files for a training step's
forward and backward: the model is the smallest with every block kind of one level (a residual block with spatial
and temporal attention going down, two coming up, the middle's residual blocks), 2 frames of 4x4. Its kernels land
in Inductor's cache, so a rerun compiles much less. `test_train_scale.py` tests the --compile wiring with a stub."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import _change_err as change_err
from test_train import _params as params
from torch._dynamo.utils import counters

import vdm_fast
from vdm_fast import checkpoint as ckpt
from vdm_fast.cli import main as cli
from vdm_fast.train import TrainConfig, Trainer

SMALLEST = dict(base_channels=4, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(4,), attn_head_dim=4,
                norm_groups=2, emb_dim=8, mid_attention=False)
RUN = dict(preset="tiny", overrides=SMALLEST, frames=2, resolution=4, batch_size=2, workers=0, log_every=1,
           save_every=100, sample_every=0, progress=False, lr=1e-3, warmup_steps=2, steps=3, grad_clip=0.5)


def _args(out) -> list[str]:
    sets = [a for k, v in SMALLEST.items()
            for a in ("--set", f"{k}={','.join(map(str, v)) + ',' if isinstance(v, tuple) else v}")]
    return ["train", "--preset", "tiny", *sets, "--frames", "2", "--resolution", "4", "--batch-size", "2",
            "--workers", "0", "--log-every", "1", "--save-every", "100", "--sample-every", "0", "--no-progress",
            "--lr", "1e-3", "--warmup-steps", "2", "--steps", "3", "--grad-clip", "0.5", "--out", str(out)]


@pytest.mark.slow  # Inductor compiles C++ kernels: 1-2 minutes of 2 cores without its cache
def test_train_compile_with_inductor_matches_eager_without_graph_breaks_or_recompiles(tmp_path):
    with vdm_fast.backend("reference"):
        eager = Trainer(TrainConfig(out=str(tmp_path / "eager"), **RUN))
        init = params(eager.model)
        ref = eager.run()
        eager.close()
        torch._dynamo.reset()
        counters.clear()
        try:
            # A recompilation on a later step raises instead of passing quietly.
            with torch._dynamo.config.patch(error_on_recompile=True):
                assert cli([*_args(tmp_path / "compiled"), "--compile"]) == 0
            stats, breaks = dict(counters["stats"]), dict(counters["graph_break"])
        finally:
            torch._dynamo.reset()  # the graph baked in the dispatch mode: keep it from later tests
    assert stats.get("unique_graphs") == 1, stats  # one graph for the model: no break, no second compile
    assert not breaks, breaks
    assert counters["inductor"], "Inductor did not run"  # the real backend (its pattern matcher or its cache)
    logged = [json.loads(line) for line in (tmp_path / "compiled" / "log.jsonl").read_text().splitlines()]
    losses = torch.tensor([r["loss"] for r in logged])
    assert [r["step"] for r in logged] == [1, 2, 3]
    torch.testing.assert_close(losses, torch.tensor([v for _, v in ref["losses"]]), rtol=1e-5, atol=1e-7)
    c, e = ckpt.load(tmp_path / "compiled"), ckpt.load(tmp_path / "eager")
    assert c.config["train"]["compile"] is True
    assert not any(k.startswith("_orig_mod") for k in c.model) and c.model.keys() == e.model.keys()
    assert sum(not torch.equal(init[k], v) for k, v in e.model.items()) > len(init) // 2  # it trained
    assert change_err(c.model, e.model, init) < 1e-4
