"""The samplers' fused update in one elementwise pass (see vdm_fast/ops/diffusion_update.py for the contract):

    p = (1 + w) pred - w pred_uncond;  e = clip(x_hat(z, p)) or eps_hat(z, p);
    z <- c_z z + c_x e + c_h1 h[0] + c_h2 h[1] + c_n noise;  h[1] <- h[0], h[0] <- e;  e_out <- e.

Definition of correct: vdm_fast/reference/diffusion_update.py. The coefficients are one table row read inside the
kernel (no host sync, CUDA-graph friendly: the row is a device tensor the graph picks with a device step counter).
Layout: z, e_out, noise and the history (K, numel) are flat contiguous fp32 buffers the launcher is given (the op
copies strided ones); pred / pred_uncond are fp32, fp16 or bf16, made contiguous. Each element is read before it is
written by the same program, so the in-place updates of z and the history are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vdm_fast.kernels._common import TRITON_DTYPE_NAMES, cdiv
from vdm_fast.kernels._compile import KernelConfig

BLOCK = 1024
NUM_WARPS = 4
PRED_CODE = {"eps": 0, "v": 1, "x": 2}


@triton.jit
def _update_kernel(z_ptr, p_ptr, pu_ptr, n_ptr, h_ptr, coef_ptr, e_ptr, numel, w,
                   PRED: tl.constexpr, CORRECTOR: tl.constexpr, CFG: tl.constexpr, CLIP: tl.constexpr,
                   NOISE: tl.constexpr, HIST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    # Row layout [logsnr, alpha, sigma, c_z, c_x, c_n, c_h1, c_h2] (vdm_fast.diffusion.samplers).
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
    if HIST >= 1:
        h1 = tl.load(h_ptr + offs, mask=m, other=0.0)
        zn = zn + tl.load(coef_ptr + 6) * h1
        if HIST == 2:
            h2_ptr = h_ptr + numel.to(tl.int64)
            zn = zn + tl.load(coef_ptr + 7) * tl.load(h2_ptr + offs, mask=m, other=0.0)
            tl.store(h2_ptr + offs, h1, mask=m)
        tl.store(h_ptr + offs, e, mask=m)
    if NOISE:
        cn = tl.load(coef_ptr + 5)
        zn = zn + cn * tl.load(n_ptr + offs, mask=m, other=0.0)
    tl.store(e_ptr + offs, e, mask=m)
    tl.store(z_ptr + offs, zn, mask=m)


def launch(z: torch.Tensor, pred: torch.Tensor, pred_u: torch.Tensor | None, coef: torch.Tensor,
           noise: torch.Tensor | None, history: torch.Tensor | None, e_out: torch.Tensor, *, w: float,
           prediction: str, corrector: bool, clip: bool) -> None:
    """z, e_out (and history) contiguous fp32, updated in place; the caller holds the device guard."""
    for name, t in (("z", z), ("e_out", e_out), ("history", history)):
        if t is not None and not (t.is_contiguous() and t.dtype == torch.float32):
            raise ValueError(f"diffusion_update kernel: {name} must be contiguous fp32")
    pred = pred.contiguous()
    pu = pred_u.contiguous() if pred_u is not None else pred  # unused pointer when CFG is off
    n = noise.contiguous().float() if noise is not None else z
    hist = history if history is not None and history.shape[0] > 0 else None
    coef = coef.contiguous().float()
    numel = z.numel()
    _update_kernel[(cdiv(numel, BLOCK),)](
        z, pred, pu, n, hist if hist is not None else z, coef, e_out, numel, float(w),
        PRED=PRED_CODE[prediction], CORRECTOR=bool(corrector), CFG=pred_u is not None,
        CLIP=bool(clip) and not corrector, NOISE=noise is not None, HIST=hist.shape[0] if hist is not None else 0,
        BLOCK=BLOCK, num_warps=NUM_WARPS)


def compile_configs() -> list[KernelConfig]:
    """Every code branch the samplers launch: per prediction type, the ancestral step (CFG, clip, noise), the DDIM
    step (no CFG, no clip, no noise), the Langevin corrector (CFG, noise), the multistep solvers (2M: one history
    buffer; 2M SDE: history and noise; 3M: two history buffers, CFG, clip); plus bf16 and fp16 model outputs."""
    cases = []
    for pred in PRED_CODE:
        cases += [(torch.float32, pred, False, True, True, True, 0), (torch.float32, pred, False, False, False, False, 0),
                  (torch.float32, pred, True, True, False, True, 0), (torch.float32, pred, False, False, True, False, 1),
                  (torch.float32, pred, False, True, True, True, 1), (torch.float32, pred, False, True, True, False, 2)]
    cases += [(torch.bfloat16, "v", False, True, True, True, 0), (torch.bfloat16, "v", False, True, True, False, 1),
              (torch.float16, "eps", False, True, True, False, 2)]
    configs = []
    for pdt, pred, corrector, cfg, clip, noise, hist in cases:
        pname = TRITON_DTYPE_NAMES[pdt]
        sig = {"z_ptr": "*fp32", "p_ptr": f"*{pname}", "pu_ptr": f"*{pname}", "n_ptr": "*fp32", "h_ptr": "*fp32",
               "coef_ptr": "*fp32", "e_ptr": "*fp32", "numel": "i32", "w": "fp32"}
        name = (f"diffusion_update_{pname}_{pred}_{'corr' if corrector else 'pred'}"
                f"{'_cfg' if cfg else ''}{'_clip' if clip else ''}{'_noise' if noise else ''}_hist{hist}")
        constexprs = dict(PRED=PRED_CODE[pred], CORRECTOR=corrector, CFG=cfg, CLIP=clip, NOISE=noise, HIST=hist,
                          BLOCK=BLOCK)
        configs.append(KernelConfig(name, _update_kernel, sig, constexprs, num_warps=NUM_WARPS, num_stages=1))
    return configs
