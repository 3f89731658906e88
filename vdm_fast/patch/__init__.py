"""Drop-in acceleration of existing video diffusion models: vdm_fast.patch(model) -> PatchReport, vdm_fast.unpatch.

patch() rewires, in place, the parts of a model it can prove equivalent to vdm_fast's fused ops, and leaves
everything else as it was, listed in the report with the reason:

- every nn.GroupNorm whose output provably goes straight into an nn.SiLU -> vdm_fast.ops.group_norm_silu, with the
  module's own parameters (state_dicts load unchanged): in an nn.Sequential (GroupNorm, SiLU); in diffusers'
  ResnetBlock2D (with its time-embedding scale/shift) and UNet3DConditionModel / UNetMotionModel output norm; in
  video-diffusion-pytorch's GroupNorm Blocks (with scale/shift);
- video-diffusion-pytorch 0.7's RMSNorm Blocks (RMSNorm -> scale/shift -> SiLU) -> vdm_fast.ops.rms_norm_silu, with
  the RMSNorm's own gamma (part of the group_norm_silu=True fusions);
- temporal self-attention -> vdm_fast.ops.temporal_attention: diffusers' TransformerTemporalModel and AnimateDiff
  motion modules (through Attention.set_processor), video-diffusion-pytorch's temporal Attention (rotary q/k, its
  relative position bias, focus-present mask) and its RelativePositionBias (vdm_fast.ops.rel_pos_bias).

"Provably" means: class identity, the attribute values that make the equivalence hold, no hooks that a fused path
would skip, and the source of each forward that an adapter copies or relies on matching a fingerprint it was checked
against (vdm_fast/patch/_common.py). unpatch(model) restores the original forwards and processors.
"""

from __future__ import annotations

from torch import nn

from vdm_fast.patch import _common, diffusers, group_norm, video_diffusion_pytorch
from vdm_fast.patch.report import PatchReport, Replaced, Skipped

__all__ = ["patch", "unpatch", "PatchReport", "Replaced", "Skipped"]

# GroupNorms that feed something other than a SiLU in code the adapters have read: (parent class, attribute).
_KNOWN_NOT_SILU = {
    ("TransformerTemporalModel", "norm"): "feeds proj_in (a Linear), not a SiLU",
    ("Transformer2DModel", "norm"): "feeds proj_in, not a SiLU",
    ("AnimateDiffTransformer3D", "norm"): "feeds proj_in (a Linear), not a SiLU",
    ("TransformerSpatioTemporalModel", "norm"): "feeds proj_in (a Linear), not a SiLU",
}


def patch(model: nn.Module, *, group_norm_silu: bool = True, attention: bool = True) -> PatchReport:
    """Patch model in place; returns the report (print it, or report.as_dict()).

    group_norm_silu: fuse GroupNorm -> SiLU pairs (and video-diffusion-pytorch 0.7's RMSNorm -> SiLU). attention:
    temporal attention and relative position bias.
    Patching a patched model patches only what is new (the rest is counted as already_patched).
    The patched modules call vdm_fast's ops, so `vdm_fast.backend(...)` picks their implementation as for any op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    seen = _common.occurrences(model)
    claimed: set[int] = set()  # GroupNorms some adapter replaced or reported
    flags = dict(group_norm_silu=group_norm_silu, attention=attention)
    diffusers.patch(model, report, seen, claimed, **flags)
    video_diffusion_pytorch.patch(model, report, seen, claimed, **flags)
    if group_norm_silu:
        group_norm.patch_sequentials(model, report, seen, claimed)
        _report_other_group_norms(model, report, claimed)
    return report


def unpatch(model: nn.Module) -> int:
    """Undo patch(model): the original forwards and attention processors come back. Returns how many modules were
    restored (0 for a model that was not patched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = sum(_common.restore(m) for m in model.modules())
    return restored + diffusers.unpatch(model)


def _report_other_group_norms(model: nn.Module, report: PatchReport, claimed: set[int]) -> None:
    for parent_path, parent in model.named_modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.GroupNorm) or id(child) in claimed:
                continue
            claimed.add(id(child))
            where = f"{parent_path}.{name}" if parent_path else name
            if _common.is_patched(child):
                report.already_patched += 1
                continue
            reason = _KNOWN_NOT_SILU.get((type(parent).__name__, name))
            if reason is None and type(child) is not nn.GroupNorm:
                reason = f"{type(child).__name__} subclasses nn.GroupNorm: its forward may differ"
            report.skip("GroupNorm", where, reason or f"no adapter proves its output goes straight into a SiLU "
                                                      f"(in {type(parent).__name__}.{name})")
