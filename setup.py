"""Build script for fastvit.

The pure-Python package (``fastvit``, plus ``kernels/`` installed as ``fastvit.kernels``) always installs.
The CUDA extension ``fastvit._C`` is built from ``csrc/`` only when torch is a CUDA build *and* a CUDA
toolchain (``nvcc``) is found; ``torch.cuda.is_available()`` is deliberately not consulted, so wheels can be
built on machines without a GPU.

Environment variables:
  FASTVIT_SKIP_CUDA_BUILD=1   never build the extension
  FASTVIT_FORCE_CUDA_BUILD=1  build it even when the checks above fail (errors surface from the compiler)
  FASTVIT_CUDA_ARCHS          ';'-separated compute capabilities, default "8.0;9.0a"
  FASTVIT_MINIMAL_BUILD=1     one instantiation per kernel template (bf16, head-dim bucket 64): minutes, not an hour
  MAX_JOBS                    parallel nvcc jobs (default: CPU count capped by available memory, 4 GiB each)

Sources, flags and the CUTLASS include path live in fastvit/runtime/cuda_build.py, shared with the JIT build and the
compile check (python -m fastvit.cuda_check).
"""

import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _load_build_config():
    # fastvit/runtime/cuda_build.py is stdlib-only; load it by path because fastvit itself is not importable yet.
    import importlib.util

    path = os.path.join(ROOT, "fastvit", "runtime", "cuda_build.py")
    spec = importlib.util.spec_from_file_location("_fastvit_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_config()


def _cuda_sources() -> list[str]:
    return [os.path.relpath(p, ROOT) for p in build.sources(os.path.join(ROOT, "csrc"))]


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
    if build.find_nvcc() is None:
        return False, "no CUDA toolchain (nvcc) found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _extensions():
    want, why = _want_cuda_build()
    print(f"fastvit: CUDA extension {'enabled' if want else 'disabled'} ({why})")
    if not want:
        return [], {}
    home = build.cuda_home()
    if home is not None:  # before torch.utils.cpp_extension guesses it from a possibly wrapped nvcc
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # MAX_JOBS bounds ninja's parallel nvcc processes; CuTe translation units need several GiB each.
    os.environ.setdefault("MAX_JOBS", str(build.max_jobs()))
    ext = CUDAExtension(
        name="fastvit._C",
        sources=_cuda_sources(),
        include_dirs=build.include_dirs(os.path.join(ROOT, "csrc")),
        extra_compile_args={
            "cxx": [*build.CXX_FLAGS, *build.defines()],
            "nvcc": [*build.NVCC_FLAGS, *build.defines(), *build.gencode_flags()],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "fastvit",
        "fastvit.nn",
        "fastvit.integrations",
        "fastvit.bench",
        "fastvit.families",
        "fastvit.runtime",
        "fastvit.kernels",
    ],
    package_dir={"fastvit.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
