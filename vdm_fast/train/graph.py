"""`--cuda-graph`: the whole training step (forward, backward, gradient clipping, AdamW) captured in CUDA graphs once
and replayed, so that a step costs the host a few copies and two graph launches instead of a launch per kernel.

PyTorch's whole-network capture recipe (torch.cuda.graph), fitted to the trainer:

- Warm-up: the first WARMUP_STEPS steps of the invocation are real steps of the trajectory, run eagerly (TrainStep)
  on a side stream, as the recipe asks: lazy initialisation (cuBLAS workspaces, Triton compilation, AdamW's state)
  happens outside any capture. Capture waits until AdamW has state (a warm-up step that was skipped as non-finite
  does not count): a state first made inside a capture would be re-zeroed by every replay.
- Static inputs (`StaticInputs`): device buffers made from the first captured batch; each step copies its batch in
  (x, t, noise, the one-hot label and CFG mask) before the replay. Every random draw of a step (t, noise, the label
  drop) is made on the host by the data stream (vdm_fast.data, from (seed, example index)) and copied in, so the
  graphed steps see the examples an eager run sees. Dropout is the one draw inside the graph: it comes from the
  default CUDA generator, which PyTorch registers with every capture (each replay advances its offset), so its masks
  differ from an eager run's (the GPU test runs without dropout). A batch whose shapes or constants differ from the
  captured one is a ValueError naming the input.
- Two graphs, one memory pool, replayed in capture order: (1) `zero_grad(set_to_none=True)` then the micro-steps'
  forward and backward (--grad-accum K: K of them, the first backward allocates the gradients from the graph's pool,
  the others accumulate into them) and `clip_grad_norm_` (no .item(): the clip factor is a device tensor; max_norm
  inf multiplies by exactly 1), giving a static loss and gradient norm; the host reads both (the one synchronisation
  per step the eager loop also makes) and, only when both are finite, replays (2) AdamW's step. One graph could not
  skip a non-finite step without touching AdamW's state (its step count and moments); two keep the eager trainer's
  guard exactly. The gradients stay the graph's tensors from capture on (never set to None after it: a skipped
  step's are overwritten by the next replay).
- AdamW runs with capturable=True and its lr as a device tensor (`make_capturable`) that `step.set_lr` fills before
  each replay, so the warmup schedule changes the lr without re-capture. Checkpoints store plain hyper-parameters
  (`portable_optimizer_state`: lr a float, capturable False): a checkpoint of a graphed run resumes without
  --cuda-graph and the other way round. Capturable AdamW computes the bias correction on the device (fp32) instead
  of in Python floats, so a graphed run equals an eager one to fp32 rounding, not bitwise.
- The EMA update runs eagerly after the optimizer graph (its decay changes at every update in its warm-up; one
  foreach launch). Autocast runs with cache_enabled=False inside the capture, as PyTorch requires.

Refused, one line naming --cuda-graph (`refusal`): a device that is not CUDA; several processes (DDP and --fsdp: their
collectives under capture need NCCL settings not validated here); --precision fp16 (GradScaler.step reads the
overflow flag on the host); --compile (Inductor's own CUDA graphs are `torch.compile(mode="reduce-overhead")`; use one
of the two); --gradient-checkpointing (torch.utils.checkpoint saves and restores the CUDA RNG state, which cannot run
under capture before torch 2.9; checkpointing is for models whose activations do not fit, where the host cost a
graph removes is small anyway).

What is tested where: the refusals, the copy-in, the optimizer-state round trip and the step's orchestration (warm-up,
capture once, replay, the non-finite skip, EMA, the lr schedule) on CPU with a stand-in for the capture that runs the
captured function at each replay (tests/test_train_graph.py); real capture only on a CUDA GPU (the `gpu`-marked test
there: the graphed run's losses and weights against the eager run's).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch

from vdm_fast.train.config import TrainConfig, lr_at
from vdm_fast.train.step import StepResult, TrainStep, set_lr

WARMUP_STEPS = 3  # eager steps on a side stream before capture (the recipe's count; DDP would need 11)


def refusal(cfg: TrainConfig, device: torch.device | str, world_size: int = 1) -> str:
    """Why --cuda-graph cannot run with these options ('' when it can)."""
    kind = torch.device(device).type
    if kind != "cuda":
        return f"CUDA graphs need a CUDA device, this run trains on {kind}"
    if cfg.fsdp or world_size > 1:
        return ("one process only: DDP's and FSDP's collectives under capture are not supported here; train "
                f"without --cuda-graph on {world_size} processes{' (--fsdp)' if cfg.fsdp else ''}")
    if cfg.precision == "fp16":
        return "--precision fp16's GradScaler reads its overflow flag on the host each step; use bf16 or fp32"
    if cfg.compile:
        return "--compile: use one of the two (torch.compile(mode='reduce-overhead') is Inductor's own CUDA graphs)"
    if cfg.gradient_checkpointing:
        return ("--gradient-checkpointing: torch.utils.checkpoint saves the CUDA RNG state, which cannot run under "
                "capture before torch 2.9; checkpointing is for large models, where a graph saves little")
    return ""


def check(cfg: TrainConfig, device: torch.device | str, world_size: int = 1) -> None:
    """A ValueError naming --cuda-graph where it cannot run (see `refusal`)."""
    reason = refusal(cfg, device, world_size)
    if reason:
        raise ValueError(f"--cuda-graph: {reason}")


# ------------------------------------------------------------------------------------------------- static inputs
def host_inputs(step: TrainStep, batch: dict) -> dict:
    """A step's inputs by name (x, t, noise, ...), tensors on the host: what gets copied into the static buffers."""
    (x,), kw = step._inputs(batch, slice(None), device="cpu")
    return {"x": x, **kw}


