"""TrainConfig: every option of a training run, checked when it is made, and the resume policy.

A config is checked as a whole up front: a bad value raises one ValueError (TypeError for a wrong type) that names the
command-line option (`--lr`, `--set base_channels`) and says what is allowed, before any data is read or any model is
built. Non-finite numbers are always bad input.

Resume policy (`merge_resumed`): a resumed run takes its saved options, with the options *given* on this invocation
on top. Which options were given is an explicit argument (the command line knows; a Python caller passing a whole
TrainConfig gives all of them). Options that fix the model or the data layout (FIXED_ON_RESUME) must not change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field

from vdm_fast.diffusion import PREDICTIONS, SAMPLERS
from vdm_fast.model import PRESETS, Unet3DConfig, preset_config

# The fast sampler when the diffusion package has it (fewer model calls for the same quality), else ancestral.
DEFAULT_SAMPLER = "dpmpp_2m" if "dpmpp_2m" in SAMPLERS else "ancestral"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Options that define the model or the data layout: a resumed run must keep them.
FIXED_ON_RESUME = ("preset", "overrides", "prediction", "frames", "resolution", "channels", "image_frames",
                   "class_cond")
# Options that name this invocation only: never taken from the saved config.
# The process layout (--frame-parallel) is one too: a run resumes under another launch to rounding, as with DDP.
PER_INVOCATION = ("out", "resume", "overwrite", "resume_from_last_good", "reset_optimizer", "frame_parallel",
                  "frame_parallel_size")


@dataclass
class TrainConfig:
    out: str = "runs/demo"
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # Unet3DConfig fields over the preset's
    prediction: str = "v"
    data: str = "bouncing"
    frames: int | None = None  # None: the preset's num_frames
    resolution: int | None = None  # None: the preset's image_size
    frameskip: int = 1
    channels: int = 3
    skip_short: bool = False
    skip_bad_data: int = 0  # a clip that fails to read is replaced by the next valid one, for up to N bad files
    image_frames: int = 0  # joint training: K independent images after the video frames
    image_data: str | None = None  # folder of images for them (default: frames of other training videos)
    class_cond: bool = False  # condition on the dataset's label (bouncing: the shape kind)
    cond_drop_prob: float = 0.1  # classifier-free guidance: drop the label this often (with class_cond)
    batch_size: int = 8  # global, split over processes (and over --grad-accum micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step: the same update as one K times larger batch
    steps: int = 2000
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0: off
    ema_decay: float = 0.999  # 0: no EMA
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp16: autocast with a GradScaler
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (Inductor)
    fsdp: bool = False  # shard weights, gradients, AdamW state and EMA over the processes (FSDP2) instead of DDP
    cuda_graph: bool = False  # capture the whole training step in CUDA graphs and replay it (train.graph)
    frame_parallel: bool = False  # split each clip's frames over processes (train.frame_parallel)
    frame_parallel_size: int = 0  # processes per clip with frame_parallel (0: all); the others are replicas
    max_nonfinite_steps: int = 3  # stop after this many non-finite steps in a row
    seed: int = 0
    workers: int = 2
    threads: int = 0  # torch CPU threads per process (0: torch's default)
    device: str = "auto"
    ddp_timeout: float = 300.0  # seconds a collective may wait for the other processes
    log_every: int = 10
    save_every: int = 500
    keep: int = 3  # 0: all
    sample_every: int = 500  # 0: never (also at the end when > 0)
    sample_num: int = 4
    sample_steps: int = 64
    sampler: str = DEFAULT_SAMPLER
    resume: bool = False
    resume_from_last_good: bool = False
    reset_optimizer: bool = False
    overwrite: bool = False
    progress: bool = True  # a bar on a terminal; else (or False) a plain line every progress_every seconds
    progress_every: float = 30.0

    def __post_init__(self):
        self.betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        self.overrides = dict(self.overrides)
        check(self)


def option(name: str) -> str:
    """The command-line spelling of a TrainConfig field."""
    return {"overrides": "--set", "progress": "--no-progress"}.get(name, "--" + name.replace("_", "-"))


def did_you_mean(value: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == str(value).lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _int(cfg, name: str, minimum: int, *, optional: bool = False, meaning: str = "") -> None:
    v = getattr(cfg, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{option(name)} must be an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"{option(name)} must be >= {minimum}{meaning}, got {v}")


def _number(cfg, name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = True) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{option(name)} must be a number, got {v!r}")
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lo_s, hi_s = ("(" if lo_open else "[") + f"{lo:g}", f"{hi:g}" + (")" if hi_open else "]")
        raise ValueError(f"{option(name)} must be a finite number in {lo_s}, {hi_s}, got {v!r}")


def _choice(cfg, name: str, choices) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise ValueError(f"{option(name)} must be one of {', '.join(choices)}; got {v!r}{did_you_mean(v, choices)}")


def check(cfg: TrainConfig) -> None:
    """Every option's range, then the model the options describe (so a bad --set fails here, not mid-build)."""
    _choice(cfg, "preset", tuple(PRESETS))
    _choice(cfg, "prediction", PREDICTIONS)
    _choice(cfg, "precision", PRECISIONS)
    _choice(cfg, "sampler", SAMPLERS)
    if not isinstance(cfg.device, str) or not (cfg.device in ("auto", "cpu", "cuda") or (
            cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    for name in ("batch_size", "grad_accum", "steps", "frameskip", "log_every", "save_every", "sample_num",
                 "sample_steps", "max_nonfinite_steps"):
        _int(cfg, name, 1)
    for name in ("warmup_steps", "image_frames", "workers", "threads", "seed", "skip_bad_data"):
        _int(cfg, name, 0)
    _int(cfg, "keep", 0, meaning=" (0 keeps every checkpoint)")
    _int(cfg, "sample_every", 0, meaning=" (0: never)")
    _int(cfg, "frames", 1, optional=True)
    _int(cfg, "resolution", 1, optional=True)
    if cfg.channels not in (1, 3) or isinstance(cfg.channels, bool):
        raise ValueError(f"--channels must be 1 or 3, got {cfg.channels!r}")
    _number(cfg, "lr", 0.0, lo_open=True)
    _number(cfg, "weight_decay", 0.0)
    _number(cfg, "grad_clip", 0.0)
    _number(cfg, "ema_decay", 0.0, 1.0)
    _number(cfg, "cond_drop_prob", 0.0, 1.0)
    _number(cfg, "ddp_timeout", 0.0, lo_open=True)
    _number(cfg, "progress_every", 0.0, lo_open=True)
    if not (isinstance(cfg.betas, tuple) and len(cfg.betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 <= b < 1
            for b in cfg.betas)):
        raise ValueError(f"--betas must be two finite numbers in [0, 1), e.g. 0.9,0.99; got {cfg.betas!r}")
    for name in ("fsdp", "cuda_graph", "compile"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{option(name)} is True or False, got {getattr(cfg, name)!r}")
    _check_frame_parallel(cfg)
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by --grad-accum ({cfg.grad_accum})")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or start it afresh")
    if cfg.resume_from_last_good and not cfg.resume:
        raise ValueError("--resume-from-last-good needs --resume")
    model_config(cfg)


def _check_frame_parallel(cfg: TrainConfig) -> None:
    """--frame-parallel's combinations (what the launch must give is checked by train.frame_parallel)."""
    if not isinstance(cfg.frame_parallel, bool):
        raise TypeError(f"--frame-parallel is True or False, got {cfg.frame_parallel!r}")
    _int(cfg, "frame_parallel_size", 0, meaning=" (0: all processes)")
    if cfg.frame_parallel_size and not cfg.frame_parallel:
        raise ValueError("--frame-parallel-size is for --frame-parallel only")
    if cfg.frame_parallel and cfg.fsdp:
        raise ValueError("--frame-parallel with --fsdp: FSDP shards the weights over all processes, which the frame "
                         "groups would need as a 2-D mesh (not built); use one of them")
    if cfg.frame_parallel and cfg.compile:
        raise ValueError("--frame-parallel with --compile: the frame-parallel wrapper's collectives are not compiled; "
                         "use one of them")


# ------------------------------------------------------------------------------------------------------- the model
_FIELDS = {f.name: f for f in dataclasses.fields(Unet3DConfig)}


def _check_override(key: str, value) -> object:
    """One --set KEY=VALUE against Unet3DConfig's field types (annotations are strings: `from __future__`)."""
    if key not in _FIELDS:
        raise ValueError(f"--set {key}: not a Unet3DConfig field{did_you_mean(key, _FIELDS)}; valid keys: "
                         f"{', '.join(_FIELDS)}")
    kind = str(_FIELDS[key].type).replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if value is None and optional:
        return None
    shown = f"--set {key}={value!r}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{shown}: {key} is True or False")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{shown}: {key} must be an integer{' or None' if optional else ''}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{shown}: {key} must be a finite number")
        value = float(value)
    elif kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"{shown}: {key} is a list of integers, written with commas: --set {key}=8,16 "
                             f"(one value: --set {key}={value},)")
        value = tuple(value)
    return value


