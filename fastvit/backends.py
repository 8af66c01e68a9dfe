"""Backend registry and dispatch for fastvit's ops (after xformers' fMHA dispatch).

This module is the registry only: it imports no backend. Each backend registers itself
(:func:`register_backend`, from :mod:`fastvit.runtime`), each op family declares its ops
(:func:`fastvit.declare.declare`, which names them here through :func:`declare_ops`) and registers one
implementation per backend (:func:`register_kernel`).

A kernel declares what it supports (:class:`Capabilities`: devices, dtypes, head dims, minimum compute
capability, dropout, determinism, plus an optional ``extra_check``) and answers, through
:meth:`Backend.not_supported_reasons`, for one typed call description (:class:`Call`, built by
each op's check step). Selection walks :data:`PRIORITY` and takes the first backend with no reasons; ``eager`` is
last and always works, on any device PyTorch runs on.

An explicit choice -- the ``backend=`` argument of an op, the :func:`use_backend` context, or the
``FASTVIT_BACKEND`` environment variable, in that order of precedence -- that cannot serve a call raises
:class:`BackendNotSupportedError` listing every backend's reasons. An automatic choice falls back quietly.

Decisions are cached by what they depend on: the op, the explicit choice and the call description (device type and
index, dtype, head dim, dropout, the sizes the kernels check). Registering a kernel or backend, or changing a
backend's attributes, clears the cache; outside torch.compile tracing a repeated call costs one dict lookup.

Verify before trusting (the self-test gate). Automatic selection uses a kernel backend (not ``eager``) for an op on a
device only once a verifier -- :class:`fastvit.selftest.Gate`, registered with :func:`set_verifier` when
:mod:`fastvit.selftest` is imported, which ``import fastvit`` does -- says its self-test passed there (cached on disk
per device, driver, toolkit, torch, Triton and fastvit build; run on first use when nothing is cached). A kernel that
fails is excluded for that op on that device, with one warning naming the failing case (:func:`excluded` lists it,
and ``python -m fastvit.info`` shows it). ``FASTVIT_SELFTEST=0`` trusts without checking. An explicit choice skips
the gate but warns once when the backend is unverified there. While torch.compile traces, the gate never runs a
self-test: it answers from what is cached (a constant for Dynamo) and skips an unverified kernel backend, saying so.

Launch fallback. An automatic choice of a kernel backend returns a thin wrapper: a kernel launch that raises (a
compile error, out of shared memory or registers, a missing symbol) falls back to the next backend for that call
description, with one warning giving the cause (:func:`excluded` records it). Under an explicit choice the failure
raises :class:`KernelLaunchError` naming the backend and the cause. ``eager`` is returned unwrapped (no host cost
added), and no wrapper is returned while torch.compile traces. Only the forward launch is guarded: a backward kernel
raises from autograd as before (the self-test runs every backward before the gate trusts a kernel).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Union

import torch

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "Call",
    "KernelLaunchError",
    "Capabilities",
    "PRIORITY",
    "available_backends",
    "clear_cache",
    "current_backend",
    "declare_ops",
    "excluded",
    "get_backend",
    "register_backend",
    "recording",
    "register_kernel",
    "select",
    "selftest_enabled",
    "set_verifier",
    "use_backend",
    "verifying",
]

#: Backends in the order automatic selection tries them.
PRIORITY: tuple[str, ...] = ("cuda", "triton", "eager")

#: The op names of :mod:`fastvit.ops` that go through dispatch, in declaration order. Derived from the op families'
#: declarations (:mod:`fastvit.declare`, the one place each name is written down).
OPS: tuple[str, ...] = ()

#: op name -> the family (module of :mod:`fastvit.families`) that declared it.
FAMILY_OF: dict[str, str] = {}


class BackendNotSupportedError(ValueError):
    """An explicitly requested backend cannot run this call; the message lists every backend's reasons."""