class StaticInputs:
    """Device buffers a captured graph reads: made from one step's inputs, every later step's copied into them.

    Tensors get a buffer each (same shape and dtype); other values (cond_drop_prob, num_video_frames) are constants
    of the capture and must not change."""

    def __init__(self, inputs: dict, device: torch.device | str):
        self.buffers = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in inputs.items()
                        if isinstance(v, torch.Tensor)}
        self.constants = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        self.copy_in(inputs, step=None)

    def copy_in(self, inputs: dict, step: int | None) -> None:
        at = "" if step is None else f"step {step}: "
        if inputs.keys() != self.buffers.keys() | self.constants.keys():
            raise ValueError(f"--cuda-graph: {at}the step's inputs are {sorted(inputs)}, the captured graph's "
                             f"{sorted(self.buffers.keys() | self.constants.keys())}")
        for k, v in self.constants.items():
            if inputs[k] != v:
                raise ValueError(f"--cuda-graph: {at}{k} is {inputs[k]!r}, the captured graph's {v!r}")
        for k, buf in self.buffers.items():
            v = inputs[k]
            if not isinstance(v, torch.Tensor) or v.shape != buf.shape or v.dtype != buf.dtype:
                got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else repr(v)
                raise ValueError(f"--cuda-graph: {at}{k} has shape and dtype {got}, the captured graph's "
                                 f"{tuple(buf.shape)} {buf.dtype}: a CUDA graph replays fixed shapes (every clip "
                                 f"the same --frames and --resolution, the same local batch)")
        for k, buf in self.buffers.items():
            buf.copy_(inputs[k], non_blocking=True)  # pinned host memory: queued, the host goes on

    def micro(self, part: slice) -> tuple[tuple, dict]:
        """(args, keywords) of the loss over rows `part` of the buffers (views: the graph reads the buffers)."""
        kw = {k: v[part] for k, v in self.buffers.items() if k != "x"}
        return (self.buffers["x"][part],), {**kw, **self.constants}


