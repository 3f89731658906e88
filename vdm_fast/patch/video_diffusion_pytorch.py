"""Adapters for video-diffusion-pytorch (lucidrains) Unet3D.

- Block (releases 0.4 to 0.6.3: proj -> nn.GroupNorm -> optional scale/shift -> nn.SiLU): fused into one
  group_norm_silu with the FiLM. In 0.7 the norm is the package's RMSNorm (`F.normalize(x, dim=1) * self.scale *
  self.gamma`, scale = dim ** 0.5, gamma (dim, 1, 1, 1)): fused into one rms_norm_silu with the FiLM (same Block
  forward source; the RMSNorm's forward has its own fingerprint). In 0.3 Block is an nn.Sequential(Conv3d,
  GroupNorm, SiLU), which the nn.Sequential adapter fuses.
- Attention wrapped in EinopsToAndFrom('b c f h w', 'b (h w) f c'), the temporal attention: q and k scaled and
  rotated (rotary embedding) as before, then softmax(q k^T + pos_bias, focus-present mask) v through
  vdm_fast.ops.temporal_attention. The spatial attention (sequence h*w) is left alone.
- RelativePositionBias: vdm_fast.ops.rel_pos_bias (same T5 buckets, same table).
Every forward replaced is proven for the sources in the fingerprint tables (read in releases 0.2.4 to 0.7.0).
The package is looked at only when the model's code already imported it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from vdm_fast import ops
from vdm_fast.ops.temporal_attention import MAX_D, MAX_T
from vdm_fast.patch import _common, group_norm
from vdm_fast.patch.report import PatchReport

MODULE = "video_diffusion_pytorch.video_diffusion_pytorch"
BLOCK_FORWARD = {"d5be31dad08ac67a": "video-diffusion-pytorch 0.4.2-0.7.0"}
RMS_NORM_FORWARD = {"4df08555c4c12d76": "video-diffusion-pytorch 0.7.0"}
RMS_KIND = "rms_norm_silu"
ATTENTION_FORWARD = {"083efd73226057dd": "video-diffusion-pytorch 0.3.19-0.7.0"}
EINOPS_FORWARD = {"9cc52b518ba2d449": "video-diffusion-pytorch 0.2.4-0.7.0"}
REL_POS_FORWARD = {"47ac0e311085b084": "video-diffusion-pytorch 0.2.4-0.7.0"}
REL_POS_BUCKET = {"22e9923e21baa2f5": "video-diffusion-pytorch 0.2.4-0.7.0"}
TEMPORAL_LAYOUT = ("b c f h w", "b (h w) f c")  # EinopsToAndFrom(from, to) of the temporal attention


def _module():
    return sys.modules.get(MODULE)


# ------------------------------------------------------------------------------------------------------------ Block


def _block_forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
    """Block.forward: proj, then silu(group_norm(x) * (scale + 1) + shift) in one op."""
    if not _common.bypassable(self.norm, self.act):  # a hook or wrapper added after patching must run
        return _common.original_forward(self)(x, scale_shift)
    x = self.proj(x)
    scale = shift = None
    if scale_shift is not None:
        scale, shift = scale_shift
        scale, shift = _common.as_film(scale, x), _common.as_film(shift, x)
        if scale is None or shift is None or x.dim() not in group_norm.FUSED_DIMS:
            return _block_lines(self, x, scale_shift)  # a scale_shift that broadcasts some other way
    if x.dim() not in group_norm.FUSED_DIMS:
        return _block_lines(self, x, None)
    return group_norm.fused_group_norm_silu(self.norm, x, scale, shift)


def _rms_fusable(norm, x: torch.Tensor) -> bool:
    """At call time: the RMSNorm still computes what rms_norm_silu does on x (5-D x, the gamma (C, 1, 1, 1) it was
    built with, its scale still sqrt(C)); else the Block's original lines run."""
    gamma, C = norm.gamma, x.shape[1]
    return (x.dim() == 5 and isinstance(gamma, torch.Tensor) and tuple(gamma.shape) == (C, 1, 1, 1)
            and isinstance(norm.scale, (int, float)) and norm.scale == C ** 0.5)


def _rms_block_forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
    """Block.forward of 0.7: proj, then silu(rms_norm(x) * (scale + 1) + shift) in one op."""
    if not _common.bypassable(self.norm, self.act):  # a hook or wrapper added after patching must run
        return _common.original_forward(self)(x, scale_shift)
    x = self.proj(x)
    if not _rms_fusable(self.norm, x):
        return _block_lines(self, x, scale_shift)
    scale = shift = None
    if scale_shift is not None:
        scale, shift = _common.as_film(scale_shift[0], x), _common.as_film(scale_shift[1], x)
        if scale is None or shift is None:  # a scale_shift that broadcasts some other way: the original lines
            return _block_lines(self, x, scale_shift)
    # CUDA autocast computes the RMSNorm's norm in fp32 and its division promotes to fp32: fed fp32 to match.
    return ops.rms_norm_silu(_common.autocast_input(x), self.norm.gamma.view(x.shape[1]), scale=scale, shift=shift)


