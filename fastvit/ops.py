"""fastvit's public functional ops: one checked signature each, dispatched to a backend.

Every op validates its inputs here -- shapes, dtypes, devices, with a :class:`ValueError` or :class:`TypeError`
that names the argument and what was expected -- then hands them to the backend picked by
:func:`fastvit.backends.select` (``backend=`` argument, :func:`fastvit.use_backend`, ``FASTVIT_BACKEND``, or
automatic). Kernels therefore never see malformed input.

Vocabulary: B batch, N tokens (prefix tokens included), H heads, D head dim, C = H·D embed dim, P patch size,
E embed dim of the patch projection.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fastvit import (
    backends,
    families,  # registers every op family with every backend; holds their autocast rules
    reference,
)
from fastvit.backends import Call, _is_compiling, _select

__all__ = [
    "attention",
    "describe_call",
    "layer_norm",
    "linear_gelu",
    "linear_residual",
    "mae_loss",
    "mae_unshuffle",
    "patch_embed",
    "random_masking",
    "scaled_dot_product_attention",
]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(_FLOAT)


# ----------------------------------------------------------------------------------------------- checks
def _tensor(name: str, t: object, ndim: int | None = None, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOAT_SET:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _like(
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
        _tensor(name, t)
    if t.dtype is not ref.dtype:  # dtypes are singletons
        _tensor(name, t)
        if not any_float:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; expected the same dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")
    if shape is not None and t.shape != shape:  # torch.Size compares equal to a tuple
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _index(name: str, t: object, ndim: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
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
def _check_index_rows(name: str, t: torch.Tensor, upper: int, what: str) -> None:
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


# Index tensors fastvit.ops.random_masking made are valid by construction: a later op given one, unchanged since (same
# version counter: any in-place write bumps it), skips the value check -- one host sync less in every MAE step, which
# on a GPU would stall the stream. id -> (weak reference, version, upper bound).
_MADE: dict[int, tuple[weakref.ref, int, int]] = {}


def _vouch(t: torch.Tensor, upper: int) -> None:
    key = id(t)
    _MADE[key] = (weakref.ref(t, lambda _ref, key=key: _MADE.pop(key, None)), t._version, upper)


def _vouched(t: torch.Tensor, upper: int) -> bool:
    entry = _MADE.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == t._version and entry[2] == upper


_new_call = tuple.__new__  # a Call built from a full tuple: a third of the NamedTuple constructor's cost
_NO_FEATURES = (None, None, None, None, None)  # features, in_features, out_features, embed_dim, patch_row
_NO_ATTENTION = (None, 0.0, None, None, None)  # head_dim, dropout_p, batch, num_tokens, num_kv_tokens


def _mixed(ref: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether any of ``others`` (``None`` ignored) has another dtype than ``ref`` (autocast's mixed operands)."""
    return any(t is not None and t.dtype is not ref.dtype for t in others)


# Whether autocast is on for any device type, in one C call (a torch without it: assume it may be, and ask per device).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)

# Fast paths. Each op's prepare step first tries the common call -- autocast off, not tracing, every operand a tensor of
# the main input's dtype and device with the expected shape -- as straight-line attribute reads and comparisons (a
# Python function call costs as much as several of them), and returns at once when it holds. Anything else (a missing
# optional operand counts as uncommon only where noted) runs the full checks after it, which accept exactly the same
# valid calls and raise with the argument's name otherwise; an exception inside a fast path (e.g. an attribute read
# on a non-tensor) only sends the call there. The fast path's conditions imply the full checks', so it accepts
# nothing they reject, and it describes the call by the same fields -- as the plain tuple dispatch takes
# (fastvit.backends._select). tests/test_ops.py checks both: valid calls described alike by either path, and
# near misses of every fast path (broadcastable shapes, another device, ...) rejected with the argument's name.
_FAST_MISS = (AttributeError, IndexError, TypeError, ValueError, ZeroDivisionError)


def _amp(t: torch.Tensor) -> torch.dtype | None:
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


