"""Triton runtime: the import guard, launch wrapping, ``triton_op`` registration once per process, and the
``triton`` backend. No op knowledge: the op families (:mod:`fastvit.families`) register their ``fastvit::`` Triton
ops through :func:`register_ops` and their dispatch entries with :func:`fastvit.backends.register_kernel`.

Importing this module never fails. Without triton, :data:`triton` is ``None`` and the backend reports "the triton
package is not installed"; with a torch lacking ``torch.library.triton_op`` / ``wrap_triton`` (< 2.6), or in a
process that cannot run Triton kernels (no CUDA device, ``TRITON_INTERPRET`` not 1), no op is registered and the
families' checks say why (:func:`unregistered_reason`).
"""

from __future__ import annotations

import functools
import importlib
import os
import types
from typing import Callable

import torch

from fastvit.backends import Backend, register_backend

try:
    import triton
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    IMPORT_ERROR: str | None = f"triton is not importable ({_exc})"
else:
    IMPORT_ERROR = None

__all__ = [
    "DEVICES",
    "DTYPES",
    "INTERPRET",
    "IMPORT_ERROR",
    "input_precision",
    "kernel_module",
    "last_contiguous",
    "num_sms",
    "register_ops",
    "triton",
    "unregistered_reason",
    "wrap",
]

HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
#: Whether kernels run in Triton's interpreter (on CPU tensors). Must be set before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Whether this process can run Triton kernels at all: on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1.
#: Without either the ``fastvit::`` Triton ops are not registered: ``triton_op`` imports ``torch._inductor``, which
#: cost 1.4 s of a 3.4 s ``import fastvit`` on a CPU-only machine (``python -X importtime``), for a backend that
#: reports "no CUDA device" there anyway.
CAN_RUN = INTERPRET or torch.cuda.is_available()

#: Dtypes of every Triton kernel's main input.
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
#: Devices the Triton kernels run on here: CUDA, plus the CPU in the interpreter.
DEVICES = frozenset({"cuda", "cpu"}) if INTERPRET else frozenset({"cuda"})


def kernel_module(name: str) -> types.ModuleType | None:
    """``fastvit.kernels.<name>`` (the Triton kernels of one family), or ``None`` without triton."""
    if triton is None:
        return None
    return importlib.import_module(f"fastvit.kernels.{name}")


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for ``dtype``: "tf32" for fp32 only when PyTorch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision() != "highest"``),
    else "ieee". Half inputs ignore it (their products are exact in fp32)."""
    if dtype != torch.float32:
        return "ieee"
    try:
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    except Exception:  # pragma: no cover - very old or very new torch
        tf32 = False
    return "tf32" if tf32 else "ieee"


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 (or size <= 1), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (2 in the interpreter: few programs, each looping over many rows)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def _is_fake(a: object) -> bool:
    return isinstance(a, torch.Tensor) and (a.is_meta or isinstance(a, torch._subclasses.FakeTensor))


class _InterpretedLaunch:
    """``kernel[grid](...)`` for the Triton interpreter, skipping launches on fake / meta tensors.

    Under ``TRITON_INTERPRET=1`` ``torch.library.wrap_triton`` returns the interpreted kernel itself (torch >= 2.9;
    older torch rejects it), so tracing the ``triton_op`` body for its fake implementation would run the kernel on
    fake tensors. Only shapes matter there, so the launch is skipped.
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if any(_is_fake(a) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)

        return launch


def wrap(kernel):
    """A ``@triton.jit`` kernel made launchable inside a ``triton_op`` (``wrap_triton``, or the interpreter)."""
    return _InterpretedLaunch(kernel) if INTERPRET else torch.library.wrap_triton(kernel)


def unregistered_reason() -> str:
    """Why the ``fastvit::`` Triton ops are not registered in this process."""
    if triton is None:
        return f"the triton package is not installed ({IMPORT_ERROR})"
    if not HAS_TRITON_OP:
        return (
            f"torch {torch.__version__} lacks torch.library.triton_op / wrap_triton (needs torch >= 2.6), so "
            "the fastvit:: Triton ops are not registered"
        )
    return (
        "the fastvit:: Triton ops were not registered: no CUDA device was present when fastvit was imported "
        "(and TRITON_INTERPRET was not 1)"
    )


def register_ops(probe: str, define: Callable[[], None]) -> bool:
    """Call ``define`` (which defines one family's ``fastvit::`` Triton ops) unless ``torch.ops.fastvit.<probe>``
    already exists (the module was reloaded); returns whether the ops are registered. Registers nothing, and
    returns ``False``, without triton, without ``triton_op``, or when this process cannot run Triton kernels."""
    if triton is None or not (HAS_TRITON_OP and CAN_RUN):
        return False
    try:
        getattr(torch.ops.fastvit, probe)
    except (AttributeError, RuntimeError):
        define()
    return True


def _availability() -> list[str]:
    if triton is None:
        return ["the triton package is not installed"]
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ["no CUDA device (set TRITON_INTERPRET=1 before importing triton to run kernels on the CPU)"]
    return []


def _automatic() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"


BACKEND = register_backend(Backend("triton", "Triton kernels (fastvit.kernels)", _availability, _automatic))