def _block_lines(block, x: torch.Tensor, scale_shift) -> torch.Tensor:
    """Block.forward after self.proj, as its source reads."""
    x = block.norm(x)
    if scale_shift is not None:
        scale, shift = scale_shift
        x = x * (scale + 1) + shift
    return block.act(x)


def _why_not_norm(block, vdp) -> tuple[str | None, str | None]:
    """(kind, None) if block.norm is a norm this adapter fuses, else (None, the reason)."""
    norm = block.norm
    rms = getattr(vdp, "RMSNorm", None)
    if type(norm) is nn.GroupNorm:
        return group_norm.KIND, None
    if rms is None or type(norm) is not rms:
        return None, f"Block.norm is {type(norm).__name__}, not nn.GroupNorm or video-diffusion-pytorch's RMSNorm"
    fp = _common.fingerprint(rms.forward)
    if fp not in RMS_NORM_FORWARD:
        return None, f"RMSNorm.forward source (fingerprint {fp}) is not one this adapter was proven against"
    gamma = getattr(norm, "gamma", None)
    if not isinstance(gamma, nn.Parameter) or gamma.dim() != 4 or tuple(gamma.shape[1:]) != (1, 1, 1):
        return None, "RMSNorm.gamma is not a (dim, 1, 1, 1) parameter"
    if not isinstance(getattr(norm, "scale", None), (int, float)) or norm.scale != gamma.shape[0] ** 0.5:
        return None, f"RMSNorm.scale is {getattr(norm, 'scale', None)!r}, not dim ** 0.5"
    return RMS_KIND, None


def _patch_blocks(model, vdp, report: PatchReport, claimed: set[int]) -> None:
    cls = getattr(vdp, "Block", None)
    for path, block in model.named_modules():
        if cls is None or type(block) is not cls or not hasattr(block, "norm"):
            continue  # 0.3's Block holds an nn.Sequential: the nn.Sequential adapter's
        norm, where = block.norm, f"{path}.norm"
        claimed.add(id(norm))
        if _common.is_patched(block):
            report.already_patched += 1
            continue
        fp = _common.fingerprint(type(block).forward)
        kind, norm_reason = _why_not_norm(block, vdp)
        if fp not in BLOCK_FORWARD:
            reason = f"Block.forward source (fingerprint {fp}) is not one this adapter was proven against"
        elif norm_reason:
            reason = norm_reason
        elif type(block.act) is not nn.SiLU:
            reason = f"Block.act is {type(block.act).__name__}, not nn.SiLU"
        else:
            reason = _common.why_not_rebindable(block)
            for m in (norm, block.act):
                reason = reason or _common.why_not_rebindable(m, bypassed=True)
        if reason:
            report.skip(type(norm).__name__, where, f"in Block: {reason}")
            continue
        if kind == RMS_KIND:
            _common.rebind(block, _rms_block_forward, "video_diffusion_pytorch.Block:rms")
            report.add(RMS_KIND, where, "video-diffusion-pytorch 0.7 Block (RMSNorm, scale/shift, SiLU)")
        else:
            _common.rebind(block, _block_forward, "video_diffusion_pytorch.Block")
            report.add(group_norm.KIND, where, "video-diffusion-pytorch Block (GroupNorm, scale/shift, SiLU)")


# -------------------------------------------------------------------------------------------------------- Attention


def _attention_forward(self, x: torch.Tensor, pos_bias=None, focus_present_mask=None) -> torch.Tensor:
    """Attention.forward with the scores, bias, mask, softmax and weighted sum in vdm_fast.ops.temporal_attention."""
    n, device = x.shape[-2], x.device
    d = self.to_qkv.out_features // (3 * self.heads)
    per_sample = focus_present_mask is not None and not (~focus_present_mask).all()
    if (x.dim() != 4 or n > MAX_T or d > MAX_D or (pos_bias is not None and pos_bias.dim() != 3)
            or (per_sample and focus_present_mask.shape != (x.shape[0],))):
        return _common.original_forward(self)(x, pos_bias=pos_bias, focus_present_mask=focus_present_mask)

    qkv = self.to_qkv(x).chunk(3, dim=-1)
    if focus_present_mask is not None and focus_present_mask.all():
        # every sample focuses on the present: each frame attends to itself only, the output is its value
        return self.to_out(qkv[-1])

    # '... n (h d) -> ... h n d': (b, hw, f, heads*d) -> (b, hw, heads, f, d) views
    q, k, v = (t.unflatten(-1, (self.heads, d)).transpose(-2, -3) for t in qkv)
    q = q * self.scale
    if self.rotary_emb is not None:  # rotate positions into queries and keys for time attention
        q = self.rotary_emb.rotate_queries_or_keys(q)
        k = self.rotary_emb.rotate_queries_or_keys(k)

    mask = None
    if per_sample:  # focusing samples attend to their own frame only, the others to all frames
        eye = torch.eye(n, device=device, dtype=torch.bool)
        mask = eye[None] | ~focus_present_mask.to(device)[:, None, None]
    b, hw = q.shape[:2]
    out = ops.temporal_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), bias=pos_bias, mask=mask,
                                 scale=1.0)  # N = b * hw sample-major, as the op's per-sample mask expects
    out = out.view(b, hw, self.heads, n, d).transpose(-2, -3).flatten(-2)  # '... h n d -> ... n (h d)'
    return self.to_out(out)