# ----------------------------------------------------------------------------------------------- ops
def _prepare_patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    reg_tokens: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
) -> tuple:
    try:  # fast path (see _FAST_MISS); no reg_tokens, ids_keep int64 and made by random_masking
        if reg_tokens is None and not _any_autocast() and not _is_compiling():
            dtype, device = images.dtype, images.device
            B, C, Hi, Wi = images.shape
            E, Cw, Ph, Pw = weight.shape
            Np = (Hi // Ph) * (Wi // Pw)
            if (
                isinstance(images, torch.Tensor)
                and dtype in _FLOAT_SET
                and weight.dtype is dtype
                and weight.device == device
                and Cw == C
                and not (Hi % Ph or Wi % Pw)
                and (bias is None or (bias.dtype is dtype and bias.device == device and bias.shape == (E,)))
                and (
                    cls_token is None
                    or (cls_token.dtype is dtype and cls_token.device == device and cls_token.shape == (1, 1, E))
                )
                and (
                    pos_embed is None
                    or (
                        pos_embed.dtype is dtype
                        and pos_embed.device == device
                        and (
                            pos_embed.shape == (1, Np, E)
                            or (cls_token is not None and pos_embed.shape == (1, Np + 1, E))
                        )
                    )
                )
                and (
                    ids_keep is None
                    or (
                        ids_keep.dtype is torch.int64
                        and ids_keep.device == device
                        and ids_keep.dim() == 2
                        and ids_keep.shape[0] == B
                        and ids_keep.shape[1] <= Np
                        and _vouched(ids_keep, Np)
                    )
                )
            ):
                call = (device, dtype, None, 0.0, None, None, None, None, None, None, E, None, False, False)
                return call, images, weight, bias, pos_embed, cls_token, None, ids_keep
    except _FAST_MISS:
        pass
    _tensor("images", images, 4)
    amp = _amp(images)
    if amp is not None:
        images, weight, bias = families.patch_embed.autocast_rule(amp, images, weight, bias)
    _tensor("weight", weight, 4)
    _like("weight", weight, "images", images)
    B, C, Hi, Wi = images.shape
    E, Cw, Ph, Pw = weight.shape
    if Cw != C:
        raise ValueError(f"images has {C} channels but weight expects {Cw} (weight shape {tuple(weight.shape)})")
    if Hi % Ph or Wi % Pw:
        raise ValueError(
            f"images spatial size {Hi}x{Wi} is not divisible by the patch size {Ph}x{Pw} (weight shape "
            f"{tuple(weight.shape)})"
        )
    _like("bias", bias, "images", images, (E,))
    mixed_ok = amp is not None  # under autocast the epilogue operands keep their dtype
    _like("cls_token", cls_token, "images", images, (1, 1, E), any_float=mixed_ok)
    if reg_tokens is not None:
        _like("reg_tokens", reg_tokens, "images", images, any_float=mixed_ok)
        if reg_tokens.dim() != 3 or reg_tokens.shape[0] != 1 or reg_tokens.shape[2] != E:
            raise ValueError(f"reg_tokens must have shape (1, R, {E}), got {tuple(reg_tokens.shape)}")
    num_patches = (Hi // Ph) * (Wi // Pw)
    num_prefix = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
    if pos_embed is not None:
        _like("pos_embed", pos_embed, "images", images, any_float=mixed_ok)
        allowed = {num_patches, num_patches + num_prefix}
        if (
            pos_embed.dim() != 3
            or pos_embed.shape[0] != 1
            or pos_embed.shape[2] != E
            or pos_embed.shape[1] not in allowed
        ):
            raise ValueError(
                f"pos_embed must have shape (1, L, {E}) with L in {sorted(allowed)} ({num_patches} patches for "
                f"{Hi}x{Wi} images, {num_prefix} prefix tokens), got {tuple(pos_embed.shape)}"
            )
    if ids_keep is not None:
        _index("ids_keep", ids_keep, 2, "images", images)
        if ids_keep.shape[0] != B or ids_keep.shape[1] > num_patches:
            raise ValueError(f"ids_keep must have shape ({B}, N_keep <= {num_patches}), got {tuple(ids_keep.shape)}")
        if not _vouched(ids_keep, num_patches):
            _check_index_rows("ids_keep", ids_keep, num_patches, "each kept patch appears once")
        ids_keep = ids_keep.long()
    mixed = mixed_ok and _mixed(images, pos_embed, cls_token, reg_tokens)
    return (
        _new_call(
            Call, (images.device, images.dtype, None, 0.0, None, None, None, None, None, None, E, None, mixed, False)
        ),
        images,
        weight,
        bias,
        pos_embed,
        cls_token,
        reg_tokens,
        ids_keep,
    )


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    reg_tokens: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embedding + position embedding + prefix tokens, optionally keeping only some patches (MAE).

    Equal to timm's ``PatchEmbed`` (a stride-P convolution, flattened) followed by ``VisionTransformer._pos_embed``,
    and to MAE's encoder embedding (``patch_embed``, ``+ pos_embed[:, 1:]``, masking, ``cls_token + pos_embed[:, :1]``
    prepended).

    Args:
        images: (B, C, Hi, Wi) float; Hi and Wi divisible by the patch size.
        weight: (E, C, Ph, Pw) projection, same dtype and device as ``images``.
        bias: (E,) or ``None``.
        pos_embed: (1, L, E) or ``None``. With L = Np + R (Np = (Hi/Ph)·(Wi/Pw) patches, R prefix tokens) the
            prefix tokens get ``pos_embed[:, :R]`` (timm's default, MAE); with L = Np only the patches get a position
            (timm's ``no_embed_class=True``).
        cls_token: (1, 1, E) or ``None``.
        reg_tokens: (1, R_reg, E) register tokens (Darcet et al., 2024) or ``None``; placed after the cls token.
        ids_keep: (B, N_keep) int64 patch indices to keep (after the position add), no repeats within a row, or
            ``None`` for all.
        backend: force a backend (see :mod:`fastvit.backends`).

    Returns:
        (B, R + N_keep, E) tokens in ``images``' dtype (N_keep = Np without ``ids_keep``).

    Raises:
        TypeError: a non-tensor, non-float or dtype-mismatched argument.
        ValueError: wrong ranks or shapes, image size not divisible by the patch size, channel mismatch,
            ``ids_keep`` out of range or repeating an index, tensors on different devices.

    Equivalent PyTorch code::

        x = F.conv2d(images, weight, bias, stride=(Ph, Pw)).flatten(2).transpose(1, 2)
        x = torch.cat([cls_token, reg_tokens, x], 1) + pos_embed          # L = Np + R
        # MAE: x = x[:, R:].gather(1, ids_keep[..., None].expand(-1, -1, E)), then prefix again
    """
    call, images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep = _prepare_patch_embed(
        images, weight, bias, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep
    )
    return _select("patch_embed", call, backend)[1](
        images, weight, bias, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep
    )


def _check_cu_seqlens(
    cu_seqlens: object, max_seqlen: object, total: int, ref_name: str, ref: torch.Tensor
) -> tuple[int, int]:
    """Check packed-sequence offsets (FlashAttention's varlen convention) and return ``(S, max_seqlen)``.

    ``cu_seqlens`` must be an int32 ``(S + 1,)`` tensor on ``ref``'s device with ``cu_seqlens[0] == 0``, non-decreasing
    values and ``cu_seqlens[-1] == total``; ``max_seqlen``, when given, an int no less than the longest sequence
    (``None``: computed). Eagerly the value checks cost one host sync; under ``torch.compile`` they become a
    ``torch._assert_async`` in the graph (as :func:`_check_index_rows`) and a missing ``max_seqlen`` is taken as ``total``,
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


def _packed_dim(name: str, t: object, ndim: int, packed: bool, layout: str) -> None:
    if packed and isinstance(t, torch.Tensor) and t.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {layout} when cu_seqlens is given (sequences packed along the first dim), "
            f"got shape {tuple(t.shape)}"
        )


def _prepare_attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple:
    try:  # fast path (see _FAST_MISS); dense, no dropout
        if (
            cu_seqlens is None
            and max_seqlen is None
            and dropout_p == 0.0
            and type(num_heads) is int
            and num_heads > 0
            and not _any_autocast()
            and not _is_compiling()
        ):
            dtype = qkv.dtype
            B, N, C3 = qkv.shape
            if isinstance(qkv, torch.Tensor) and dtype in _FLOAT_SET and C3 and not C3 % (3 * num_heads):
                call = (qkv.device, dtype, C3 // (3 * num_heads), dropout_p, B, N, N) + _NO_FEATURES + (False, False)
                return call, qkv
    except _FAST_MISS:
        pass
    packed = cu_seqlens is not None
    if packed:
        _packed_dim("qkv", qkv, 2, packed, "(T, 3·C)")
    _tensor("qkv", qkv, 2 if packed else 3)
    amp = _amp(qkv)
    if amp is not None:
        (qkv,) = families.attention.autocast_rule(amp, qkv)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if qkv.shape[-1] % (3 * num_heads) or qkv.shape[-1] == 0:
        raise ValueError(
            f"qkv's last dim ({qkv.shape[-1]}) must be a positive multiple of 3 * num_heads = {3 * num_heads}"
        )
    if dropout_p != 0.0:
        _check_dropout(dropout_p)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if packed:
        S, n = _check_cu_seqlens(cu_seqlens, max_seqlen, qkv.shape[0], "qkv", qkv)
        return _new_call(
            Call, (qkv.device, qkv.dtype, head_dim, dropout_p, S, n, n) + _NO_FEATURES + (False, True)
        ), qkv
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed sequences); got cu_seqlens=None")
    B, N, _ = qkv.shape
    return _new_call(Call, (qkv.device, qkv.dtype, head_dim, dropout_p, B, N, N) + _NO_FEATURES + (False, False)), qkv


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head self-attention read straight from the packed output of a ``qkv`` Linear.

    ``qkv`` is laid out as timm's / MAE's ``Attention.qkv`` output: the last dim is ``[q | k | v]``, each
    head-major (head h owns columns ``h·D : (h+1)·D`` of its third). Computes softmax(q kᵀ · scale) v per head
    (Vaswani et al., 2017) and returns the heads concatenated, ready for ``proj``.

    With ``cu_seqlens``, ``qkv`` holds S sequences of different lengths packed along its first dim, without padding
    (NaViT, Dehghani et al., 2023; the ``cu_seqlens`` convention of FlashAttention's ``flash_attn_varlen_*``):
    sequence ``s`` is rows ``cu_seqlens[s] : cu_seqlens[s + 1]`` and attends only to itself.

    Args:
        qkv: (B, N, 3·C) float, C = num_heads · D; with ``cu_seqlens``: (T, 3·C) for T packed tokens.
        num_heads: H >= 1.
        cu_seqlens: int32 (S + 1,) offsets on ``qkv``'s device: 0, then the running sum of the S lengths (so
            ``cu_seqlens[-1] == T``); ``None``: ``qkv`` is a dense batch.
        max_seqlen: the longest sequence (or any larger bound); ``None`` computes it from ``cu_seqlens`` (one host
            sync, which the value checks of ``cu_seqlens`` make anyway).
        scale: softmax scale; default D ** -0.5.
        dropout_p: attention-probability dropout (timm's ``attn_drop``), applied only when > 0.
        backend: force a backend.

    Returns:
        (B, N, C) -- with ``cu_seqlens``: (T, C) -- in ``qkv``'s dtype.

    Raises:
        TypeError: ``qkv`` not a float tensor, ``num_heads`` / ``max_seqlen`` not an int, ``cu_seqlens`` not int32.
        ValueError: ``qkv`` not 3-D (2-D with ``cu_seqlens``), its last dim not divisible by 3·num_heads,
            ``num_heads`` < 1, ``dropout_p`` outside [0, 1); ``cu_seqlens`` not 1-D with >= 2 entries, on another
            device, not starting at 0, decreasing, or not ending at T; ``max_seqlen`` below the longest sequence or
            given without ``cu_seqlens``.

    Equivalent PyTorch code::

        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, H * D)
        # with cu_seqlens: the same on each qkv[cu_seqlens[s]:cu_seqlens[s + 1]][None], concatenated
    """
    call, qkv = _prepare_attention(
        qkv, num_heads, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, dropout_p=dropout_p
    )
    fn = _select("attention", call, backend)[1]
    if cu_seqlens is None:
        return fn(qkv, num_heads, scale=scale, dropout_p=dropout_p)
    return fn(qkv, num_heads, scale=scale, dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=call.num_tokens)


def _prepare_scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple:
    try:  # fast path (see _FAST_MISS); dense, no dropout, last dims contiguous
        if (
            cu_seqlens is None
            and max_seqlen is None
            and dropout_p == 0.0
            and not _any_autocast()
            and not _is_compiling()
        ):
            dtype, device = q.dtype, q.device
            B, H, Nq, D = q.shape
            ks = k.shape
            Bk, Hk, Nk, Dk = ks
            if (
                isinstance(q, torch.Tensor)
                and dtype in _FLOAT_SET
                and k.dtype is dtype
                and v.dtype is dtype
                and k.device == device
                and v.device == device
                and Bk == B
                and Hk == H
                and Dk == D
                and v.shape == ks
                and q.stride()[-1] == 1
                and k.stride()[-1] == 1
                and v.stride()[-1] == 1
            ):
                call = (device, dtype, D, dropout_p, B, Nq, Nk) + _NO_FEATURES + (False, False)
                return call, q, k, v
    except _FAST_MISS:
        pass
    packed = cu_seqlens is not None
    ndim = 3 if packed else 4
    if packed:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _packed_dim(name, t, 3, packed, "(T, H, D)")
    _tensor("q", q, ndim)
    _tensor("k", k, ndim)
    _tensor("v", v, ndim)
    amp = _amp(q)
    if amp is not None:
        q, k, v = families.attention.autocast_rule(amp, q, k, v)
    _like("k", k, "q", q)
    _like("v", v, "q", q, k.shape)
    if packed:
        if k.shape != q.shape:
            raise ValueError(
                f"k must have q's shape {tuple(q.shape)} (packed self-attention: one cu_seqlens for q, k and v), "
                f"got {tuple(k.shape)}"
            )
        T, H, D = q.shape
    else:
        B, H, _, D = q.shape
        if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
            raise ValueError(f"k must have shape ({B}, {H}, Nk, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[-1] > 1 and t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")
    if dropout_p != 0.0:
        _check_dropout(dropout_p)
    if packed:
        S, n = _check_cu_seqlens(cu_seqlens, max_seqlen, T, "q", q)
        return _new_call(Call, (q.device, q.dtype, D, dropout_p, S, n, n) + _NO_FEATURES + (False, True)), q, k, v
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed sequences); got cu_seqlens=None")
    n_q, n_kv = q.shape[2], k.shape[2]
    return _new_call(Call, (q.device, q.dtype, D, dropout_p, B, n_q, n_kv) + _NO_FEATURES + (False, False)), q, k, v


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for per-head tensors with any strides whose last dimension is contiguous.

    With ``cu_seqlens``, q, k and v hold S sequences packed along their first dim (FlashAttention's
    ``flash_attn_varlen_func`` layout); sequence ``s`` is rows ``cu_seqlens[s] : cu_seqlens[s + 1]`` and attends
    only to itself.

    Args:
        q: (B, H, Nq, D) float; with ``cu_seqlens``: (T, H, D).
        k: (B, H, Nk, D), same dtype and device; with ``cu_seqlens``: (T, H, D).
        v: (B, H, Nk, D), same dtype and device; with ``cu_seqlens``: (T, H, D).
        cu_seqlens: int32 (S + 1,) offsets (see :func:`attention`), shared by q, k and v.
        max_seqlen: the longest sequence or a larger bound; ``None`` computes it.
        scale: default D ** -0.5.
        dropout_p: attention-probability dropout, in [0, 1).
        backend: force a backend.

    Returns:
        (B, H, Nq, D) -- with ``cu_seqlens``: (T, H, D) -- in ``q``'s dtype.

    Raises:
        TypeError / ValueError: non-float or mismatched dtypes, devices or shapes; a last dim with stride != 1;
            malformed ``cu_seqlens`` / ``max_seqlen`` (as :func:`attention`).

    Equivalent PyTorch code: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)`` (with
    ``cu_seqlens``: on each sequence's ``(1, H, n, D)`` transpose, concatenated).
    """
    call, q, k, v = _prepare_scaled_dot_product_attention(
        q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, dropout_p=dropout_p
    )
    fn = _select("scaled_dot_product_attention", call, backend)[1]
    if cu_seqlens is None:
        return fn(q, k, v, scale=scale, dropout_p=dropout_p)
    return fn(q, k, v, scale=scale, dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=call.num_tokens)


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")


def _prepare_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
) -> tuple:
    try:  # fast path (see _FAST_MISS); weight and bias given
        if not _any_autocast() and not _is_compiling():
            dtype, device, shape = x.dtype, x.device, x.shape
            C = shape[-1]
            if (
                C
                and dtype in _FLOAT_SET
                and weight.dtype is dtype
                and bias.dtype is dtype
                and weight.device == device
                and bias.device == device
                and weight.shape == (C,)
                and bias.shape == (C,)
                and (
                    residual is None
                    or (residual.dtype is dtype and residual.device == device and residual.shape == shape)
                )
                and eps >= 0
            ):
                call = (device, dtype, None, 0.0, None, None, None, C, None, None, None, None, False, False)
                return call, x, weight, bias, residual
    except _FAST_MISS:
        pass
    _tensor("x", x)
    shape = x.shape
    if not shape or shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(shape)}")
    mixed_ok = _amp(x) is not None
    if mixed_ok:
        x, weight, bias, residual = families.layer_norm.autocast_rule(x.device.type, x, weight, bias, residual)
    C = shape[-1]
    _like("weight", weight, "x", x, (C,), any_float=mixed_ok)
    _like("bias", bias, "x", x, (C,), any_float=mixed_ok)
    _like("residual", residual, "x", x, shape, any_float=mixed_ok)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mixed = mixed_ok and _mixed(x, weight, bias, residual)
    call = _new_call(Call, (x.device, x.dtype, None, 0.0, None, None, None, C, None, None, None, None, mixed, False))
    return call, x, weight, bias, residual


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim (Ba et al., 2016) with fp32 statistics, optionally fused with a residual add.

    Args:
        x: (..., C) float.
        weight: (C,) or ``None``; bias: (C,) or ``None``; same dtype and device as ``x``.
        eps: added to the (biased) variance; timm's ViT uses 1e-6, Hugging Face's 1e-12.
        residual: tensor of ``x``'s shape or ``None``.
        backend: force a backend.

    Returns:
        ``y`` (x's shape and dtype), or ``(y, h)`` with ``h = x + residual`` and ``y = LayerNorm(h)`` when
        ``residual`` is given (the fused add of a pre-norm block).

    Raises:
        TypeError / ValueError: non-float input, mismatched shapes, dtypes or devices, eps < 0.

    Equivalent PyTorch code: ``h = x + residual; y = F.layer_norm(h, (C,), weight, bias, eps)``.
    """
    call, x, weight, bias, residual = _prepare_layer_norm(x, weight, bias, eps, residual=residual)
    return _select("layer_norm", call, backend)[1](x, weight, bias, eps, residual=residual)


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Check a linear op's GEMM operands (after applying the autocast rule when autocast is on); returns
    ``(x, weight, bias, autocast_on)``."""
    _tensor("x", x)
    amp = _amp(x)
    if amp is not None:
        x, weight, bias = families.linear.autocast_rule(amp, x, weight, bias)
    _tensor("weight", weight, 2)
    _like("weight", weight, "x", x)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dim ({x.shape[-1] if x.dim() else 'scalar'}) must equal weight's in_features "
            f"(weight shape {tuple(weight.shape)} is (out_features, in_features))"
        )
    _like("bias", bias, "x", x, (weight.shape[0],))
    return x, weight, bias, amp is not None


def _prepare_linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    approximate: str = "none",
) -> tuple:
    try:  # fast path (see _FAST_MISS)
        if not _any_autocast() and not _is_compiling():
            dtype, device = x.dtype, x.device
            M, K = weight.shape
            if (
                isinstance(x, torch.Tensor)
                and dtype in _FLOAT_SET
                and weight.dtype is dtype
                and weight.device == device
                and x.shape[-1] == K
                and (bias is None or (bias.dtype is dtype and bias.device == device and bias.shape == (M,)))
                and (approximate == "none" or approximate == "tanh")
            ):
                call = (device, dtype, None, 0.0, None, None, None, None, K, M, None, None, False, False)
                return call, x, weight, bias
    except _FAST_MISS:
        pass
    x, weight, bias, _ = _check_linear(x, weight, bias)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    M, K = weight.shape
    return (
        _new_call(Call, (x.device, x.dtype, None, 0.0, None, None, None, None, K, M, None, None, False, False)),
        x,
        weight,
        bias,
    )


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """GELU(x Wᵀ + b): an MLP's fc1 with its activation (Hendrycks & Gimpel, 2016).

    Args:
        x: (..., K) float.
        weight: (M, K) as ``nn.Linear.weight``; bias: (M,) or ``None``.
        approximate: ``"none"`` (exact erf, timm / MAE / HF default) or ``"tanh"``.
        backend: force a backend.

    Returns:
        (..., M) in ``x``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices; unknown ``approximate``.

    Equivalent PyTorch code: ``F.gelu(F.linear(x, weight, bias), approximate=approximate)``.
    """
    call, x, weight, bias = _prepare_linear_gelu(x, weight, bias, approximate=approximate)
    return _select("linear_gelu", call, backend)[1](x, weight, bias, approximate=approximate)


