"""What every adapter shares: source fingerprints, the checks that make rebinding a forward safe, and the
rebinding itself (undone by vdm_fast.unpatch).

A patched module keeps its class, parameters and buffers: only an instance attribute `forward` is added (and a
marker), so state_dicts, .to(), deepcopy and pickling see the same module.
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

MARK = "_vdm_fast_patched"  # instance attribute: the kind of patch applied to this module's forward


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


def _has_hooks(module: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(module, n, None) or {}) for n in names)


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


def rebind(module: nn.Module, forward: Callable, kind: str) -> None:
    """module.forward = forward(module, ...) until unpatch. functools.partial, not a bound method: it pickles and
    deep-copies with its module."""
    module.__dict__["forward"] = functools.partial(forward, module)
    module.__dict__[MARK] = kind


def is_patched(module: nn.Module) -> bool:
    return MARK in module.__dict__


def restore(module: nn.Module) -> bool:
    """Undo rebind(); True if module was patched."""
    if MARK not in module.__dict__:
        return False
    module.__dict__.pop("forward", None)
    module.__dict__.pop(MARK)
    return True


def original_forward(module: nn.Module) -> Callable:
    """The class's own forward bound to module (what ran before patching)."""
    return type(module).forward.__get__(module)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """CUDA autocast runs group_norm in fp32 (and returns fp32): the fused op is fed fp32 to match. (CPU autocast
    leaves group_norm in the input's dtype, as the fused op does.)"""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and x.dtype != torch.float64:
        return x.float()
    return x