# ------------------------------------------------------------------------------------------------------ AdamW state
def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Switch an AdamW (fresh or just loaded from a checkpoint) to capturable=True with its lr as a device tensor;
    its step counts move to the device (capturable AdamW keeps them there)."""
    for g in optimizer.param_groups:
        lr = g["lr"]
        g["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        g["capturable"] = True
    for s in optimizer.state.values():
        if "step" in s:
            s["step"] = s["step"].to(device=device, dtype=torch.float32)


def portable_optimizer_state(state: dict) -> dict:
    """optimizer.state_dict() with plain hyper-parameters (tensor lr -> float, capturable -> False): what a run
    without --cuda-graph loads (torch.optim takes the saved groups' options)."""
    if not state:
        return state
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                g[k] = float(v)
        if "capturable" in g:
            g["capturable"] = False
        groups.append(g)
    return {**state, "param_groups": groups}


# -------------------------------------------------------------------------------------------------------- capture
def capture(fn: Callable[[], None], pool) -> Callable[[], None]:
    """Capture fn() (run once, recording) into a CUDA graph on `pool`; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # thread_local: a CUDA call from another thread (the DataLoader's pin-memory thread) does not invalidate the
        # capture, as the default global mode lets it.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            fn()
    for w in caught:  # PyTorch only warns about an empty capture: replaying it would silently do nothing
        if "empty" in str(w.message).lower():
            raise RuntimeError(f"--cuda-graph: the captured graph is empty ({w.message})")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return graph.replay


def new_pool():
    return torch.cuda.graph_pool_handle()


class GraphedStep:
    """`step(batch, step_index) -> StepResult` like `eager` (a TrainStep), with the step captured after warm-up
    (see the module docstring). `capture` and `new_pool` are module functions so that a test can stand in for them."""

    def __init__(self, eager: TrainStep, diffusion):
        self.eager, self.diffusion = eager, diffusion
        self.cfg, self.device = eager.cfg, eager.device
        self.warm = 0  # applied eager steps so far
        self.static: StaticInputs | None = None
        self.replays = 0
        self._fwd_bwd = self._opt_step = None
        self._loss = self._norm = None
        self._side = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    @property
    def captured(self) -> bool:
        return self._fwd_bwd is not None

    def _on_side_stream(self):
        if self._side is None:
            return contextlib.nullcontext()
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._side)

    def __call__(self, batch: dict, step: int) -> StepResult:
        # The step's device current: a capture on another current device (cuda:1 while cuda:0 is current) records
        # nothing, and replay launches on the current device's stream.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return self._step(batch, step)

    def _step(self, batch: dict, step: int) -> StepResult:
        if not self.captured and (self.warm < WARMUP_STEPS or not self.eager.optimizer.state):
            with self._on_side_stream():
                r = self.eager(batch, step)
            if self._side is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._side)
            self.warm += r.applied
            return r
        inputs = host_inputs(self.eager, batch)
        if not self.captured:
            self._capture(inputs)
        else:
            self.static.copy_in(inputs, step + 1)
        set_lr(self.eager.optimizer, lr_at(self.cfg, step))
        self._fwd_bwd()
        self.replays += 1
        loss, norm = self._loss.clone(), self._norm.clone()  # the next replay overwrites the static ones
        ok = bool(torch.isfinite(torch.stack([loss, norm])).all())  # the step's one host sync, as in eager
        if ok:
            self._opt_step()
            if self.eager.ema is not None:
                self.eager.ema.update(self.eager.model)
        return StepResult(loss, float(norm), applied=ok)

    def _capture(self, inputs: dict) -> None:
        eager, cfg = self.eager, self.cfg
        self.static = StaticInputs(inputs, self.device)
        k = cfg.grad_accum
        n = self.static.buffers["x"].shape[0]
        params = list(eager.model.parameters())
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf

        def fwd_bwd() -> None:
            # Before the first backward of the capture: it then allocates the gradients from the graph's pool (the
            # recipe's zero_grad(set_to_none=True)); the captured backward writes them, later ones accumulate.
            eager.optimizer.zero_grad(set_to_none=True)
            losses = []
            for i in range(k):
                args, kw = self.static.micro(slice(i * n // k, (i + 1) * n // k))
                kw.pop("cond_drop_prob", None)  # the CFG drop is in cond_mask (drawn by the data stream)
                with self._autocast():
                    loss = self.diffusion.loss_given(*args, **kw)
                losses.append(loss.detach().float())
                (loss / k if k > 1 else loss).backward()
            self._loss = torch.stack(losses).mean() if k > 1 else losses[0]
            self._norm = torch.nn.utils.clip_grad_norm_(params, clip)

        pool = new_pool()
        self._fwd_bwd = capture(fwd_bwd, pool)
        self._opt_step = capture(eager.optimizer.step, pool)

    def _autocast(self):
        if self.eager.dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: autocast's cache of cast weights must not outlive a capture (PyTorch's rule).
        return torch.autocast(self.device.type, dtype=self.eager.dtype, cache_enabled=False)