def _prepare_linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
) -> tuple:
    try:  # fast path (see _FAST_MISS)
        if not _any_autocast() and not _is_compiling():
            dtype, device, shape = x.dtype, x.device, x.shape
            M, K = weight.shape
            rs = residual.shape
            if (
                isinstance(x, torch.Tensor)
                and dtype in _FLOAT_SET
                and weight.dtype is dtype
                and residual.dtype is dtype
                and weight.device == device
                and residual.device == device
                and shape[-1] == K
                and rs[-1] == M
                and len(rs) == len(shape)
                and 2 <= len(shape) <= 3  # leading dims (B, N) or (T,), compared without slicing a torch.Size
                and rs[0] == shape[0]
                and rs[len(shape) - 2] == shape[len(shape) - 2]
                and (bias is None or (bias.dtype is dtype and bias.device == device and bias.shape == (M,)))
                and (gamma is None or (gamma.dtype is dtype and gamma.device == device and gamma.shape == (M,)))
            ):
                call = (device, dtype, None, 0.0, None, None, None, None, K, M, None, None, False, False)
                return call, x, weight, bias, residual, gamma
    except _FAST_MISS:
        pass
    x, weight, bias, mixed_ok = _check_linear(x, weight, bias)
    M, K = weight.shape
    _like("residual", residual, "x", x, (*x.shape[:-1], M), any_float=mixed_ok)
    _like("gamma", gamma, "x", x, (M,), any_float=mixed_ok)
    mixed = mixed_ok and _mixed(x, residual, gamma)
    call = _new_call(Call, (x.device, x.dtype, None, 0.0, None, None, None, None, K, M, None, None, mixed, False))
    return call, x, weight, bias, residual, gamma


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """residual + gamma · (x Wᵀ + b): a block's ``proj`` / ``fc2`` with LayerScale and the residual add.

    Args:
        x: (..., K) float.
        weight: (M, K); bias: (M,) or ``None``.
        residual: (..., M), x's leading shape.
        gamma: (M,) LayerScale (Touvron et al., 2021, "Going deeper with image transformers") or ``None``.
        backend: force a backend.

    Returns:
        (..., M) in ``x``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices.

    Equivalent PyTorch code: ``residual + gamma * F.linear(x, weight, bias)``.
    """
    call, x, weight, bias, residual, gamma = _prepare_linear_residual(x, weight, bias, residual, gamma=gamma)
    return _select("linear_residual", call, backend)[1](x, weight, bias, residual, gamma=gamma)


