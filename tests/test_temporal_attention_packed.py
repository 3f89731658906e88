"""temporal_attention_packed (the qkv projection read in place, one packed gradient) and the attention layers on it:
the op contract, the layers against their definition, the copies they make, the host path (no aten kernel in a
forward call but the launches), empty shapes, double backward and Inductor."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, strided
from op_contract import OpContract
from test_temporal_attention import _bias, _mask, eager_lowprec

import vdm_fast
from vdm_fast import ops
from vdm_fast import reference as ref
from vdm_fast.layers import SpatialAttention, TemporalAttention
from vdm_fast.testing import CopyCounter, rel_err


def _views(qkv, heads):
    """(N, heads, T, d) views q, k, v of a packed (B, T, S, 3 * heads * d) projection."""
    b, frames, seqs, width = qkv.shape
    d = width // (3 * heads)
    return qkv.view(b, frames, seqs, 3, heads, d).permute(3, 0, 2, 4, 1, 5).reshape(3, b * seqs, heads, frames, d)


def _packed_out(out4, b, frames, seqs):
    n, heads, _, d = out4.shape
    return out4.reshape(b, seqs, heads, frames, d).permute(0, 3, 1, 2, 4).reshape(b, frames, seqs, heads * d)


# (B, T, S, heads, d, bias, mask, layout): bias "per_sample" is (B, heads, T, T), "one" (1, heads, T, T)
PACKED_CASES = [
    (2, 7, 3, 2, 16, "per_sample", "shared", "channels_last"),
    (1, 16, 5, 2, 64, "shared", "joint", "channels_last"),
    (3, 5, 4, 1, 24, None, "per_sample", "channels_last"),
    (2, 1, 3, 2, 8, "one", None, "channels_last"),
    (2, 33, 1, 1, 16, "per_sample", None, "channels_last"),
    (2, 6, 4, 2, 16, "per_sample", "shared", "channels_first"),  # a bmm projection of a contiguous activation
]
_PNAMES = ("batch", "frames", "seqs", "heads", "d", "bias", "mask", "layout")


def _make_packed(p, dtype, device):
    b, frames, seqs, heads, d = (p[k] for k in _PNAMES[:5])
    width = 3 * heads * d
    if p["layout"] == "channels_first":  # (B, 3hd, T, S) memory, viewed (B, T, S, 3hd): channel stride T*S
        qkv = torch.randn(b, width, frames, seqs, device=device, dtype=dtype).permute(0, 2, 3, 1)
    else:
        qkv = torch.randn(b, frames, seqs, width, device=device, dtype=dtype)
    kind = p["bias"]
    bias = None if kind is None else _bias("per_sample", 1, heads, frames) if kind == "one" else _bias(
        kind, b, heads, frames)
    return dict(qkv=qkv, heads=heads, bias=bias, mask=_mask(p["mask"], b, frames), scale=p.get("scale"))


class TestTemporalAttentionPackedContract(OpContract):
    differentiable = ("qkv", "bias")
    cases = [("B{}-T{}-S{}-h{}-d{}-{}-{}-{}".format(*c), dict(zip(_PNAMES, c))) for c in PACKED_CASES]
    bad_inputs = [
        (dict(qkv=torch.randn(2, 5, 48)), ValueError, "qkv"),
        (dict(qkv=torch.randn(2, 5, 3, 50)), ValueError, "qkv"),
        (dict(qkv=torch.randint(0, 3, (2, 5, 3, 48))), TypeError, "qkv"),
        (dict(qkv=None), TypeError, "qkv"),
        (dict(heads=0), ValueError, "heads"),
        (dict(heads=2.0), TypeError, "heads"),
        (dict(heads=True), TypeError, "heads"),
        (dict(bias=torch.randn(3, 2, 5, 5)), ValueError, "bias.*B=3"),
        (dict(bias=torch.randn(2, 5, 4)), ValueError, "bias"),
        (dict(mask=torch.ones(5, 5)), TypeError, "mask"),
        (dict(mask=torch.ones(4, 5, 5, dtype=torch.bool)), ValueError, "mask"),
        (dict(scale=math.inf), TypeError, "scale"),
        (dict(qkv=torch.randn(2, 129, 1, 48)), ValueError, "T=129"),
    ]

    def make_inputs(self, params, dtype, device):
        return _make_packed(params, dtype, device)

    def bad_base(self):
        return dict(qkv=torch.randn(2, 5, 3, 48), heads=2, bias=None, mask=None, scale=None)

    def reference(self, qkv, heads, bias, mask, scale):
        return ref.temporal_attention_packed(qkv, heads, bias, mask, scale=scale)

    def baseline(self, qkv, heads, bias, mask, scale):
        q, k, v = _views(qkv, heads)
        return _packed_out(eager_lowprec(q, k, v, bias, mask, scale), qkv.shape[0], qkv.shape[1], qkv.shape[2])

    def fast(self, qkv, heads, bias, mask, scale):
        return ops.temporal_attention_packed(qkv, heads, bias, mask, scale=scale)

    def opcheck_cases(self):  # opcheck runs the op a dozen ways: small cases
        return [dict(zip(_PNAMES, (2, 4, 2, 2, 8, "per_sample", "per_sample", "channels_first")))]

    def opcheck_calls(self, inputs):
        qkv, heads = inputs["qkv"], inputs["heads"]
        scale = 1.0 / math.sqrt(qkv.shape[-1] // (3 * heads))
        op = torch.ops.vdm_fast.temporal_attention_packed.default
        return [(op, (qkv, heads, inputs["bias"], inputs["mask"], scale, "triton")),
                (op, (qkv, heads, None, None, scale, "triton"))]


def test_packed_equals_the_4d_op_on_views():
    """The packed op is temporal_attention on the q, k, v views of the projection (one definition)."""
    p = dict(zip(_PNAMES, PACKED_CASES[0]))
    inputs = _make_packed(p, torch.float32, DEVICE)
    q, k, v = _views(inputs["qkv"], p["heads"])
    with vdm_fast.backend("triton"):
        packed = ops.temporal_attention_packed(**inputs)
        four = ops.temporal_attention(q, k, v, inputs["bias"], inputs["mask"])
    assert torch.equal(packed, _packed_out(four, p["batch"], p["frames"], p["seqs"]))


# ----------------------------------------------------------------------------------------------- the layers


def _layer_inputs(channels_last, b=2, c=12, frames=6, h=3, w=2):
    x = torch.randn(b, c, frames, h, w, device=DEVICE)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def _manual_temporal(layer, x, pos, num_video_frames):
    """The layer's definition in plain PyTorch (fp64): qkv projection per (b, h, w) sequence, attention with the
    relative position bias and the joint mask, output projection."""
    b, c, frames, h, w = x.shape
    heads, dh = layer.heads, layer.dim_head
    xs = x.permute(0, 3, 4, 2, 1).reshape(-1, frames, c)
    qkv = xs @ layer.to_qkv.weight.t()
    q2, k2, v2 = (t.reshape(-1, frames, heads, dh).transpose(1, 2) for t in qkv.chunk(3, -1))
    s = q2 @ k2.transpose(-1, -2) / math.sqrt(dh)
    s = s + layer.rel_pos_bias(pos).repeat_interleave(h * w, 0)
    s = s.masked_fill(~ops.joint_video_image_mask(frames, num_video_frames, device=x.device), float("-inf"))
    o = (s.softmax(-1) @ v2).transpose(1, 2).reshape(-1, frames, heads * dh) @ layer.to_out.weight.t()
    return o.reshape(b, h, w, frames, c).permute(0, 4, 3, 1, 2)


@pytest.mark.parametrize("channels_last", [True, False])
def test_temporal_layer_matches_its_definition(channels_last):
    """Forward and every gradient (x, to_qkv, to_out, the bias table) of the fast layer against the definition in
    fp64, for channels_last_3d and contiguous input; per-sample positions and the joint mask."""
    layer = TemporalAttention(12, heads=3, dim_head=8).to(DEVICE)
    x = _layer_inputs(channels_last).requires_grad_()
    pos = torch.randint(0, 20, (2, 6), device=DEVICE)
    with vdm_fast.backend("triton"):
        y = layer(x, positions=pos, num_video_frames=4)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn_like(y)
    y.backward(grad)
    layer64 = TemporalAttention(12, heads=3, dim_head=8).to(DEVICE).double()
    layer64.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_()
    want = _manual_temporal(layer64, x64, pos, 4)
    want.backward(grad.double())
    assert rel_err(y, want) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    for (name, p), p64 in zip(layer.named_parameters(), layer64.parameters()):
        assert rel_err(p.grad, p64.grad) < 1e-5, name


def test_layer_joint_mask_isolates_images():
    layer = TemporalAttention(8, heads=2, dim_head=4).to(DEVICE)
    x = torch.randn(1, 8, 5, 2, 2, device=DEVICE)
    x2 = x.clone()
    x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])  # change the appended images only
    with vdm_fast.backend("triton"):
        y, y2 = layer(x, num_video_frames=3), layer(x2, num_video_frames=3)
        assert torch.equal(y[:, :, :3], y2[:, :, :3])
        y.sum().backward()
    assert layer.rel_pos_bias.relative_attention_bias.weight.grad.abs().sum() > 0


def test_temporal_layer_bad_input_names_the_argument():
    layer = TemporalAttention(8, heads=2, dim_head=4)
    x = torch.randn(2, 8, 5, 2, 2)
    with pytest.raises(ValueError, match="positions"):
        layer(x, positions=torch.arange(4))  # T = 5 frames
    with pytest.raises(ValueError, match="positions"):
        layer(x, positions=torch.zeros(3, 5, dtype=torch.long))  # B = 2
    with pytest.raises(ValueError, match="positions"):
        layer(x, positions=[0, 1, 2, 3, 4])
    with pytest.raises(TypeError, match="positions"):
        layer(x, positions=torch.arange(5.0))
    with pytest.raises(ValueError, match="num_video_frames"):
        layer(x, num_video_frames=6)
    for bad in (torch.randn(2, 7, 5, 2, 2), torch.randn(2, 8, 5, 2)):
        with pytest.raises(ValueError, match="x must"):
            layer(bad)
    with pytest.raises(ValueError, match="x must"):
        SpatialAttention(8, heads=2, dim_head=4)(torch.randn(2, 6, 5, 2, 2))


def _count_copies(monkeypatch, step):
    """Copies made by step() with the kernel launches no-op'd: the audit is of the layer and launcher path (the
    kernels write their outputs in place; the interpreter's own traffic is not the layer's)."""
    from vdm_fast.kernels import temporal_attention as kern

    monkeypatch.setattr(kern, "_launch", lambda *a: None)
    with CopyCounter() as counter:
        step()
    return counter


@pytest.mark.parametrize("layer_cls,channels_last", [(TemporalAttention, True), (TemporalAttention, False),
                                                     (SpatialAttention, True)])
def test_layers_copy_at_most_a_quarter_of_their_input(monkeypatch, layer_cls, channels_last):
    """Forward + backward copies <= 0.25x the input activation's bytes (issue 12's target): the temporal layer
    none at all in either layout, the spatial one (channels_last_3d, as Unet3D runs it) only its weight gradient's
    concatenation (3 * inner / (B * T * H * W) of the input: 0.19x here, 0.02x at the U-Net's 32x32 level).
    Contiguous input to SpatialAttention with B > 1 is copied once into frame-major order (the benchmark's rows)."""
    layer = layer_cls(32, heads=2, dim_head=16).to(DEVICE)
    x = _layer_inputs(channels_last, b=2, c=32, frames=4, h=8, w=8).requires_grad_()
    with vdm_fast.backend("triton"):
        y = layer(x)
        g = torch.randn_like(y)

        def step():
            layer(x).backward(g)

        counter = _count_copies(monkeypatch, step)
    ratio = counter.bytes / (x.numel() * x.element_size())
    assert ratio <= 0.25, (ratio, counter.ops)
    if layer_cls is TemporalAttention:
        assert counter.bytes == 0, counter.ops


# ----------------------------------------------------------------------------------------------- host path

# Ops that allocate or re-view, launching no kernel; anything else in a forward call is a kernel besides ours.
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::transpose", "aten::as_strided", "aten::view",
              "aten::_reshape_alias", "aten::detach", "aten::alias", "aten::lift_fresh"}


def _launch_ranges(monkeypatch):
    from vdm_fast.kernels import temporal_attention as kern

    real = kern._launch

    def launch(*a):
        with torch.profiler.record_function("vdm_fast::launch"):
            real(*a)

    monkeypatch.setattr(kern, "_launch", launch)


def _aten_outside_launches(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    launches = [e for e in events if e.name == "vdm_fast::launch"]

    def inside(e):
        p = e
        while p is not None:
            if p.name == "vdm_fast::launch":
                return True
            p = p.cpu_parent
        return False

    others = [e.name for e in events if e.name.startswith("aten::") and not inside(e) and e.name not in _NO_KERNEL]
    return len(launches), others


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_runs_no_aten_kernel_but_its_launch(monkeypatch, packed, requires_grad):
    """A forward call (second call: the plan is cached) runs exactly one launch and no other aten kernel (no
    fill, cast or copy), with a shared fp32 bias and a bool mask, as the layer calls it."""
    heads, frames, d = 2, 5, 8
    bias = torch.randn(heads, frames, frames, device=DEVICE, requires_grad=requires_grad)
    mask = torch.rand(frames, frames, device=DEVICE) > 0.3
    if packed:
        qkv = torch.randn(2, frames, 3, 3 * heads * d, device=DEVICE, requires_grad=requires_grad)

        def call():
            return ops.temporal_attention_packed(qkv, heads, bias, mask)
    else:
        qkv = torch.randn(6, frames, 3 * heads * d, device=DEVICE, requires_grad=requires_grad)
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in qkv.chunk(3, -1))

        def call():
            return ops.temporal_attention(q, k, v, bias, mask)

    _launch_ranges(monkeypatch)
    with vdm_fast.backend("triton"):
        call()
        launches, others = _aten_outside_launches(call)
    assert launches == 1 and not others, others


def test_plan_cache_hits_and_still_validates():
    import importlib

    mod = importlib.import_module("vdm_fast.ops.temporal_attention")  # the module (the package exports the function)
    q = torch.randn(3, 2, 5, 8, device=DEVICE)
    with vdm_fast.backend("triton"):
        ops.temporal_attention(q, q, q, scale=1.0)
        before = len(mod._CALLS.entries)
        ops.temporal_attention(q, q, q, scale=1.0)
        assert len(mod._CALLS.entries) == before
        with pytest.raises(TypeError, match="scale"):
            ops.temporal_attention(q, q, q, scale=True)  # True == 1.0: must not hit 1.0's entry
        with pytest.raises(ValueError, match="k"):
            ops.temporal_attention(q, q[:, :, :4], q)


# ----------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (3, 2, 0, 8), (3, 2, 5, 0), (0, 2, 0, 8)])
def test_empty_shapes_are_empty_on_every_path(backend, shape):
    """N = 0, T = 0, d = 0: every path returns the empty output (and empty gradients), none raises."""
    n, heads, frames, d = shape
    q, k, v = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, frames, frames, device=DEVICE, requires_grad=True)
    with vdm_fast.backend(backend):
        out = ops.temporal_attention(q, k, v, bias)
        out.sum().backward()
        qkv = torch.randn(1, frames, n, 3 * heads * d, device=DEVICE, requires_grad=True)
        packed = ops.temporal_attention_packed(qkv, heads, bias)
        packed.sum().backward()
    assert out.shape == shape and packed.shape == (1, frames, n, heads * d)
    assert q.grad.shape == shape and qkv.grad.shape == qkv.shape and bias.grad.shape == bias.shape
    assert not bias.grad.any() and not q.grad.any()


