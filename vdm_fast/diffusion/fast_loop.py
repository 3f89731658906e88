"""The sampling loop: eager, or each step captured once in a CUDA graph and replayed.

Both loops run the same step body on the same buffers, so they draw the same noise in the same order:

- The schedule is computed once (fp64, vdm_fast/diffusion/samplers.py) and copied to the device before the loop as
  two (steps, 8) tables (predictor rows, corrector rows). The eager loop reads row i as a view (no copy, no sync);
  the graph reads it with index_select on a device step counter that the graph itself increments.
- The noise of step i is drawn by ONE `noise.normal_(generator=...)` into a (K, *shape) buffer before the step, K =
  the draws a step needs: per model call, a replacement noise for z^a when frames are given; a fresh noise (ancestral,
  pc, dpmpp_2m_sde); a Langevin noise per corrector step. Outside the graph, so a user's generator drives both loops.
- The update is one fused kernel on CUDA (vdm_fast.ops.diffusion_update) reading its coefficients from the row; the
  multistep solvers' previous x_hat live in a static (K, *shape) history buffer the kernel reads and shifts, so their
  steps (whose order changes only through the row's coefficients) replay the same graph.
- No .item(), no host sync, no host-to-device copy per step: the Python loop only queues work (and moves the
  progress bar).

What is captured (cuda_graph=True, the default on CUDA): model call(s) (with classifier-free guidance: one call of
batch 2B), replacement of given frames, update, Langevin correctors. Steps 0 and 1 run eagerly first on a side
stream (warm-up: lazy initialisation, Triton compilation, cuBLAS workspaces), then step 2 is captured and replayed for
steps 2..N-2; the last step (no corrector, its x_hat is the output) runs eagerly. Falls back to the eager loop, with
the reason in GaussianDiffusion.last_sample_info (and a warning when cuda_graph=True was asked for):
- not a CUDA device;
- reconstruction guidance or super-resolution (x_lowres): they differentiate through the model each step, and a
  captured backward (make_graphed_callables-style) was not validated on a GPU in this project yet;
- capture raised (a model with host syncs, data-dependent shapes, CPU tensors, ...), or captured nothing (PyTorch only
  warns about an empty graph): the buffers are restored and the remaining steps run eagerly.
Multi-GPU safety: warm-up, capture and replay run under a device guard for the samples' device (a capture on another
current device would record nothing), capture uses capture_error_mode="thread_local" (CUDA calls from other threads
do not invalidate it), and the update's launch has its own guard. The graph assumes the model is a pure function of
its inputs (no state changing from call to call).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from vdm_fast import _checks
from vdm_fast._progress import progress_bar
from vdm_fast.diffusion import guidance, samplers
from vdm_fast.diffusion.samplers import ALPHA, LOGSNR, SIGMA
from vdm_fast.kernels._common import device_guard

WARMUP_STEPS = 2
# Upper bounds of sample()'s scalars: far beyond any useful value, and small enough that the fp32 coefficients and
# the samples stay finite (guidance_weight 1e308 overflows (1 + w) pred in fp32; delta > 1 makes Langevin diverge).
MAX_GUIDANCE_WEIGHT = 1e3
MAX_LANGEVIN_DELTA = 1.0
MAX_W_R = 1e4
# A sampling run's length: the coefficient tables are (steps, 8) and the loop is Python; far beyond any use.
MAX_STEPS = 100_000
MAX_CORRECTOR_STEPS = 100


@dataclass
class Plan:
    model: object
    prediction: str
    shape: tuple[int, ...]
    device: torch.device
    steps: int
    sampler: str
    timesteps: str
    corrector_steps: int
    clip: bool
    w: float
    cond: torch.Tensor | None
    cfg_mask: torch.Tensor | None
    frames: guidance.Frames | None
    lowres: torch.Tensor | None
    w_r: float
    pred_table: torch.Tensor
    corr_table: torch.Tensor
    generator: torch.Generator | None
    progress: bool
    cuda_graph: bool | None
    model_kw: dict = field(default_factory=dict)

    @property
    def gradient_guidance(self) -> bool:
        return self.lowres is not None or (self.frames is not None and self.frames.mode == "reconstruction")

    @property
    def draws_per_call(self) -> int:
        return 1 if self.frames is not None else 0

    @property
    def noise_slots(self) -> int:
        noisy = 1 if self.sampler in samplers.NOISY else 0
        return self.draws_per_call + noisy + self.corrector_steps * (self.draws_per_call + 1)

    @property
    def history(self) -> int:
        return samplers.HISTORY[self.sampler]


def make_plan(diffusion, shape, *, steps, sampler, timesteps, gamma, corrector_steps, langevin_delta, cond,
              guidance_weight, x_a, a_mask, x_lowres, conditioning, w_r, clip, generator, progress, cuda_graph, device,
              model_kw) -> Plan:
    """Validate sample()'s arguments (ValueError / TypeError naming the argument) and build the device tables."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (B, C, T, H, W), got {shape!r}")
    shape = tuple(shape)
    _checks.positive_int(steps, "steps")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS}, got {steps}")
    sampler = samplers.check_sampler(sampler)
    timesteps = samplers.check_timesteps(timesteps, sampler)
    gamma = _checks.number(gamma, "gamma", 0.0, 1.0)
    if corrector_steps is None:  # pc's default: one Langevin step per step (the CLI's default too)
        corrector_steps = 1 if sampler == "pc" else 0
    _checks.positive_int(corrector_steps, "corrector_steps", minimum=0)
    if corrector_steps > MAX_CORRECTOR_STEPS:
        raise ValueError(f"corrector_steps must be <= {MAX_CORRECTOR_STEPS}, got {corrector_steps}")
    if sampler == "pc" and corrector_steps < 1:
        raise ValueError("corrector_steps must be >= 1 with sampler='pc' (its Langevin steps per step)")
    if sampler != "pc" and corrector_steps:
        raise ValueError(f"corrector_steps must be 0 with sampler={sampler!r} (use sampler='pc')")
    langevin_delta = _checks.number(langevin_delta, "langevin_delta", 0.0, MAX_LANGEVIN_DELTA, lo_open=True)
    w = _checks.number(guidance_weight, "guidance_weight", -1.0, MAX_GUIDANCE_WEIGHT)
    w_r = _checks.number(w_r, "w_r", 0.0, MAX_W_R)
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool or None, got {type(cuda_graph).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but samples are drawn on {device}")
    conditioning = guidance.check_conditioning(conditioning)
    B = shape[0]
    cfg_mask = None
    if cond is not None:
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"cond must be a torch.Tensor, got {type(cond).__name__}")
        if cond.dim() == 0 or cond.shape[0] != B:
            raise ValueError(f"cond must have batch size {B} (first dim), got shape {tuple(cond.shape)}")
        _checks.finite(cond, "cond")
        cond = cond.to(device)
        if w != 0.0:
            cfg_mask = torch.arange(2 * B, device=device) < B
    elif w != 0.0:
        raise ValueError(f"guidance_weight={w} needs cond (classifier-free guidance mixes cond and no cond)")
    frames = guidance.make_frames(x_a, a_mask, shape, conditioning, device)
    lowres = guidance.check_lowres(x_lowres, shape, device)
    if lowres is not None and conditioning == "replacement":
        raise ValueError("conditioning='replacement' cannot condition on x_lowres: super-resolution works by "
                         "reconstruction guidance (conditioning='reconstruction')")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if "cond_mask" in model_kw:
        raise TypeError("cond_mask is set by sample() itself (classifier-free guidance marks the unconditional "
                        "half); pass cond and guidance_weight instead")
    sched = diffusion.schedule
    pred_table = samplers.predictor_table(sched, steps, sampler, gamma, timesteps)
    corr_table = samplers.corrector_table(sched, steps, langevin_delta, timesteps)
    return Plan(
        model=diffusion.model, prediction=diffusion.prediction, shape=shape, device=device, steps=steps,
        sampler=sampler, timesteps=timesteps, corrector_steps=corrector_steps, clip=clip, w=w, cond=cond,
        cfg_mask=cfg_mask, frames=frames, lowres=lowres, w_r=w_r, pred_table=pred_table.to(device, torch.float32),
        corr_table=corr_table.to(device, torch.float32), generator=generator, progress=progress,
        cuda_graph=cuda_graph, model_kw=model_kw)


