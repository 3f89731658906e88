"""RelativePositionBias: the temporal attention's learned bias over frame offsets.

bias[..., h, i, j] = table[bucket(positions[j] - positions[i]), h] with T5's buckets (vdm_fast.ops.rel_pos_bias).
The table is an nn.Embedding(num_buckets, heads) under the key `relative_attention_bias.weight`, as in
video-diffusion-pytorch, whose class differs in one default: max_distance=128 there, 32 here (this package's
U-Net). A state_dict carries no max_distance, so weights from there load without complaint into a default-built
layer here and then give other biases from T = 11 on: build with `from_video_diffusion_pytorch(...)`.
"""

from __future__ import annotations

import torch
from torch import nn

from vdm_fast import _checks
from vdm_fast.ops import rel_pos_bias


class RelativePositionBias(nn.Module):
    """T5-bucketed relative position bias, (heads, T, T) or (B, heads, T, T).

    Same parameter and state_dict key (`relative_attention_bias.weight`) as video-diffusion-pytorch's
    RelativePositionBias, so its trained tables load unchanged; its default max_distance is VDP_MAX_DISTANCE (128),
    not 32: use `from_video_diffusion_pytorch` to get its configuration along with its weights.
    """

    VDP_MAX_DISTANCE = 128  # video-diffusion-pytorch's RelativePositionBias default (ours: 32)

    def __init__(self, heads: int = 8, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        for name, v in (("heads", heads), ("num_buckets", num_buckets), ("max_distance", max_distance)):
            _checks.positive_int(v, name)
        self.heads, self.num_buckets, self.max_distance = heads, num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    @classmethod
    def from_video_diffusion_pytorch(cls, source: nn.Module | dict | None = None, *, heads: int | None = None,
                                     num_buckets: int | None = None,
                                     max_distance: int | None = None) -> RelativePositionBias:
        """The layer video-diffusion-pytorch's RelativePositionBias computes, with its weights where given.

        source: that class's module (its num_buckets, max_distance and table are read), or its state_dict, or
        None (a fresh table). Unset arguments take that module's values, else that class's defaults (heads=8,
        num_buckets=32, max_distance=128); a given argument that contradicts the module raises ValueError.
        """
        found: dict[str, int] = {}
        state = None
        if isinstance(source, nn.Module):
            emb = getattr(source, "relative_attention_bias", None)
            if not isinstance(emb, nn.Embedding):
                raise TypeError("source must be video-diffusion-pytorch's RelativePositionBias (a module with an "
                                f"nn.Embedding `relative_attention_bias`), got {type(source).__name__}")
            found = dict(num_buckets=emb.num_embeddings, heads=emb.embedding_dim)
            if hasattr(source, "max_distance"):
                found["max_distance"] = int(source.max_distance)
            state = source.state_dict()
        elif isinstance(source, dict):
            state = source
            weight = state.get("relative_attention_bias.weight")
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError("source state_dict must hold a 2-D `relative_attention_bias.weight`")
            found = dict(num_buckets=weight.shape[0], heads=weight.shape[1])
        elif source is not None:
            raise TypeError(f"source must be a module, a state_dict or None, got {type(source).__name__}")
        given = dict(heads=heads, num_buckets=num_buckets, max_distance=max_distance)
        for name, value in given.items():
            if value is not None and name in found and found[name] != value:
                raise ValueError(f"{name}={value} contradicts the source's {name}={found[name]}")
        defaults = dict(heads=8, num_buckets=32, max_distance=cls.VDP_MAX_DISTANCE)
        config = {k: given[k] if given[k] is not None else found.get(k, defaults[k]) for k in defaults}
        layer = cls(**config)
        if state is not None:
            layer.load_state_dict(state)
        return layer

    def forward(self, positions: int | torch.Tensor) -> torch.Tensor:
        """positions: an int T (frames 0..T-1) or a (T,) / (B, T) integer tensor of frame indices."""
        weight = self.relative_attention_bias.weight
        if isinstance(positions, int):
            positions = torch.arange(positions, device=weight.device)
        return rel_pos_bias(weight, positions, max_distance=self.max_distance)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}"
