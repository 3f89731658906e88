"""State-dict keys of earlier Unet3D layouts -> today's, so that every checkpoint ever written keeps loading.

Layout 1 (vdm_fast 0.1.0 up to the Level/MidBlock rebuild) numbered one flat list of stages per path:

    down.{i}.res.*  down.{i}.attn.*  down.{i}.resample.*       i over all levels' blocks and downsamples in order
    mid.res.*  mid.attn.*  mid.res2.*
    up.{i}.res.*  up.{i}.attn.*  up.{i}.resample.*             i over all levels' blocks, lowest resolution first

Layout 2 (today) names levels and their blocks, as the paper's figure does:

    down.{level}.blocks.{j}.res.*  down.{level}.blocks.{j}.attn.*  down.{level}.downsample.*
    mid.res1.*  mid.attn.*  mid.res2.*
    up.{k}.blocks.{j}.res.*  up.{k}.blocks.{j}.attn.*  up.{k}.upsample.*   (k = 0: the lowest resolution)

The map depends only on the config (levels, blocks per level). Parameters come in the same order in both layouts, so
an optimizer state saved with layout 1 (keyed by parameter index) stays valid too. Keys already in layout 2 and keys
outside these paths pass unchanged, so converting twice is converting once.
"""

from __future__ import annotations

import re

from vdm_fast.model.config import Unet3DConfig

# The module prefix of a layout-1 key: a stage of a path, or the middle's first residual block (the only middle name
# that changed).
_LAYOUT1 = re.compile(r"^(?:(?:down|up)\.\d+\.(?:res|attn|resample)|mid\.res)\.")


def layout1_prefixes(config: Unet3DConfig) -> dict[str, str]:
    """Module prefix in layout 1 -> the same module's prefix in layout 2 ("down.3.res." -> "down.1.blocks.0.res.")."""
    levels, n = len(config.channel_mults), config.num_res_blocks
    out = {"mid.res.": "mid.res1."}
    i = 0
    for level in range(levels):
        for j in range(n):
            out[f"down.{i}.res."] = f"down.{level}.blocks.{j}.res."
            out[f"down.{i}.attn."] = f"down.{level}.blocks.{j}.attn."
            i += 1
        if level < levels - 1:
            out[f"down.{i}.resample."] = f"down.{level}.downsample."
            i += 1
    i = 0
    for k, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            out[f"up.{i}.res."] = f"up.{k}.blocks.{j}.res."
            out[f"up.{i}.attn."] = f"up.{k}.blocks.{j}.attn."
            if level > 0 and j == n:
                out[f"up.{i}.resample."] = f"up.{k}.upsample."
            i += 1
    return out


def renames(keys, config: Unet3DConfig, prefix: str = "") -> dict[str, str]:
    """{old key: new key} for the layout-1 keys among `keys` that start with `prefix` (a module's state-dict prefix).
    A layout-1-looking key with no counterpart (another config's index) is left out, so loading reports it."""
    table = layout1_prefixes(config)
    out = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        local = key[len(prefix):]
        m = _LAYOUT1.match(local)
        if m and m.group(0) in table:
            out[key] = prefix + table[m.group(0)] + local[m.end():]
    return out


def convert_state_dict(state_dict: dict, config: Unet3DConfig | dict) -> dict:
    """A Unet3D state dict in any layout -> today's (a new dict, same tensors, same order). For offline conversion of
    weight files; `Unet3D.load_state_dict` applies it by itself."""
    config = config if isinstance(config, Unet3DConfig) else Unet3DConfig(**config)
    table = renames(state_dict, config)
    return {table.get(k, k): v for k, v in state_dict.items()}
