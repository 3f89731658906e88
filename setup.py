"""Build of vdm_fast and its compiled extension vdm_fast._C.

The extension uses pybind11 and links no libtorch (tensors cross as pointers), so the build needs no torch and one
build serves every torch >= 2.6. CPU code is always compiled. CUDA code is compiled when nvcc is found
(VDM_FAST_BUILD_CUDA=0 forces it off, =1 forces it on), for the archs in VDM_FAST_CUDA_ARCHS (default
"80;86;89;90", PTX of the newest embedded too), with the CUDA runtime linked statically so the module imports on a
machine with no driver.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from pybind11.setup_helpers import build_ext as _build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90"


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, else the toolkit that holds the nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def cuda_wanted() -> tuple[bool, Path | None]:
    flag = os.environ.get("VDM_FAST_BUILD_CUDA", "").strip().lower()
    home = find_cuda_home()
    if flag in ("0", "false", "off", "no"):
        return False, None
    if flag in ("1", "true", "on", "yes") and home is None:
        raise RuntimeError(
            "VDM_FAST_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit or put nvcc on PATH"
        )
    return home is not None, home


def cuda_archs() -> list[str]:
    raw = os.environ.get("VDM_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "").replace("sm_", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("a").isdigit():
            raise RuntimeError(f"VDM_FAST_CUDA_ARCHS: cannot read arch {a!r} (expected e.g. '80;90')")
    return archs


def static_cudart(home: Path) -> Path:
    for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        p = home / lib / "libcudart_static.a"
        if p.exists():
            return p
    raise RuntimeError(f"libcudart_static.a not found under {home}")


def have_ninja() -> str | None:
    try:
        import ninja  # the PyPI package ships a binary

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("ninja")


class BuildExt(_build_ext):
    """Compiles csrc/cuda/*.cu with nvcc (through ninja when present, else a thread pool) before the C++ link."""

    def build_extensions(self):
        use_cuda, home = cuda_wanted()
        for ext in self.extensions:
            if use_cuda:
                self._add_cuda(ext, home)
            else:
                print("vdm_fast: building the CPU code only (no nvcc found, or VDM_FAST_BUILD_CUDA=0)")
        super().build_extensions()

    def _add_cuda(self, ext, home: Path):
        archs = cuda_archs()
        nvcc = home / "bin" / "nvcc"
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-DVDM_FAST_WITH_CUDA",
                 *gencode, *shlex.split(os.environ.get("VDM_FAST_NVCC_FLAGS", ""))]
        sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
        out_dir = Path(self.build_temp).resolve() / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = [out_dir / (s.stem + ".o") for s in sources]
        print(f"vdm_fast: compiling {len(sources)} CUDA sources for sm_{', sm_'.join(archs)} with {nvcc}")
        ninja = have_ninja()
        if ninja:
            lines = [f"rule nvcc\n  command = {shlex.quote(str(nvcc))} {' '.join(map(shlex.quote, flags))} "
                     "-c $in -o $out\n  description = nvcc $in\n"]
            lines += [f"build {o}: nvcc {s}\n" for s, o in zip(sources, objects)]
            (out_dir / "build.ninja").write_text("\n".join(lines))
            subprocess.run([ninja, "-C", str(out_dir)], check=True)
        else:
            def compile_one(pair):
                s, o = pair
                subprocess.run([str(nvcc), *flags, "-c", str(s), "-o", str(o)], check=True)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                list(pool.map(compile_one, zip(sources, objects)))
        ext.extra_objects += [str(o) for o in objects]
        ext.define_macros += [("VDM_FAST_WITH_CUDA", "1"), ("VDM_FAST_CUDA_ARCHS", f'"{";".join(archs)}"')]
        ext.include_dirs.append(str(home / "include"))
        ext.extra_link_args += [str(static_cudart(home)), "-lrt", "-lpthread", "-ldl"]


ParallelCompile("VDM_FAST_MAX_JOBS", default=0).install()

ext = Pybind11Extension(
    "vdm_fast._C",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

# Peer models for vdm_fast.patch tests and benchmarks, pinned to versions that install beside torch 2.13 (CPU).
# video-diffusion-pytorch needs a torchvision that matches the installed torch, which PyPI lacks for the CPU build:
# on a machine that has one, `pip install --no-deps video-diffusion-pytorch==0.6.3 einops-exts==0.0.4
# rotary-embedding-torch==0.9.1` (its patch tests skip, naming the reason, where it cannot be imported).
PEERS = ["diffusers==0.42.1", "transformers==5.24.0", "accelerate==1.15.0", "einops==0.8.2"]

setup(
    name="vdm_fast",
    version="0.1.0",
    description="Fast kernels, a 3D U-Net and samplers for Video Diffusion Models (Ho et al. 2022)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vdm_fast", "vdm_fast.*"]) + ["vdm_fast.kernels", "vdm_fast.benchmarks"],
    # Top-level kernels/ and benchmarks/ install as subpackages (PyPI has an unrelated top-level `kernels`).
    package_dir={"vdm_fast.kernels": "kernels", "vdm_fast.benchmarks": "benchmarks"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    # Light core dependencies: torch is whatever build the user installed first (the CPU wheel, or a CUDA build that
    # brings its own triton); pillow writes GIF/PNG samples. triton is no core dependency: CUDA builds of torch pin
    # the one they were built with, and a CPU user needs it only for the interpreter tests (the `test` extra).
    # CI tests torch 2.13.0 with triton 3.6.0.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "pillow>=9.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6", "ruff", "imageio>=2.30",
                 "imageio-ffmpeg", "av", "matplotlib", "triton>=3.2; platform_system == 'Linux'"],
        "gpu": ["triton>=3.2; platform_system == 'Linux'"],
        "video": ["imageio>=2.30", "imageio-ffmpeg", "av"],
        "plot": ["matplotlib"],
        "peers": PEERS,
    },
    entry_points={"console_scripts": ["vdm-fast = vdm_fast.cli:main"]},
    zip_safe=False,
)