class KernelLaunchError(RuntimeError):
    """The kernel of an explicitly chosen backend raised (compile error, out of resources, missing symbol, ...); the
    message names the op, the backend and the cause, which is chained as ``__cause__``."""


class Call(NamedTuple):
    """The typed description of one op call that dispatch decides on (built by each op's check step, reused by the
    benchmark through :func:`fastvit.ops.describe_call`). Fields an op does not have stay ``None``.

    Attributes:
        device: the device of the op's main input (``None``: any).
        dtype: the dtype of the main input.
        head_dim: attention head dim D.
        dropout_p: attention-probability dropout.
        batch: B (the attention kernels put it on a grid dimension).
        num_tokens: query tokens N (attention).
        num_kv_tokens: key tokens (attention).
        features: LayerNorm's normalised width C.
        in_features / out_features: a linear op's K and M.
        embed_dim: patch embedding's E.
        patch_row: MAE loss's P·P·C elements per patch.
        mixed_dtypes: under autocast, operands of different dtypes (half GEMM operands with an fp32 residual,
            LayerScale, position table or prefix tokens, as autocast leaves them; the output has their promoted
            dtype).
        varlen: attention on packed variable-length sequences (``cu_seqlens`` given): ``batch`` is then the number
            of sequences S and ``num_tokens`` / ``num_kv_tokens`` the longest one's length (``max_seqlen``).
        rope: attention with rotary position embeddings applied to q and k (``rope=`` given; timm's EVA-02 /
            DINOv3 / Perception Encoder / ``vit_*_rope_*`` attention).
        rope_per_sample: the rotary table has one table per sample (dense) or per packed sequence (``cu_seqlens``):
            ``rope`` of shape (B or S, 1 or H, N_rot, 2·D) with a leading dim > 1 (timm's NaFlexVit and patch
            dropout); False for a table shared by the batch, and without ``rope``.
    """

    device: torch.device | None = None
    dtype: torch.dtype | None = None
    head_dim: int | None = None
    dropout_p: float = 0.0
    batch: int | None = None
    num_tokens: int | None = None
    num_kv_tokens: int | None = None
    features: int | None = None
    in_features: int | None = None
    out_features: int | None = None
    embed_dim: int | None = None
    patch_row: int | None = None
    mixed_dtypes: bool = False
    varlen: bool = False
    rope: bool = False
    rope_per_sample: bool = False

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access (``call.get("head_dim")``): the field's value, or ``default`` when it is ``None`` or no
        such field exists -- what ``extra_check`` functions written for plain dicts expect."""
        value = getattr(self, key, None)
        return default if value is None else value


CallLike = Union[Call, Mapping[str, Any], None]


def as_call(call: CallLike) -> Call:
    """``call`` as a :class:`Call` (a mapping's keys are its field names).

    Raises:
        TypeError: a mapping with a key that is no field of :class:`Call`.
    """
    if isinstance(call, Call):
        return call
    if call is None:
        return Call()
    unknown = set(call) - set(Call._fields)
    if unknown:
        raise TypeError(
            f"call has unknown keys {sorted(unknown)}; expected fields of fastvit.backends.Call: {list(Call._fields)}"
        )
    return Call(**call)


@dataclass(frozen=True)
class Capabilities:
    """What one backend's implementation of one op accepts.

    Attributes:
        devices: device types (``"cpu"``, ``"cuda"``, ``"meta"``, ...) the kernel runs on; ``None``: any device
            PyTorch runs on (the eager backend).
        dtypes: floating dtypes of the main input.
        head_dims: supported attention head dims ``D`` (``None``: any).
        min_compute_capability: minimum CUDA compute capability ``(major, minor)``, or ``None``.
        dropout: whether ``dropout_p > 0`` is supported.
        deterministic: whether the backward is bit-reproducible run to run.
        mixed_dtypes: whether the kernel takes operands of different dtypes (:attr:`Call.mixed_dtypes`).
        varlen: whether the kernel takes packed variable-length sequences (:attr:`Call.varlen`; it is then called
            with ``cu_seqlens=`` and ``max_seqlen=`` keyword arguments as well).
        rope: whether the kernel applies rotary position embeddings to q and k (:attr:`Call.rope`; it is then
            called with ``rope=``, ``num_prefix_tokens=`` and ``rotate_half=`` keyword arguments as well).
        rope_per_sample: whether it also takes a rotary table per sample or packed sequence
            (:attr:`Call.rope_per_sample`: a 4-D ``rope`` (B or S, 1 or H, N_rot, 2·D) with a leading dim > 1).
    """

    devices: frozenset[str] | None = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
    head_dims: frozenset[int] | None = None
    min_compute_capability: tuple[int, int] | None = None
    dropout: bool = True
    deterministic: bool = True
    mixed_dtypes: bool = False
    varlen: bool = False
    rope: bool = False
    rope_per_sample: bool = False

    def reasons(self, call: CallLike) -> list[str]:
        """Reasons (empty when supported) these capabilities cannot serve ``call`` (a :class:`Call` or a mapping
        with some of its fields)."""
        call = as_call(call)
        out: list[str] = []
        device = call.device
        if device is not None and self.devices is not None:
            if device.type not in self.devices:
                out.append(f"device {device.type!r} not in {sorted(self.devices)}")
            elif device.type == "cuda" and self.min_compute_capability is not None:
                cc = torch.cuda.get_device_capability(device)
                if cc < self.min_compute_capability:
                    out.append(f"compute capability {cc} < required {self.min_compute_capability}")
        if call.dtype is not None and call.dtype not in self.dtypes:
            out.append(f"dtype {call.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if call.head_dim is not None and self.head_dims is not None and call.head_dim not in self.head_dims:
            out.append(f"head_dim {call.head_dim} not in {describe_ints(self.head_dims)}")
        if call.dropout_p > 0.0 and not self.dropout:
            out.append("dropout_p > 0 is not supported")
        if call.mixed_dtypes and not self.mixed_dtypes:
            out.append(
                "operands of different dtypes under autocast (half GEMM operands with fp32 epilogue "
                "operands); the kernel takes one dtype"
            )
        if call.varlen and not self.varlen:
            out.append("packed variable-length sequences (cu_seqlens) are not supported")
        if call.rope and not self.rope:
            out.append("rotary position embeddings (rope=) are not supported")
        elif call.rope_per_sample and not self.rope_per_sample:
            out.append(
                "a rotary table per sample / packed sequence (rope of shape (B or S, 1 or H, N_rot, 2·D)) is not "
                "supported; a table shared by the batch is"
            )
        return out


def describe_ints(values: frozenset[int]) -> str:
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
    extra_check: Callable[[Call], list[str]] | None = None
    #: Whether ``extra_check`` depends on the call alone (decisions that consult it may be cached).
    cacheable: bool = True


class _KernelTable(dict):
    """A backend's ``{op: kernel}`` table; any change clears the dispatch cache."""

    def _changed(self) -> None:
        clear_cache()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def clear(self):
        super().clear()
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        out = super().pop(*args)
        self._changed()
        return out

    def popitem(self):
        out = super().popitem()
        self._changed()
        return out

    def setdefault(self, key, default=None):
        out = super().setdefault(key, default)
        self._changed()
        return out


def _no_reasons() -> list[str]:
    return []


def _always() -> bool:
    return True


@dataclass
class Backend:
    """One backend: a name, a global availability check and a table of op implementations.

    Attributes:
        name: ``"eager"``, ``"triton"`` or ``"cuda"``.
        description: one line for ``python -m fastvit.info``.
        availability: returns the reasons the backend cannot run at all here (empty when it can).
        automatic: returns whether automatic selection may pick this backend; ``False`` keeps it to explicit
            requests (Triton under ``TRITON_INTERPRET=1`` runs on the CPU, but far too slowly to be a default).
        kernels: ``{op: kernel}``, filled by :func:`register_kernel`; each entry has ``.fn`` and ``.capabilities``.

    Setting an attribute (or changing ``kernels``) clears the dispatch cache.
    """

    name: str
    description: str
    availability: Callable[[], list[str]] = _no_reasons
    automatic: Callable[[], bool] = _always
    kernels: dict[str, _Kernel] = field(default_factory=_KernelTable)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "kernels" and not isinstance(value, _KernelTable):
            value = _KernelTable(value)
        object.__setattr__(self, key, value)
        clear_cache()

    def unavailable_reasons(self) -> list[str]:
        """Reasons this backend cannot run on this machine at all (not built, package missing, ...)."""
        return list(self.availability())

    def not_supported_reasons(self, op: str, call: CallLike = None) -> list[str]:
        """Reasons this backend cannot run ``op`` for ``call`` (see :meth:`Capabilities.reasons`)."""
        reasons = self.unavailable_reasons()
        if reasons:
            return reasons
        kernel = self.kernels.get(op)
        if kernel is None:
            return [f"no {self.name} kernel for op {op!r}"]
        call = as_call(call)
        reasons = kernel.capabilities.reasons(call)
        if kernel.extra_check is not None:
            reasons += kernel.extra_check(call)
        return reasons


_BACKENDS: dict[str, Backend] = {}

# The use_backend choice of this thread / task (a ContextVar reads in ~50 ns, a threading.local attribute in ~1 µs).
_UNSET = object()  # no use_backend context is active (None inside one means "automatic")
_forced: contextvars.ContextVar = contextvars.ContextVar("fastvit_forced_backend", default=_UNSET)
#: Per-thread flags off the hot path (``verifying``: the self-test's own calls, read only on a cache miss).
_state = threading.local()

#: (op, explicit choice, Call) -> (backend name, fn). Bounded: cleared when it grows past _CACHE_LIMIT entries.
_CACHE: dict[tuple[str, str | None, Call], tuple[str, Callable[..., Any]]] = {}
_CACHE_LIMIT = 4096

#: The verifier (``fastvit.selftest.GATE``): ``lookup(backend, op, device) -> (passed | None, detail)`` answers from
#: what is cached, ``verify(backend, op, device) -> (passed, detail)`` runs the self-test when nothing is.
_VERIFIER: Any = None
#: (backend, op, device) -> (passed, detail): verdicts this process acted on.
_VERDICTS: dict[tuple[str, str, str], tuple[bool, str]] = {}
#: (backend, op, device) -> why automatic dispatch does not use it (failed self-test, launch failure).
_EXCLUDED: dict[tuple[str, str, str], str] = {}
#: (op, Call) -> backends whose kernel raised at launch for this call description.
_LAUNCH_FAILED: dict[tuple[str, Call], set[str]] = {}
#: Keys of the warnings already given (each is given once).
_WARNED: set[tuple] = set()


def clear_cache() -> None:
    """Forget every cached dispatch decision, and what this process learnt about kernels: self-test verdicts held in
    memory (the disk cache stays), exclusions, launch failures and which warnings were given. Registration does this
    itself; call it after changing what a backend's availability depends on outside fastvit (``CUDA_VISIBLE_DEVICES``,
    a monkeypatched ``torch.cuda``)."""
    _CACHE.clear()
    _VERDICTS.clear()
    _EXCLUDED.clear()
    _LAUNCH_FAILED.clear()
    _WARNED.clear()
    forget = getattr(_VERIFIER, "forget", None)
    if forget is not None:
        forget()


def declare_ops(family: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Declare the dispatched ops of one op family (called once per family module); returns ``names``.

    Raises:
        ValueError: a name already declared by another family.
    """
    global OPS
    for name in names:
        owner = FAMILY_OF.get(name)
        if owner is not None and owner != family:
            raise ValueError(f"op {name!r} is declared by family {owner!r} and {family!r}")
        FAMILY_OF[name] = family
    OPS = tuple(FAMILY_OF)
    return names


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend in the registry; its name must be one of :data:`PRIORITY`.

    Raises:
        ValueError: ``backend.name`` is not in :data:`PRIORITY`.
    """
    if backend.name not in PRIORITY:
        raise ValueError(f"unknown backend {backend.name!r}; expected one of {list(PRIORITY)}")
    previous = _BACKENDS.get(backend.name)
    if previous is not None and not backend.kernels:
        backend.kernels = previous.kernels  # a re-registered runtime keeps the families' kernels
    _BACKENDS[backend.name] = backend
    clear_cache()
    return backend


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
    extra_check: Callable[[Call], list[str]] | None = None,
    *,
    check_depends_on_call_only: bool = False,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    ``fn`` takes the op's validated arguments exactly as :mod:`fastvit.ops` documents them (without ``backend``).
    ``extra_check(call)`` gets the :class:`Call` (which also answers ``call.get(key)``) and returns reasons.
    Dispatch decisions that consult an ``extra_check`` are cached only when ``check_depends_on_call_only`` says
    its answer is a function of the call (and of the machine) alone; by default it is asked on every call.

    Raises:
        ValueError: unknown backend or op name.
    """
    if op not in FAMILY_OF:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")
    cacheable = extra_check is None or check_depends_on_call_only
    get_backend(backend).kernels[op] = _Kernel(fn, capabilities or Capabilities(), extra_check, cacheable)


# ``os.environ.get`` of a missing key costs microseconds (a KeyError raised and caught inside ``os._Environ``), and
# dispatch reads FASTVIT_BACKEND on every op; the mapping underneath (``os.environ._data``, kept in sync by every
# ``os.environ`` write, monkeypatch.setenv included) answers in tens of nanoseconds.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FASTVIT_BACKEND") if _ENV_DATA is not None else None


_env_last: list = [None, None]  # (raw value, parsed choice) of the last FASTVIT_BACKEND seen


def _env_backend() -> str | None:
    if _ENV_DATA is None:  # pragma: no cover - a Python without os._Environ._data
        raw = os.environ.get("FASTVIT_BACKEND")
    else:
        raw = _ENV_DATA.get(_ENV_KEY)
    if raw is None:
        return None
    if raw != _env_last[0]:
        env = raw if isinstance(raw, str) else os.environ.decodevalue(raw)
        _env_last[:] = [raw, env.strip() or None]
    return _env_last[1]


def current_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``FASTVIT_BACKEND`` (``None``: automatic)."""
    forced = _forced.get()
    if forced is not _UNSET:
        return forced
    return _env_backend()


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
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


_is_compiling = torch.compiler.is_compiling  # bound once: select runs in every op call


def select(op: str, call: CallLike, backend: str | None = None) -> tuple[str, Callable[..., Any]]:
    """Pick the implementation of ``op`` for ``call``.

    Args:
        op: an op name from :data:`OPS`.
        call: the typed call description (:func:`fastvit.ops.describe_call`), or a mapping with some of its fields.
        backend: an explicit choice; falls back to :func:`current_backend`.

    Returns:
        ``(backend_name, fn)``. For a kernel backend (not ``eager``), outside torch.compile tracing, ``fn`` is a thin
        wrapper of the kernel: chosen automatically, a launch that raises falls back to the next backend; chosen
        explicitly, it raises :class:`KernelLaunchError`. ``fn.__wrapped__`` is the kernel.

    Raises:
        ValueError: ``backend`` (or ``FASTVIT_BACKEND``) names no backend.
        BackendNotSupportedError: the explicitly chosen backend cannot serve ``call``.
    """
    return _select(op, as_call(call), backend)


#: While :func:`recording` is active: the list every dispatched op appends ``(op, call)`` to.
_RECORD: list[tuple[str, Call]] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, Call]]]:
    """Record every op dispatched inside: yields a list that fills with ``(op, call)`` pairs in call order (the
    benchmark reads which ops a model calls, and how, from one forward on the meta device). Not thread-safe: meant
    for one thread at a time.

    Raises:
        RuntimeError: already recording.
    """
    global _RECORD
    if _RECORD is not None:
        raise RuntimeError("fastvit.backends.recording() is already active")
    _RECORD = []
    try:
        yield _RECORD
    finally:
        _RECORD = None


