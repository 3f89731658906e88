"""The samplers' fused update: z <- c_z z + c_x e + c_n noise, e = x_hat (clipped) or eps_hat, in one pass.

Definition of correct: vdm_fast.diffusion.samplers.update_reference. The coefficients are read from a device table
row inside the kernel (no host sync, CUDA-graph friendly: the row is a device tensor indexed by a device step
counter). Reads z, pred (, pred_u, noise), writes z in place and e: elementwise, so in place is safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vdm_fast.kernels._compile import KernelConfig

BLOCK = 1024
NUM_WARPS = 4
PRED_CODE = {"eps": 0, "v": 1, "x": 2}


@triton.jit
def _update_kernel(z_ptr, p_ptr, pu_ptr, n_ptr, coef_ptr, e_ptr, numel, w,
                   PRED: tl.constexpr, CORRECTOR: tl.constexpr, CFG: tl.constexpr, CLIP: tl.constexpr,
                   NOISE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    # Row layout [logsnr, alpha, sigma, c_z, c_x, c_n, 0, 0] (vdm_fast.diffusion.samplers).
    alpha = tl.load(coef_ptr + 1)
    sigma = tl.load(coef_ptr + 2)
    cz = tl.load(coef_ptr + 3)
    cx = tl.load(coef_ptr + 4)
    z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if CFG:
        pu = tl.load(pu_ptr + offs, mask=m, other=0.0).to(tl.float32)
        p = (1.0 + w) * p - w * pu
    if CORRECTOR:  # e = eps_hat (a score estimate: never clipped)
        if PRED == 0:
            e = p
        elif PRED == 1:
            e = alpha * p + sigma * z
        else:
            e = (z - alpha * p) / sigma
    else:  # e = x_hat
        if PRED == 0:
            e = (z - sigma * p) / alpha
        elif PRED == 1:
            e = alpha * z - sigma * p
        else:
            e = p
        if CLIP:
            e = tl.minimum(tl.maximum(e, -1.0), 1.0)
    zn = cz * z + cx * e
    if NOISE:
        cn = tl.load(coef_ptr + 5)
        zn = zn + cn * tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(e_ptr + offs, e, mask=m)
    tl.store(z_ptr + offs, zn, mask=m)


def launch(z: torch.Tensor, pred: torch.Tensor, pred_u: torch.Tensor | None, row: torch.Tensor,
           noise: torch.Tensor | None, *, w: float, prediction: str, corrector: bool, clip: bool,
           out_e: torch.Tensor) -> None:
    if not (z.is_contiguous() and out_e.is_contiguous() and z.dtype == out_e.dtype == torch.float32):
        raise ValueError("diffusion_update: z and out_e must be contiguous fp32")
    pred = pred.contiguous()
    pu = pred_u.contiguous() if pred_u is not None else pred  # unused pointer when CFG is off
    n = noise.contiguous() if noise is not None else z
    row = row.contiguous()
    numel = z.numel()
    grid = (triton.cdiv(numel, BLOCK),)
    _update_kernel[grid](z, pred, pu, n, row, out_e, numel, float(w),
                         PRED=PRED_CODE[prediction], CORRECTOR=bool(corrector), CFG=pred_u is not None,
                         CLIP=bool(clip) and not corrector, NOISE=noise is not None, BLOCK=BLOCK,
                         num_warps=NUM_WARPS)


def compile_configs() -> list[KernelConfig]:
    """Every code branch the samplers launch: per prediction type, the ancestral step (CFG, clip, noise), the DDIM
    step (no CFG, no clip, no noise) and the Langevin corrector (CFG, noise); plus bf16 model outputs."""
    cases = []
    for pred in PRED_CODE:
        cases += [("fp32", pred, False, True, True, True), ("fp32", pred, False, False, False, False),
                  ("fp32", pred, True, True, False, True)]
    cases.append(("bf16", "v", False, True, True, True))
    configs = []
    for pdt, pred, corrector, cfg, clip, noise in cases:
        sig = {"z_ptr": "*fp32", "p_ptr": f"*{pdt}", "pu_ptr": f"*{pdt}", "n_ptr": "*fp32", "coef_ptr": "*fp32",
               "e_ptr": "*fp32", "numel": "i32", "w": "fp32"}
        name = (f"diffusion_update_{pdt}_{pred}_{'corr' if corrector else 'pred'}"
                f"{'_cfg' if cfg else ''}{'_clip' if clip else ''}{'_noise' if noise else ''}")
        constexprs = dict(PRED=PRED_CODE[pred], CORRECTOR=corrector, CFG=cfg, CLIP=clip, NOISE=noise, BLOCK=BLOCK)
        configs.append(KernelConfig(name, _update_kernel, sig, constexprs, num_warps=NUM_WARPS, num_stages=1))
    return configs