def random_masking(
    batch_size: int,
    seq_len: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking (He et al., 2022, sec. 3; ``models_mae.random_masking``).

    Keeps ``int(seq_len * (1 - mask_ratio))`` patches per sample: the ones with the smallest ``noise``.

    Args:
        batch_size: B >= 1.
        seq_len: number of patches N >= 1 (no cls token).
        mask_ratio: fraction to drop, in [0, 1).
        noise: (B, N) float, or ``None`` to draw uniform noise (with ``generator`` on ``device``).

    Returns:
        ``ids_keep`` (B, N_keep) int64, ``ids_restore`` (B, N) int64 (argsort of the shuffle), and ``mask``
        (B, N) float32 with 0 = kept, 1 = removed, in the original patch order. Given to :func:`patch_embed` /
        :func:`mae_unshuffle` unchanged, ``ids_keep`` / ``ids_restore`` skip those ops' value checks (they are
        valid by construction); indices from anywhere else, or written to in place since, are checked (one sort
        and one host sync).

    Raises:
        ValueError: ``mask_ratio`` outside [0, 1), non-positive sizes, ``noise`` of the wrong shape.
        TypeError: ``noise`` not a float tensor.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    if noise is not None:
        _tensor("noise", noise, 2)
        if tuple(noise.shape) != (batch_size, seq_len):
            raise ValueError(f"noise must have shape ({batch_size}, {seq_len}), got {tuple(noise.shape)}")
    ids_keep, ids_restore, mask = reference.random_masking(
        batch_size, seq_len, mask_ratio, noise=noise, generator=generator, device=device
    )
    if not torch.compiler.is_compiling():
        _vouch(ids_keep, seq_len)
        _vouch(ids_restore, seq_len)
    return ids_keep, ids_restore, mask


