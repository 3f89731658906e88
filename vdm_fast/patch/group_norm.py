"""GroupNorm -> SiLU fusion: the fused forward, the (GroupNorm, SiLU) pair rebinding, and the adapter for
nn.Sequential, whose forward is torch's own: child i's output goes straight into child i + 1, so a GroupNorm directly
followed by a SiLU in an nn.Sequential is proven to feed it and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast import ops
from vdm_fast.patch import _common
from vdm_fast.patch.report import PatchReport

KIND = "group_norm_silu"
FUSED_DIMS = (3, 4, 5)  # the ranks group_norm_silu takes: (B, C, L), (B, C, H, W), (B, C, T, H, W)


def fused_group_norm_silu(
    norm: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(norm(x) * (1 + scale) + shift) through vdm_fast.ops.group_norm_silu, with norm's own parameters."""
    return ops.group_norm_silu(_common.autocast_input(x), norm.num_groups, norm.weight, norm.bias, norm.eps,
                               scale=scale, shift=shift)


def _pair_norm_forward(norm: nn.GroupNorm, act: nn.SiLU, x: torch.Tensor) -> torch.Tensor:
    """The patched GroupNorm of a pair in code that calls norm then act: GroupNorm + SiLU fused, or, when the input
    rank is not one the op takes or either module is wrapped now, the plain GroupNorm (act then applies the SiLU)."""
    if x.dim() not in FUSED_DIMS or not _common.bypassable(norm, act):
        return _common.original_forward(norm)(x)
    return fused_group_norm_silu(norm, x)


def _pair_act_forward(act: nn.SiLU, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The patched SiLU of a pair: the identity when its GroupNorm applied it (the same call-time test), else SiLU."""
    if x.dim() in FUSED_DIMS and _common.bypassable(norm, act):
        return x
    return _common.original_forward(act)(x)


def _sequential_forward(seq: nn.Sequential, fused: tuple[str, ...], input: torch.Tensor) -> torch.Tensor:
    """nn.Sequential.forward with each (GroupNorm, SiLU) pair named in `fused` run as one op. The pair is re-checked
    at every call (still exactly GroupNorm then SiLU, neither wrapped), so a slice, a replaced child or a hook added
    after patching computes what the unpatched Sequential would."""
    children = list(seq._modules.items())
    i = 0
    while i < len(children):
        name, module = children[i]
        act = children[i + 1][1] if i + 1 < len(children) else None
        if (name in fused and type(module) is nn.GroupNorm and type(act) is nn.SiLU and input.dim() in FUSED_DIMS
                and _common.bypassable(module, act)):
            input = fused_group_norm_silu(module, input)
            i += 2
            continue
        input = module(input)
        i += 1
    return input


def why_not_pair(norm: nn.Module, act: nn.Module, seen) -> str | None:
    """None if (norm, act) may be fused in place, else the reason."""
    if type(norm) is not nn.GroupNorm:
        return f"{type(norm).__name__} is not exactly nn.GroupNorm"
    if type(act) is not nn.SiLU:
        return f"followed by {type(act).__name__}, not nn.SiLU"
    for m in (norm, act):
        reason = _common.why_not_rebindable(m, seen, bypassed=True)
        if reason:
            return reason
    return None


def fuse_pair(norm: nn.GroupNorm, act: nn.SiLU) -> None:
    """For code that calls norm(x) and passes the result straight to act: norm's forward becomes the fused
    GroupNorm + SiLU and act's the identity, both deciding at call time by the same test; unpatch undoes both.
    (norm called on its own returns the post-SiLU output: only for pairs an adapter proved are always called so.)"""
    _common.rebind(norm, _pair_norm_forward, KIND, act)
    _common.rebind(act, _pair_act_forward, KIND + ":act", norm)


SEQUENTIAL_KIND = KIND + ":sequential"


def _fused_in(seq: nn.Sequential) -> tuple[str, ...]:
    """The names of the GroupNorms a patched nn.Sequential fuses (empty if it is not patched)."""
    fn = seq.__dict__.get("forward") if _common.is_patched(seq) else None
    return fn.args[1] if getattr(fn, "func", None) is _sequential_forward else ()


def patch_sequentials(model: nn.Module, report: PatchReport, seen, claimed: set[int]) -> None:
    """Every exact nn.Sequential: child GroupNorm immediately followed by child SiLU -> fused pair, by rebinding the
    Sequential's forward (its children stay as they are, so slices and hooks on them see unfused modules)."""
    for path, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.named_children())
        already = _fused_in(seq)
        fused = []
        for (name, norm), (_, act) in zip(children, children[1:]):
            if type(norm) is not nn.GroupNorm or id(norm) in claimed:
                continue
            claimed.add(id(norm))
            where = f"{path}.{name}" if path else name
            if name in already:
                report.already_patched += 1
                continue
            reason = why_not_pair(norm, act, seen) or (
                None if not _common.is_patched(seq) else "in an nn.Sequential patched before it was changed")
            reason = reason or _common.why_not_rebindable(seq)
            if reason:
                report.skip("GroupNorm", where, f"in nn.Sequential: {reason}")
            else:
                fused.append(name)
                report.add(KIND, where, "nn.Sequential(GroupNorm, SiLU)")
        if fused:
            _common.rebind(seq, _sequential_forward, SEQUENTIAL_KIND, tuple(fused))