class Stepper:
    """The step body shared by the eager and the graph loop; it owns the buffers (z, noise, x_hat, eps)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.first_call = True
        p = plan
        self.z = torch.randn(p.shape, generator=p.generator, device=p.device, dtype=torch.float32)
        self.noise = torch.empty((p.noise_slots, *p.shape), device=p.device, dtype=torch.float32)
        self.x_hat = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
        self.eps = torch.zeros(p.shape, device=p.device, dtype=torch.float32) if p.corrector_steps else None
        # The multistep solvers' previous x_hat, newest first: static, so a replayed graph reads and shifts it. Zero
        # at the start: the first rows' history coefficients are 0 (order 1), and 0 * 0 stays 0.
        self.history = (torch.zeros((p.history, *p.shape), device=p.device, dtype=torch.float32)
                        if p.history else None)

    def state(self) -> list[torch.Tensor | None]:
        """Copies of the buffers a step changes (restored when a capture fails part-way)."""
        return [t.clone() if t is not None else None for t in (self.z, self.x_hat, self.eps, self.history)]

    def restore(self, state: list[torch.Tensor | None]) -> None:
        for dst, src in zip((self.z, self.x_hat, self.eps, self.history), state):
            if dst is not None:
                dst.copy_(src)

    def draw(self) -> None:
        if self.noise.shape[0]:
            self.noise.normal_(generator=self.plan.generator)

    def step(self, row_p: torch.Tensor, row_c: torch.Tensor, final: bool) -> None:
        p = self.plan
        slot = self._call_and_update(row_p, False, 0, p.sampler in samplers.NOISY)
        if not final:
            for _ in range(p.corrector_steps):
                slot = self._call_and_update(row_c, True, slot, True)

    def _call_and_update(self, row: torch.Tensor, corrector: bool, slot: int, noisy: bool) -> int:
        p, z = self.plan, self.z
        alpha, sigma = row[ALPHA], row[SIGMA]
        if p.frames is not None:
            guidance.replace_frames_(z, p.frames, alpha, sigma, self.noise[slot])
            slot += 1
        logsnr = row[LOGSNR].expand(p.shape[0]).contiguous()
        out_e = self.eps if corrector else self.x_hat
        hist = None if corrector else self.history
        noise = None
        if noisy:
            noise, slot = self.noise[slot], slot + 1
        try:
            if p.gradient_guidance:
                pred = guidance.guided_x(p.model, z, logsnr, alpha, sigma, prediction=p.prediction, cond=p.cond,
                                         w=p.w, cfg_mask=p.cfg_mask, model_kw=p.model_kw, frames=p.frames,
                                         lowres=p.lowres, w_r=p.w_r)
                pred_u, w, prediction = None, 0.0, "x"
            else:
                pred, pred_u = guidance.predict(p.model, z, logsnr, p.cond, p.w, p.cfg_mask, p.model_kw)
                w, prediction = p.w, p.prediction
        except (ValueError, TypeError) as e:
            # The model only ever sees z of the `shape` asked for: what it refuses on the first call is that shape.
            if not self.first_call or str(e).startswith("model returned"):
                raise
            raise type(e)(f"shape {p.shape}: the model refused a sample of this shape: {e}") from e
        finally:
            self.first_call = False
        samplers.update_(z, pred, pred_u, row, noise, w=w, prediction=prediction, corrector=corrector, clip=p.clip,
                         out_e=out_e, history=hist)
        return slot

    def result(self) -> torch.Tensor:
        out = self.x_hat.clone()
        if self.plan.frames is not None:
            out = torch.where(self.plan.frames.mask, self.plan.frames.x_full, out)
        return out


def _progress_bar(plan: Plan):
    # A bar on a terminal, a plain line every few seconds in a batch job's log.
    return progress_bar(plan.steps, "sampling", enabled=plan.progress)


def _graph_reason(plan: Plan) -> str:
    """Why this plan runs eagerly ('' when the graph loop can run)."""
    if plan.device.type != "cuda":
        return f"CUDA graphs need a CUDA device (sampling on {plan.device.type})"
    if plan.gradient_guidance:
        return ("reconstruction guidance / super-resolution differentiate through the model every step "
                "(autograd): run eagerly")
    if plan.steps <= WARMUP_STEPS + 1:
        return f"{plan.steps} steps: too few to capture (the first {WARMUP_STEPS} warm up, the last runs eagerly)"
    return ""


def run(plan: Plan) -> tuple[torch.Tensor, dict]:
    """Run the sampler; returns (x, info) with info = {"cuda_graph": bool, "reason": str, "steps": int}."""
    want = plan.device.type == "cuda" if plan.cuda_graph is None else plan.cuda_graph
    reason = _graph_reason(plan) if want else "cuda_graph=False"
    if want and reason and plan.cuda_graph:
        warnings.warn(f"vdm_fast sample: cuda_graph=True falls back to the eager loop: {reason}", stacklevel=3)
    with torch.no_grad():
        stepper = Stepper(plan)
        bar = _progress_bar(plan)
        try:
            if want and not reason:
                captured, reason = _run_graph(stepper, plan, bar)
                if not captured and plan.cuda_graph:
                    warnings.warn(f"vdm_fast sample: CUDA graph capture failed, ran eagerly: {reason}", stacklevel=3)
            else:
                captured = False
                _run_eager(stepper, plan, bar, 0)
        finally:
            bar.close()
        out = stepper.result()
    return out, {"cuda_graph": captured, "reason": reason, "steps": plan.steps}


def _run_eager(stepper: Stepper, plan: Plan, bar, start: int) -> None:
    n = plan.steps
    for i in range(start, n):
        stepper.draw()
        stepper.step(plan.pred_table[i], plan.corr_table[i], final=i == n - 1)
        bar.update(1)


def _run_graph(stepper: Stepper, plan: Plan, bar) -> tuple[bool, str]:
    """Warm up, capture one step, replay it; every CUDA call under a guard for the plan's device (on a machine with
    several GPUs a capture on the current device instead of the tensors' one records nothing)."""
    with device_guard(stepper.z):
        return _run_graph_on_device(stepper, plan, bar)