def _select(op: str, call: Call, backend: str | None) -> tuple[str, Callable[..., Any]]:
    """:func:`select` for a :class:`Call` (what every op's check step builds), without the conversion."""
    if _RECORD is not None:
        _RECORD.append((op, call))
    explicit = backend
    if explicit is None:  # current_backend(), inlined: this runs in every op call
        explicit = _forced.get()
        if explicit is _UNSET:
            explicit = None if _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA else _env_backend()
    if _is_compiling():  # traced (and constant-folded) by Dynamo: no cache, no wrapper
        return _decide(op, call, explicit)
    key = (op, explicit, call)
    hit = _CACHE.get(key)
    if hit is None:
        if getattr(_state, "verifying", False):  # the self-test's own calls: no warnings, nothing cached
            return _decide(op, call, explicit)
        name, fn = _decide(op, call, explicit)
        if name != "eager":
            fn = _explicit_guard(op, name, fn) if explicit is not None else _automatic_guard(op, call, key, name, fn)
        hit = (name, fn)
        if _cacheable(op, explicit, name):
            if len(_CACHE) >= _CACHE_LIMIT:
                _CACHE.clear()
            _CACHE[key] = hit
    return hit


def _cacheable(op: str, explicit: str | None, chosen: str) -> bool:
    """Whether every kernel consulted to choose ``chosen`` answers from the call alone."""
    consulted = (explicit,) if explicit is not None else PRIORITY[: PRIORITY.index(chosen) + 1]
    for name in consulted:
        kernel = _BACKENDS[name].kernels.get(op) if name in _BACKENDS else None
        if kernel is not None and not kernel.cacheable:
            return False
    return True


