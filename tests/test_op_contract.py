"""The contract base itself can fail: each check, run on a deliberately broken rel_pos_bias, raises."""

from __future__ import annotations

import pytest
import test_rel_pos_bias  # the module, not the class: importing the class would collect its tests here again
import torch

from vdm_fast import ops


class _Broken(test_rel_pos_bias.TestRelPosBiasContract):
    """rel_pos_bias with one defect injected into fast() (the class is not collected: no `Test` prefix)."""

    defect = ""

    def fast(self, table, positions, max_distance, bidirectional):
        if self.defect == "grad_scale":  # gradient off by 1e-5 relative: far above fp32 summation error
            table = _ScaleGrad.apply(table, 1 + 1e-5)
        if self.defect == "one_grad_element":  # one wrong gradient entry: the norm barely moves, the max does
            table = _BumpGrad.apply(table)
        out = ops.rel_pos_bias(table, positions, max_distance=max_distance, bidirectional=bidirectional)
        if self.defect == "lowprec_internal":  # computes in bf16 whatever the input dtype
            out = out.to(torch.bfloat16).to(out.dtype)
        if self.defect == "nondeterministic":
            out = _NoisyGrad.apply(out)
        return out


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


class _BumpGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] += 1e-2 * g.abs().max().clamp_min(1)
        return g


class _NoisyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-6 * torch.rand(()))


CASE = dict(batch=3, frames=7, heads=5, num_buckets=32, max_distance=32, bidirectional=True)


@pytest.mark.parametrize("defect", ["grad_scale", "one_grad_element", "lowprec_internal"])
def test_reference_agreement_catches(defect):
    t = _Broken()
    t.defect = defect
    with pytest.raises(AssertionError):
        t.test_matches_reference(CASE, torch.float32)


def test_determinism_check_catches():
    t = _Broken()
    t.defect = "nondeterministic"
    with pytest.raises(AssertionError, match="differs run to run"):
        t.test_backward_is_bitwise_deterministic()


def test_bad_input_check_catches_a_wrong_name():
    t = test_rel_pos_bias.TestRelPosBiasContract()
    with pytest.raises(AssertionError):
        t.test_bad_input_raises((dict(max_distance=0), ValueError, "table"))
    with pytest.raises(pytest.fail.Exception):  # a valid input that does not raise fails the row
        t.test_bad_input_raises((dict(max_distance=64), ValueError, "max_distance"))
