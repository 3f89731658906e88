"""The one dispatch mechanism every op uses.

Each op's public function (vdm_fast/ops/<op>.py) asks `select(SPEC, tensor)` which implementation to run:

- "reference": the plain-PyTorch definition of correct (vdm_fast/reference/<op>.py), called directly so that autograd
  and torch.compile see through it;
- "triton": the op's Triton kernels (vdm_fast/kernels/<op>.py), on CUDA tensors, or on CPU tensors under
  TRITON_INTERPRET=1 (how CI tests every kernel);
- "ext": the compiled extension vdm_fast._C (csrc/), on the device of the tensors.

The fast implementations run inside a `torch.library` custom op that takes the chosen implementation's name as an
argument, so its backward uses the same implementation as its forward, whatever thread autograd runs it on.

The mode comes from `with vdm_fast.backend(...)`, else the environment variable VDM_FAST_BACKEND, else "auto", and is
read each time an op is called (under torch.compile: when the op is traced):

- "auto": CUDA tensors take the fast path; CPU tensors take compiled CPU code where the op has it, else the reference.
  Inputs the fast path does not take (fp64, say) take the reference.
- "reference": the reference everywhere.
- "triton": the fast path even for CPU tensors (Triton kernels through the interpreter; ops whose fast path is the
  compiled extension use it). A forced backend that cannot run raises; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vdm_fast.kernels._common import interpreting

MODES = ("auto", "reference", "triton")
_mode_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("vdm_fast_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run these inputs on this machine."""


def _check_mode(mode: str, source: str) -> str:
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {MODES}, got {mode!r}")
    return mode


def current_mode() -> str:
    """The backend mode in force now: the innermost `vdm_fast.backend(...)`, else VDM_FAST_BACKEND, else "auto"."""
    override = _mode_override.get()
    if override is not None:
        return override
    return _check_mode(os.environ.get("VDM_FAST_BACKEND", "auto") or "auto", "VDM_FAST_BACKEND")


@contextlib.contextmanager
def backend(mode: str) -> Iterator[None]:
    """Force a backend for the ops called inside the block: "auto", "reference" or "triton"."""
    token = _mode_override.set(_check_mode(mode, "backend"))
    try:
        yield
    finally:
        _mode_override.reset(token)


@dataclass(frozen=True)
class OpSpec:
    """What fast code an op has. `ext_devices`: devices with compiled code in vdm_fast._C."""

    name: str
    triton: bool = False
    ext_devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = field(default=(torch.float32, torch.float16, torch.bfloat16))
    min_triton: tuple[int, int] = (3, 2)  # the oldest Triton whose GPU compiler builds the op's kernels

    def __post_init__(self) -> None:
        _SPECS[self.name] = self


# OpSpecs by name: select() hands torch.compile only the name (a str), because torch 2.6's dynamo cannot take a
# dataclass instance as an argument of an assume_constant_result function ("FrozenDataClassVariable is not a constant").
_SPECS: dict[str, OpSpec] = {}


@functools.cache
def triton_available() -> str | None:
    """None if Triton can run here, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"Triton is not installed ({e})"
    return None


def _triton_too_old(spec: OpSpec) -> str | None:
    import triton  # optional dependency: triton_available() said it imports

    return _too_old(triton.__version__, spec.min_triton)


@functools.cache
def _too_old(version: str, minimum: tuple[int, int]) -> str | None:
    # Cached by the version string: parsing it on every op call cost about one eager aten dispatch.
    have = tuple(int(p) for p in version.split(".")[:2])
    if have < minimum:
        return f"its kernels need Triton >= {'.'.join(map(str, minimum))} (installed: {version})"
    return None


def ext_devices() -> tuple[str, ...]:
    from vdm_fast import _ext

    return _ext.devices()


def _fast_impl(spec: OpSpec, device: torch.device) -> tuple[str | None, str]:
    """The fast implementation for this device, or None with the reason there is none."""
    if spec.triton:
        reason = triton_available() or _triton_too_old(spec)
        if reason:
            return None, reason
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return "triton", ""
        if device.type == "cpu":
            return None, "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        return None, f"no Triton kernel for device {device.type!r}"
    if device.type in spec.ext_devices:
        if device.type in ext_devices():
            return "ext", ""
        from vdm_fast import _ext

        return None, _ext.why_not(device.type)
    return None, f"{spec.name} has no fast implementation for device {device.type!r}"


def select(spec: OpSpec, device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation of `spec` runs for inputs on `device` of `dtype` in the current mode."""
    if torch.compiler.is_compiling():
        return _select(spec.name, device, dtype)
    # Eager: the answer memoized by everything it depends on that can change in a process (the mode, and for CPU
    # tensors TRITON_INTERPRET); the uncached chain of calls cost about one eager aten dispatch per op call.
    mode = _mode_override.get()
    if mode is None:
        mode = os.environ.get("VDM_FAST_BACKEND", "auto")
    kind = device.type
    key = (spec.name, mode, kind, dtype, kind == "cpu" and interpreting())
    impl = _SELECTED.get(key)
    if impl is None:
        impl = _select(spec.name, device, dtype)  # raises where it cannot run: nothing is cached then
        _SELECTED[key] = impl
    return impl


