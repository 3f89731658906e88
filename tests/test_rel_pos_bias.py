"""rel_pos_bias (csrc/): the compiled CPU code here, the CUDA code on a lent GPU, against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, DTYPES, GPU, TOL, assert_close, strided

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,frames,heads,num_buckets,max_distance,bidirectional", [
    (*case, bi) for case in [(None, 1, 1, 32, 32), (None, 16, 8, 32, 32), (3, 7, 5, 32, 32), (2, 33, 4, 16, 20),
                             (1, 64, 3, 64, 128), (4, 5, 2, 8, 3), (2, 9, 2, 8, 5)]
    for bi in (True, False) if _valid(*case[3:], bi)])
def test_forward_backward_match_reference(device, dtype, batch, frames, heads, num_buckets, max_distance,
                                          bidirectional):
    table = torch.randn(num_buckets, heads, device=device, dtype=dtype)
    pos = _positions(batch, frames, device)
    with vdm_fast.backend("triton"):  # the fast path: the compiled extension for this op
        out = ops.rel_pos_bias(table.requires_grad_(), pos, max_distance=max_distance, bidirectional=bidirectional)
    want = ref.rel_pos_bias(table.detach().double().requires_grad_(), pos, max_distance=max_distance,
                            bidirectional=bidirectional)
    assert out.dtype == dtype and out.shape == want.shape
    assert torch.equal(out.double(), want.detach()), "a gather must be exact"
    grad = torch.randn_like(want)
    out.backward(grad.to(dtype))
    want.backward(grad)
    assert table.grad.dtype == dtype
    # The gradient of a bf16/fp16 output is itself rounded: the reference sums that rounded gradient in fp64.
    assert_close(table.grad, _ref_grad(table, pos, grad.to(dtype), max_distance, bidirectional),
                 max(TOL[dtype], 1e-6), "grad_table")


def _ref_grad(table, pos, grad, max_distance, bidirectional):
    t = table.detach().double().requires_grad_()
    out = ref.rel_pos_bias(t, pos, max_distance=max_distance, bidirectional=bidirectional)
    (g,) = torch.autograd.grad(out, t, grad.double())
    return g


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    table = strided(torch.randn(32, 6, device=device), dim=0)
    pos = strided(torch.randint(0, 40, (3, 12), device=device), dim=1)
    grad = strided(torch.randn(3, 6, 12, 12, device=device), dim=2)
    t = table.clone().requires_grad_()
    with vdm_fast.backend("triton"):
        out = ops.rel_pos_bias(table.requires_grad_(), pos)
    out.backward(grad)
    want = ref.rel_pos_bias(t, pos)
    want.backward(grad)
    assert torch.equal(out, want)
    assert_close(table.grad, t.grad, 1e-6, "grad_table")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    table = torch.randn(32, 8, device=device, requires_grad=True)
    pos = torch.randint(0, 500, (16, 48), device=device)
    grad = torch.randn(16, 8, 48, 48, device=device)
    grads = []
    for _ in range(3):
        table.grad = None
        with vdm_fast.backend("triton"):
            ops.rel_pos_bias(table, pos).backward(grad)
        grads.append(table.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_auto_uses_compiled_cpu_code_and_reference_mode_does_not():
    from vdm_fast import _dispatch
    from vdm_fast.ops.rel_pos_bias import SPEC

    assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "ext"
    assert _dispatch.select(SPEC, torch.device("cpu"), torch.float64) == "reference"
    with vdm_fast.backend("reference"):
        assert _dispatch.select(SPEC, torch.device("cpu"), torch.float32) == "reference"
    with pytest.raises(TypeError, match="float32"), vdm_fast.backend("triton"):
        _dispatch.select(SPEC, torch.device("cpu"), torch.float64)


def test_opcheck():
    impl = "ext"
    table = torch.randn(32, 4, device=DEVICE, requires_grad=True)
    pos = torch.randint(0, 30, (2, 9), device=DEVICE)
    torch.library.opcheck(torch.ops.vdm_fast.rel_pos_bias.default, (table, pos, 32, True, impl))
    torch.library.opcheck(torch.ops.vdm_fast.rel_pos_bias.default, (table, pos[0], 16, False, impl))


def test_torch_compile_fullgraph():
    layer = RelativePositionBias(heads=4).to(DEVICE)
    pos = torch.randint(0, 30, (2, 9), device=DEVICE)

    def f(p):
        return layer(p).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with vdm_fast.backend("triton"):
        got = compiled(pos)
        got.backward()
    assert torch.allclose(got, f(pos).detach())


@pytest.mark.parametrize("bad,err,match", [
    (dict(table=torch.randn(32)), ValueError, "table"),
    (dict(table=torch.randint(0, 3, (32, 4))), TypeError, "table"),
    (dict(positions=torch.randn(5)), TypeError, "positions"),
    (dict(positions=torch.zeros(2, 3, 4, dtype=torch.long)), ValueError, "positions"),
    (dict(max_distance=4), ValueError, "max_distance"),
    (dict(max_distance=0), ValueError, "max_distance"),
    (dict(max_distance=2.5), TypeError, "max_distance"),
    (dict(table=torch.randn(2, 4)), ValueError, "buckets"),
    (dict(positions=[0, 1, 2]), TypeError, "positions"),
])
def test_bad_input_raises(bad, err, match):
    args = dict(table=torch.randn(32, 4), positions=torch.arange(6), max_distance=32)
    args.update(bad)
    with pytest.raises(err, match=match):
        ops.rel_pos_bias(args["table"], args["positions"], max_distance=args["max_distance"])


def test_custom_op_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        torch.ops.vdm_fast.rel_pos_bias(torch.randn(32, 4), torch.arange(3), 32, True, "reference")


def test_device_mix_raises():
    if not GPU:
        pytest.skip("needs a CUDA GPU")
    with pytest.raises(ValueError, match="positions"):
        ops.rel_pos_bias(torch.randn(32, 4, device="cuda"), torch.arange(5))


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
    """This machine has nvcc: the build must have compiled CUDA code (CI compiles every .cu file every run)."""
    mod = _ext.module()
    if not mod.with_cuda:
        pytest.skip("built without nvcc")
    assert "90" in mod.cuda_archs.split(";")


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