def _decide(op: str, call: Call, explicit: str | None) -> tuple[str, Callable[..., Any]]:
    if explicit is not None:
        chosen = get_backend(explicit)
        reasons = chosen.not_supported_reasons(op, call)
        if reasons:
            lines = [f"backend {explicit!r} cannot run fastvit.ops.{op} here:"]
            for name in PRIORITY:
                if name in _BACKENDS:
                    r = _BACKENDS[name].not_supported_reasons(op, call)
                    lines.append(f"  {name}: {'; '.join(r) if r else 'supported'}")
            raise BackendNotSupportedError("\n".join(lines))
        if explicit != "eager" and _VERIFIER is not None:
            _warn_if_unverified(explicit, op, call.device)
        return explicit, chosen.kernels[op].fn
    failed = _LAUNCH_FAILED.get((op, call), ())
    for name in PRIORITY:
        candidate = _BACKENDS.get(name)
        if (
            candidate is not None
            and name not in failed
            and candidate.automatic()
            and not candidate.not_supported_reasons(op, call)
            and _trusted(name, op, call.device)
        ):
            return name, candidate.kernels[op].fn
    raise RuntimeError(f"no backend can run fastvit.ops.{op}; the eager backend should always be registered")


# ------------------------------------------------------------------------------------------- the self-test gate
def set_verifier(verifier: Any) -> None:
    """Install the self-test gate's verifier (``None``: trust every kernel); :mod:`fastvit.selftest` installs its
    :class:`~fastvit.selftest.Gate` on import. Clears the dispatch cache."""
    global _VERIFIER
    _VERIFIER = verifier
    clear_cache()