def _prepare_mae_unshuffle(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
) -> tuple:
    try:  # fast path (see _FAST_MISS); ids_restore int64 and made by random_masking
        if not _any_autocast() and not _is_compiling():
            dtype, device = x.dtype, x.device
            B, T, C = x.shape
            Bi, N = ids_restore.shape
            if (
                isinstance(x, torch.Tensor)
                and dtype in _FLOAT_SET
                and mask_token.dtype is dtype
                and mask_token.device == device
                and mask_token.shape == (1, 1, C)
                and ids_restore.dtype is torch.int64
                and ids_restore.device == device
                and Bi == B
                and 1 <= T <= N + 1
                and (
                    pos_embed is None
                    or (pos_embed.dtype is dtype and pos_embed.device == device and pos_embed.shape == (1, N + 1, C))
                )
                and _vouched(ids_restore, N)
            ):
                call = (device, dtype) + _NO_ATTENTION + _NO_FEATURES + (False, False)
                return call, x, mask_token, ids_restore, pos_embed
    except _FAST_MISS:
        pass
    _tensor("x", x, 3)
    if _amp(x) is not None:
        x, mask_token, pos_embed = families.mae.autocast_unshuffle_rule(x, mask_token, pos_embed)
    B, T, C = x.shape
    _like("mask_token", mask_token, "x", x, (1, 1, C))
    _index("ids_restore", ids_restore, 2, "x", x)
    N = ids_restore.shape[1]
    if ids_restore.shape[0] != B:
        raise ValueError(f"ids_restore must have shape ({B}, N), got {tuple(ids_restore.shape)}")
    if not 1 <= T <= N + 1:
        raise ValueError(f"x must hold 1 + N_keep tokens with N_keep <= N = {N}, got {T} tokens")
    if not _vouched(ids_restore, N):
        _check_index_rows("ids_restore", ids_restore, N, "each row is a permutation of 0..N-1")
    _like("pos_embed", pos_embed, "x", x, (1, N + 1, C))
    return (
        _new_call(Call, (x.device, x.dtype) + _NO_ATTENTION + _NO_FEATURES + (False, False)),
        x,
        mask_token,
        ids_restore.long(),
        pos_embed,
    )


