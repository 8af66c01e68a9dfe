"""Backend registry and dispatch for fastvit's ops (after xformers' fMHA dispatch).

Every op of :mod:`fastvit.ops` has one implementation per backend. A backend declares what it supports
(:class:`Capabilities`: devices, dtypes, head dims, minimum compute capability, dropout, determinism) and
answers :meth:`Backend.not_supported_reasons` for one call. Selection walks :data:`PRIORITY` and takes the
first backend with no reasons; ``eager`` is last and always works.

An explicit choice -- the ``backend=`` argument of an op, the :func:`use_backend` context, or the
``FASTVIT_BACKEND`` environment variable, in that order of precedence -- that cannot serve a call raises
:class:`BackendNotSupportedError` listing every backend's reasons. An automatic choice falls back quietly.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "Capabilities",
    "PRIORITY",
    "available_backends",
    "current_backend",
    "get_backend",
    "register_kernel",
    "select",
    "use_backend",
]

#: Backends in the order automatic selection tries them.
PRIORITY: tuple[str, ...] = ("cuda", "triton", "eager")

#: The op names of :mod:`fastvit.ops` that go through dispatch.
OPS: tuple[str, ...] = (
    "patch_embed",
    "attention",
    "scaled_dot_product_attention",
    "layer_norm",
    "linear_gelu",
    "linear_residual",
    "mae_unshuffle",
    "mae_loss",
)


class BackendNotSupportedError(ValueError):
    """An explicitly requested backend cannot run this call; the message lists every backend's reasons."""


@dataclass(frozen=True)
class Capabilities:
    """What one backend's implementation of one op accepts.

    Attributes:
        devices: device types (``"cpu"``, ``"cuda"``) the kernel runs on.
        dtypes: floating dtypes of the main input.
        head_dims: supported attention head dims ``D`` (``None``: any).
        min_compute_capability: minimum CUDA compute capability ``(major, minor)``, or ``None``.
        dropout: whether ``dropout_p > 0`` is supported.
        deterministic: whether the backward is bit-reproducible run to run.
    """

    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
    head_dims: frozenset[int] | None = None
    min_compute_capability: tuple[int, int] | None = None
    dropout: bool = True
    deterministic: bool = True

    def reasons(self, call: dict[str, Any]) -> list[str]:
        """Reasons (empty when supported) these capabilities cannot serve ``call``.

        ``call`` may hold ``device`` (torch.device), ``dtype``, ``head_dim`` and ``dropout_p``.
        """
        out: list[str] = []
        device = call.get("device")
        if device is not None:
            if device.type not in self.devices:
                out.append(f"device {device.type!r} not in {sorted(self.devices)}")
            elif device.type == "cuda" and self.min_compute_capability is not None:
                cc = torch.cuda.get_device_capability(device)
                if cc < self.min_compute_capability:
                    out.append(f"compute capability {cc} < required {self.min_compute_capability}")
        dtype = call.get("dtype")
        if dtype is not None and dtype not in self.dtypes:
            out.append(f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}")
        head_dim = call.get("head_dim")
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            out.append(f"head_dim {head_dim} not in {_describe_ints(self.head_dims)}")
        if call.get("dropout_p", 0.0) > 0.0 and not self.dropout:
            out.append("dropout_p > 0 is not supported")
        return out


def empty_sequence_reasons(call: dict[str, Any]) -> list[str]:
    """Reasons an attention kernel cannot serve ``call``: a ``num_tokens`` / ``num_kv_tokens`` below 1 (the kernels of
    both kernel backends need at least one query and one key; eager handles empty sequences). Written as a plain loop
    so that Dynamo traces it (it runs inside every compiled attention call)."""
    reasons = []
    for key in ("num_tokens", "num_kv_tokens"):
        n = call.get(key)
        if n is not None and n < 1:
            reasons.append(f"{key} = {n}: the kernels need at least one token")
    return reasons


def _describe_ints(values: frozenset[int]) -> str:
    """``{16, 17, ..., 128}`` as "16..128", ``{8, 16, ..., 128}`` as "8..128 in steps of 8", else the sorted list."""
    v = sorted(values)
    if len(v) > 2:
        step = v[1] - v[0]
        if all(b - a == step for a, b in zip(v, v[1:])):
            return f"{v[0]}..{v[-1]}" + (f" in steps of {step}" if step != 1 else "")
    return str(v)


@dataclass
class _Kernel:
    fn: Callable[..., Any]
    capabilities: Capabilities
    extra_check: Callable[[dict[str, Any]], list[str]] | None = None


