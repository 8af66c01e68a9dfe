"""CUDA runtime: loading ``fastvit._C`` (the CUDA C++ kernels of ``csrc/``), the kernel facts of its build, load
hooks for the op families, and the ``cuda`` backend. No op knowledge: each family (:mod:`fastvit.families`)
registers its fakes, autograd and dispatch entries through :func:`on_load`.

Where the extension comes from, in order: ``fastvit._C`` (built by ``pip install --no-build-isolation -e .`` on a
machine with nvcc and a CUDA build of torch), else -- only when asked -- a just-in-time build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``): ``python -m fastvit.build``,
:func:`load` with ``jit=True``, or ``FASTVIT_CUDA_JIT=1`` in the environment of the importing process. Importing
fastvit never compiles anything otherwise. A full build compiles every (dtype, head-dim bucket) instantiation and
takes a while; ``FASTVIT_MINIMAL_BUILD=1`` compiles one per kernel template (bf16, head-dim bucket 64).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
import types
import warnings
from typing import Callable, Iterator

import torch

from fastvit.backends import Backend, register_backend
from fastvit.runtime import cache_root
from fastvit.runtime import cuda_build as build

__all__ = ["build_info", "head_dim_bucket", "jit_build", "load", "load_error", "on_load"]

#: The loaded extension module (``fastvit._C`` or the JIT-built one), or ``None``.
_EXT: types.ModuleType | None = None
#: Why no extension is loaded (``None`` once one is).
_LOAD_ERROR: str | None = "not loaded yet"
#: Callbacks ``fn(build_info)`` run once the extension is loaded (the families' registrations).
_HOOKS: list[Callable[[dict], None]] = []


def load_error() -> str | None:
    """Why the CUDA extension is not loaded, or ``None`` when it is."""
    return _LOAD_ERROR


def build_info() -> dict:
    """What the loaded extension compiled and the kernel facts Python needs: ``archs``, CUDA and CUTLASS versions,
    ``minimal``, ``half_dtypes``, ``attention_head_dim_buckets`` (compiled), and the facts of the kernels themselves
    (head-dim bucket table, shared memory of the attention backward per bucket, GEMM alignment).

    Raises:
        RuntimeError: no extension is loaded (the message says why).
    """
    if _EXT is None:
        raise RuntimeError(f"the fastvit CUDA extension is not loaded: {_LOAD_ERROR}")
    return dict(_EXT.build_info())


def on_load(hook: Callable[[dict], None]) -> None:
    """Run ``hook(build_info())`` when the extension is loaded (now, if it already is)."""
    _HOOKS.append(hook)
    if _EXT is not None:
        hook(build_info())


# ------------------------------------------------------------------------------------------- kernel facts
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in str(text).split(",") if b.strip())


def compiled_head_dim_buckets(info: dict) -> tuple[int, ...]:
    """The head-dim buckets this build compiled attention kernels for."""
    return _ints(info["attention_head_dim_buckets"])


def head_dim_buckets(info: dict) -> tuple[int, ...]:
    """Every head-dim bucket the attention kernels know (compiled or not), ascending."""
    return _ints(info["attention_head_dim_bucket_bounds"])


def head_dim_bucket(head_dim: int, info: dict) -> int:
    """The bucket a head dim runs in (the smallest bucket >= ``head_dim``; 0 when above every bucket)."""
    return next((b for b in head_dim_buckets(info) if head_dim <= b), 0)


def attention_bwd_smem_bytes(info: dict) -> dict[int, int]:
    """Dynamic shared memory per block of the largest attention backward kernel, per compiled head-dim bucket."""
    out = {}
    for item in str(info["attention_bwd_smem_bytes"]).split(","):
        if item.strip():
            bucket, nbytes = item.split(":")
            out[int(bucket)] = int(nbytes)
    return out


# ------------------------------------------------------------------------------------------- building
def _jit_requested() -> bool:
    """``FASTVIT_CUDA_JIT=1`` (or true / yes / on): build ``csrc/`` just in time when ``fastvit._C`` is missing."""
    return os.environ.get("FASTVIT_CUDA_JIT", "").strip().lower() in {"1", "true", "yes", "on"}


def local_arch() -> str:
    """The current GPU's compute capability as a build arch (``"9.0a"`` on Hopper, whose kernels use the "a"
    features), unless ``FASTVIT_CUDA_ARCHS`` says otherwise; without a GPU, the default archs."""
    if os.environ.get("FASTVIT_CUDA_ARCHS"):
        return os.environ["FASTVIT_CUDA_ARCHS"]
    if not torch.cuda.is_available():
        return build.DEFAULT_ARCHS
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def missing_for_build() -> list[str]:
    """What this machine lacks to compile ``csrc/`` (empty: a build can work here)."""
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed)")
    if build.find_nvcc() is None:
        missing.append("nvcc (the CUDA toolkit) is not found")
    if build.cutlass_include() is None:
        missing.append("CUTLASS headers are not found (pip install nvidia-cutlass)")
    if not os.path.isdir(build.CSRC):
        missing.append(f"no csrc/ at {build.CSRC} (the build needs a source checkout)")
    return missing


@contextlib.contextmanager
def _output_to(log_path: str, label: str) -> Iterator[None]:
    """Send this process's stdout / stderr (the compiler's output) to ``log_path`` and print a progress line with
    the elapsed time to the real stderr every 15 s until the block ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    real_err = os.fdopen(os.dup(2), "w")
    done = threading.Event()
    start = time.monotonic()

    def progress() -> None:
        while not done.wait(15.0):
            print(f"fastvit: {label}: {time.monotonic() - start:.0f} s (log: {log_path})", file=real_err, flush=True)

    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        thread = threading.Thread(target=progress, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            real_err.close()


def jit_build(
    *,
    minimal: bool | None = None,
    archs: str | None = None,
    verbose: bool = False,
    build_directory: str | None = None,
    log_path: str | None = None,
) -> types.ModuleType:
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load`` and return the loaded module.

    Args:
        minimal: one instantiation per kernel template (default: ``FASTVIT_MINIMAL_BUILD``).
        archs: ``';'``-separated compute capabilities (default: ``FASTVIT_CUDA_ARCHS`` or ``"8.0;9.0a"``).
        verbose: print the compiler's output (to the log when ``log_path`` is given).
        build_directory: where objects go (default: torch's extension cache, keyed by the flags).
        log_path: write the compiler's output there and print a progress line with that path every 15 s.

    Raises:
        FileNotFoundError: no ``csrc/`` next to the package (installed without sources) or no CUTLASS headers.
        RuntimeError: the build failed (torch raises it with the compiler's output).
    """
    from torch.utils import cpp_extension

    if not os.path.isdir(build.CSRC):
        raise FileNotFoundError(f"no csrc/ at {build.CSRC}: the JIT build needs a source checkout")
    if build.cutlass_include() is None:
        raise FileNotFoundError("CUTLASS headers not found: pip install nvidia-cutlass")
    minimal = build.is_minimal() if minimal is None else minimal
    gencode = build.gencode_flags(archs)
    os.environ.setdefault("MAX_JOBS", str(build.max_jobs()))
    name = "fastvit_C_minimal" if minimal else "fastvit_C"
    home = build.cuda_home()
    if home is not None:  # torch guesses the toolkit from nvcc's location, which may be a wrapper's
        cpp_extension.CUDA_HOME = home
    kwargs = dict(
        name=name,
        sources=build.sources(minimal=minimal),
        extra_include_paths=build.include_dirs(),
        extra_cflags=[*build.CXX_FLAGS, *build.defines(minimal)],
        extra_cuda_cflags=[*build.NVCC_FLAGS, *build.defines(minimal), *gencode],
        build_directory=build_directory,
    )
    if log_path is None:
        return cpp_extension.load(verbose=verbose, **kwargs)
    label = f"building csrc/ ({'minimal' if minimal else 'full'}, archs {archs or build.DEFAULT_ARCHS})"
    with _output_to(log_path, label):
        return cpp_extension.load(verbose=True, **kwargs)


def default_log_path() -> str:
    """Where a requested build writes the compiler's output: ``$FASTVIT_BUILD_LOG`` or a file in the temp dir."""
    return os.environ.get("FASTVIT_BUILD_LOG") or os.path.join(tempfile.gettempdir(), "fastvit-build.log")


# ------------------------------------------------------------------------------------------- recorded builds
def _record_file() -> str:
    return os.path.join(cache_root(), "cuda-build.json")


def _sources_digest() -> str:
    """A hash of every file under ``csrc/`` (names and contents): a recorded build of other sources is stale."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(build.CSRC, "**", "*.[ch]*"), recursive=True)):
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def record_build(ext: types.ModuleType) -> str:
    """Remember where ``python -m fastvit.build`` put the extension, so that later imports load it without building;
    returns the record's path. The record holds the module's file, its name, torch's version and a hash of
    ``csrc/``."""
    record = {
        "path": os.path.abspath(ext.__file__),
        "name": ext.__name__,
        "torch": torch.__version__,
        "sources": _sources_digest(),
    }
    os.makedirs(cache_root(), exist_ok=True)
    tmp = _record_file() + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _record_file())
    return _record_file()


def _load_recorded_build() -> types.ModuleType | None:
    """The extension a previous ``python -m fastvit.build`` recorded, when it still matches this torch and ``csrc/``
    (else ``None``, and :func:`load_error` keeps saying it is not built)."""
    try:
        with open(_record_file()) as f:
            record = json.load(f)
        if record["torch"] != torch.__version__ or not os.path.isfile(record["path"]):
            return None
        if os.path.isdir(build.CSRC) and record["sources"] != _sources_digest():
            return None
        loader = importlib.machinery.ExtensionFileLoader(record["name"], record["path"])
        spec = importlib.util.spec_from_loader(record["name"], loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except (OSError, ValueError, KeyError, ImportError):
        return None


# ------------------------------------------------------------------------------------------- loading
def _not_built_reason() -> str:
    """Why the backend cannot run when ``fastvit._C`` is missing, suggesting only what can work on this machine."""
    if not torch.cuda.is_available():
        return "no CUDA device (and the extension fastvit._C is not built)"
    missing = missing_for_build()
    if missing:
        return "the extension fastvit._C is not built, and it cannot be built here: " + "; ".join(missing)
    return (
        "the extension fastvit._C is not built; build it for this GPU with `python -m fastvit.build` (minutes; "
        "prints progress and its log path) or `pip install --no-build-isolation -e .`"
    )


def load(*, jit: bool | None = None, **jit_kwargs) -> types.ModuleType | None:
    """Load the extension (``fastvit._C``, else a JIT build when asked) and run the families' registrations
    (:func:`on_load`); return the module, or ``None`` (then :func:`load_error` says why).

    Args:
        jit: build ``csrc/`` just in time when ``fastvit._C`` is missing. Default: ``FASTVIT_CUDA_JIT`` (off when
            unset: importing fastvit never compiles behind the user's back). With ``FASTVIT_CUDA_JIT=1`` a failed
            build only makes the backend unavailable (a warning, and the compiler's message in :func:`load_error`).
        **jit_kwargs: passed to :func:`jit_build` (default ``archs``: this GPU's; default ``log_path`` for a build
            requested by the environment: :func:`default_log_path`).

    Raises:
        RuntimeError / FileNotFoundError: only from a build requested with ``jit=True`` that fails.
    """
    global _EXT, _LOAD_ERROR
    if _EXT is not None:
        return _EXT
    ext = None
    if importlib.util.find_spec("fastvit._C") is None:
        _LOAD_ERROR = _not_built_reason()
        ext = _load_recorded_build()
    else:
        try:
            ext = importlib.import_module("fastvit._C")
        except ImportError as exc:
            _LOAD_ERROR = f"the extension fastvit._C does not load: {exc}"
    if ext is None:
        if jit is True:
            ext = jit_build(**jit_kwargs)
        elif jit is None and _jit_requested():
            log_path = jit_kwargs.pop("log_path", None) or default_log_path()
            print(
                f"fastvit: FASTVIT_CUDA_JIT=1 and fastvit._C is not built: building csrc/ just in time (cached; "
                f"log: {log_path})",
                file=sys.stderr,
            )
            try:
                ext = jit_build(**{"archs": local_arch(), "log_path": log_path, **jit_kwargs})
            except Exception as exc:  # noqa: BLE001 -- reported through load_error()
                _LOAD_ERROR = f"the just-in-time build of csrc/ failed (log: {log_path}): {str(exc)[-2000:]}"
                warnings.warn(f"fastvit: {_LOAD_ERROR}", RuntimeWarning, stacklevel=2)
                return None
        else:
            return None
    _EXT, _LOAD_ERROR = ext, None
    info = build_info()
    for hook in _HOOKS:
        hook(info)
    return ext


def _availability() -> list[str]:
    if _LOAD_ERROR is not None:
        return [_LOAD_ERROR]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    return []


BACKEND = register_backend(Backend("cuda", "CUDA C++ kernels (fastvit._C)", _availability))

load()


# ------------------------------------------------------------------------------------------- for the families
#: Devices of the cuda backend's kernels: CUDA, and "meta" (shape propagation through the fake implementations:
#: a model on the meta device, FLOP counting).
DEVICES = frozenset({"cuda", "meta"})
#: Every kernel needs Ampere or newer (cp.async, bf16 mma).
MIN_COMPUTE_CAPABILITY = (8, 0)
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def half_dtypes(info: dict) -> frozenset[torch.dtype]:
    """The dtypes of the tensor-core ops (attention, linear, patch_embed) this build compiled."""
    return frozenset(_DTYPE_NAMES[d] for d in info["half_dtypes"].split(",") if d in _DTYPE_NAMES)