def selftest_enabled() -> bool:
    """Whether the gate checks kernels (``FASTVIT_SELFTEST`` is not ``0``)."""
    return os.environ.get("FASTVIT_SELFTEST", "1").strip() != "0"


@contextlib.contextmanager
def verifying() -> Iterator[None]:
    """Inside, dispatch neither warns about unverified kernels nor caches decisions: the self-test's own calls, which
    choose each backend explicitly, must not count as the user's first explicit use."""
    previous = getattr(_state, "verifying", False)
    _state.verifying = True
    try:
        yield
    finally:
        _state.verifying = previous


def excluded() -> dict[tuple[str, str, str], str]:
    """What automatic dispatch stopped using in this process: ``{(backend, op, device): reason}`` (a failed
    self-test naming the failing case, or a kernel launch that raised, with its cause)."""
    return dict(_EXCLUDED)


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _warn_once(key: tuple, message: str) -> None:
    """Warn (a RuntimeWarning attributed to the first caller outside fastvit) unless ``key`` was warned about."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("fastvit"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _trusted(name: str, op: str, device: torch.device | None) -> bool:
    """Whether automatic dispatch may use ``name``'s kernel of ``op`` on ``device`` (see the module docstring)."""
    if name == "eager" or _VERIFIER is None or device is None or device.type == "meta":
        return True  # no numerics on the meta device; a call without a device is a description only
    if torch.compiler.is_compiling():
        return _trusted_while_tracing(name, op, device.type, device.index)
    if not selftest_enabled():
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a CUDA graph capture: no self-test
        return _trusted_while_tracing(name, op, device.type, device.index)
    key = (name, op, _device_key(device))
    verdict = _VERDICTS.get(key)
    if verdict is None:
        try:
            verdict = _VERIFIER.verify(name, op, device)
        except Exception as exc:  # the gate itself broke: do not trust what it could not check
            verdict = (False, f"the self-test could not run ({type(exc).__name__}: {exc})")
        _VERDICTS[key] = verdict
        if not verdict[0]:
            _EXCLUDED[key] = f"self-test failed: {verdict[1]}"
            _warn_once(
                ("excluded",) + key,
                f"fastvit: the {name} kernel of {op} failed its self-test on {key[2]} ({verdict[1]}); automatic "
                f"dispatch will not use it there (python -m fastvit.selftest --backend {name} --ops {op} "
                "shows every case)",
            )
    return verdict[0]


