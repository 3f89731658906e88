"""Preview samples during training: a few videos from the EMA weights (else the raw ones) with the run's sampler,
written as a GIF and a frame strip under run/samples/ (skipped, with the reason, when pillow is missing)."""

from __future__ import annotations

import sys

from vdm_fast import sample as sampling
from vdm_fast.diffusion import GaussianDiffusion


def write_samples(trainer, module=None) -> None:
    """`module`: the network to sample (default: the EMA copy, else the trained model; unsharded)."""
    cfg = trainer.cfg
    if module is None:
        module = trainer.ema.module if trainer.ema else trainer.model
    diffusion = GaussianDiffusion(module, prediction=cfg.prediction)
    c = trainer.model.config
    shape = (cfg.sample_num, c.in_channels, trainer.frames, c.image_size, c.image_size)
    # fp32, no autocast: the sampler may capture CUDA graphs, and these few videos are cheap anyway.
    videos = sampling.generate(diffusion, shape, steps=cfg.sample_steps, sampler=cfg.sampler,
                               num_classes=trainer.num_classes if cfg.class_cond else 0, seed=cfg.seed,
                               progress=False)
    try:
        sampling.write_outputs(videos, trainer.out / "samples" / f"step_{trainer.step:08d}.gif", strip=True)
    except ImportError as e:  # no pillow: keep training, say why there are no sample files
        print(f"samples not written: {e}", file=sys.stderr)
