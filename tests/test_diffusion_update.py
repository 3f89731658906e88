"""diffusion_update (the samplers' fused update) under the op contract: the Triton kernel (interpreter on CPU)
against the plain-PyTorch reference in fp64 on fresh random inputs (odd sizes, strided views, every model-output
dtype, every prediction type, guidance, clip, noise, the multistep history), bitwise run to run, opcheck,
torch.compile(fullgraph=True), bad input, the reference against the parameterization it restates, `vdm-fast info`.

The op has no gradient (it mutates the sampler's buffers; see vdm_fast/ops/diffusion_update.py): the gradient
check is that a grad-requiring input is refused with an error naming it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, rel_err, strided

import vdm_fast
from vdm_fast.diffusion import CosineSchedule, alpha_sigma, eps_from_prediction, x_from_prediction
from vdm_fast.diffusion import samplers as S
from vdm_fast.ops.diffusion_update import _diffusion_update_op
from vdm_fast.reference.diffusion_update import convert

PREDS = ("eps", "v", "x")
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _row(kind: str, i: int, steps: int = 16) -> torch.Tensor:
    sch = CosineSchedule()
    if kind == "corrector":
        return S.corrector_table(sch, steps, 0.1)[i]
    return S.predictor_table(sch, steps, kind, 0.3, "karras" if kind.startswith("dpmpp") else "uniform")[i]


def _inputs(shape, *, pred_dtype=torch.float32, cfg=False, noise=False, hist=0, device=DEVICE):
    z = torch.randn(shape, device=device)
    return dict(z=z, pred=torch.randn(shape, device=device).to(pred_dtype),
                pred_uncond=torch.randn(shape, device=device).to(pred_dtype) if cfg else None,
                noise=torch.randn(shape, device=device) if noise else None,
                history=torch.randn((hist, *shape), device=device) if hist else None,
                e_out=torch.full(shape, float("nan"), device=device))


def _run(inputs: dict, coef: torch.Tensor, mode: str, dtype=None, **kw):
    """Run the op on copies of the inputs (cast to dtype where given); returns (z, e_out, history) after it."""
    x = {k: None if v is None else (v.clone() if dtype is None else v.to(dtype, copy=True)) for k, v in inputs.items()}
    c = coef.to(x["z"].device, x["z"].dtype)
    with vdm_fast.backend(mode):
        vdm_fast.ops.diffusion_update(x["z"], x["pred"], c, x["e_out"], pred_uncond=x["pred_uncond"],
                                      noise=x["noise"], history=x["history"], **kw)
    return x["z"], x["e_out"], x["history"]


CASES = [  # (row kind, row index, cfg, clip, noise, history length)
    ("ancestral", 0, False, False, True, 0), ("ancestral", 9, True, True, True, 0), ("ddim", 5, False, True, False, 0),
    ("corrector", 3, True, False, True, 0), ("dpmpp_2m", 0, False, True, False, 1),
    ("dpmpp_2m", 7, True, True, False, 1), ("dpmpp_2m_sde", 6, True, False, True, 1),
    ("dpmpp_3m", 1, False, True, False, 2), ("dpmpp_3m", 8, True, True, False, 2),
]


@pytest.mark.parametrize("prediction", PREDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{c[1]}-cfg{c[2]:d}-clip{c[3]:d}-n{c[4]:d}-h{c[5]}" for c in CASES])
def test_kernel_matches_fp64_reference(prediction, case):
    """Every output (z, e, the shifted history) against the reference in fp64 on the same rounded inputs, bounded
    by the error of the reference run in fp32 (the same-precision baseline), and exactly the history shift."""
    kind, i, cfg, clip, noisy, hist = case
    corrector = kind == "corrector"
    coef = _row(kind, i).float()
    for shape in ((1037,), (3, 5, 7)):  # not a multiple of the block: the tail mask matters
        inputs = _inputs(shape, cfg=cfg, noise=noisy, hist=hist)
        kw = dict(guidance_weight=0.7, prediction=prediction, corrector=corrector, clip=clip)
        fast = _run(inputs, coef, "triton", **kw)
        ref64 = _run(inputs, coef.double(), "reference", torch.float64, **kw)
        ref32 = _run(inputs, coef, "reference", **kw)
        for name, f, r, b in zip(("z", "e_out", "history"), fast, ref64, ref32):
            if f is None:
                continue
            base = rel_err(b, r)
            assert rel_err(f, r) <= 4 * base + 1e-7, (name, rel_err(f, r), base)
            assert (f.double() - r).abs().max() <= 4 * (b.double() - r).abs().max() + 1e-6 * r.abs().max(), name
        if hist:
            assert torch.equal(fast[2][0], fast[1])  # the newest history entry is this step's e
            if hist == 2:
                assert torch.equal(fast[2][1], inputs["history"][0])
        if clip and not corrector:
            assert fast[1].abs().max() <= 1.0


@pytest.mark.parametrize("pred_dtype", OUTPUT_DTYPES)
def test_model_output_dtypes_and_strided_views(pred_dtype):
    """Low-precision model outputs are upcast exactly; strided views of every input and output give the same
    result as contiguous copies (the op updates strided outputs through contiguous copies)."""
    coef = _row("dpmpp_3m", 6).float()
    shape = (2, 3, 5, 9)
    inputs = _inputs(shape, pred_dtype=pred_dtype, cfg=True, noise=True, hist=2)
    kw = dict(guidance_weight=1.5, prediction="v", clip=True)
    ref = _run(inputs, coef.double(), "reference", torch.float64, **kw)
    dense = _run(inputs, coef, "triton", **kw)
    v = {k: (strided(t, 1 if k == "history" else -1) if t is not None else None) for k, t in inputs.items()}
    with vdm_fast.backend("triton"):  # in place on the views themselves
        vdm_fast.ops.diffusion_update(v["z"], v["pred"], strided(coef), v["e_out"], pred_uncond=v["pred_uncond"],
                                      noise=v["noise"], history=v["history"], **kw)
    fast = (v["z"], v["e_out"], v["history"])
    assert all(not t.is_contiguous() for t in fast)
    for f, d, r in zip(fast, dense, ref):
        assert torch.equal(f, d)
        assert rel_err(f, r) < 1e-6


def test_bitwise_run_to_run_and_fp64_runs_the_reference():
    coef = _row("dpmpp_2m_sde", 4).float()
    inputs = _inputs((4, 3, 33), pred_dtype=torch.bfloat16, cfg=True, noise=True, hist=1)
    kw = dict(guidance_weight=2.0, prediction="eps", clip=True)
    runs = [_run(inputs, coef, "triton", **kw) for _ in range(3)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))
    auto = _run(inputs, coef.double(), "auto", torch.float64, **kw)
    ref = _run(inputs, coef.double(), "reference", torch.float64, **kw)
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))


def test_empty_input():
    coef = _row("ancestral", 2).float()
    inputs = _inputs((0, 3), noise=True, hist=0)
    for mode in ("reference", "triton"):
        z, e, _ = _run(inputs, coef, mode)
        assert z.shape == (0, 3) and e.shape == (0, 3)


@pytest.mark.parametrize("prediction", PREDS)
def test_reference_restates_the_parameterization(prediction):
    """The reference writes the x_hat / eps_hat conversions the way the kernel computes them: they must agree with
    vdm_fast.diffusion.parameterization, which defines them."""
    lam = torch.tensor(1.3, dtype=torch.float64)
    alpha, sigma = alpha_sigma(lam)
    z, p = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert torch.allclose(convert(z, p, alpha, sigma, prediction, False),
                          x_from_prediction(z, p, alpha, sigma, prediction), rtol=1e-14, atol=1e-14)
    assert torch.allclose(convert(z, p, alpha, sigma, prediction, True),
                          eps_from_prediction(z, p, alpha, sigma, prediction), rtol=1e-14, atol=1e-14)


def test_opcheck_and_compile_fullgraph():
    coef = _row("dpmpp_3m", 5).float()
    for cfg, noisy, hist in ((True, True, 2), (False, False, 0), (False, True, 1)):
        x = _inputs((3, 7), cfg=cfg, noise=noisy, hist=hist)
        args = (x["z"], x["pred"], x["pred_uncond"], coef, x["noise"], x["history"], x["e_out"].zero_(), 0.5, "v",
                False, True, "triton")
        torch.library.opcheck(_diffusion_update_op, args)

    def step(z, pred, coef, e, hist):
        vdm_fast.ops.diffusion_update(z, pred, coef, e, history=hist, prediction="eps", clip=True)
        return z * 1.0, e * 1.0, hist * 1.0

    x = _inputs((5, 11), hist=2)
    for mode in ("triton", "reference"):
        with vdm_fast.backend(mode):
            eager = step(x["z"].clone(), x["pred"], coef, x["e_out"].clone(), x["history"].clone())
            torch._dynamo.reset()
            compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
                x["z"].clone(), x["pred"], coef, x["e_out"].clone(), x["history"].clone())
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), mode


def test_bad_input():
    shape = (2, 3)
    z, p, e = torch.randn(shape), torch.randn(shape), torch.zeros(shape)
    coef = _row("dpmpp_2m", 3).float()
    op = vdm_fast.ops.diffusion_update
    cases = [
        (TypeError, "z", lambda: op(z.long(), p, coef, e)),
        (TypeError, "pred", lambda: op(z, p.int(), coef, e)),
        (ValueError, "pred", lambda: op(z, torch.randn(3, 2), coef, e)),
        (ValueError, "coef", lambda: op(z, p, coef[:6], e)),
        (ValueError, "coef", lambda: op(z, p, coef.view(2, 4), e)),
        (TypeError, "e_out", lambda: op(z, p, coef, e.double())),
        (ValueError, "e_out", lambda: op(z, p, coef, torch.zeros(3))),
        (ValueError, "noise", lambda: op(z, p, coef, e, noise=torch.randn(2, 4))),
        (TypeError, "noise", lambda: op(z, p, coef, e, noise=torch.randn(shape, dtype=torch.float64))),
        (ValueError, "history", lambda: op(z, p, coef, e, history=torch.zeros(3, *shape))),
        (ValueError, "history", lambda: op(z, p, coef, e, history=torch.zeros(shape))),
        (ValueError, "history", lambda: op(z, p, coef, e, history=torch.zeros(1, *shape), corrector=True)),
        (ValueError, "guidance_weight", lambda: op(z, p, coef, e, guidance_weight=float("inf"))),
        (ValueError, "guidance_weight", lambda: op(z, p, coef, e, guidance_weight=float("nan"))),
        (ValueError, "prediction", lambda: op(z, p, coef, e, prediction="score")),
        (TypeError, "clip", lambda: op(z, p, coef, e, clip=1)),
        (TypeError, "corrector", lambda: op(z, p, coef, e, corrector="no")),
        (ValueError, "e_out", lambda: op(z, p, coef, z[:])),
        (ValueError, "z", lambda: op(z, z, coef, e)),
        (ValueError, "pred", lambda: op(z, p, coef, e, history=p[None])),
        (ValueError, "coef", lambda: op(z, p, torch.zeros(8, device="meta"), e)),
        (ValueError, "pred", lambda: op(z, p.requires_grad_(True), coef, e)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
    p.requires_grad_(False)
    with vdm_fast.backend("triton"), pytest.raises(TypeError, match="float32"):
        op(z.double(), p.double(), coef.double(), e.double())


@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_whole_sampler_triton_equals_reference(sampler):
    """A whole sampling run (guidance, given frames, the history) through the kernel equals the reference run to fp32
    rounding, and reruns are bitwise equal."""
    from test_diffusion import GaussianOracle

    from vdm_fast.diffusion import GaussianDiffusion

    d = GaussianDiffusion(GaussianOracle("v", mean=0.2, std=0.4), prediction="v")
    cond = torch.randn(3)
    kw = dict(steps=6, sampler=sampler, cond=cond, guidance_weight=1.0, progress=False, x_a=torch.rand(3, 1, 1, 3, 5),
              a_mask=torch.tensor([True, False]), conditioning="replacement")
    outs = []
    for mode in ("reference", "triton", "triton"):
        with vdm_fast.backend(mode):
            outs.append(d.sample((3, 1, 2, 3, 5), generator=torch.Generator().manual_seed(2), **kw))
    assert rel_err(outs[1], outs[0]) < 1e-5 and (outs[1] - outs[0]).abs().max() < 1e-5
    assert torch.equal(outs[1], outs[2])


def test_listed_by_info():
    from vdm_fast import info

    assert "diffusion_update" in info.op_specs()
    line = [ln for ln in info.report().splitlines() if ln.startswith("diffusion_update")]
    assert len(line) == 1 and "reference" in line[0]


# ---- the shared op contract (tests/op_contract.py), on a functional view of the in-place op -----------------------
from op_contract import OpContract  # noqa: E402  (tests/ is on the path; after the op's own tests)


def _functional(impl):
    """The op as a function: copies of the buffers it updates are updated in place and returned (z, e, history)."""

    def run(z, pred, coef, e_out, pred_uncond, noise, history, guidance_weight, prediction, clip):
        z, e_out, history = z.clone(), e_out.clone(), history.clone()
        impl(z, pred, coef, e_out, pred_uncond=pred_uncond, noise=noise, history=history,
             guidance_weight=guidance_weight, prediction=prediction, clip=clip)
        return z, e_out, history

    return run


class TestDiffusionUpdateContract(OpContract):
    differentiable = ()  # no autograd by design (see the module docstring); refused inputs are tested above
    dtypes = (torch.float32,)  # z's dtype on the fast path (model outputs of every dtype: the tests above)
    cases = [("3m-cfg-noise", dict(shape=(3, 5, 7), kind="dpmpp_3m", hist=2, cfg=True, noise=True, pred="v")),
             ("2m-odd", dict(shape=(1037,), kind="dpmpp_2m", hist=1, cfg=False, noise=False, pred="eps")),
             ("sde-x", dict(shape=(2, 3, 2, 5, 5), kind="dpmpp_2m_sde", hist=1, cfg=True, noise=True, pred="x"))]
    bad_inputs = [(dict(prediction="score"), ValueError, "prediction"), (dict(guidance_weight=float("inf")),
                                                                         ValueError, "guidance_weight"),
                  (dict(coef=lambda x: x["coef"][:5]), ValueError, "coef"),
                  (dict(history=lambda x: x["history"][:, :1]), ValueError, "history"),
                  (dict(noise=lambda x: x["noise"].double()), TypeError, "noise")]

    def make_inputs(self, params, dtype, device):
        p = params
        x = _inputs(p["shape"], cfg=p["cfg"], noise=p["noise"], hist=p["hist"], device=device)
        x = {k: (v.to(dtype) if v is not None else None) for k, v in x.items()}
        x["e_out"] = torch.zeros_like(x["z"])
        return dict(x, coef=_row(p["kind"], 6).to(device, dtype), guidance_weight=0.7, prediction=p["pred"],
                    clip=True)

    def reference(self, **inputs):
        from vdm_fast.reference.diffusion_update import diffusion_update as ref

        return _functional(ref)(**inputs)

    def fast(self, **inputs):
        return _functional(vdm_fast.ops.diffusion_update)(**inputs)

    def opcheck_calls(self, inputs):
        x = inputs
        return [(_diffusion_update_op, (x["z"].clone(), x["pred"], x["pred_uncond"], x["coef"], x["noise"],
                                        x["history"].clone(), x["e_out"].clone(), 0.7, x["prediction"], False,
                                        True, "triton"))]

    def test_backward_is_bitwise_deterministic(self):
        """No backward here: the forward is bitwise deterministic run to run instead."""
        inputs = self.make_inputs(self.cases[0][1], torch.float32, DEVICE)
        with self._fast_ctx():
            runs = [self.fast(**inputs) for _ in range(3)]
        assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(r, runs[0]))