def _run_graph_on_device(stepper: Stepper, plan: Plan, bar) -> tuple[bool, str]:
    n = plan.steps
    side = torch.cuda.Stream(device=plan.device)
    side.wait_stream(torch.cuda.current_stream(plan.device))
    with torch.cuda.stream(side):
        for i in range(WARMUP_STEPS):
            stepper.draw()
            stepper.step(plan.pred_table[i], plan.corr_table[i], final=False)
            bar.update(1)
    torch.cuda.current_stream(plan.device).wait_stream(side)
    step_dev = torch.full((1,), WARMUP_STEPS, dtype=torch.int64, device=plan.device)
    saved = stepper.state()
    graph = torch.cuda.CUDAGraph()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # thread_local: a CUDA call from another thread (a logger, a pin-memory worker) does not invalidate the
            # capture, as the default global mode lets it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                row_p = plan.pred_table.index_select(0, step_dev)[0]
                row_c = plan.corr_table.index_select(0, step_dev)[0]
                stepper.step(row_p, row_c, final=False)
                step_dev.add_(1)
        for w in caught:  # PyTorch only warns about an empty capture: replaying it would silently do nothing
            if "empty" in str(w.message).lower():
                raise RuntimeError(f"the captured graph is empty ({w.message})")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        failure = ""
    except Exception as e:  # capture can fail for models that sync or branch on data: finish eagerly
        failure = f"capture failed ({type(e).__name__}: {str(e)[:300]})"
    # A model split over processes (vdm_fast.parallel) replays on every rank or on none: its collectives must match.
    agree = getattr(plan.model, "all_ranks_ok", None)
    if agree is not None and not agree(not failure):
        failure = failure or "another rank's capture failed: every rank finishes eagerly"
    if failure:
        del graph
        torch.cuda.synchronize(plan.device)
        stepper.restore(saved)
        _run_eager(stepper, plan, bar, WARMUP_STEPS)
        return False, failure
    for _ in range(WARMUP_STEPS, n - 1):
        stepper.draw()
        graph.replay()
        bar.update(1)
    stepper.draw()
    stepper.step(plan.pred_table[n - 1], plan.corr_table[n - 1], final=True)
    bar.update(1)
    return True, ""