def _trusted_while_tracing(name: str, op: str, device_type: str, device_index: int | None) -> bool:
    """:func:`_trusted` while Dynamo traces (or a CUDA graph is captured): what this process or the disk cache
    already knows, never a self-test run. Dynamo calls it as real Python and bakes the answer into the graph (it is marked the way
    ``torch._dynamo.assume_constant_result`` marks a function), so it may read files and warn."""
    if not selftest_enabled():
        return True
    device = torch.device(device_type, device_index)
    key = (name, op, _device_key(device))
    verdict = _VERDICTS.get(key)
    if verdict is None:
        try:
            passed, detail = _VERIFIER.lookup(name, op, device)
        except Exception as exc:
            passed, detail = None, f"{type(exc).__name__}: {exc}"
        if passed is None:
            _warn_once(
                ("tracing",) + key,
                f"fastvit: the {name} kernel of {op} is not verified on {key[2]} yet ({detail}), and the "
                "self-test does not run while torch.compile traces (or a CUDA graph is captured): this graph "
                "uses the next backend. Run "
                f"python -m fastvit.selftest --backend {name} (or the model once uncompiled) first.",
            )
            return False
        verdict = (passed, detail)
        _VERDICTS[key] = verdict
        if not passed:
            _EXCLUDED[key] = f"self-test failed: {detail}"
    return verdict[0]


