"""Adapters for diffusers models: UNet3DConditionModel (ModelScope), UNetMotionModel (AnimateDiff), I2VGen-XL,
Stable Video Diffusion's UNetSpatioTemporalConditionModel and its AutoencoderKLTemporalDecoder, and any model built
of the same blocks.

- ResnetBlock2D: its forward does norm1 -> nonlinearity and norm2 (-> time scale/shift) -> nonlinearity; with
  nonlinearity an nn.SiLU both pairs are fused. The block's forward is replaced by a copy of diffusers' own with the
  two fused calls, proven for the forward sources listed in RESNET_FORWARD (a release that edits that forward is
  left alone). TemporalResnetBlock (SVD's temporal half of SpatioTemporalResBlock, U-Net and VAE decoder): the same
  on 5-D input, statistics over the whole clip.
- The U-Nets' and the temporal VAE decoder's forward end conv_norm_out -> conv_act (an nn.SiLU): a fused pair.
- Attention inside TransformerTemporalModel / AnimateDiffTransformer3D / SVD's TemporalBasicTransformerBlock /
  I2VGen-XL's temporal encoder (self-attention over (b*h*w, frames, c)): processor AttnProcessor2_0 or AttnProcessor
  -> TemporalAttnProcessor, the same code with vdm_fast.ops.temporal_attention in place of the attention core (no
  65,535 batch limit). diffusers' set_default_attn_processor() and set_attn_processor() replace it as they would
  the processor it wraps.
Every fused forward checks at call time that no hook or offloading wrapper was put on a module it skips (see
vdm_fast/patch/_common.py), else runs diffusers' own forward. The diffusers modules are imported only when the
model's code already imported diffusers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from vdm_fast import ops
from vdm_fast.ops.temporal_attention import MAX_D, MAX_T
from vdm_fast.patch import _common, group_norm
from vdm_fast.patch.report import PatchReport

# Fingerprints (vdm_fast.patch._common.fingerprint) of the sources each adapter copies or relies on, with the
# releases they were read in. 0.42.1 is tested (tests/test_patch.py); the others differ from it only in ways that
# change no value (a .contiguous() before conv_shortcut; how a Python-number timestep becomes a tensor).
RESNET_FORWARD = {
    "1f365f27ef532815": "diffusers 0.30.3",
    "e975ef5f3cf497e5": "diffusers 0.35.2",
    "17c7b8ecb8987b5a": "diffusers 0.42.1",
}
TEMPORAL_RESNET_FORWARD = {"c3106a0635f668f1": "diffusers 0.42.1"}  # SVD's TemporalResnetBlock (5-D, whole clip)
UNET_FORWARD = {  # conv_norm_out's output goes to conv_act and nowhere else
    "UNetSpatioTemporalConditionModel": {"ede1b3e0114b8423": "diffusers 0.42.1"},  # Stable Video Diffusion
    "TemporalDecoder": {"52177a5f7e7f230b": "diffusers 0.42.1"},  # SVD's AutoencoderKLTemporalDecoder.decoder
    "I2VGenXLUNet": {"3a05b26da9d4b099": "diffusers 0.42.1"},
    "UNet3DConditionModel": {
        "77ca4353bcdba053": "diffusers 0.30.3", "9d03fdab3a771fed": "diffusers 0.35.2",
        "997015aa3e2bd40c": "diffusers 0.42.1",
    },
    "UNetMotionModel": {
        "650f5136031dcca4": "diffusers 0.30.3", "87940c33a0567fc2": "diffusers 0.35.2",
        "db92dfca0bb3f9ce": "diffusers 0.42.1",
    },
}
PROCESSOR_CALL = {  # identical from 0.30.3 to 0.42.1
    "AttnProcessor2_0": {"1a7e4791b8f1d44b": "diffusers 0.30.3-0.42.1"},
    "AttnProcessor": {"aad888ffe2ae1d4b": "diffusers 0.30.3-0.42.1"},
}
# Modules whose Attention children attend over frames: (b*h*w, frames, c) self-attention (cross-attention in them
# is refused by the processor check).
TEMPORAL_CONTAINERS = ("TransformerTemporalModel", "AnimateDiffTransformer3D", "TemporalBasicTransformerBlock",
                       "I2VGenXLTransformerTemporalEncoder")


def _classes() -> dict | None:
    """The diffusers classes the adapters recognise (by identity), or None when diffusers is not in use."""
    if "diffusers" not in sys.modules:
        return None
    found = {}
    for mod, names in (
        ("diffusers.models.resnet", ("ResnetBlock2D", "TemporalResnetBlock")),
        ("diffusers.models.attention", ("TemporalBasicTransformerBlock",)),
        ("diffusers.models.unets.unet_spatio_temporal_condition", ("UNetSpatioTemporalConditionModel",)),
        ("diffusers.models.autoencoders.autoencoder_kl_temporal_decoder", ("TemporalDecoder",)),
        ("diffusers.models.unets.unet_i2vgen_xl", ("I2VGenXLUNet", "I2VGenXLTransformerTemporalEncoder")),
        ("diffusers.models.autoencoders.autoencoder_kl_hunyuan_video", ("HunyuanVideoResnetBlockCausal3D",)),
        ("diffusers.models.autoencoders.autoencoder_kl_cogvideox", ("CogVideoXResnetBlock3D",)),
        ("diffusers.models.attention_processor", ("Attention", "AttnProcessor2_0", "AttnProcessor")),
        ("diffusers.models.unets.unet_3d_condition", ("UNet3DConditionModel",)),
        ("diffusers.models.unets.unet_motion_model", ("UNetMotionModel", "AnimateDiffTransformer3D")),
        ("diffusers.models.transformers.transformer_temporal", ("TransformerTemporalModel",)),
    ):
        try:
            module = __import__(mod, fromlist=list(names))
        except Exception:  # noqa: BLE001 - a diffusers without that module: its adapter has nothing to match
            continue
        for n in names:
            if hasattr(module, n):
                found[n] = getattr(module, n)
    return found


# ---------------------------------------------------------------------------------------------------- ResnetBlock2D


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward (0.42.1) with norm1 -> SiLU and norm2 (-> scale/shift) -> SiLU fused."""
    if (args or kwargs.get("scale", None) is not None or input_tensor.dim() not in group_norm.FUSED_DIMS
            or not _common.bypassable(self.norm1, self.norm2, self.nonlinearity)):
        # its deprecation path, or a hook / offloading wrapper on a module the fused path would skip
        return _common.original_forward(self)(input_tensor, temb, *args, **kwargs)

    hidden_states = group_norm.fused_group_norm_silu(self.norm1, input_tensor)

    if self.upsample is not None:
        # upsample_nearest_nhwc fails with large batch sizes. see https://github.com/huggingface/diffusers/issues/984
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "default":
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = group_norm.fused_group_norm_silu(self.norm2, hidden_states)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        film = _common.as_film(time_scale, hidden_states), _common.as_film(time_shift, hidden_states)
        if film[0] is not None and film[1] is not None:
            hidden_states = group_norm.fused_group_norm_silu(self.norm2, hidden_states, film[0], film[1])
        else:  # a temb that broadcasts some other way: diffusers' own lines
            hidden_states = self.nonlinearity(self.norm2(hidden_states) * (1 + time_scale) + time_shift)
    else:
        hidden_states = self.nonlinearity(self.norm2(hidden_states))

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    return (input_tensor + hidden_states) / self.output_scale_factor


