"""A pytest plugin that runs someone else's model tests against vdm_fast-patched models:

    pytest -p vdm_fast.patch.pytest_plugin path/to/diffusers/tests/models/unets/test_models_unet_3d_condition.py

Every diffusers model (a `diffusers.ModelMixin`) is passed to `vdm_fast.patch` once, right after it is built: when
the outermost `__init__` of a ModelMixin subclass returns (a model built inside another model's `__init__` is
patched with its parent, as one model), and again after `from_pretrained` has loaded the weights (a no-op for what
is already patched; it catches modules that loading replaced). The test then runs on the patched model unchanged, so
"diffusers' tests pass patched as they pass unpatched" is checked by diffing two runs of the same files: one with
`--vdm-fast-patch=off` (or without the plugin), one with it on.

How the hook is installed: every ModelMixin subclass that defines `__init__` gets that `__init__` wrapped in place
(functools.wraps, so `inspect.signature`, which diffusers' config machinery reads, sees the original), both for the
subclasses imported already and, through `ModelMixin.__init_subclass__`, for those imported later (diffusers imports
lazily; test files define their own). The wrappers are removed at the end of the session.

Options:
  --vdm-fast-patch on|off     patch models (default on; off leaves the hooks out, for the baseline run)
  --vdm-fast-backend MODE     the backend the patched ops run ("reference" unless VDM_FAST_BACKEND is set; "triton"
                              on a machine without CUDA needs TRITON_INTERPRET=1 in pytest's environment: it must
                              precede the import of the kernels, which loading this plugin already does)
  --vdm-fast-report PATH      write a JSON list: per test, the models patched and what patch replaced / skipped

The terminal summary says how many models were patched, in how many tests, and what was replaced per model class:
a run in which nothing was fused would pass vacuously, and that line shows it.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import Counter, defaultdict

import pytest

_state = threading.local()  # depth: nesting of wrapped ModelMixin __init__ calls on this thread
_WRAPPED = "_vdm_fast_pytest_wrapped"  # attribute on a wrapper: the function it wraps


class _Recorder:
    """What was patched, per test (nodeid) and per model class."""

    def __init__(self) -> None:
        self.current = "<collection>"
        self.per_test: dict[str, list[dict]] = defaultdict(list)
        self.per_class: dict[str, Counter] = defaultdict(Counter)
        self.models_per_class: Counter = Counter()
        self.errors: list[str] = []

    def record(self, model, report, when: str) -> None:
        name = type(model).__name__
        entry = {"model": name, "when": when, "replaced": report.counts, "skipped": len(report.skipped)}
        self.per_test[self.current].append(entry)
        if when == "init":
            self.models_per_class[name] += 1
        self.per_class[name].update(report.counts)


_recorder: _Recorder | None = None
_installed: list[tuple[type, str, object]] = []  # (class, attribute, original) to put back at unconfigure


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vdm_fast", "vdm_fast.patch applied to every diffusers model built in a test")
    group.addoption("--vdm-fast-patch", choices=("on", "off"), default="on", help="patch models (default: on)")
    group.addoption("--vdm-fast-backend", default=None, choices=("auto", "reference", "triton"),
                    help='backend of the patched ops (default: VDM_FAST_BACKEND, else "reference")')
    group.addoption("--vdm-fast-report", default=None, metavar="PATH", help="write what was patched, per test, as JSON")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args) -> None:
    # Before the tests' conftest.py runs. TRITON_INTERPRET is read when triton's @jit functions are decorated, and
    # importing this module already imported vdm_fast's kernels: it cannot be set from here, only checked.
    if early_config.known_args_namespace.vdm_fast_patch != "on":
        return
    mode = early_config.known_args_namespace.vdm_fast_backend or os.environ.get("VDM_FAST_BACKEND") or "reference"
    os.environ["VDM_FAST_BACKEND"] = mode
    if mode == "triton":
        import torch  # noqa: PLC0415  (heavy: only for the interpreter decision)

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise pytest.UsageError("--vdm-fast-backend=triton without CUDA needs TRITON_INTERPRET=1 in the "
                                    "environment of pytest (set before vdm_fast's kernels are imported)")


def pytest_configure(config: pytest.Config) -> None:
    global _recorder
    if config.getoption("--vdm-fast-patch") != "on":
        return
    _recorder = _Recorder()
    _install()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _recorder
    if _recorder is None:
        return
    path = config.getoption("--vdm-fast-report")
    if path:
        with open(path, "w") as f:
            json.dump({"per_test": _recorder.per_test, "errors": _recorder.errors}, f, indent=1)
    _uninstall()
    _recorder = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    if _recorder is not None:
        _recorder.current = item.nodeid
    try:
        return (yield)
    finally:
        if _recorder is not None:
            _recorder.current = "<between tests>"


def pytest_report_header(config: pytest.Config) -> str:
    if config.getoption("--vdm-fast-patch") != "on":
        return "vdm_fast.patch plugin: off (models run unpatched)"
    return f"vdm_fast.patch plugin: on, every diffusers model patched after construction, backend " \
           f"{os.environ.get('VDM_FAST_BACKEND')}"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if _recorder is None:
        return
    tr = terminalreporter
    tr.section("vdm_fast.patch")
    tests = [t for t, entries in _recorder.per_test.items() if any(e["when"] == "init" for e in entries)]
    fused_tests = [t for t in tests if any(e["replaced"] for e in _recorder.per_test[t])]
    tr.write_line(f"models patched: {sum(_recorder.models_per_class.values())} in {len(tests)} tests "
                  f"({len(fused_tests)} of them with at least one fused module)")
    for name, n in sorted(_recorder.models_per_class.items()):
        built = _recorder.per_class[name]
        per_model = ", ".join(f"{k} x{v / max(n, 1):.4g}" for k, v in sorted(built.items())) or "nothing fused"
        tr.write_line(f"  {name}: {n} models; per model on average: {per_model}")
    for err in _recorder.errors:
        tr.write_line(f"  patch raised: {err}")


# --- the construction hook -------------------------------------------------------------------------------------


def _patch_model(model, when: str) -> None:
    import vdm_fast  # noqa: PLC0415  (imported on first use so that --vdm-fast-backend is read before it)

    try:
        report = vdm_fast.patch(model)
    except Exception as exc:  # recorded for the summary, then re-raised: a test that patch breaks must fail
        _recorder.errors.append(f"{_recorder.current}: {type(model).__name__}: {type(exc).__name__}: {exc}")
        raise
    _recorder.record(model, report, when)


def _wrap_init(cls: type) -> None:
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, _WRAPPED, None) is not None:
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        depth = getattr(_state, "depth", 0)
        _state.depth = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _state.depth = depth
        if depth == 0 and _recorder is not None:
            _patch_model(self, "init")

    setattr(__init__, _WRAPPED, init)
    cls.__init__ = __init__
    _installed.append((cls, "__init__", init))


def _all_subclasses(cls: type) -> list[type]:
    out, todo = [], list(cls.__subclasses__())
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def _install() -> None:
    from diffusers.models.modeling_utils import ModelMixin  # noqa: PLC0415  (optional: the plugin's only target)

    for cls in [ModelMixin, *_all_subclasses(ModelMixin)]:
        _wrap_init(cls)

    previous = ModelMixin.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        super(ModelMixin, cls).__init_subclass__(**kwargs)
        _wrap_init(cls)

    ModelMixin.__init_subclass__ = classmethod(__init_subclass__)
    _installed.append((ModelMixin, "__init_subclass__", previous))

    original = ModelMixin.__dict__["from_pretrained"]
    raw = original.__func__

    @functools.wraps(raw)
    def from_pretrained(cls, *args, **kwargs):
        out = raw(cls, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out  # output_loading_info=True returns (model, info)
        if _recorder is not None and isinstance(model, ModelMixin):
            _patch_model(model, "from_pretrained")
        return out

    ModelMixin.from_pretrained = classmethod(from_pretrained)
    _installed.append((ModelMixin, "from_pretrained", original))


def _uninstall() -> None:
    while _installed:
        cls, attr, original = _installed.pop()
        if original is None:
            delattr(cls, attr)
        else:
            setattr(cls, attr, original)
