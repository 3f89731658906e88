"""The op contract as tests, written once: each op's test file subclasses `OpContract` (as torchvision's RoIOpTester).

What every op must satisfy, and how it is checked here:

- Reference agreement, forward and every gradient, on fresh random inputs (the subclass's cases: odd sizes,
  strided views, every dtype): the fast path's error against the reference run in fp64 must satisfy

      err(fast, ref64) <= k * err(ref_lowprec, ref64) + tiny

  (flash-attention's pattern): `ref_lowprec` is the same reference run in the input's precision, the error a user of
  plain PyTorch already accepts. It is checked both norm-wise (||a - b|| / ||b||) and element-wise (max |a - b|, with
  tiny scaled by max |ref64|), so neither a spread-out error nor one wrong element passes. `tiny` is the dtype's unit
  roundoff (eps / 2) times `tiny_factor`: it only covers a baseline that is exactly 0 (a gather, one-term sums).
  The fp64 reference takes the same rounded inputs and the same rounded output gradient as the fast path.
- The same agreement with every tensor input replaced by a strided (non-contiguous) view of itself.
- fp64 inputs in auto mode run the reference itself (bitwise equal to calling it).
- `torch.library.opcheck` on the custom op (fake, schema, autograd registration, aot dispatch).
- `torch.compile(fullgraph=True)` with aot_eager and with Inductor: no graph break, outputs and gradients equal to
  eager within the dtype's tolerance.
- Bad input: each row of the subclass's table raises its ValueError/TypeError with a message naming the argument.
- Backward is bitwise deterministic run to run (same inputs, same output gradient, three runs).
- Device mix refused: each tensor input moved alone to another device ("meta" on a CPU-only machine, where no
  kernel can run; the CPU when the tests run on a GPU) raises ValueError naming it, before anything runs.

A subclass supplies (see tests/test_rel_pos_bias.py, the smallest example):

    class TestMyOpContract(OpContract):
        differentiable = ("x", "weight")          # the inputs that get gradients, by name
        cases = [("odd", dict(B=3, C=5)), ...]    # (id, params) for make_inputs
        def make_inputs(self, params, dtype, device) -> dict   # fresh random inputs, by argument name
        def reference(self, **inputs)             # vdm_fast.reference.<op>
        def fast(self, **inputs)                  # vdm_fast.ops.<op> (the base forces the fast backend)
        def opcheck_calls(self, inputs)           # [(torch.ops.vdm_fast.<op>.default, args), ...]
        bad_inputs = [(dict(x=...), ValueError, "x"), ...]     # overrides of bad_base(); a callable value gets
                                                                # the valid inputs and returns the bad one

Optional hooks: `dtypes`, `k`, `k_max`, `tiny_factor`, `baseline` (a different low-precision baseline),
`bad_base`, `compile_case`, `opcheck_cases`, `backend` ("triton": the fast path, whatever it is for the op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from helpers import DEVICE, DTYPES, GPU, strided

import vdm_fast
from vdm_fast.testing import max_abs_err, rel_err

Inputs = dict[str, Any]


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _map_tensors(inputs: Inputs, fn: Callable[[str, torch.Tensor], Any]) -> Inputs:
    return {k: fn(k, v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


class OpContract:
    """The contract tests; not collected itself (no `Test` prefix), only through subclasses."""

    # --- what a subclass supplies -----------------------------------------------------------------------------------
    differentiable: Sequence[str] = ()
    cases: Sequence[tuple[str, dict]] = ()
    bad_inputs: Sequence[tuple[dict, type[Exception], str]] = ()
    dtypes: Sequence[torch.dtype] = DTYPES
    backend: str = "triton"
    k: float = 3.0  # norm-wise: err(fast) <= k * err(baseline) + tiny
    k_max: float = 5.0  # element-wise: max|fast - ref| <= k_max * max|baseline - ref| + tiny * max|ref|
    tiny_factor: float = 1.0

    def make_inputs(self, params: dict, dtype: torch.dtype, device: str) -> Inputs:
        raise NotImplementedError

    def reference(self, **inputs):
        raise NotImplementedError

    def fast(self, **inputs):
        raise NotImplementedError

    def opcheck_calls(self, inputs: Inputs) -> list[tuple[Any, tuple]]:
        raise NotImplementedError

    def bad_base(self) -> Inputs:
        """Valid inputs the bad-input rows override (default: the first case in fp32 on the CPU)."""
        return self.make_inputs(self.cases[0][1], torch.float32, "cpu")

    def opcheck_cases(self) -> list[dict]:
        """The cases opcheck runs on (it traces each several ways: a few cases, not all)."""
        return [self.cases[0][1], self.cases[-1][1]]

    def compile_case(self) -> dict:
        return self.cases[0][1]

    def baseline(self, **inputs):
        """The error a user of plain PyTorch accepts: the reference run in the inputs' own precision."""
        return self.reference(**inputs)

    # --- parametrization --------------------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", [p for _, p in self.cases], ids=[i for i, _ in self.cases])
        if "dtype" in metafunc.fixturenames:
            metafunc.parametrize("dtype", self.dtypes, ids=[str(d).replace("torch.", "") for d in self.dtypes])
        if "bad" in metafunc.fixturenames:
            metafunc.parametrize("bad", self.bad_inputs, ids=[f"{i}-{row[2]}" for i, row in enumerate(self.bad_inputs)])
        if "compile_backend" in metafunc.fixturenames:
            metafunc.parametrize("compile_backend", ["aot_eager", "inductor"])

    # --- running ----------------------------------------------------------------------------------------------------
    def _fast_ctx(self):
        return vdm_fast.backend(self.backend)

    def _forward_backward(self, fn: Callable, inputs: Inputs, grads: Sequence[torch.Tensor] | None, *,
                          cast: torch.dtype | None = None, ctx=None):
        """Outputs and the gradients of the differentiable inputs (by name) of fn(**inputs), on fresh leaves.

        cast: convert floating inputs (and the output gradients) to this dtype first (the fp64 reference).
        grads: output gradients (made here, fresh random, when None). Returns (outputs, grads_out, input_grads).
        """
        def leaf(name, t):
            if cast is not None and t.is_floating_point():
                t = t.detach().to(cast)
            if name in self.differentiable:
                # detach() keeps the strides (clone() would make a strided view contiguous)
                return t.detach().requires_grad_() if cast is None else t.requires_grad_()
            return t

        leaves = _map_tensors(inputs, leaf)
        with ctx if ctx is not None else contextlib.nullcontext():
            outs = _as_tuple(fn(**leaves))
        if grads is None:
            grads = [torch.randn_like(o) for o in outs if o.is_floating_point()]
        diff = [n for n in self.differentiable if leaves.get(n) is not None]
        if diff:
            floats = [o for o in outs if o.is_floating_point()]
            g_in = [g.to(o.dtype) for g, o in zip(grads, floats)]
            got = torch.autograd.grad(floats, [leaves[n] for n in diff], g_in, allow_unused=True)
        else:
            got = ()
        return tuple(o.detach() for o in outs), grads, dict(zip(diff, got))

    def _check_against_reference(self, inputs: Inputs, dtype: torch.dtype) -> None:
        outs, grads, dgrads = self._forward_backward(self.fast, inputs, None, ctx=self._fast_ctx())
        ref_outs, _, ref_grads = self._forward_backward(self.reference, inputs, grads, cast=torch.float64)
        base_outs, _, base_grads = self._forward_backward(self.baseline, inputs, grads)
        assert len(outs) == len(ref_outs)
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)}, reference {tuple(r.shape)}"
            if r.is_floating_point():
                assert o.dtype == dtype, f"output {i}: dtype {o.dtype}, inputs {dtype}"
            self._assert_within_baseline(o, r, base_outs[i], f"output {i}", dtype)
        for name in dgrads:
            g, r, b = dgrads[name], ref_grads[name], base_grads.get(name)
            assert g is not None, f"grad of {name} is None: it does not reach the input"
            assert g.shape == inputs[name].shape, f"grad of {name}: shape {tuple(g.shape)}"
            assert g.dtype == inputs[name].dtype, f"grad of {name}: dtype {g.dtype}, input {inputs[name].dtype}"
            self._assert_within_baseline(g, r, b if b is not None else torch.zeros_like(r), f"grad of {name}",
                                         dtype)

    def _assert_within_baseline(self, out, ref64, base, what: str, dtype: torch.dtype) -> None:
        if not ref64.is_floating_point():
            assert torch.equal(out.to(ref64.dtype), ref64), f"{what}: integer output differs from the reference"
            return
        tiny = self.tiny_factor * _unit_roundoff(dtype)
        err, err_base = rel_err(out, ref64), rel_err(base, ref64)
        assert err <= self.k * err_base + tiny, (
            f"{what} ({dtype}): relative error {err:.3e} > {self.k} x baseline {err_base:.3e} + {tiny:.1e}")
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        m, m_base = max_abs_err(out, ref64), max_abs_err(base, ref64)
        assert m <= self.k_max * m_base + tiny * scale, (
            f"{what} ({dtype}): max abs error {m:.3e} > {self.k_max} x baseline {m_base:.3e} "
            f"+ {tiny:.1e} x {scale:.3e}")

    # --- the contract -----------------------------------------------------------------------------------------------
    def test_matches_reference(self, case, dtype):
        self._check_against_reference(self.make_inputs(case, dtype, DEVICE), dtype)

    def test_strided_inputs_match_reference(self, case):
        inputs = self.make_inputs(case, torch.float32, DEVICE)
        views = _map_tensors(inputs, lambda _, t: strided(t) if t.dim() and t.numel() > 1 else t)
        assert any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in views.values())
        self._check_against_reference(views, torch.float32)

    def test_fp64_runs_the_reference(self):
        inputs = self.make_inputs(self.cases[0][1], torch.float64, DEVICE)
        with vdm_fast.backend("auto"):
            got = _as_tuple(self.fast(**inputs))
        want = _as_tuple(self.reference(**inputs))
        assert all(torch.equal(g, w) for g, w in zip(got, want))

    def test_opcheck(self):
        for params in self.opcheck_cases():
            inputs = self.make_inputs(params, torch.float32, DEVICE)
            inputs = _map_tensors(inputs, lambda n, t: t.detach().requires_grad_() if n in self.differentiable else t)
            calls = self.opcheck_calls(inputs)
            assert calls, "opcheck_calls returned nothing to check"
            for op, args in calls:
                torch.library.opcheck(op, args)

    def test_torch_compile_fullgraph(self, compile_backend):
        import torch._dynamo

        inputs = self.make_inputs(self.compile_case(), torch.float32, DEVICE)
        torch._dynamo.reset()  # a fresh trace: the backend choice is read when the op is traced
        compiled = torch.compile(self.fast, fullgraph=True, backend=compile_backend)
        outs, grads, dgrads = self._forward_backward(self.fast, inputs, None, ctx=self._fast_ctx())
        c_outs, _, c_grads = self._forward_backward(compiled, inputs, grads, ctx=self._fast_ctx())
        tol = 1e-5
        for o, c in zip(outs, c_outs):
            assert rel_err(c, o) <= tol, f"compiled output differs from eager: {rel_err(c, o):.3e}"
        assert set(c_grads) == set(dgrads)
        for name in dgrads:
            assert c_grads[name] is not None, f"compiled: grad of {name} is None"
            assert rel_err(c_grads[name], dgrads[name]) <= tol, f"compiled grad of {name} differs from eager"

    def test_bad_input_raises(self, bad):
        overrides, err, match = bad
        inputs = self.bad_base()
        for k, v in overrides.items():
            inputs[k] = v(inputs) if callable(v) else v
        with pytest.raises(err, match=match), self._fast_ctx():
            self.fast(**inputs)

    def test_backward_is_bitwise_deterministic(self):
        inputs = self.make_inputs(self.cases[-1][1], torch.float32, DEVICE)
        outs, grads, first = self._forward_backward(self.fast, inputs, None, ctx=self._fast_ctx())
        assert first, "no differentiable input to check"
        for _ in range(2):
            again_outs, _, again = self._forward_backward(self.fast, inputs, grads, ctx=self._fast_ctx())
            assert all(torch.equal(a, b) for a, b in zip(outs, again_outs)), "forward differs run to run"
            for name in first:
                assert torch.equal(first[name], again[name]), f"grad of {name} differs run to run"

    def test_device_mix_raises(self):
        other = "cpu" if DEVICE != "cpu" else ("cuda" if GPU else "meta")
        inputs = self.make_inputs(self.cases[0][1], torch.float32, DEVICE)
        names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]
        if len(names) < 2:
            pytest.skip("one tensor input: nothing to mix")  # a property of the op, not of this machine
        for name in names:
            mixed = dict(inputs, **{name: inputs[name].to(other)})
            with pytest.raises(ValueError, match=name), self._fast_ctx():
                self.fast(**mixed)