_trusted_while_tracing._dynamo_marked_constant = True  # what torch._dynamo.assume_constant_result sets


def _warn_if_unverified(name: str, op: str, device: torch.device | None) -> None:
    """An explicit choice skips the gate; warn once when its kernel has no passing self-test on ``device``."""
    if device is None or device.type == "meta" or getattr(_state, "verifying", False):
        return
    if torch.compiler.is_compiling():
        _warn_if_unverified_while_tracing(name, op, device.type, device.index)
    elif selftest_enabled():
        _explicit_check(name, op, device)


def _explicit_check(name: str, op: str, device: torch.device) -> None:
    key = (name, op, _device_key(device))
    if ("explicit",) + key in _WARNED:
        return
    verdict = _VERDICTS.get(key)
    if verdict is None:
        try:
            verdict = _VERIFIER.lookup(name, op, device)
        except Exception as exc:
            verdict = (None, f"{type(exc).__name__}: {exc}")
    passed, detail = verdict
    if passed:
        return
    state = "is unverified" if passed is None else "failed its self-test"
    _warn_once(
        ("explicit",) + key,
        f"fastvit: backend {name!r} was chosen explicitly for {op} on {key[2]}, where its kernel {state} "
        f"({detail}); run python -m fastvit.selftest --backend {name} to check it",
    )