def mae_unshuffle(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE decoder input: fill the removed positions with ``mask_token``, undo the shuffle, add position.

    Args:
        x: (B, 1 + N_keep, C) decoder-embedded encoder output, cls token first.
        mask_token: (1, 1, C).
        ids_restore: (B, N) int64 from :func:`random_masking`: each row a permutation of 0..N-1.
        pos_embed: (1, 1 + N, C) decoder position embedding, or ``None``.
        backend: force a backend.

    Returns:
        (B, 1 + N, C) in ``x``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices, N_keep > N, ``ids_restore`` not a permutation.

    Equivalent PyTorch code (models_mae.forward_decoder)::

        x_ = torch.cat([x[:, 1:], mask_token.repeat(B, N + 1 - x.shape[1], 1)], 1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, C))
        out = torch.cat([x[:, :1], x_], 1) + pos_embed
    """
    call, x, mask_token, ids_restore, pos_embed = _prepare_mae_unshuffle(
        x, mask_token, ids_restore, pos_embed=pos_embed
    )
    return _select("mae_unshuffle", call, backend)[1](x, mask_token, ids_restore, pos_embed=pos_embed)


def _prepare_mae_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix_loss: bool = False,
) -> tuple:
    try:  # fast path (see _FAST_MISS)
        if type(patch_size) is int and patch_size > 0 and not _any_autocast() and not _is_compiling():
            dtype, device = pred.dtype, pred.device
            B, C, Hi, Wi = images.shape
            N = (Hi // patch_size) * (Wi // patch_size)
            row = patch_size * patch_size * C
            if (
                isinstance(pred, torch.Tensor)
                and dtype in _FLOAT_SET
                and images.dtype in _FLOAT_SET
                and mask.dtype in _FLOAT_SET
                and not (Hi % patch_size or Wi % patch_size)
                and pred.shape == (B, N, row)
                and mask.shape == (B, N)
                and images.device == device
                and mask.device == device
            ):
                call = (device, dtype) + _NO_ATTENTION + (None, None, None, None, row, False, False)
                return call, pred, images
    except _FAST_MISS:
        pass
    _tensor("pred", pred, 3)
    _tensor("images", images, 4)
    if _amp(pred) is not None:
        pred, images = families.mae.autocast_loss_rule(pred, images)
    _tensor("mask", mask, 2)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    B, C, Hi, Wi = images.shape
    if Hi % patch_size or Wi % patch_size:
        raise ValueError(f"images spatial size {Hi}x{Wi} is not divisible by patch_size {patch_size}")
    N = (Hi // patch_size) * (Wi // patch_size)
    expected = (B, N, patch_size * patch_size * C)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {expected} for images {tuple(images.shape)}, got {tuple(pred.shape)}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must have shape {(B, N)}, got {tuple(mask.shape)}")
    for name, t in (("images", images), ("mask", mask)):
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device} but pred is on {pred.device}; expected the same device")
    call = _new_call(
        Call, (pred.device, pred.dtype) + _NO_ATTENTION + (None, None, None, None, pred.shape[-1], False, False)
    )
    return call, pred, images


def mae_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix_loss: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE's reconstruction loss: mean squared error on the removed patches only (He et al., 2022, sec. 3).

    Args:
        pred: (B, N, P·P·C) decoder output, MAE's (p, q, c) order within a patch.
        images: (B, C, Hi, Wi), Hi and Wi divisible by P; same device as ``pred``.
        mask: (B, N), 1 for removed patches, 0 for kept ones.
        patch_size: P.
        norm_pix_loss: normalise each target patch by its mean and unbiased std (+1e-6 on the variance).
        backend: force a backend.

    Returns:
        0-D tensor in ``pred``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes or devices, image size not divisible by ``patch_size``.

    Equivalent PyTorch code: ``((pred - patchify(images)) ** 2).mean(-1).mul(mask).sum() / mask.sum()``.
    """
    call, pred, images = _prepare_mae_loss(pred, images, mask, patch_size, norm_pix_loss=norm_pix_loss)
    return _select("mae_loss", call, backend)[1](pred, images, mask, patch_size, norm_pix_loss=norm_pix_loss)


