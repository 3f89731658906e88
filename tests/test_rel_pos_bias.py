"""rel_pos_bias (csrc/): the compiled CPU code here, the CUDA code on a lent GPU, against the reference."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from helpers import DTYPES, GPU
from op_contract import OpContract

import vdm_fast
from vdm_fast import _ext, ops
from vdm_fast import reference as ref
from vdm_fast.layers import RelativePositionBias

DEVICES = ["cpu"] + (["cuda"] if GPU else [])


def hf_t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Hugging Face T5's _relative_position_bucket, written out here as the spec (transformers 4.x source)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def _valid(num_buckets, max_distance, bidirectional):
    """T5 bucketing needs max_distance past the exact buckets (the op rejects the rest: test_bad_input_raises)."""
    return max_distance > (num_buckets // 2 if bidirectional else num_buckets) // 2


@pytest.mark.parametrize("num_buckets,max_distance,bidirectional", [
    (nb, md, bi) for nb, md in [(32, 32), (32, 128), (16, 9), (8, 100), (64, 32), (8, 3)] for bi in (True, False)
    if _valid(nb, md, bi)])
def test_bucket_is_t5(num_buckets, max_distance, bidirectional):
    d = torch.cat([torch.arange(-3 * max_distance, 3 * max_distance), torch.randint(-10**6, 10**6, (1000,))])
    want = hf_t5_bucket(d, bidirectional, num_buckets, max_distance)
    assert torch.equal(ref.relative_position_bucket(d, bidirectional, num_buckets, max_distance), want)
    # The kernels' clamped lookup table gives the same buckets for every offset.
    lut = ops.rel_pos_bias.__globals__["bucket_lut"](num_buckets, max_distance, bidirectional, torch.device("cpu"))
    assert torch.equal(lut[d.clamp(-max_distance, max_distance) + max_distance].long(), want)


def _positions(batch, frames, device):
    if batch is None:
        return torch.randint(-50, 50, (frames,), device=device)
    return torch.randint(-50, 50, (batch, frames), device=device)


# (B or None for (T,) positions, T, heads, num_buckets, max_distance) x bidirectional, invalid T5 setups filtered out.
# The last case has many offsets per bucket: the backward's sums matter there (the determinism test uses it).
CASES = [(*case, bi) for case in [(None, 1, 1, 32, 32), (None, 16, 8, 32, 32), (3, 7, 5, 32, 32), (2, 33, 4, 16, 20),
                                  (1, 64, 3, 64, 128), (4, 5, 2, 8, 3), (2, 9, 2, 8, 5), (16, 48, 8, 32, 32)]
         for bi in (True, False) if _valid(*case[3:], bi)]


class TestRelPosBiasContract(OpContract):
    differentiable = ("table",)
    cases = [("B{}-T{}-h{}-nb{}-md{}-{}".format(*c[:5], "bi" if c[5] else "uni"), dict(zip(
        ("batch", "frames", "heads", "num_buckets", "max_distance", "bidirectional"), c))) for c in CASES]
    bad_inputs = [
        (dict(table=torch.randn(32)), ValueError, "table"),
        (dict(table=torch.randint(0, 3, (32, 4))), TypeError, "table"),
        (dict(table=[[0.0] * 4] * 32), TypeError, "table"),
        (dict(positions=torch.randn(5)), TypeError, "positions"),
        (dict(positions=torch.zeros(2, 3, 4, dtype=torch.long)), ValueError, "positions"),
        (dict(positions=[0, 1, 2]), TypeError, "positions"),
        (dict(max_distance=4), ValueError, "max_distance"),
        (dict(max_distance=0), ValueError, "max_distance"),
        (dict(max_distance=2.5), TypeError, "max_distance"),
        (dict(max_distance=True), TypeError, "max_distance"),
        (dict(bidirectional=1), TypeError, "bidirectional"),
        (dict(table=torch.randn(2, 4)), ValueError, "buckets"),
    ]

    def make_inputs(self, params, dtype, device):
        table = torch.randn(params["num_buckets"], params["heads"], device=device, dtype=dtype)
        return dict(table=table, positions=_positions(params["batch"], params["frames"], device),
                    max_distance=params["max_distance"], bidirectional=params["bidirectional"])

    def bad_base(self):
        return dict(table=torch.randn(32, 4), positions=torch.arange(6), max_distance=32, bidirectional=True)

    def reference(self, table, positions, max_distance, bidirectional):
        return ref.rel_pos_bias(table, positions, max_distance=max_distance, bidirectional=bidirectional)

    def fast(self, table, positions, max_distance, bidirectional):
        return ops.rel_pos_bias(table, positions, max_distance=max_distance, bidirectional=bidirectional)

    def opcheck_calls(self, inputs):
        t, p, md, bi = inputs["table"], inputs["positions"], inputs["max_distance"], inputs["bidirectional"]
        grad = torch.randn(ref.rel_pos_bias(t.detach(), p, max_distance=md, bidirectional=bi).shape, device=t.device)
        return [(torch.ops.vdm_fast.rel_pos_bias.default, (t, p, md, bi, "ext")),
                (torch.ops.vdm_fast.rel_pos_bias_backward.default, (grad, p, t.shape[0], md, bi, "ext"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_an_exact_gather(device, dtype):
    """Stronger than the contract's bound: the forward copies table entries, so it equals the reference bitwise."""
    for batch, frames, heads, nb, md, bi in CASES:
        table = torch.randn(nb, heads, device=device, dtype=dtype)
        pos = _positions(batch, frames, device)
        with vdm_fast.backend("triton"):
            out = ops.rel_pos_bias(table, pos, max_distance=md, bidirectional=bi)
        assert torch.equal(out, ref.rel_pos_bias(table, pos, max_distance=md, bidirectional=bi))


