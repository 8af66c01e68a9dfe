"""Build script for fastvit.

The pure-Python package (``fastvit``, plus ``kernels/`` installed as ``fastvit.kernels``) always installs.
The CUDA extension ``fastvit._C`` is built from ``csrc/`` only when torch is a CUDA build *and* a CUDA
toolchain (``nvcc``) is found; ``torch.cuda.is_available()`` is deliberately not consulted, so wheels can be
built on machines without a GPU.

Environment variables:
  FASTVIT_SKIP_CUDA_BUILD=1   never build the extension
  FASTVIT_FORCE_CUDA_BUILD=1  build it even when the checks above fail (errors surface from the compiler)
  FASTVIT_CUDA_ARCHS          ';'-separated compute capabilities, default "8.0;9.0a"
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) + sorted(
        glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    )


def _want_cuda_build() -> tuple[bool, str]:
    if _truthy("FASTVIT_SKIP_CUDA_BUILD"):
        return False, "FASTVIT_SKIP_CUDA_BUILD is set"
    if not _cuda_sources():
        return False, "csrc/ has no sources"
    if _truthy("FASTVIT_FORCE_CUDA_BUILD"):
        return True, "FASTVIT_FORCE_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return False, "torch is not importable at build time (use --no-build-isolation)"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "no CUDA toolchain (nvcc) found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _extensions():
    want, why = _want_cuda_build()
    print(f"fastvit: CUDA extension {'enabled' if want else 'disabled'} ({why})")
    if not want:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("FASTVIT_CUDA_ARCHS", "8.0;9.0a")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        num = arch.replace(".", "")
        gencode += [f"-gencode=arch=compute_{num},code=sm_{num}"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    try:  # CUTLASS / CuTe headers from the nvidia-cutlass package
        import cutlass_library

        include_dirs.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    ext = CUDAExtension(
        name="fastvit._C",
        sources=_cuda_sources(),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["fastvit", "fastvit.nn", "fastvit.integrations", "fastvit.bench", "fastvit.kernels"],
    package_dir={"fastvit.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
