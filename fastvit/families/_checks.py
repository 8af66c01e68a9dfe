"""The argument checks every op's check step is built from: each raises a :class:`TypeError` or :class:`ValueError`
that names the argument and says what was expected, so kernels never see malformed input.

Also the autocast probe (:func:`amp`) and the record of index tensors :func:`fastvit.ops.random_masking` made
(:func:`vouch`), which later ops trust without a value check.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fastvit.backends import _is_compiling

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


# ----------------------------------------------------------------------------------------------- checks
def check_tensor(name: str, t: object, ndim: int | None = None, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_like(
    name: str,
    t: torch.Tensor | None,
    ref_name: str,
    ref: torch.Tensor,
    shape: tuple | None = None,
    *,
    any_float: bool = False,
) -> None:
    """Check that optional tensor ``t`` matches ``ref``'s device and dtype (and ``shape`` when given); with
    ``any_float`` (an operand autocast leaves in its own precision) any floating dtype is accepted."""
    if t is None:
        return
    try:  # the common case first: three attribute reads (a non-tensor has no .dtype and gets the full check)
        if t.dtype is ref.dtype and t.device == ref.device and (shape is None or t.shape == shape):
            return
    except AttributeError:
        pass
    if not isinstance(t, torch.Tensor):
        check_tensor(name, t)
    if t.dtype is not ref.dtype:  # dtypes are singletons
        check_tensor(name, t)
        if not any_float:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; expected the same dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")
    if shape is not None and t.shape != shape:  # torch.Size compares equal to a tuple
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_index(name: str, t: object, ndim: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 indices, got {type(t).__name__}")
    if type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t):  # DTensor: its values are not all here
        raise TypeError(
            f"{name} must be a plain torch.Tensor of indices, got a {type(t).__name__} (a tensor subclass such as "
            f"DTensor); pass {name}.full_tensor() (or .to_local() when each rank holds its own rows)"
        )
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")
    return t


# The value check below reads index values. Eagerly that is one host sync and a ValueError. Under torch.compile a host
# read would be a data-dependent guard (an error with fullgraph=True), so the check stays in the graph as
# torch._assert_async instead: a RuntimeError on the CPU, a device-side assert on a GPU -- still never a silent wrong
# answer or an out-of-bounds read inside a kernel. Meta and fake tensors hold no values.
def check_index_rows(name: str, t: torch.Tensor, upper: int, what: str) -> None:
    """Every value of ``t`` (B, L) in ``[0, upper)`` and no value repeated within a row (the backward kernels scatter
    through these indices without atomics, which is only right when no index repeats): one sort, one host read."""
    if not t.numel() or t.device.type == "meta":
        return
    s = t.sort(dim=1).values
    lo, hi = s[:, 0].min(), s[:, -1].max()
    repeats = (s.diff(dim=1) == 0).any()
    if torch.compiler.is_compiling():
        torch._assert_async((lo >= 0) & (hi < upper), f"{name} values must lie in [0, {upper})")
        torch._assert_async(~repeats, f"{name} must not repeat an index within a row ({what})")
        return
    lo, hi, repeats = torch.stack((lo, hi, repeats.to(lo.dtype))).tolist()
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} values must lie in [0, {upper}), got [{lo}, {hi}]")
    if repeats:
        raise ValueError(f"{name} must not repeat an index within a row ({what})")


# Index tensors random_masking made are valid by construction: a later op given one, unchanged since (same version
# counter: any in-place write bumps it), skips the value check -- one host sync less in every MAE step, which on a GPU
# would stall the stream. id -> (weak reference, version, upper bound).
_MADE: dict[int, tuple[weakref.ref, int, int]] = {}


def vouch(t: torch.Tensor, upper: int) -> None:
    key = id(t)
    _MADE[key] = (weakref.ref(t, lambda _ref, key=key: _MADE.pop(key, None)), t._version, upper)


def vouched(t: torch.Tensor, upper: int) -> bool:
    entry = _MADE.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == t._version and entry[2] == upper


def mixed_dtypes(ref: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether any of ``others`` (``None`` ignored) has another dtype than ``ref`` (autocast's mixed operands)."""
    return any(t is not None and t.dtype is not ref.dtype for t in others)


# Whether autocast is on for any device type, in one C call (a torch without it: assume it may be, and ask per device).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def amp_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for ``t``'s device type, or ``None`` when autocast is off there (or for a device type
    autocast does not know, e.g. meta)."""
    if not _any_autocast() and not _is_compiling():
        return None  # the common case, in one C call (Dynamo reads autocast state through the public API below)
    device_type = t.device.type
    if device_type == "meta":  # autocast has no meta dispatch key (asking raises, also while Dynamo traces)
        return None
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type without autocast
        return None
    return torch.get_autocast_dtype(device_type)


def check_cu_seqlens(
    cu_seqlens: object, max_seqlen: object, total: int, ref_name: str, ref: torch.Tensor
) -> tuple[int, int]:
    """Check packed-sequence offsets (FlashAttention's varlen convention) and return ``(S, max_seqlen)``.

    ``cu_seqlens`` must be an int32 ``(S + 1,)`` tensor on ``ref``'s device with ``cu_seqlens[0] == 0``, non-decreasing
    values and ``cu_seqlens[-1] == total``; ``max_seqlen``, when given, an int no less than the longest sequence
    (``None``: computed). Eagerly the value checks cost one host sync; under ``torch.compile`` they become a
    ``torch._assert_async`` in the graph (as :func:`check_index_rows`) and a missing ``max_seqlen`` is taken as ``total``,
    an upper bound that needs no host read.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype is not torch.int32:
        raise TypeError(
            f"cu_seqlens must be an int32 tensor (FlashAttention's varlen convention), got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with S + 1 >= 2 entries (offsets of S sequences), got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != ref.device:
        raise ValueError(
            f"cu_seqlens is on {cu_seqlens.device} but {ref_name} is on {ref.device}; expected the same device"
        )
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    num_seqs = cu_seqlens.shape[0] - 1
    if cu_seqlens.device.type == "meta":  # no values to check
        return num_seqs, total if max_seqlen is None else max_seqlen
    lengths = cu_seqlens.diff()
    if torch.compiler.is_compiling():
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lengths >= 0).all()
        if max_seqlen is not None:
            ok = ok & (lengths <= max_seqlen).all()
        torch._assert_async(
            ok,
            f"cu_seqlens must start at 0, be non-decreasing and end at T = {total}, and max_seqlen bound every length",
        )
        return num_seqs, total if max_seqlen is None else max_seqlen
    first, last, shortest, longest = torch.stack((cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max())).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    if shortest < 0:
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cu_seqlens[i])} > "
            f"cu_seqlens[{i + 1}] = {int(cu_seqlens[i + 1])}"
        )
    if last != total:
        raise ValueError(
            f"cu_seqlens must end at the number of packed tokens T = {total} ({ref_name}.shape[0]), "
            f"got cu_seqlens[-1] = {last}"
        )
    if max_seqlen is None:
        return num_seqs, longest
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen = {max_seqlen} is less than the longest sequence in cu_seqlens ({longest})")
    return num_seqs, max_seqlen


def check_packed_dim(name: str, t: object, ndim: int, packed: bool, layout: str) -> None:
    if packed and isinstance(t, torch.Tensor) and t.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {layout} when cu_seqlens is given (sequences packed along the first dim), "
            f"got shape {tuple(t.shape)}"
        )


def check_dropout(dropout_p: float) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