@dataclass
class Backend:
    """One backend: a name, a global availability check and a table of op implementations.

    Attributes:
        name: ``"eager"``, ``"triton"`` or ``"cuda"``.
        description: one line for ``python -m fastvit.info``.
        availability: returns the reasons the backend cannot run at all here (empty when it can).
        automatic: returns whether automatic selection may pick this backend; ``False`` keeps it to explicit
            requests (Triton under ``TRITON_INTERPRET=1`` runs on the CPU, but far too slowly to be a default).
    """

    name: str
    description: str
    availability: Callable[[], list[str]] = lambda: []
    automatic: Callable[[], bool] = lambda: True
    kernels: dict[str, _Kernel] = field(default_factory=dict)

    def unavailable_reasons(self) -> list[str]:
        """Reasons this backend cannot run on this machine at all (not built, package missing, ...)."""
        return list(self.availability())

    def not_supported_reasons(self, op: str, call: dict[str, Any] | None = None) -> list[str]:
        """Reasons this backend cannot run ``op`` for ``call`` (see :meth:`Capabilities.reasons`)."""
        reasons = self.unavailable_reasons()
        if reasons:
            return reasons
        kernel = self.kernels.get(op)
        if kernel is None:
            return [f"no {self.name} kernel for op {op!r}"]
        call = call or {}
        reasons = kernel.capabilities.reasons(call)
        if kernel.extra_check is not None:
            reasons += kernel.extra_check(call)
        return reasons


def _triton_availability() -> list[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["the triton package is not installed"]
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ["no CUDA device (set TRITON_INTERPRET=1 before importing triton to run kernels on the CPU)"]
    return []


def _cuda_availability() -> list[str]:
    from fastvit import _cuda  # the loader; imports this module, hence the late import

    error = _cuda.load_error()
    if error is not None:
        return [error]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    return []


_BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", "PyTorch eager (reference math; SDPA for attention)"),
    "triton": Backend(
        "triton",
        "Triton kernels (fastvit.kernels)",
        _triton_availability,
        automatic=lambda: os.environ.get("TRITON_INTERPRET") != "1",
    ),
    "cuda": Backend("cuda", "CUDA C++ kernels (fastvit._C)", _cuda_availability),
}

_state = threading.local()
_UNSET = object()  # no use_backend context is active (None inside one means "automatic")


def get_backend(name: str) -> Backend:
    """The :class:`Backend` called ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`PRIORITY`.
    """
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(PRIORITY)}") from None


def register_kernel(
    backend: str,
    op: str,
    fn: Callable[..., Any],
    capabilities: Capabilities | None = None,
    extra_check: Callable[[dict[str, Any]], list[str]] | None = None,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    ``fn`` takes the op's validated arguments exactly as :mod:`fastvit.ops` documents them (without ``backend``).

    Raises:
        ValueError: unknown backend or op name.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")
    get_backend(backend).kernels[op] = _Kernel(fn, capabilities or Capabilities(), extra_check)


def current_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``FASTVIT_BACKEND`` (``None``: automatic)."""
    forced = getattr(_state, "forced", _UNSET)
    if forced is not _UNSET:
        return forced
    env = os.environ.get("FASTVIT_BACKEND", "").strip()
    return env or None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager forcing every fastvit op in its body onto backend ``name``.

    ``None`` means automatic selection, overriding ``FASTVIT_BACKEND`` inside the block.

    Example::

        with fastvit.use_backend("triton"):
            logits = model(images)

    Raises:
        ValueError: ``name`` is not a known backend.
    """
    if name is not None:
        get_backend(name)
    previous = getattr(_state, "forced", _UNSET)
    _state.forced = name
    try:
        yield
    finally:
        if previous is _UNSET:
            del _state.forced
        else:
            _state.forced = previous


def select(op: str, call: dict[str, Any], backend: str | None = None) -> tuple[str, Callable[..., Any]]:
    """Pick the implementation of ``op`` for ``call``.

    Args:
        op: an op name from :data:`OPS`.
        call: facts about the call (``device``, ``dtype``, ``head_dim``, ``dropout_p``).
        backend: an explicit choice; falls back to :func:`current_backend`.

    Returns:
        ``(backend_name, fn)``.

    Raises:
        ValueError: ``backend`` (or ``FASTVIT_BACKEND``) names no backend.
        BackendNotSupportedError: the explicitly chosen backend cannot serve ``call``.
    """
    explicit = backend if backend is not None else current_backend()
    if explicit is not None:
        chosen = get_backend(explicit)
        reasons = chosen.not_supported_reasons(op, call)
        if reasons:
            lines = [f"backend {explicit!r} cannot run fastvit.ops.{op} here:"]
            for name in PRIORITY:
                r = _BACKENDS[name].not_supported_reasons(op, call)
                lines.append(f"  {name}: {'; '.join(r) if r else 'supported'}")
            raise BackendNotSupportedError("\n".join(lines))
        return explicit, chosen.kernels[op].fn
    for name in PRIORITY:
        candidate = _BACKENDS[name]
        if candidate.automatic() and not candidate.not_supported_reasons(op, call):
            return name, candidate.kernels[op].fn
    raise RuntimeError(f"no backend can run fastvit.ops.{op}; the eager backend should always be registered")


def available_backends() -> dict[str, list[str]]:
    """For each backend, the reasons it cannot run on this machine (an empty list: it runs here).

    Example: ``{"cuda": ["no CUDA device"], "triton": [...], "eager": []}``.
    """
    return {name: _BACKENDS[name].unavailable_reasons() for name in PRIORITY}
