"""Unet3D under torch.compile(fullgraph=True) with the default Inductor backend, the fast ops inside (Triton under
the interpreter on CPU: to Inductor each custom op is an opaque extern kernel with its fake), forward and every
gradient against eager, and no recompilation when only the batch changes (batch marked dynamic).

Inductor compiles C++ for its own kernels here, so the model is the smallest with every block kind of a level:
one level, a residual block with spatial and temporal attention (relative position bias, joint mask) going down
and two coming up, the middle's residual blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_unet3d import _forward_backward, inputs, randomize
from torch._dynamo.utils import counters

from vdm_fast.model import Unet3D

SMALLEST = dict(base_channels=4, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(4,), attn_head_dim=4,
                norm_groups=2, image_size=4, emb_dim=8, mid_attention=False)


@pytest.mark.slow  # Inductor compiles C++ kernels: about a minute of one core
def test_inductor_fullgraph_matches_eager_and_does_not_recompile_for_a_new_batch():
    torch._dynamo.reset()
    counters.clear()
    model = randomize(Unet3D(**SMALLEST))
    compiled = torch.compile(model, fullgraph=True)  # the default backend: Inductor
    try:
        for batch in (2, 3):
            x, logsnr, _ = inputs(model, batch=batch, size=4)
            for t in (x, logsnr):
                torch._dynamo.mark_dynamic(t, 0)
            kwargs = dict(num_video_frames=2, positions=torch.tensor([0, 2, 3]))
            out_ref, g_ref = _forward_backward(model, "triton", x, logsnr, **kwargs)
            out, grads = _forward_backward(compiled, "triton", x, logsnr, **kwargs)
            assert_close(out, out_ref, 1e-5, f"forward, batch {batch}")
            grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
            assert grads.keys() == g_ref.keys()
            # Inductor reorders fp32 sums (its own kernels around ours): all gradients together to 1e-5, and each
            # parameter's to 1e-4, since a small-norm one (a norm's bias: a sum of cancelling terms) shows the same
            # absolute rounding as a larger relative error (seen: 1.6e-5). A wrong gradient is off by O(1).
            flat = torch.cat([grads[n].flatten() for n in g_ref])
            assert_close(flat, torch.cat([g.flatten() for g in g_ref.values()]), 1e-5, f"all gradients, batch {batch}")
            for name, g in g_ref.items():
                assert g.abs().max() > 0, f"{name}: zero gradient (the test could not fail)"
                assert_close(grads[name], g, 1e-4, f"grad {name}, batch {batch}")
        # One graph for both batches: the dynamic batch compiled once, no recompilation, no graph break.
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()  # the graph baked in the triton dispatch: keep it from later tests
