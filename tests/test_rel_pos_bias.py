"""rel_pos_bias (csrc/): the compiled CPU code here, the CUDA code on a lent GPU, against the reference."""

from __future__ import annotations

import math
import os
import re
import shutil

import pytest
import torch
from helpers import DTYPES, GPU, run_python
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


# ------------------------------------------------------------------------------------------- extension CUDA side

def _needs_cuda_build():
    if not _ext.module().with_cuda:
        pytest.fail("this test checks the CUDA build's probe: test_extension_reports_cuda_build says why it is absent")


def test_cuda_probe_on_this_machine():
    """The probe agrees with torch about whether CUDA code can run; without, devices() omits "cuda" and says why."""
    _needs_cuda_build()
    probe = _ext.cuda_probe()
    assert probe["runtime_version"] >= 11000
    assert probe is not _ext.cuda_probe() and probe == _ext.cuda_probe()  # a copy of one cached result
    if GPU:
        assert probe["reason"] == "" and "cuda" in _ext.devices()
    else:
        assert probe["reason"] and _ext.devices() == ("cpu",)
        assert "cannot run here: " + probe["reason"] in _ext.status()


@pytest.mark.parametrize("runtime,driver,count,error,want", [
    (13000, 0, 0, 0, "no CUDA driver"),
    (13000, 12040, 1, 0, r"supports CUDA 12\.4.*CUDA 13\.0 runtime.*R580"),
    (13020, 12090, 1, 0, r"CUDA 13\.0 or newer"),
    (12040, 11080, 1, 0, r"R525"),
    (13000, 13000, 0, 100, "cudaGetDeviceCount failed: no CUDA-capable device"),
    (13000, 13010, 0, 0, "no CUDA device is visible"),
    (13020, 13000, 2, 0, "^$"),  # minor-version compatibility: a 13.0 driver runs the 13.2 runtime
    (12080, 13000, 1, 0, "^$"),
])
def test_probe_reasons(runtime, driver, count, error, want):
    _needs_cuda_build()
    got = _ext.module().explain_cuda_probe(runtime, driver, count, error)
    assert re.search(want, got["reason"]), got["reason"]


def _stub_probe(monkeypatch, **values):
    probe = dict(_ext.module().explain_cuda_probe(**values))
    monkeypatch.setattr(_ext, "cuda_probe", lambda: dict(probe))
    return probe


def test_old_driver_means_no_cuda_device_and_info_says_why(monkeypatch):
    """A stub probe for an R550 driver (CUDA 12.4) under the CUDA 13 runtime: no "cuda" in devices(), the
    dispatcher runs the reference on CUDA tensors in auto mode and refuses a forced backend, both with the reason,
    and `vdm-fast info` prints it; a new enough driver gives "cuda" back."""
    _needs_cuda_build()
    from vdm_fast import _dispatch, info
    from vdm_fast.ops.rel_pos_bias import SPEC

    _stub_probe(monkeypatch, runtime_version=13000, driver_version=12040, device_count=1)
    assert _ext.devices() == ("cpu",)
    with vdm_fast.backend("auto"):
        assert _dispatch.select(SPEC, torch.device("cuda"), torch.float32) == "reference"
        assert re.search(r"reference \(vdm_fast._C cannot run CUDA code here: .*R580", _dispatch.describe(SPEC, "cuda"))
    with vdm_fast.backend("triton"), pytest.raises(_dispatch.BackendUnavailable, match="R580"):
        _dispatch.select(SPEC, torch.device("cuda"), torch.float32)
    assert "driver supports CUDA 12.4" in info.report()
    _stub_probe(monkeypatch, runtime_version=13000, driver_version=13000, device_count=1)
    assert _ext.devices() == ("cpu", "cuda") and "cannot run" not in _ext.status()


def test_binding_refuses_cuda_code_that_cannot_run():
    """Called directly for CUDA on a machine where CUDA code cannot run, the binding raises with the probe's reason
    before any CUDA call or pointer use (the pointers here are made up)."""
    _needs_cuda_build()
    reason = _ext.cuda_probe()["reason"]
    if not reason:
        pytest.skip("CUDA code can run here: the refusal needs a machine without a usable driver")
    args = dict(table_stride_k=4, table_stride_h=1, dtype=0, num_buckets=32, heads=4, positions=16,
                pos_stride_b=3, pos_stride_t=1, batch=1, frames=3, lut=32, max_distance=32, out=64)
    with pytest.raises(RuntimeError, match=re.escape("rel_pos_bias forward: CUDA code cannot run here: " + reason)):
        _ext.module().rel_pos_bias_forward(device="cuda", table=8, **args)
    with pytest.raises(RuntimeError, match="rel_pos_bias backward: CUDA code cannot run here"):
        _ext.module().rel_pos_bias_backward(device="cuda", grad=8, grad_strides=[48, 12, 3, 1], dtype=0,
                                            num_buckets=32, heads=4, positions=16, pos_stride_b=3, pos_stride_t=1,
                                            batch=1, frames=3, lut=32, max_distance=32, grad_table=64)