_SELECTED: dict[tuple, str] = {}


# torch.compile resolves the dispatch once, when it traces the op, and bakes the answer into the graph.
@torch.compiler.assume_constant_result
def _select(name: str, device: torch.device, dtype: torch.dtype) -> str:
    spec = _SPECS[name]
    mode = current_mode()
    if mode == "reference":
        return "reference"
    impl, reason = _fast_impl(spec, device)
    if mode == "triton":
        if impl is None:
            raise BackendUnavailable(f"VDM_FAST_BACKEND=triton: cannot run {spec.name}: {reason}")
        if dtype not in spec.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in spec.dtypes)
            raise TypeError(f"{spec.name}: the fast path takes {names}, got {dtype}")
        return impl
    # auto: the fast path where there is one for this device and dtype. On CPU only compiled code counts.
    if impl is None or dtype not in spec.dtypes or (device.type == "cpu" and impl != "ext"):
        return "reference"
    return impl


def autograd_apply(function: type[torch.autograd.Function]):
    """`function.apply` for the eager fast paths, minus its Python wrapper where that has nothing to do: the wrapper
    only unwraps functorch's dead wrappers, so the C-level apply runs unless a functorch transform (vmap, grad) is
    active. The wrapper costs about one eager aten dispatch per call."""
    c_apply = super(torch.autograd.Function, function).apply  # torch._C._FunctionBase.apply, bound to the class

    def apply(*args):
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return c_apply(*args)

    return apply


def tensor_key(*tensors) -> tuple:
    """What an op's argument checks and launch plan read of its tensors: shape, strides, dtype, device (None for an
    absent one). AttributeError for a non-tensor: the op's checks then say which argument is wrong."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)


class CallCache:
    """Validated call signatures of one op -> what the op built for them (its checks' results, its launcher).

    An op puts an entry only after its checks passed, so a hit skips them: the key must hold everything they read
    (`tensor_key`, and each scalar with its type, so that True does not hit 1's entry). Bounded: a model makes a
    handful of signatures; a stream of new shapes must not grow it forever."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self.entries: dict[tuple, object] = {}

    def get(self, key: tuple | None):
        """The entry for key, or None (also for a key that cannot be hashed: an unhashable scalar)."""
        if key is None:
            return None
        try:
            return self.entries.get(key)
        except TypeError:
            return None

    def put(self, key: tuple | None, entry):
        if key is not None:
            try:
                hash(key)
            except TypeError:
                return entry
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = entry
        return entry

    def clear(self) -> None:
        self.entries.clear()


def check_impl(spec: OpSpec, impl: str) -> None:
    """Inside an op's custom op: `impl` must name one of its fast implementations (the reference never runs there:
    it is called directly, so that autograd and torch.compile see through it)."""
    fast = (("triton",) if spec.triton else ()) + (("ext",) if spec.ext_devices else ())
    if impl not in fast:
        raise ValueError(f"vdm_fast::{spec.name}: impl must be one of {fast}, got {impl!r}")


def describe(spec: OpSpec, device: str) -> str:
    """For `vdm-fast info`: what `spec` runs for fp32 inputs on `device` in the current mode, or why it cannot."""
    try:
        impl = _select(spec.name, torch.device(device), torch.float32)  # uncached: a report reads the facts now
    except (BackendUnavailable, TypeError) as e:
        return f"unavailable ({e})"
    reason = _fast_impl(spec, torch.device(device))[1] if impl == "reference" and current_mode() == "auto" else ""
    return f"reference ({reason})" if reason else impl