def _second_order(fn, inputs, grad, probes):
    """d/d(inputs) of sum(probe * d out/d input): double backward, through create_graph=True."""
    out = fn(*inputs)
    first = torch.autograd.grad(out, inputs, grad, create_graph=True)
    total = sum((g * p).sum() for g, p in zip(first, probes))
    return first, torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("packed", [False, True])
def test_double_backward_matches_the_reference(packed):
    heads, frames, d = 2, 6, 8
    bias = torch.randn(2, heads, frames, frames, device=DEVICE)
    mask = _mask("shared", 1, frames)
    if packed:
        inputs = [torch.randn(2, frames, 3, 3 * heads * d, device=DEVICE), bias]

        def fast(x, b):
            return ops.temporal_attention_packed(x, heads, b, mask)

        def slow(x, b):
            return ref.temporal_attention_packed(x, heads, b, mask)
    else:
        inputs = [torch.randn(4, heads, frames, d, device=DEVICE) for _ in range(3)] + [bias]

        def fast(q, k, v, b):
            return ops.temporal_attention(q, k, v, b, mask)

        def slow(q, k, v, b):
            return ref.temporal_attention(q, k, v, b, mask)

    grad = torch.randn_like(slow(*inputs))
    probes = [torch.randn_like(t) for t in inputs]
    with vdm_fast.backend("triton"):
        got1, got2 = _second_order(fast, [t.clone().requires_grad_() for t in inputs], grad, probes)
    want1, want2 = _second_order(slow, [t.double().requires_grad_() for t in inputs], grad.double(),
                                 [p.double() for p in probes])
    for a, b in zip(got1 + got2, want1 + want2):
        assert rel_err(a, b) < 1e-5


