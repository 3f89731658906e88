"""GroupNorm -> SiLU fusion: the fused forward, the (GroupNorm, SiLU) pair rebinding, and the adapter for
nn.Sequential, whose forward is torch's own: child i's output goes straight into child i + 1, so a GroupNorm directly
followed by a SiLU in an nn.Sequential is proven to feed it and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast.patch import _common
from vdm_fast.patch.report import PatchReport

KIND = "group_norm_silu"
FUSED_DIMS = (3, 4, 5)  # the ranks group_norm_silu takes: (B, C, L), (B, C, H, W), (B, C, T, H, W)


def fused_group_norm_silu(
    norm: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(norm(x) * (1 + scale) + shift) through vdm_fast.ops.group_norm_silu, with norm's own parameters."""
    from vdm_fast import ops

    return ops.group_norm_silu(_common.autocast_input(x), norm.num_groups, norm.weight, norm.bias, norm.eps,
                               scale=scale, shift=shift)


def _fused_norm_forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The patched GroupNorm of a pair: GroupNorm and the SiLU after it (whose forward became the identity)."""
    if x.dim() not in FUSED_DIMS:
        return torch.nn.functional.silu(_common.original_forward(norm)(x))
    return fused_group_norm_silu(norm, x)


def _identity_forward(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patched SiLU of a pair: its GroupNorm already applied it."""
    return x


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
    """norm's forward becomes the fused GroupNorm + SiLU, act's the identity; unpatch undoes both."""
    _common.rebind(norm, _fused_norm_forward, KIND)
    _common.rebind(act, _identity_forward, KIND + ":act")


def patch_sequentials(model: nn.Module, report: PatchReport, seen, claimed: set[int]) -> None:
    """Every exact nn.Sequential: child GroupNorm immediately followed by child SiLU -> fused pair."""
    for path, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.named_children())
        for (name, norm), (_, act) in zip(children, children[1:]):
            if type(norm) is not nn.GroupNorm or id(norm) in claimed:
                continue
            where = f"{path}.{name}" if path else name
            if _common.is_patched(norm):
                report.already_patched += 1
                claimed.add(id(norm))
                continue
            reason = why_not_pair(norm, act, seen)
            if reason:
                report.skip("GroupNorm", where, f"in nn.Sequential: {reason}")
            else:
                fuse_pair(norm, act)
                report.add(KIND, where, "nn.Sequential(GroupNorm, SiLU)")
            claimed.add(id(norm))
