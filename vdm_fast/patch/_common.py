"""What every adapter shares: source fingerprints, the checks that make rebinding a forward safe, and the
rebinding itself (undone by vdm_fast.unpatch).

A patched module keeps its class, parameters and buffers: only an instance attribute `forward` is added (and a
marker), so state_dicts, .to(), deepcopy and pickling see the same module.

A fused forward skips calling the modules it fuses (a GroupNorm, a SiLU). Whatever users wrap around those modules
after patching (forward or backward hooks, global module hooks, accelerate's cpu_offload / device hooks and diffusers'
group offloading and layerwise casting, which replace a module's `forward`) would then be skipped silently. So every
fused forward asks `bypassable(...)` at call time and, when any fused module is wrapped, runs the original forward,
which calls those modules and their wrappers.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _torch_module  # the global hook registries live there

MARK = "_vdm_fast_patched"  # instance attribute: the kind of patch applied to this module's forward
_OWN = "_vdm_fast_forward"  # instance attribute: the forward rebind() set (a wrapper replaces `forward`, not this)


@functools.lru_cache(maxsize=256)
def fingerprint(fn: Callable) -> str:
    """A short hash of fn's source structure (AST node types and names, docstring, comments and formatting left
    out). An adapter that re-implements a forward is proven only for the fingerprints it was checked against: a
    release that changes that forward gets a new fingerprint and is left alone."""
    try:
        return fingerprint_source(inspect.getsource(fn))
    except (OSError, TypeError, SyntaxError):
        return "unavailable"


def fingerprint_source(source: str) -> str:
    """fingerprint() of one function's source text."""
    tree = ast.parse(textwrap.dedent(source))
    func = tree.body[0]
    body = getattr(func, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body.pop(0)  # the docstring
    # Decorators and type annotations do not change what the body computes (Optional[int] vs int | None).
    if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        func.decorator_list, func.returns = [], None
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
    tokens = []
    for node in ast.walk(tree):
        tokens.append(type(node).__name__)
        for name in ("id", "attr", "arg", "name", "asname"):
            value = getattr(node, name, None)
            if isinstance(value, str):
                tokens.append(value)
        if isinstance(node, ast.Constant):
            tokens.append(repr(node.value))
    return hashlib.sha256("\x00".join(tokens).encode()).hexdigest()[:16]


def occurrences(model: nn.Module) -> Counter:
    """id(module) -> how many paths reach it in model (more than one: the module is shared)."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(f"_global{n}" for n in _HOOKS)  # torch.nn.modules.module's registries for every module


def _has_hooks(module: nn.Module) -> bool:
    return any(len(getattr(module, n, None) or {}) for n in _HOOKS)


def _global_hooks() -> bool:
    return any(len(getattr(_torch_module, n, None) or {}) for n in _GLOBAL_HOOKS)


def bypassable(*modules: nn.Module) -> bool:
    """At call time: True if a fused forward may skip calling `modules`, i.e. calling each would run exactly its
    class's forward (or the one rebind() set) with no hook or wrapper around it."""
    if _global_hooks():
        return False
    for m in modules:
        d = m.__dict__
        fwd = d.get("forward")
        if _has_hooks(m) or (fwd is not None and fwd is not d.get(_OWN)) or "_hf_hook" in d:
            return False
    return True


def why_not_rebindable(module: nn.Module, seen: Counter | None = None, *, bypassed: bool = False) -> str | None:
    """None if module's forward may be rebound, else the reason. bypassed=True: a rebound forward skips calling
    this module (a hook on it would no longer run). seen: also refuse a shared module (for a rebinding that changes
    what the module computes, as a fused pair does: the module is called from places no adapter has read)."""
    name = type(module).__name__
    if MARK in module.__dict__:
        return f"{name} is already patched"
    if "forward" in module.__dict__:
        return f"{name} already has an instance-level forward (another library's patch)"
    if bypassed and _has_hooks(module):
        return f"{name} has forward/backward hooks that the fused path would skip"
    if seen is not None and seen[id(module)] > 1:
        return f"{name} is shared ({seen[id(module)]} places in the model)"
    return None


def rebind(module: nn.Module, forward: Callable, kind: str, *args) -> None:
    """module.forward = forward(module, *args, ...) until unpatch. functools.partial, not a bound method: it pickles
    and deep-copies with its module."""
    fn = functools.partial(forward, module, *args)
    module.__dict__["forward"] = fn
    module.__dict__[_OWN] = fn
    module.__dict__[MARK] = kind


def is_patched(module: nn.Module) -> bool:
    return MARK in module.__dict__


def restore(module: nn.Module) -> bool:
    """Undo rebind(); True if module was patched."""
    if MARK not in module.__dict__:
        return False
    if module.__dict__.get("forward") is module.__dict__.get(_OWN):  # a wrapper set after patching stays
        module.__dict__.pop("forward", None)
    module.__dict__.pop(_OWN, None)
    module.__dict__.pop(MARK)
    return True


def original_forward(module: nn.Module) -> Callable:
    """The class's own forward bound to module (what ran before patching)."""
    return type(module).forward.__get__(module)


def as_film(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """t (B, C, 1, ...) broadcast over x (B, C, ...) as the (B, C) FiLM group_norm_silu takes; None if it is not."""
    if t.dim() != x.dim() or tuple(t.shape[:2]) != tuple(x.shape[:2]) or any(s != 1 for s in t.shape[2:]):
        return None
    return t.flatten(1)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """CUDA autocast runs group_norm in fp32 (and returns fp32): the fused op is fed fp32 to match. (CPU autocast
    leaves group_norm in the input's dtype, as the fused op does.)"""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and x.dtype != torch.float64:
        return x.float()
    return x