# ----------------------------------------------------------------------------------------------- Inductor


@pytest.mark.parametrize("layer_cls", [TemporalAttention, SpatialAttention])
def test_layers_compile_with_inductor_fullgraph(layer_cls):
    """torch.compile(layer, fullgraph=True) with the default (Inductor) backend: no graph break (fullgraph raises on
    one), the fast op inside as an extern kernel; forward and every gradient equal to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = layer_cls(16, heads=2, dim_head=8).to(DEVICE)
    x = _layer_inputs(True, b=2, c=16, frames=5, h=2, w=3)
    kwargs = {}
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    with vdm_fast.backend("triton"):
        for fn in (layer, compiled):
            xi = x.clone().requires_grad_()
            y = fn(xi, **kwargs)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
            layer.zero_grad()
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    assert rel_err(y1, y0) < 1e-5 and rel_err(gx1, gx0) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(gp1, gp0))


def test_strided_projection_gradient_is_one_packed_buffer():
    """The backward hands the projection one dqkv in qkv's own layout: no concatenation, no copy."""
    qkv = strided(torch.randn(2, 5, 3, 48, device=DEVICE), dim=2).requires_grad_()
    with vdm_fast.backend("triton"):
        out = ops.temporal_attention_packed(qkv, 2)
    (g,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    assert g.shape == qkv.shape and g.is_contiguous()


def test_temporal_layer_compiles_with_mask_and_positions():
    """The joint image-video mask and per-sample positions trace too (fullgraph, aot_eager: the Inductor test
    above covers the default backend on the plain layer); forward and every gradient equal to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = TemporalAttention(16, heads=2, dim_head=8).to(DEVICE)
    x = _layer_inputs(True, b=2, c=16, frames=5, h=2, w=3)
    pos = torch.randint(0, 9, (2, 5), device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    with vdm_fast.backend("triton"):
        for fn in (layer, compiled):
            xi = x.clone().requires_grad_()
            y = fn(xi, positions=pos, num_video_frames=3)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
            layer.zero_grad()
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    assert rel_err(y1, y0) < 1e-5 and rel_err(gx1, gx0) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(gp1, gp0))
