"""Helpers shared by the tests: tolerances, relative error, strided inputs."""

from __future__ import annotations

import torch

from vdm_fast.testing import max_abs_err, rel_err  # noqa: F401  (re-exported: the one definition)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Fixed ||out - ref|| / ||ref|| bounds against an fp64 reference, for checks with no same-precision baseline;
# op tests bound their error by the baseline's instead (tests/op_contract.py).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def strided(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The same values as t in a non-contiguous view (every other element of a doubled buffer along dim)."""
    dim = dim % t.dim()
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.randn(shape, dtype=t.dtype, device=t.device) if t.is_floating_point() else torch.randint(
        0 if t.dtype == torch.bool else -5, 2 if t.dtype == torch.bool else 5, shape, dtype=t.dtype, device=t.device)
    view = big.narrow(dim, 0, t.shape[dim] * 2)[(slice(None),) * dim + (slice(0, None, 2),)]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def run_python(*args: str, timeout: float = 300, env: dict | None = None):
    """Run `python *args` as a user would, from outside the source tree: with `-m` or `-c`, Python puts the working
    directory first on sys.path, and in the repo root that would import the uninstalled source (no compiled _C, no
    vdm_fast.kernels) instead of the installed package."""
    import subprocess
    import sys
    import tempfile

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tempfile.gettempdir())


# video-diffusion-pytorch imports these at module level for its Trainer, Dataset and attention layers, none of which
# the Block / RMSNorm / ResnetBlock tests build. torchvision in particular cannot be installed beside a CPU-only torch
# 2.13 (no matching wheel), which would leave the package untested. So a test may import it with whichever of them is
# unimportable replaced by a stub (every attribute a placeholder), inserted into sys.modules only for the duration of
# the import (the package keeps its references to the placeholders); `VDP_STUBBED` records which were. Install the
# package itself with `pip install --no-deps video-diffusion-pytorch==0.7.0`.
VDP_MODULE = "video_diffusion_pytorch.video_diffusion_pytorch"
VDP_OPTIONAL_DEPS = ("torchvision", "einops_exts", "rotary_embedding_torch")
VDP_STUBBED: set[str] = set()


class _StubbedOut:
    """What a stubbed module's attribute is: a placeholder whose attributes and calls are placeholders (the package
    calls some at import time: `def gif_to_tensor(..., transform=T.ToTensor())`)."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        return _StubbedOut(f"{self._name}()")

    def __repr__(self) -> str:
        return f"<test stub {self._name}>"

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubbedOut(f"{self._name}.{attr}")


def _stub_module(name: str):
    import types

    mod = types.ModuleType(name, "a test stub: see tests/helpers.py")

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubbedOut(f"{name}.{attr}")

    mod.__getattr__ = getattr_
    return mod


def import_video_diffusion_pytorch():
    """video-diffusion-pytorch's model module, imported with stubs for the unimportable ones of VDP_OPTIONAL_DEPS
    (recorded in VDP_STUBBED); ImportError (the reason) if the package itself is not installed."""
    import importlib
    import importlib.util
    import sys

    if VDP_MODULE in sys.modules and sys.modules[VDP_MODULE] is not None:
        return sys.modules[VDP_MODULE]
    if importlib.util.find_spec("video_diffusion_pytorch") is None:
        raise ImportError("video-diffusion-pytorch is not installed (pip install --no-deps "
                          "video-diffusion-pytorch==0.7.0)")
    stubs = {}
    for dep in VDP_OPTIONAL_DEPS:
        try:
            importlib.import_module(dep)
        except Exception:  # noqa: BLE001 - torchvision beside a mismatched torch raises RuntimeError, not ImportError
            for key in [k for k in sys.modules if k == dep or k.startswith(dep + ".")]:
                del sys.modules[key]  # a half-imported package
            stubs[dep] = sys.modules[dep] = _stub_module(dep)
            VDP_STUBBED.add(dep)
    try:
        return importlib.import_module(VDP_MODULE)
    finally:
        for dep, stub in stubs.items():
            if sys.modules.get(dep) is stub:
                del sys.modules[dep]


def run_ranks(code: str, world: int, *args: str, timeout: float = 300, env: dict | None = None) -> list:
    """Run the Python `code` as `world` processes at once, each with torchrun's environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT on a free local port) and `args` as its argv, from outside the source tree (see
    run_python); returns each rank's (returncode, stdout, stderr)."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "rank.py")
        with open(script, "w") as f:
            f.write(code)
        base = dict(os.environ if env is None else env, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, script, *args], cwd=tmp, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]
        results = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=timeout)
                results.append((p.returncode, out, err))
        finally:
            for p in procs:
                p.kill()
        return results


def sample_videos(run, out, argv) -> torch.Tensor:
    """The videos tensor `python -m vdm_fast.sample --run RUN --out OUT --no-progress *argv` writes, in this
    process on the reference backend (a spy on sample.write_outputs keeps it)."""
    import vdm_fast
    from vdm_fast import sample

    real = sample.write_outputs
    saved = {}

    def spy(videos, path, **kw):
        saved["videos"] = videos
        return real(videos, path, **kw)

    sample.write_outputs = spy
    try:
        with vdm_fast.backend("reference"):
            assert sample.main(["--run", str(run), "--out", str(out), "--no-progress", *argv]) == 0
    finally:
        sample.write_outputs = real
    return saved["videos"]