def test_auto_uses_compiled_cpu_code_and_reference_mode_does_not():
    from vdm_fast import _dispatch
    from vdm_fast.ops.rel_pos_bias import SPEC

    assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "ext"
    assert _dispatch.select(SPEC, torch.device("cpu"), torch.float64) == "reference"
    with vdm_fast.backend("reference"):
        assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "reference"
    with pytest.raises(TypeError, match="float32"), vdm_fast.backend("triton"):
        _dispatch.select(SPEC, torch.device("cpu"), torch.float64)


def test_custom_op_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        torch.ops.vdm_fast.rel_pos_bias(torch.randn(32, 4), torch.arange(3), 32, True, "reference")


def test_layer_matches_video_diffusion_pytorch_layout():
    layer = RelativePositionBias(heads=8, num_buckets=32, max_distance=32)
    assert list(layer.state_dict()) == ["relative_attention_bias.weight"]
    out = layer(10)
    assert out.shape == (8, 10, 10)
    # video-diffusion-pytorch: rel_pos = k_pos[None, :] - q_pos[:, None]; values = emb(bucket); 'i j h -> h i j'
    q = torch.arange(10)
    rel = q[None, :] - q[:, None]
    want = layer.relative_attention_bias(hf_t5_bucket(rel, True, 32, 32)).permute(2, 0, 1)
    assert torch.equal(out, want)
    assert layer(torch.arange(10)[None].expand(3, 10)).shape == (3, 8, 10, 10)


def test_extension_reports_cuda_build():
    """Where nvcc is on this machine (and not forced off), the build must have compiled the CUDA code, for sm_80 and
    sm_90 at least; a build without it must not claim CUDA."""
    mod = _ext.module()
    nvcc_here = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    forced_off = os.environ.get("VDM_FAST_BUILD_CUDA", "").strip().lower() in ("0", "false", "off", "no")
    if nvcc_here and not forced_off:
        assert mod.with_cuda, "nvcc is on this machine but vdm_fast._C was built without CUDA code"
    if mod.with_cuda:
        assert {"80", "90"} <= set(mod.cuda_archs.split(";")), mod.cuda_archs
    else:
        assert "cuda" not in _ext.devices()


def test_dispatch_respects_an_ops_minimum_triton(monkeypatch):
    """An op whose kernels need a newer Triton runs the reference in auto mode and raises when forced."""
    import triton

    from vdm_fast import _dispatch

    spec = _dispatch.OpSpec("needs_future_triton", triton=True, min_triton=(99, 0))
    device = torch.device("cuda")  # dispatch reads only the device type: no GPU is touched
    assert _dispatch.select(spec, device, torch.float32) == "reference"
    with vdm_fast.backend("triton"), pytest.raises(_dispatch.BackendUnavailable, match="Triton >= 99.0"):
        _dispatch.select(spec, device, torch.float32)
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    from vdm_fast.ops.temporal_attention import SPEC

    with vdm_fast.backend("auto"):
        assert _dispatch.describe(SPEC, "cuda").startswith("reference (its kernels need Triton >= 3.4")
    with vdm_fast.backend("triton"):
        assert "Triton >= 3.4" in _dispatch.describe(SPEC, "cuda")