def _warn_if_unverified_while_tracing(name: str, op: str, device_type: str, device_index: int | None) -> bool:
    if selftest_enabled():
        _explicit_check(name, op, torch.device(device_type, device_index))
    return True


_warn_if_unverified_while_tracing._dynamo_marked_constant = True


# ------------------------------------------------------------------------------------------- launch guards
def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300] + '...' if len(text) > 300 else text}"


def _automatic_guard(op: str, call: Call, key: tuple, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an automatically chosen kernel) that falls back to the next backend when its launch raises."""

    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except torch.OutOfMemoryError:  # memory, not a kernel defect: another backend needs more of it
            raise
        except Exception as exc:
            if torch.compiler.is_compiling():
                raise
            return _launch_failed(op, call, key, name, exc)(*args, **kwargs)

    guarded.__wrapped__ = fn
    guarded.backend = name
    return guarded


def _launch_failed(op: str, call: Call, key: tuple, name: str, exc: Exception) -> Callable[..., Any]:
    """Record that ``name``'s kernel of ``op`` raised for ``call``; the next backend's (guarded) implementation."""
    _LAUNCH_FAILED.setdefault((op, call), set()).add(name)
    cause = _cause(exc)
    where = _device_key(call.device) if call.device is not None else "any device"
    _EXCLUDED.setdefault((name, op, where), f"kernel launch raised for {_describe(call)}: {cause}")
    next_name, next_fn = _decide(op, call, None)
    _warn_once(
        ("launch", name, op),
        f"fastvit: the {name} kernel of {op} raised at launch ({cause}) for {_describe(call)}; falling back to "
        f"the {next_name} backend for this call shape",
    )
    if next_name != "eager":
        next_fn = _automatic_guard(op, call, key, next_name, next_fn)
    if key in _CACHE:
        _CACHE[key] = (next_name, next_fn)
    return next_fn


def _describe(call: Call) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in call._asdict().items() if v is not None and not (k == "dropout_p" and not v)
    )


def _explicit_guard(op: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an explicitly chosen kernel) whose failures raise :class:`KernelLaunchError` naming the backend."""

    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BackendNotSupportedError, KernelLaunchError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            if torch.compiler.is_compiling():
                raise
            raise KernelLaunchError(
                f"fastvit.ops.{op}: the {name!r} backend, chosen explicitly, failed: {_cause(exc)}"
            ) from exc

    guarded.__wrapped__ = fn
    guarded.backend = name
    return guarded


def available_backends() -> dict[str, list[str]]:
    """For each backend, the reasons it cannot run on this machine (an empty list: it runs here).

    Example: ``{"cuda": ["no CUDA device"], "triton": [...], "eager": []}``.
    """
    return {name: _BACKENDS[name].unavailable_reasons() for name in PRIORITY if name in _BACKENDS}