def _patch_attention(model, vdp, report: PatchReport) -> None:
    attn_cls, wrap_cls = getattr(vdp, "Attention", None), getattr(vdp, "EinopsToAndFrom", None)
    if attn_cls is None:
        return
    parents = {id(w.fn): w for w in model.modules() if wrap_cls is not None and type(w) is wrap_cls}
    for path, attn in model.named_modules():
        if type(attn) is not attn_cls:
            continue
        if _common.is_patched(attn):
            report.already_patched += 1
            continue
        wrap = parents.get(id(attn))
        layout = (wrap.from_einops, wrap.to_einops) if wrap is not None else None
        fp, wfp = _common.fingerprint(type(attn).forward), _common.fingerprint(wrap_cls.forward)
        if layout != TEMPORAL_LAYOUT:
            reason = (f"not temporal attention (EinopsToAndFrom layout {layout}): the sequence is not the frames"
                      if layout else "not wrapped in an EinopsToAndFrom: its sequence axis is unknown")
        elif fp not in ATTENTION_FORWARD or wfp not in EINOPS_FORWARD:
            reason = f"Attention/EinopsToAndFrom forward source ({fp}/{wfp}) is not one this adapter was proven against"
        elif not isinstance(attn.to_qkv, nn.Linear) or attn.to_qkv.out_features % (3 * attn.heads):
            reason = "to_qkv is not an nn.Linear to 3 * heads * dim_head features"
        else:
            reason = _common.why_not_rebindable(attn)
        if reason:
            report.skip("Attention", path, reason)
            continue
        _common.rebind(attn, _attention_forward, "video_diffusion_pytorch.Attention")
        how = "video-diffusion-pytorch temporal Attention" + (" (rotary q/k)" if attn.rotary_emb is not None else "")
        report.add("temporal_attention", path, how)


# ---------------------------------------------------------------------------------------------- RelativePositionBias


def _rel_pos_forward(self, n: int, device) -> torch.Tensor:
    """RelativePositionBias.forward(n, device) -> (heads, n, n) through vdm_fast.ops.rel_pos_bias."""
    table = self.relative_attention_bias.weight
    return ops.rel_pos_bias(table, torch.arange(n, dtype=torch.long, device=device), max_distance=self.max_distance)


def _patch_rel_pos(model, vdp, report: PatchReport) -> None:
    cls = getattr(vdp, "RelativePositionBias", None)
    for path, rpb in model.named_modules():
        if cls is None or type(rpb) is not cls:
            continue
        if _common.is_patched(rpb):
            report.already_patched += 1
            continue
        fp = _common.fingerprint(cls.forward)
        bfp = _common.fingerprint(cls._relative_position_bucket)
        emb = getattr(rpb, "relative_attention_bias", None)
        max_exact = rpb.num_buckets // 4  # bidirectional: half the buckets per sign, half of those exact
        if fp not in REL_POS_FORWARD or bfp not in REL_POS_BUCKET:
            reason = f"RelativePositionBias source ({fp}/{bfp}) is not one this adapter was proven against"
        elif type(emb) is not nn.Embedding or emb.num_embeddings != rpb.num_buckets:
            reason = "relative_attention_bias is not an nn.Embedding(num_buckets, heads)"
        elif max_exact < 1 or rpb.max_distance <= max_exact:
            reason = f"num_buckets={rpb.num_buckets}, max_distance={rpb.max_distance}: outside rel_pos_bias's domain"
        else:
            reason = _common.why_not_rebindable(rpb) or _common.why_not_rebindable(emb, bypassed=True)
        if reason:
            report.skip("RelativePositionBias", path, reason)
            continue
        _common.rebind(rpb, _rel_pos_forward, "video_diffusion_pytorch.RelativePositionBias")
        report.add("rel_pos_bias", path, "video-diffusion-pytorch RelativePositionBias")


def patch(model: nn.Module, report: PatchReport, seen, claimed: set[int], *, group_norm_silu: bool,
          attention: bool) -> None:
    vdp = _module()
    if vdp is None:
        return
    if group_norm_silu:
        _patch_blocks(model, vdp, report, claimed)
    if attention:
        _patch_attention(model, vdp, report)
        _patch_rel_pos(model, vdp, report)