# ------------------------------------------------------------------------ video-diffusion-pytorch interop

class _VdpRelativePositionBias(torch.nn.Module):
    """video-diffusion-pytorch 0.6's RelativePositionBias, its attributes and forward written out here as the spec
    (its package needs a torchvision matching torch, which this machine lacks)."""

    def __init__(self, heads=8, num_buckets=32, max_distance=128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = torch.nn.Embedding(num_buckets, heads)

    def forward(self, n):
        q_pos = torch.arange(n, dtype=torch.long)
        rel_pos = q_pos[None, :] - q_pos[:, None]
        rp_bucket = hf_t5_bucket(rel_pos, True, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(rp_bucket).permute(2, 0, 1)


@pytest.mark.parametrize("kwargs", [{}, dict(heads=4, num_buckets=16, max_distance=40)])
def test_from_video_diffusion_pytorch_matches_it(kwargs):
    theirs = _VdpRelativePositionBias(**kwargs)
    for source in (theirs, theirs.state_dict()):
        extra = {} if isinstance(source, torch.nn.Module) else dict(max_distance=theirs.max_distance)
        ours = RelativePositionBias.from_video_diffusion_pytorch(source, **extra)
        assert ours.max_distance == theirs.max_distance and ours.num_buckets == theirs.num_buckets
        for n in (1, 11, 40, 300):  # past T = 11 a max_distance of 32 would give other buckets
            assert torch.equal(ours(n), theirs(n))
    # The trap it avoids: a default-built layer loads their default state_dict strictly and differs from T = 11.
    vdp = _VdpRelativePositionBias()
    default = RelativePositionBias()
    default.load_state_dict(vdp.state_dict())
    assert torch.equal(default(10), vdp(10)) and not torch.equal(default(300), vdp(300))
    fresh = RelativePositionBias.from_video_diffusion_pytorch()
    assert (fresh.heads, fresh.num_buckets, fresh.max_distance) == (8, 32, 128)


def test_from_video_diffusion_pytorch_refuses_contradictions():
    theirs = _VdpRelativePositionBias(heads=4)
    with pytest.raises(ValueError, match="max_distance=32 contradicts"):
        RelativePositionBias.from_video_diffusion_pytorch(theirs, max_distance=32)
    with pytest.raises(ValueError, match="heads=8 contradicts"):
        RelativePositionBias.from_video_diffusion_pytorch(theirs.state_dict(), heads=8)
    with pytest.raises(TypeError, match="source"):
        RelativePositionBias.from_video_diffusion_pytorch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="relative_attention_bias.weight"):
        RelativePositionBias.from_video_diffusion_pytorch({})
    with pytest.raises(ValueError, match="max_distance"):
        RelativePositionBias(4, 32, 0)


PENDING_ERROR_SCRIPT = """
import torch, vdm_fast
from vdm_fast import ops
table, pos = torch.randn(32, 4, device="cuda"), torch.arange(6, device="cuda")
ops.rel_pos_bias(table, pos)  # probe and first launch: fine
x = torch.zeros(4, device="cuda")
x[torch.tensor([1 << 40], device="cuda")] = 1.0  # a device-side assert in PyTorch's own kernel: a sticky error
try:
    ops.rel_pos_bias(table, pos)
    torch.cuda.synchronize()
except RuntimeError as e:
    print("ERROR:", e)
"""


@pytest.mark.gpu
def test_error_left_by_an_earlier_kernel_is_not_reported_as_the_launch_s():
    proc = run_python("-c", PENDING_ERROR_SCRIPT, timeout=300)
    out = proc.stdout + proc.stderr
    assert "ERROR:" in out, out[-3000:]
    err = out[out.index("ERROR:"):]
    # Either torch notices first (its own error), or the extension reports the pending error as an earlier call's.
    assert "already pending before the launch" in err or "device-side assert" in err, err[:2000]
    assert "launch failed" not in err, err[:2000]