def model_config(cfg: TrainConfig, num_classes: int | None = None) -> Unet3DConfig:
    """The Unet3DConfig the options describe: the preset, --set on top, then the clip layout and channels."""
    overrides = {str(k): _check_override(str(k), v) for k, v in cfg.overrides.items()}
    overrides["num_frames"], overrides["image_size"] = layout(cfg)
    overrides.setdefault("in_channels", cfg.channels)
    if num_classes is not None and cfg.class_cond:
        if num_classes < 1:
            raise ValueError(f"--class-cond: the data {cfg.data!r} has no labels")
        overrides["cond_dim"] = num_classes
    try:
        return preset_config(cfg.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--preset {cfg.preset} with --set/--frames/--resolution: {e}") from None


def layout(cfg: TrainConfig) -> tuple[int, int]:
    """(frames, resolution) of the training clips: the options, else the overrides, else the preset's."""
    base = PRESETS[cfg.preset]
    frames = cfg.frames or cfg.overrides.get("num_frames") or base.get("num_frames", Unet3DConfig.num_frames)
    size = cfg.resolution or cfg.overrides.get("image_size") or base.get("image_size", Unet3DConfig.image_size)
    return frames, size


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then constant (step = optimizer steps done)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


# ------------------------------------------------------------------------------------------------------ resume policy
def merge_resumed(saved: dict, cfg: TrainConfig, given: Collection[str] | None = None) -> TrainConfig:
    """The config of a resumed run: the saved one, with the options in `given` taken from `cfg` (all of cfg's when
    `given` is None, as in `train(TrainConfig(..., resume=True))`). Options that define the model or the data layout
    must not change."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = set(names) if given is None else set(given)
    merged = dict(saved)
    for name in names:
        new = getattr(cfg, name)
        if name in PER_INVOCATION:
            merged[name] = new
        elif name in given:
            old = saved.get(name, new)
            if name in FIXED_ON_RESUME and _norm(old) != _norm(new):
                raise ValueError(f"--resume: {option(name)} was {old!r} in the saved run, got {new!r}; a resumed run "
                                 "keeps its model and data layout")
            merged[name] = new
    return TrainConfig(**{k: v for k, v in merged.items() if k in names})


def _norm(v):
    return json.loads(json.dumps(v))
