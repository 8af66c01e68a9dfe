"""How ``fastvit._C`` is compiled: sources, nvcc flags, CUTLASS headers (stdlib only).

One definition serves the three places that compile ``csrc/``: ``setup.py`` (loads this file by path, before
fastvit is importable), the JIT build in :mod:`fastvit.runtime.cuda` (``torch.utils.cpp_extension.load``) and the
compile check ``python -m fastvit.cuda_check``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

if __package__:
    from fastvit.runtime import kernel_table
else:  # loaded by path (setup.py, before fastvit is importable): load the table next to this file the same way
    _spec = importlib.util.spec_from_file_location(
        "_fastvit_kernel_table", os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_table.py")
    )
    kernel_table = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = kernel_table  # dataclasses look their module up while the file executes
    _spec.loader.exec_module(kernel_table)

#: csrc/ of a source checkout (the JIT path and the compile check need the sources, a wheel does not).
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

#: Default archs: Ampere (mma.sync, cp.async) and Hopper with its arch-specific features ("a").
DEFAULT_ARCHS = "8.0;9.0a"

#: nvcc flags for every translation unit. CuTe needs relaxed constexpr; the half / bf16 operators that torch's
#: CUDAExtension switches off by default are switched back on (CUTLASS's numeric types rely on them). No
#: --use_fast_math: GELU's erf and LayerNorm's rsqrt must be the accurate ones (exact to eager within rounding).
NVCC_FLAGS = [
    "-O3",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-lineinfo",
]
CXX_FLAGS = ["-O3"]
# No -std above: torch's extension builder picks the standard its headers need (C++17 for older torch, C++20
# after) and nvcc refuses two -std flags. The kernel files are C++17; the compile check builds them as such.
CHECK_STD = "-std=c++17"


def gencode_flags(archs: str | None = None) -> list[str]:
    """``-gencode`` flags for ``archs`` (';'-separated compute capabilities such as ``"8.0;9.0a"``)."""
    archs = archs if archs is not None else os.environ.get("FASTVIT_CUDA_ARCHS", DEFAULT_ARCHS)
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    if not flags:
        raise ValueError(f"FASTVIT_CUDA_ARCHS names no architecture: {archs!r}")
    return flags


def is_minimal() -> bool:
    """Whether ``FASTVIT_MINIMAL_BUILD`` asks for one instantiation per kernel template (CI)."""
    return os.environ.get("FASTVIT_MINIMAL_BUILD", "").strip().lower() in {"1", "true", "yes", "on"}


def sources(root: str = CSRC, *, minimal: bool | None = None, kernels_only: bool = False) -> list[str]:
    """The ``.cu`` (and, unless ``kernels_only``, ``.cpp``) files of ``root``, sorted; minimal builds skip the
    instantiation files the kernel table (:mod:`fastvit.runtime.kernel_table`) leaves out of them (fp16, head-dim
    buckets other than 64)."""
    minimal = is_minimal() if minimal is None else minimal
    skip = kernel_table.not_minimal_files() if minimal else frozenset()
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not (name.endswith(".cu") or (name.endswith(".cpp") and not kernels_only)):
                continue
            if os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/") in skip:
                continue
            out.append(os.path.join(dirpath, name))
    return sorted(out)


def cutlass_include() -> str | None:
    """The CUTLASS / CuTe include directory of the ``nvidia-cutlass`` package, or ``None``."""
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(path) else None


def include_dirs(root: str = CSRC) -> list[str]:
    """``csrc/`` plus CUTLASS's headers."""
    cutlass = cutlass_include()
    return [root] + ([cutlass] if cutlass else [])


def defines(minimal: bool | None = None) -> list[str]:
    """``-D`` flags: ``FASTVIT_MINIMAL_BUILD`` for a minimal build."""
    minimal = is_minimal() if minimal is None else minimal
    return ["-DFASTVIT_MINIMAL_BUILD"] if minimal else []


def cuda_home() -> str | None:
    """The CUDA toolkit root whose ``include/`` has the runtime headers: ``$CUDA_HOME`` / ``$CUDA_PATH``, the
    directory above a real ``nvcc`` binary, or ``/usr/local/cuda``. (``nvcc`` on PATH may be a wrapper script in
    ``/usr/local/bin``, from which torch would guess ``/usr/local``.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` or the first ``nvcc`` on PATH."""
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def max_jobs(per_job_gib: float = 4.0) -> int:
    """Parallel nvcc jobs: CPU count, capped so that each job has ``per_job_gib`` of available memory
    (CuTe translation units take several GiB each)."""
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].split()[0]) / 2**20
        return max(1, min(cpus, int(avail_gib // per_job_gib)))
    except (OSError, KeyError, ValueError):
        return max(1, cpus // 2)
