"""Test setup: without a GPU, Triton kernels run through the interpreter (set before any kernel is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' tensors are small and the interpreter is single-threaded: one intra-op thread per process avoids
# OpenMP contention (tiny ops ran 25-700x slower with 2 threads on a busy 2-core machine), and pytest-xdist
# (`pytest -n 2`) uses the cores instead.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test and per run (fresh random inputs), printed on failure to reproduce it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"torch.manual_seed({v}) reproduces this failure")


@pytest.fixture(scope="module")
def diffusers():
    """The diffusers package (an optional peer), or a skip saying why it cannot be used."""
    try:
        import diffusers
        from diffusers import UNet3DConditionModel  # noqa: F401 - its lazy import is where a broken env fails
    except ImportError as e:
        pytest.skip(f"diffusers is not installed (pip install .[peers]): {e}")
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision that does not match torch breaks transformers
        pytest.skip(f"diffusers cannot be imported here: {type(e).__name__}: {e}")
    return diffusers