def _temporal_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """diffusers' TemporalResnetBlock.forward (0.42.1; Stable Video Diffusion's U-Net and VAE decoder) with
    norm1 -> SiLU and norm2 -> SiLU fused: GroupNorm over each group of the whole clip (C/G, T, H, W), as nn.GroupNorm
    on a 5-D tensor."""
    if input_tensor.dim() not in group_norm.FUSED_DIMS or not _common.bypassable(self.norm1, self.norm2,
                                                                                   self.nonlinearity):
        return _common.original_forward(self)(input_tensor, temb)
    hidden_states = group_norm.fused_group_norm_silu(self.norm1, input_tensor)
    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, :, None, None]
        temb = temb.permute(0, 2, 1, 3, 4)
        hidden_states = hidden_states + temb

    hidden_states = group_norm.fused_group_norm_silu(self.norm2, hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)

    return input_tensor + hidden_states


def _hunyuan_resnet_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' HunyuanVideoResnetBlockCausal3D.forward (0.42.1; HunyuanVideo's VAE) with both GroupNorm -> SiLU
    pairs fused (5-D, statistics over the whole clip)."""
    if hidden_states.dim() not in group_norm.FUSED_DIMS or not _common.bypassable(self.norm1, self.norm2,
                                                                                    self.nonlinearity):
        return _common.original_forward(self)(hidden_states)
    hidden_states = hidden_states.contiguous()
    residual = hidden_states
    hidden_states = self.conv1(group_norm.fused_group_norm_silu(self.norm1, hidden_states))
    hidden_states = group_norm.fused_group_norm_silu(self.norm2, hidden_states)
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        residual = self.conv_shortcut(residual)
    return hidden_states + residual


def _cogvideox_resnet_forward(self, inputs: torch.Tensor, temb: torch.Tensor | None = None,
                              zq: torch.Tensor | None = None, conv_cache: dict | None = None):
    """diffusers' CogVideoXResnetBlock3D.forward (0.42.1; CogVideoX's VAE encoder, whose norms are nn.GroupNorm)
    with both GroupNorm -> SiLU pairs fused (5-D, whole clip). With zq (the decoder's spatial norms) it is diffusers'
    own forward."""
    if zq is not None or inputs.dim() not in group_norm.FUSED_DIMS or not _common.bypassable(
            self.norm1, self.norm2, self.nonlinearity):
        return _common.original_forward(self)(inputs, temb, zq, conv_cache)
    new_conv_cache = {}
    conv_cache = conv_cache or {}
    hidden_states = group_norm.fused_group_norm_silu(self.norm1, inputs)
    hidden_states, new_conv_cache["conv1"] = self.conv1(hidden_states, conv_cache=conv_cache.get("conv1"))
    if temb is not None:
        hidden_states = hidden_states + self.temb_proj(self.nonlinearity(temb))[:, :, None, None, None]
    hidden_states = group_norm.fused_group_norm_silu(self.norm2, hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states, new_conv_cache["conv2"] = self.conv2(hidden_states, conv_cache=conv_cache.get("conv2"))
    if self.in_channels != self.out_channels:
        if self.use_conv_shortcut:
            inputs, new_conv_cache["conv_shortcut"] = self.conv_shortcut(inputs, conv_cache=conv_cache.get(
                "conv_shortcut"))
        else:
            inputs = self.conv_shortcut(inputs)
    return hidden_states + inputs, new_conv_cache


# class name -> (its patched forward, the forward sources it was proven against)
RESNETS = {
    "ResnetBlock2D": (_resnet_forward, RESNET_FORWARD),
    "TemporalResnetBlock": (_temporal_resnet_forward, TEMPORAL_RESNET_FORWARD),
    "HunyuanVideoResnetBlockCausal3D": (_hunyuan_resnet_forward, {"2cc04887df57f4a2": "diffusers 0.42.1"}),
    "CogVideoXResnetBlock3D": (_cogvideox_resnet_forward, {"53780a286bfd488b": "diffusers 0.42.1"}),
}


def _why_not_resnet(block: nn.Module, name: str) -> str | None:
    fp = _common.fingerprint(type(block).forward)
    if fp not in RESNETS[name][1]:
        return f"{name}.forward source (fingerprint {fp}) is not one this adapter was proven against"
    if type(block.norm1) is not nn.GroupNorm or type(block.norm2) is not nn.GroupNorm:
        return "norm1/norm2 are not exactly nn.GroupNorm"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"non_linearity is {type(block.nonlinearity).__name__}, not nn.SiLU"
    if getattr(block, "time_embedding_norm", "default") not in ("default", "scale_shift"):
        return f"time_embedding_norm={block.time_embedding_norm!r} (handled: 'default', 'scale_shift')"
    reason = _common.why_not_rebindable(block)
    for m in (block.norm1, block.norm2, block.nonlinearity):
        reason = reason or _common.why_not_rebindable(m, bypassed=True)
    return reason


def _patch_resnets(model, classes, report: PatchReport, claimed: set[int]) -> None:
    known = {classes[n]: n for n in RESNETS if n in classes}
    for path, block in model.named_modules():
        name = known.get(type(block))
        if name is None:
            continue
        norms = [(f"{path}.{n}", getattr(block, n, None)) for n in ("norm1", "norm2")]
        claimed.update(id(m) for _, m in norms)
        if _common.is_patched(block):
            report.already_patched += 2
            continue
        reason = _why_not_resnet(block, name)
        if reason:
            for where, _ in norms:
                report.skip("GroupNorm", where, f"in {name}: {reason}")
            continue
        _common.rebind(block, RESNETS[name][0], f"diffusers.{name}")
        how = (f"diffusers ResnetBlock2D (time_embedding_norm={block.time_embedding_norm!r})"
               if name == "ResnetBlock2D" else f"diffusers {name} (5-D, statistics over the whole clip)")
        for where, _ in norms:
            report.add(group_norm.KIND, where, how)


def _patch_unet_out(model, classes, report: PatchReport, seen, claimed: set[int]) -> None:
    for path, unet in model.named_modules():
        name = next((n for n in UNET_FORWARD if classes.get(n) is not None and type(unet) is classes[n]), None)
        norm = getattr(unet, "conv_norm_out", None) if name else None
        if norm is None or id(norm) in claimed:
            continue
        claimed.add(id(norm))
        where = f"{path}.conv_norm_out" if path else "conv_norm_out"
        if _common.is_patched(norm):
            report.already_patched += 1
            continue
        fp = _common.fingerprint(type(unet).forward)
        reason = None if fp in UNET_FORWARD[name] else (
            f"{name}.forward source (fingerprint {fp}) is not one this adapter was proven against")
        reason = reason or group_norm.why_not_pair(norm, unet.conv_act, seen)
        if reason:
            report.skip("GroupNorm", where, f"{name}.conv_norm_out -> conv_act: {reason}")
            continue
        group_norm.fuse_pair(norm, unet.conv_act)
        report.add(group_norm.KIND, where, f"diffusers {name} conv_norm_out -> conv_act")


# -------------------------------------------------------------------------------------------------------- Attention


class TemporalAttnProcessor:
    """diffusers' AttnProcessor2_0 (sdpa=True) or AttnProcessor (sdpa=False), self-attention path, with the
    attention core computed by vdm_fast.ops.temporal_attention. Anything else it is handed (cross-attention, a mask,
    4-D input, T or head dim past the op's limits, extra arguments) goes to the original processor unchanged."""

    def __init__(self, original, *, sdpa: bool):
        self.original = original
        self.sdpa = sdpa

    # diffusers' set_default_attn_processor() accepts only processors whose `__class__` is one of its own (an exact
    # membership test), and it raised on a patched model. This processor computes what the processor it wraps
    # computes, so it presents that class there; set_default_attn_processor() then replaces it with diffusers'
    # default, which is what the call asks for. type(self) and isinstance(self, TemporalAttnProcessor) are unchanged.
    @property
    def __class__(self):
        return type(self.original)

    def __reduce__(self):  # pickle and deepcopy would otherwise rebuild `__class__`, the wrapped processor's class
        return _temporal_processor, (self.original, self.sdpa)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        inner_dim = attn.to_k.out_features if isinstance(attn.to_k, nn.Linear) else None
        if (args or kwargs or encoder_hidden_states is not None or attention_mask is not None
                or hidden_states.dim() != 3 or hidden_states.shape[1] > MAX_T
                or inner_dim is None or inner_dim // attn.heads > MAX_D):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (N, T, heads * d) -> (N, heads, T, d) views: the op reads any strides
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if self.sdpa:  # AttnProcessor2_0 normalizes q and k; F.scaled_dot_product_attention's scale: 1/sqrt(d)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            scale = None
        else:  # AttnProcessor: attn.get_attention_scores uses attn.scale (and no q/k norm)
            scale = attn.scale

        hidden_states = ops.temporal_attention(query, key, value, scale=scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _temporal_processor(original, sdpa: bool) -> TemporalAttnProcessor:
    return TemporalAttnProcessor(original, sdpa=sdpa)


def _temporal_attention_paths(model, classes) -> set[int]:
    containers = [classes[n] for n in TEMPORAL_CONTAINERS if n in classes]
    inside = set()
    for m in model.modules():
        if containers and type(m) in containers:
            inside.update(id(a) for a in m.modules())
    return inside


def _why_not_processor(attn, classes) -> tuple[str | None, bool]:
    proc = attn.processor
    name = type(proc).__name__
    if name not in PROCESSOR_CALL or classes.get(name) is not type(proc):
        return f"processor {name} is not AttnProcessor2_0 / AttnProcessor: its math is not known here", False
    fp = _common.fingerprint(type(proc).__call__)
    if fp not in PROCESSOR_CALL[name]:
        return f"{name}.__call__ source (fingerprint {fp}) is not one this adapter was proven against", False
    if attn.is_cross_attention:
        return "cross-attention (keys from encoder_hidden_states)", False
    if not isinstance(attn.to_k, nn.Linear):
        return f"to_k is {type(attn.to_k).__name__}, not nn.Linear", False
    return None, name == "AttnProcessor2_0"


def _patch_attention(model, classes, report: PatchReport) -> None:
    attn_cls = classes.get("Attention")
    if attn_cls is None:
        return
    temporal = _temporal_attention_paths(model, classes)
    for path, attn in model.named_modules():
        if type(attn) is not attn_cls:
            continue
        if isinstance(attn.processor, TemporalAttnProcessor):
            report.already_patched += 1
            continue
        if id(attn) not in temporal:
            report.skip("Attention", path, f"not inside {' / '.join(TEMPORAL_CONTAINERS)} (spatial or "
                                           "cross-attention, or a container this adapter does not know)")
            continue
        reason, sdpa = _why_not_processor(attn, classes)
        if reason:
            report.skip("Attention", path, reason)
            continue
        attn.set_processor(TemporalAttnProcessor(attn.processor, sdpa=sdpa))
        report.add("temporal_attention", path,
                   f"diffusers Attention, {'AttnProcessor2_0' if sdpa else 'AttnProcessor'} -> TemporalAttnProcessor")


# ------------------------------------------------------------------------------------------------------ entry points


def patch(model: nn.Module, report: PatchReport, seen, claimed: set[int], *, group_norm_silu: bool,
          attention: bool) -> None:
    classes = _classes()
    if classes is None:
        return
    if group_norm_silu:
        _patch_resnets(model, classes, report, claimed)
        _patch_unet_out(model, classes, report, seen, claimed)
    if attention:
        _patch_attention(model, classes, report)


def unpatch(model: nn.Module) -> int:
    """Restore every Attention processor this module set; returns how many."""
    restored = 0
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if isinstance(proc, TemporalAttnProcessor) and hasattr(m, "set_processor"):
            m.set_processor(proc.original)
            restored += 1
    return restored