#: op -> its autocast rule and argument checks, returning (call description, *the operands after the rule);
#: derived from the declared op names.
_PREPARE = {name: globals()[f"_prepare_{name}"] for name in backends.OPS}


def describe_call(op: str, *args, **kwargs) -> Call:
    """The typed call description dispatch decides on for ``fastvit.ops.<op>(*args, **kwargs)``, after the op's own
    autocast rule and argument checks, without running it (what the benchmark and :func:`fastvit.backends.select` take).

    Example: ``select("attention", describe_call("attention", qkv, 12))`` names the backend ``attention(qkv, 12)``
    would run on.

    Raises:
        ValueError: ``op`` is no dispatched op (or ``backend`` was passed: the call description does not include it);
            otherwise whatever the op itself raises for these arguments.
    """
    if "backend" in kwargs:
        raise ValueError("describe_call takes the op's arguments without backend=; pass it to select()")
    try:
        prepare = _PREPARE[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_PREPARE)}") from None
    call = prepare(*args, **kwargs)[0]
    return call if type(call) is Call else _new_call(Call, call)  # a fast path's plain tuple of the fields


# Every tensor op is a torch.fx leaf: a symbolic trace (torch.fx.symbolic_trace, torchvision's feature extraction,
# timm's fx tests) records one call_function node per op and the GraphModule runs the same op as the eager forward,
# instead of tracing into the argument checks, which take real tensors.
for _name in backends.OPS:
    torch.fx.wrap(_name)
del _name
