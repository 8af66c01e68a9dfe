"""``attn_implementation="fastvit"`` for Hugging Face ``transformers`` models (attention only).

:func:`register_attention` adds the name ``"fastvit"`` to transformers' ``AttentionInterface`` (the registry behind
``Model.from_pretrained(..., attn_implementation=...)`` and ``model.set_attn_implementation(...)``, through which
SDPA, FlashAttention and FlexAttention plug in) and the same name to ``AttentionMaskInterface`` (with
transformers' own ``sdpa_mask``: boolean ``(B, 1, Nq, Nk)`` masks, ``None`` when there is nothing to mask), so that
a model's padding mask still reaches the attention function instead of being dropped -- transformers hands no mask
at all to an implementation that has no mask entry. It registers a second name, ``"fastvit_flash"``, the same
function, for vision towers that pass packed sequences only to FlashAttention-style implementations (transformers
recognises those by ``"flash"`` in the name): Qwen2-VL / Qwen2.5-VL / Qwen3-VL and Pixtral then hand it
``cu_seq_lens_q`` / ``max_length_q`` and it runs one packed call per layer, instead of one call per image or window.

``import fastvit`` calls :func:`register_attention` itself when ``transformers`` is already imported; it never
imports ``transformers`` (which costs seconds). Otherwise call it once, after importing both::

    import fastvit, transformers
    fastvit.integrations.hf.register_attention()      # not needed when transformers was imported first
    model = transformers.AutoModel.from_pretrained("facebook/dinov2-small", attn_implementation="fastvit")

What runs where (:func:`fastvit_attention_forward`):

* no mask, or a mask that masks nothing (all ``True`` / all zeros) -> :func:`fastvit.ops.scaled_dot_product_attention`
  on whatever backend dispatch picks (or the one :func:`fastvit.use_backend` forces), on HF's strided q / k / v
  views as they are; attention dropout (``dropout > 0``, HF passes it in training only) is passed on as
  ``dropout_p``, so automatic dispatch picks a backend that implements it (today: eager, i.e. PyTorch's SDPA); a
  forced kernel backend that has no dropout raises :class:`fastvit.BackendNotSupportedError`;
* a key-padding mask (SigLIP-2 NaFlex ``pixel_attention_mask``, Idefics3 / SmolVLM ``patch_attention_mask``, any
  ``attention_mask`` with zeros) or a block-diagonal one (Pixtral's images in one sequence), or both -> fastvit's
  packed attention: the valid tokens of q / k / v are gathered into (T, H, D), one
  ``scaled_dot_product_attention(..., cu_seqlens=..., max_seqlen=...)`` call, and the result is scattered back. The
  offsets are derived from the mask once per forward -- cached on the mask tensor, which transformers hands to every
  layer -- not per layer. Padding rows (tokens that are no key of any query) get what transformers' SDPA gives them
  (they attend to the valid keys of their sample, so they are not zeros): one SDPA call on those rows only;
* ``cu_seq_lens_q`` / ``max_length_q`` keywords (``"fastvit_flash"``) -> fastvit's packed attention on those offsets;
* a causal or any other mask, an additive bias (``position_bias`` or a float mask), or ``is_causal`` -> transformers'
  own SDPA attention (``torch.nn.functional.scaled_dot_product_attention``), with a
  :class:`FastvitAttentionFallbackWarning` naming the reason, once per reason per process.

:func:`attention_report` lists which attention modules of a model run on fastvit and why the others do not. A model
built with or switched to ``"fastvit"`` whose attention cannot take it at all (SAM's vision encoder builds its own
attention classes) is refused with a ``ValueError`` at that call; attention modules no ``attn_implementation``
reaches (``nn.MultiheadAttention`` pooling heads) are named in a :class:`FastvitAttentionNotCoveredWarning`; and
``set_attn_implementation`` also reaches configs transformers leaves behind (ViT-MAE's decoder keeps a copy of the
model config) -- see :func:`register_attention`.

Source: transformers' "Attention interface" documentation (``transformers.AttentionInterface``) and its reference
implementations ``transformers/integrations/sdpa_attention.py`` (``sdpa_attention_forward``, whose signature and
return convention this follows) and ``modeling_flash_attention_utils.py`` (the ``cu_seq_lens_*`` keywords); the
packed layout is FlashAttention's ``flash_attn_varlen_func`` (Dao, 2023, arXiv:2307.08691) and NaViT's "Patch n'
Pack" (Dehghani et al., 2023, arXiv:2307.06304).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import threading
import warnings
from typing import Any, List, NamedTuple, Optional, Tuple

import torch

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FLASH_ATTN_IMPLEMENTATION",
    "AttentionRecord",
    "FastvitAttentionFallbackWarning",
    "FastvitAttentionNotCoveredWarning",
    "attention_report",
    "fastvit_attention_forward",
    "format_attention_report",
    "register_attention",
]

#: The name models are given: ``attn_implementation="fastvit"``.
ATTN_IMPLEMENTATION = "fastvit"
#: The same implementation under a name transformers treats as FlashAttention-style (it contains ``"flash"``), so that
#: vision towers pass packed sequences (``cu_seq_lens_q`` / ``max_length_q``) to it: Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
#: Pixtral.
FLASH_ATTN_IMPLEMENTATION = "fastvit_flash"
_NAMES = (ATTN_IMPLEMENTATION, FLASH_ATTN_IMPLEMENTATION)


class FastvitAttentionFallbackWarning(UserWarning):
    """A ``"fastvit"`` attention call ran transformers' SDPA attention instead of fastvit's op; the message says why."""


_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(reason: str) -> None:
    with _WARNED_LOCK:
        if reason in _WARNED:
            return
        _WARNED.add(reason)
    warnings.warn(
        f'attn_implementation="fastvit": {reason}; running transformers\' SDPA attention '
        "(torch.nn.functional.scaled_dot_product_attention) for such calls instead (warned once per reason)",
        FastvitAttentionFallbackWarning,
        stacklevel=3,
    )


def reset_fallback_warnings() -> None:
    """Forget which fallback reasons were already warned about, so each warns again once (for tests)."""
    with _WARNED_LOCK:
        _WARNED.clear()


# ------------------------------------------------------------------------------------------------ masks
_CAUSAL_MASK = "a causal attention mask: fastvit's attention kernels are bidirectional and take no mask"
_OTHER_MASK = (
    "an attention mask that is neither empty, key-padding nor block-diagonal (tokens attending to groups of tokens "
    "they belong to): fastvit's attention kernels take no mask"
)
_PER_HEAD_MASK = "an attention mask that differs between heads: fastvit's packed attention shares one mask over heads"
_CROSS_MASK = (
    "a mask on attention with different query and key lengths: fastvit's packed attention (cu_seqlens) is "
    "self-attention"
)
_EMPTY_ROWS_MASK = "an attention mask that masks every key: nothing for fastvit's packed attention to run"
_ADDITIVE = "an additive attention bias (a float mask with finite non-zero values): fastvit's kernels take no bias"
_IS_CAUSAL = (
    "is_causal=True (the is_causal argument, or module.is_causal): fastvit's attention kernels are bidirectional"
)
_POSITION_BIAS = "a position_bias (an additive attention bias): fastvit's attention kernels take no bias"


class _Packing(NamedTuple):
    """How a key-padding / block-diagonal mask maps a padded (B, N) batch onto packed sequences; built once per mask
    object by :func:`_analyse_mask` and cached on it, so every layer of a forward reuses it.

    Fields:
        indices: int64 (T,) flat positions in the (B·N) rows of the tokens that are keys of some query, grouped by
            sequence (one sequence = one sample's tokens, or one block of a block-diagonal mask), in token order within
            a sequence.
        cu_seqlens: int32 (S + 1,) offsets of the S sequences in ``indices``.
        max_seqlen: the longest sequence (python int).
        pad_rows: ``None``, or int64 (B, Pmax): per sample, the positions of its P_b rows that are no key of any query
            (padding) first, then filler; their outputs are what transformers' SDPA gives (see :func:`_padded_rows`).
        pad_keep: int64 (P,): which of the (B·Pmax) rows of ``pad_rows`` are real padded rows.
        scatter: int64 (T + P,): ``indices`` then the flat positions of the padded rows (where the outputs go back).
        kind: ``'key-padding'``, ``'block-diagonal'`` or ``'key-padding + block-diagonal'`` (for the report).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pad_rows: Optional[torch.Tensor]
    pad_keep: Optional[torch.Tensor]
    scatter: torch.Tensor
    kind: str


def _keep(mask: Any) -> "torch.Tensor | str | None":
    """The boolean ``True`` = attend form of ``mask``; ``None`` when it masks nothing; a reason string for a mask
    fastvit cannot use at all (not a tensor, an additive bias)."""
    if not isinstance(mask, torch.Tensor):
        return f"an attention mask of type {type(mask).__name__} (not a tensor): fastvit's kernels take no mask"
    if mask.dtype == torch.bool:
        return None if bool(mask.all()) else mask
    if not bool(mask.any()):
        return None
    masked = mask <= torch.finfo(mask.dtype).min / 2  # -inf, finfo.min (HF's eager masks), and the like
    if not bool((masked | (mask == 0)).all()):
        return _ADDITIVE
    return ~masked


def _classify(keep: torch.Tensor) -> str:
    """Why a boolean mask that is neither empty nor packable falls back."""
    if keep.dim() >= 2:
        n_q, n_k = keep.shape[-2], keep.shape[-1]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=keep.device).tril(n_k - n_q)
        if bool((keep == causal).all()):
            return _CAUSAL_MASK
    return _OTHER_MASK


def _analyse_mask(mask: torch.Tensor, B: int, n_q: int, n_k: int) -> "_Packing | str | None":
    """``None`` (the mask masks nothing), a :class:`_Packing` (fastvit's packed attention computes it exactly), or the
    reason it falls back.

    Packable: a boolean (or 0 / -inf additive) mask broadcastable to (B, H, N, N), the same for every head, under which
    the tokens that are keys of some query split into groups that attend exactly to their own group -- a key-padding
    mask (one group per sample: its valid tokens, in any positions) or a block-diagonal one (Pixtral's images, one
    group each), or both. Rows of tokens that are no key of any query (padding) may hold any pattern: transformers'
    SDPA computes them (see :func:`_padded_rows`). Costs a few passes over the (B, N, N) mask and a few host syncs;
    :func:`_packing_of` caches the answer on the mask, so that happens once per forward.
    """
    keep = _keep(mask)
    if keep is None or isinstance(keep, str):
        return keep
    if keep.dim() < 2 or keep.dim() > 4:
        return _OTHER_MASK
    if n_q != n_k:
        return _CROSS_MASK
    N = n_q
    keep4 = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    try:
        target = torch.broadcast_shapes(keep4.shape, (B, 1, N, N))
    except RuntimeError:
        return _OTHER_MASK
    if target[0] != B or tuple(target[2:]) != (N, N):
        return _OTHER_MASK
    keep4 = keep4.expand(target)
    if keep4.shape[1] > 1:
        if not bool((keep4 == keep4[:, :1]).all()):
            return _PER_HEAD_MASK
    k3 = keep4[:, 0].expand(B, N, N)
    valid = k3.any(dim=1)  # (B, N): the token is a key of some query
    # a token's group label: the first key its row attends to (the smallest member of its group when packable)
    first = k3.to(torch.int8).argmax(dim=2)
    group = torch.where(valid, first, torch.full_like(first, N))
    expected = (group[:, :, None] == group[:, None, :]) & valid[:, None, :]
    if not bool(((k3 == expected) | ~valid[:, :, None]).all()):
        return _classify(keep)
    flat_valid = valid.reshape(-1)
    vidx = flat_valid.nonzero().squeeze(1)
    if vidx.numel() == 0:
        return _EMPTY_ROWS_MASK
    gid = (torch.arange(B, device=k3.device)[:, None] * (N + 1) + group).reshape(-1).index_select(0, vidx)
    gid_sorted, order = torch.sort(gid, stable=True)
    indices = vidx.index_select(0, order)
    _, lengths = torch.unique_consecutive(gid_sorted, return_counts=True)
    from fastvit.nn import cu_seqlens_from_lengths

    cu_seqlens = cu_seqlens_from_lengths(lengths)
    n_pad = (~valid).sum(dim=1)  # (B,)
    samples_with_tokens = valid.any(dim=1).sum()
    max_seqlen, pmax, samples = torch.stack((lengths.max(), n_pad.max(), samples_with_tokens)).tolist()
    num_groups = lengths.numel()
    kinds = []
    if pmax:
        kinds.append("key-padding")
    if num_groups > samples:
        kinds.append("block-diagonal")
    pad_rows = pad_keep = None
    scatter = indices
    if pmax:
        # per sample, its padded positions first (a stable sort of valid = False before True), cut to the longest
        pad_rows = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, :pmax]
        real = torch.arange(pmax, device=k3.device)[None, :] < n_pad[:, None]
        pad_keep = real.reshape(-1).nonzero().squeeze(1)
        flat_pad = (pad_rows + torch.arange(B, device=k3.device)[:, None] * N).reshape(-1).index_select(0, pad_keep)
        scatter = torch.cat((indices, flat_pad))
    return _Packing(indices, cu_seqlens, max_seqlen, pad_rows, pad_keep, scatter, " + ".join(kinds))


def _packing_of(mask: Any, B: int, n_q: int, n_k: int) -> "_Packing | str | None":
    """:func:`_analyse_mask`, cached on the mask tensor (keyed by its in-place version counter and the batch / token
    counts), so a model that hands the same mask to every layer (all of transformers' vision encoders) analyses it
    once per forward."""
    if not isinstance(mask, torch.Tensor) or torch.compiler.is_compiling():
        return _analyse_mask(mask, B, n_q, n_k) if isinstance(mask, torch.Tensor) else _keep(mask)
    key = (mask._version, B, n_q, n_k)
    cached = getattr(mask, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _analyse_mask(mask, B, n_q, n_k)
    try:
        setattr(mask, _CACHE_ATTR, (key, plan))
    except (AttributeError, RuntimeError):  # a tensor subclass that takes no attributes: analyse per call
        pass
    return plan


_CACHE_ATTR = "_fastvit_packing"


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv·n_rep, N, D), each key / value head repeated for its ``n_rep`` query heads (HF's
    ``repeat_kv``, i.e. ``repeat_interleave`` on dim 1). A copy: one head dim cannot express the repetition as a
    stride."""
    B, H_kv, N, D = t.shape
    return t[:, :, None].expand(B, H_kv, n_rep, N, D).reshape(B, H_kv * n_rep, N, D)


def _repeat_kv_packed(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(T, Hkv, D) -> (T, Hkv·n_rep, D), as :func:`_repeat_kv` for packed tokens (a copy)."""
    T, H_kv, D = t.shape
    return t[:, :, None].expand(T, H_kv, n_rep, D).reshape(T, H_kv * n_rep, D)


# ------------------------------------------------------------------------------------------------ the function
_PATH_ATTR = "_fastvit_attention_path"


def _record(module: Any, path: str) -> None:
    """Remember what ``module``'s last call ran (for :func:`attention_report`); a plain dict write, skipped while
    compiling."""
    d = getattr(module, "__dict__", None)
    if d is not None and not torch.compiler.is_compiling():
        d[_PATH_ATTR] = path


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _check_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_dim: int = 1) -> int:
    H, H_kv = query.shape[head_dim], key.shape[head_dim]
    if H_kv != H and (H_kv < 1 or H % H_kv or value.shape[head_dim] != H_kv):
        raise ValueError(
            f"query has {H} heads but key / value {H_kv} / {value.shape[head_dim]}: grouped-query attention needs the "
            "key / value heads to divide the query heads"
        )
    return H // H_kv if H_kv else 1


def _padded_rows(query, key, value, mask, plan: _Packing, dropout, scaling) -> torch.Tensor:
    """(P, H, D): the outputs of the P padded query rows (tokens that are no key of any query), computed as
    transformers' SDPA path computes them -- those rows attend to whatever their mask row allows (for a key-padding
    mask: the sample's valid tokens), so they are not zeros. One SDPA call on the (B, H, Pmax, D) gathered rows, with
    their mask rows; cost Pmax·N per sample and head, against N·N for the whole batch on SDPA."""
    B, H, _, D = query.shape
    idx = plan.pad_rows
    pmax = idx.shape[1]
    q_rows = query.gather(2, idx[:, None, :, None].expand(B, H, pmax, D))
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = m.expand(B, m.shape[1], query.shape[2], m.shape[-1])
    m_rows = m.gather(2, idx[:, None, :, None].expand(B, m.shape[1], pmax, m.shape[-1]))
    n_rep = H // key.shape[1]
    if n_rep > 1:
        key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    # what transformers' sdpa_attention_forward runs for these rows (it repeats grouped key / value heads as well
    # when a mask is given)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_rows, key, value, attn_mask=m_rows, dropout_p=dropout, scale=scaling
    )
    Dv = out.shape[-1]
    return out.transpose(1, 2).reshape(B * pmax, H, Dv).index_select(0, plan.pad_keep)


def _packed_from_mask(query, key, value, mask, plan: _Packing, dropout, scaling) -> torch.Tensor:
    """Key-padding / block-diagonal attention on fastvit's packed op: gather the valid rows of q / k / v into
    (T, H, D), one :func:`fastvit.ops.scaled_dot_product_attention` call with ``cu_seqlens``, scatter back into
    (B, N, H, D) with the padded rows from :func:`_padded_rows`."""
    from fastvit import ops
    from fastvit.nn import pad_input

    B, H, N, D = query.shape
    n_rep = _check_heads(query, key, value)
    q = query.transpose(1, 2).reshape(B * N, H, D).index_select(0, plan.indices)
    k = key.transpose(1, 2).reshape(B * N, key.shape[1], D).index_select(0, plan.indices)
    v = value.transpose(1, 2).reshape(B * N, value.shape[1], value.shape[-1]).index_select(0, plan.indices)
    if n_rep > 1:
        k, v = _repeat_kv_packed(k, n_rep), _repeat_kv_packed(v, n_rep)
    out = ops.scaled_dot_product_attention(
        q, k, v, cu_seqlens=plan.cu_seqlens, max_seqlen=plan.max_seqlen, scale=scaling, dropout_p=float(dropout)
    )
    Dv = out.shape[-1]
    tokens = out.reshape(out.shape[0], H * Dv)
    if plan.pad_rows is not None:
        rows = _padded_rows(query, key, value, mask, plan, dropout, scaling)
        tokens = torch.cat((tokens, rows.to(tokens.dtype).reshape(rows.shape[0], H * Dv)))
    return pad_input(tokens, plan.scatter, B, N).view(B, N, H, Dv)


def _packed_from_offsets(query, key, value, cu_q, cu_k, max_q, max_k, dropout, scaling) -> torch.Tensor:
    """FlashAttention-style varlen call (transformers' ``cu_seq_lens_q`` / ``max_length_q`` keywords): q / k / v
    (1, H, T, D) are S sequences packed along the tokens; one packed fastvit call; returns (1, T, H, D)."""
    from fastvit import ops

    if cu_k is not None and cu_q is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError(
            'attn_implementation="fastvit": cu_seq_lens_k differs from cu_seq_lens_q; fastvit\'s packed attention is '
            "self-attention (one set of offsets for q, k and v)"
        )
    cu = cu_q if cu_q is not None else cu_k
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(
            f'attn_implementation="fastvit": with cu_seq_lens_q the tokens are packed into one row, q / k / v '
            f"(1, H, T, D) with the same T; got q {tuple(query.shape)}, k {tuple(key.shape)}"
        )
    n_rep = _check_heads(query, key, value)
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    if n_rep > 1:
        k, v = _repeat_kv_packed(k, n_rep), _repeat_kv_packed(v, n_rep)
    max_seqlen = max_q if max_q is not None else max_k
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)
    out = ops.scaled_dot_product_attention(
        q, k, v, cu_seqlens=cu.to(torch.int32), max_seqlen=max_seqlen, scale=scaling, dropout_p=float(dropout)
    )
    return out.unsqueeze(0)


def fastvit_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature, computed by :func:`fastvit.ops.scaled_dot_product_attention`.

    Registered as ``"fastvit"`` by :func:`register_attention`; models call it from their attention modules as
    ``attention_interface(self, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``.

    Args:
        module: the calling attention module; ``module.is_causal`` (default ``True``, as in transformers' SDPA
            function) is read when ``is_causal`` is not given. Vision encoders set it to ``False``.
        query: (B, H, Nq, D) float (fp32 / fp16 / bf16; under autocast, what the projections produced), any strides
            with a contiguous last dim -- HF's ``q_proj(x).view(B, N, H, D).transpose(1, 2)`` is taken as it is.
        key, value: (B, Hkv, Nk, D), same dtype and device; ``Hkv`` divides ``H`` (grouped-query attention: each
            key / value head is repeated for its ``H / Hkv`` query heads, a copy, as transformers' SDPA path does).
        attention_mask: ``None``; a boolean mask broadcastable to (B, H, Nq, Nk), ``True`` = attend; or an additive
            float mask (0 = attend, ``finfo.min`` / ``-inf`` = masked). One that masks nothing runs fastvit's dense
            op; a key-padding or block-diagonal one (the same for every head, Nq = Nk) runs its packed op (see the
            module docstring); any other falls back to transformers' SDPA with a warning.
        dropout: attention-probability dropout in [0, 1); transformers passes 0 outside training. Passed to fastvit
            as ``dropout_p`` (automatic dispatch then picks a backend with dropout: eager).
        scaling: the softmax scale; ``None`` means D ** -0.5.
        is_causal: causal attention; ``True`` (with Nq > 1 and no mask) falls back. Ignored when a mask is given,
            as transformers' SDPA function ignores it then.
        **kwargs: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 (S + 1,) offsets) and ``max_length_q`` /
            ``max_length_k``, which transformers passes to FlashAttention-style implementations for packed
            sequences (q / k / v then (1, H, T, D)): one packed fastvit call; ``position_bias`` (falls back);
            ``softcap`` / ``s_aux`` (attention-logit soft-capping and attention sinks: not supported, raise); the rest
            of transformers' per-call kwargs (``output_attentions``, ``sliding_window`` -- encoded in the mask --,
            ...) are ignored.

    Returns:
        ``(attn_output, None)``: ``attn_output`` (B, Nq, H, D) contiguous, in ``query``'s dtype (the kernels write
        (B, H, Nq, D); this transpose is the one copy, the same one transformers' SDPA function makes). On the packed
        path the rows of padding tokens (tokens that are no key of any query) hold what transformers' SDPA gives
        there (they attend to the keys their mask row allows), so the whole output matches ``"sdpa"``. No attention
        weights are materialised, so the second slot is always ``None`` (``output_attentions`` needs ``"eager"``).

    Raises:
        ValueError: ``H`` not a multiple of ``Hkv``; a ``softcap`` or ``s_aux`` argument; ``cu_seq_lens_k`` other
            than ``cu_seq_lens_q``, or with a batch other than 1, a mask, ``is_causal`` or a ``position_bias`` (no
            fallback computes those); everything :func:`fastvit.ops.scaled_dot_product_attention` raises (mismatched
            dtypes / devices, a non-contiguous last dim, ``dropout`` outside [0, 1), malformed ``cu_seqlens``).
        fastvit.BackendNotSupportedError: a backend forced with :func:`fastvit.use_backend` / ``FASTVIT_BACKEND``
            cannot serve the call (e.g. ``dropout > 0`` on triton or cuda, which have no dropout).
    """
    from fastvit import ops

    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f'attn_implementation="fastvit" does not support {name!r} (got {kwargs[name]!r}); use "eager" or a '
                "FlashAttention implementation that has it"
            )
    kwargs.pop("softcap", None)
    kwargs.pop("s_aux", None)
    q_len = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    max_q, max_k = kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
    if cu_q is not None or cu_k is not None:
        if attention_mask is not None or kwargs.get("position_bias") is not None or (is_causal and q_len > 1):
            raise ValueError(
                'attn_implementation="fastvit": cu_seq_lens_q / cu_seq_lens_k together with an attention mask, a '
                "position_bias or causal attention is not supported (and SDPA would ignore the offsets)"
            )
        out = _packed_from_offsets(query, key, value, cu_q, cu_k, max_q, max_k, dropout, scaling)
        _record(module, "packed (cu_seq_lens)")
        return out, None
    reason = plan = None
    if kwargs.get("position_bias") is not None:
        reason = _POSITION_BIAS
    elif attention_mask is not None:
        plan = _packing_of(attention_mask, query.shape[0], q_len, key.shape[2])
        if isinstance(plan, str):
            reason = plan
    elif is_causal and q_len > 1:
        reason = _IS_CAUSAL
    if reason is not None:
        _warn_once(reason)
        _record(module, "fallback: " + reason)
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if plan is not None:
        _record(module, f"packed ({plan.kind} mask)")
        return _packed_from_mask(query, key, value, attention_mask, plan, dropout, scaling), None

    n_rep = _check_heads(query, key, value)
    if n_rep > 1:
        key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    out = ops.scaled_dot_product_attention(query, key, value, scale=scaling, dropout_p=float(dropout))
    _record(module, "dense")
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------------ which modules run it
class AttentionRecord(NamedTuple):
    """One row of :func:`attention_report`.

    Fields:
        name: the attention module's qualified name in the model (``model.get_submodule(name)``).
        class_name: its class, e.g. ``'SiglipAttention'``, ``'MultiheadAttention'``.
        status: ``'fastvit'`` (it calls transformers' attention interface, its config asks for ``"fastvit"``, and its
            last call, if any, ran on fastvit), ``'fallback'`` (as ``'fastvit'``, but its last call fell back to
            transformers' SDPA: the reason says why), ``'other'`` (it calls the attention interface, but its config
            asks for another implementation) or ``'not covered'`` (it computes attention itself -- PyTorch's
            ``nn.MultiheadAttention``, a direct ``scaled_dot_product_attention`` call -- so no ``attn_implementation``
            reaches it).
        reason: why it is not ``'fastvit'`` (``''`` when it is).
        last_call: what its last call ran: ``'dense'``, ``'packed (key-padding mask)'``, ``'packed (block-diagonal
            mask)'``, ``'packed (cu_seq_lens)'``, ``'fallback: <reason>'``; ``''`` before any call through fastvit.
    """

    name: str
    class_name: str
    status: str
    reason: str
    last_call: str


_INTERFACE_MARKS = ("ALL_ATTENTION_FUNCTIONS", "attention_interface")
_ATTENTION_MARKS = _INTERFACE_MARKS + ("scaled_dot_product_attention", "softmax", "MultiheadAttention")
_SOURCE_CACHE: dict = {}


def _forward_source(cls: type) -> Optional[str]:
    if cls not in _SOURCE_CACHE:
        try:
            _SOURCE_CACHE[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError, AttributeError):
            _SOURCE_CACHE[cls] = None
    return _SOURCE_CACHE[cls]


def _is_attention_class(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.MultiheadAttention) or "Attention" in type(m).__name__


def _attention_leaves(model: torch.nn.Module):
    """``(name, module, config, uses_interface)`` for each attention module of ``model`` that computes attention:
    an ``nn.MultiheadAttention``, or a module whose class name contains ``Attention``, with no such module below it,
    whose ``forward`` calls transformers' attention interface or computes attention (softmax / SDPA). ``config`` is
    the module's own ``config`` or its nearest ancestor's; ``uses_interface`` is read off the forward's source."""
    from transformers import PretrainedConfig

    out = []

    def walk(prefix: str, m: torch.nn.Module, config) -> bool:
        own = m.__dict__.get("config")
        if isinstance(own, PretrainedConfig):
            config = own
        below = False
        for child_name, child in m.named_children():
            below |= walk(f"{prefix}.{child_name}" if prefix else child_name, child, config)
        if not _is_attention_class(m):
            return below
        if below:
            return True
        if isinstance(m, torch.nn.MultiheadAttention):
            out.append((prefix, m, config, False))
            return True
        src = _forward_source(type(m))
        if src is None or not any(mark in src for mark in _ATTENTION_MARKS):
            return False  # e.g. a *AttentionOutput projection: not attention itself
        out.append((prefix, m, config, any(mark in src for mark in _INTERFACE_MARKS)))
        return True

    walk("", model, None)
    return out


def _implementation(config) -> Optional[str]:
    return None if config is None else getattr(config, "_attn_implementation", None)


def _not_covered_reason(m: torch.nn.Module) -> str:
    if isinstance(m, torch.nn.MultiheadAttention):
        return (
            "torch.nn.MultiheadAttention (e.g. an attention-pooling head): PyTorch's own attention, which no "
            "attn_implementation reaches"
        )
    return (
        f"{type(m).__name__} computes attention itself (not through transformers' attention interface), so no "
        "attn_implementation reaches it"
    )


def attention_report(model: torch.nn.Module) -> List[AttentionRecord]:
    """Which attention modules of a Hugging Face model run on fastvit, and why the others do not.

    Lists, in module order, every module that computes attention (see :class:`AttentionRecord`): the ones that call
    transformers' attention interface, with the implementation their config asks for and what their last call ran
    (fastvit dense, fastvit packed, or transformers' SDPA and the reason), and the ones no ``attn_implementation``
    reaches (``nn.MultiheadAttention`` attention-pooling heads of SigLIP / SigLIP-2, AIMv2's pooling head, SAM's vision
    attention). Read off the model as it is now: the configuration at the call, the last call of each module (a
    forward between asking twice can change ``'fastvit'`` into ``'fallback'``).

    Args:
        model: a ``transformers`` model (any ``nn.Module``; modules without a config count as asking for nothing).

    Returns:
        A list of :class:`AttentionRecord` ``(name, class_name, status, reason, last_call)`` named tuples;
        :func:`format_attention_report` renders it as a table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: ``transformers`` is not installed.

    Example::

        model.set_attn_implementation("fastvit")
        model(**inputs)
        print(format_attention_report(attention_report(model)))
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows = []
    for name, m, config, uses_interface in _attention_leaves(model):
        last = m.__dict__.get(_PATH_ATTR, "")
        impl = _implementation(config)
        if not uses_interface:
            status, reason = "not covered", _not_covered_reason(m)
        elif impl not in _NAMES:
            status, reason = "other", f"its config asks for attn_implementation={impl!r}"
        elif last.startswith("fallback: "):
            status, reason = "fallback", last[len("fallback: ") :]
        else:
            status, reason = "fastvit", ""
        rows.append(AttentionRecord(name, type(m).__name__, status, reason, last))
    return rows


def format_attention_report(report: List[AttentionRecord]) -> str:
    """:func:`attention_report`'s rows as a fixed-width text table (module, class, status, last call, reason)
    followed by a line counting each status."""
    rows = [("module", "class", "status", "last call", "reason")] + [
        (r.name, r.class_name, r.status, r.last_call or "-", r.reason) for r in report
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    counts: dict = {}
    for r in report:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines.append(f"{len(report)} attention modules" + "".join(f", {n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------------ refusing models
class FastvitAttentionNotCoveredWarning(FastvitAttentionFallbackWarning):
    """A model asked for ``"fastvit"`` has attention modules that no ``attn_implementation`` reaches (an
    ``nn.MultiheadAttention`` pooling head, attention computed in place); they keep their own code."""


_CLASS_DICT = re.compile(r"\b(\w*ATTENTION\w*CLASSES)\s*\[\s*(?:self\.)?config\._attn_implementation\s*\]")
_REFUSAL_CACHE: dict = {}


def _class_refusal(cls: type) -> Optional[str]:
    """Why models of ``cls`` cannot take ``"fastvit"`` at all, read off its module: attention layers built from a
    ``*_ATTENTION_CLASSES[config._attn_implementation]`` table without a ``"fastvit"`` entry (SAM, SAM-HQ,
    Data2Vec-Vision, GIT, ...: transformers would fail with ``KeyError: 'fastvit'`` while building a layer, or, when
    switching, keep the classes it built)."""
    if cls in _REFUSAL_CACHE:
        return _REFUSAL_CACHE[cls]
    reason = None
    module = sys.modules.get(cls.__module__)
    try:
        src = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        src = ""
    for table in dict.fromkeys(_CLASS_DICT.findall(src)):
        classes = getattr(module, table, None)
        if isinstance(classes, dict) and ATTN_IMPLEMENTATION not in classes:
            reason = (
                f"its attention layers are built from {cls.__module__.rsplit('.', 1)[-1]}.{table}, which has only "
                f"{sorted(classes)}: they compute attention themselves, not through transformers' attention interface"
            )
            break
    _REFUSAL_CACHE[cls] = reason
    return reason


def _refuse(model_name: str, reason: str) -> None:
    raise ValueError(
        f'{model_name} cannot run attn_implementation="fastvit": {reason}. Use "sdpa" or "eager" for it (or, in a '
        'composite model, a dict such as {"vision_config": "sdpa", "text_config": "fastvit"})'
    )


def _check_model(model: torch.nn.Module) -> None:
    """After ``model`` was built with, or switched to, ``"fastvit"``: refuse (``ValueError``) when it has attention
    modules configured for ``"fastvit"`` and none of them calls the attention interface (nothing would run on
    fastvit); warn once per message about the attention modules no ``attn_implementation`` reaches."""
    leaves = _attention_leaves(model)
    asked = [(n, m, u) for n, m, c, u in leaves if _implementation(c) in _NAMES]
    if not asked:
        return
    if not any(u for _, _, u in asked):
        _refuse(type(model).__name__, _not_covered_reason(asked[0][1]) + f" ({len(asked)} attention modules)")
    skipped = [(n, m) for n, m, c, u in leaves if not u]
    if skipped:
        names = ", ".join(f"{n} ({type(m).__name__})" for n, m in skipped[:4]) + (" ..." if len(skipped) > 4 else "")
        message = (
            f'attn_implementation="fastvit" on {type(model).__name__}: {len(skipped)} attention module(s) compute '
            f"attention themselves and keep their own code: {names}; fastvit.integrations.hf.attention_report(model) "
            "lists them"
        )
        with _WARNED_LOCK:
            if message in _WARNED:
                return
            _WARNED.add(message)
        warnings.warn(message, FastvitAttentionNotCoveredWarning, stacklevel=4)


def _config_tree(model: torch.nn.Module):
    """``(configs, orphans)``: every config object of ``model`` (``{id: config}``: module configs and their
    ``sub_configs``, at any depth) and the orphans -- configs held by plain modules that transformers'
    ``set_attn_implementation`` does not visit (neither a ``PreTrainedModel``'s config nor one of its sub-configs,
    e.g. ViT-MAE's decoder config, a ``deepcopy`` of the model's) -- each with the config of its nearest enclosing
    ``PreTrainedModel``."""
    from transformers import PretrainedConfig, PreTrainedModel

    configs: dict = {}
    handled: set = set()

    def add(config, into: Optional[set]) -> None:
        stack = [config]
        while stack:
            c = stack.pop()
            if not isinstance(c, PretrainedConfig) or (into is not None and id(c) in into):
                continue
            configs[id(c)] = c
            if into is not None:
                into.add(id(c))
            for key in getattr(c, "sub_configs", {}) or {}:
                stack.append(getattr(c, key, None))

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            add(m.config, handled)
    orphans = []

    def walk(m: torch.nn.Module, owner) -> None:
        if isinstance(m, PreTrainedModel):
            owner = m.config
        own = m.__dict__.get("config")
        if isinstance(own, PretrainedConfig) and id(own) not in handled and owner is not None:
            handled.add(id(own))
            configs[id(own)] = own
            orphans.append((own, owner))
        for child in m.children():
            walk(child, owner)

    walk(model, None)
    return configs, orphans


def _get_impl(config):
    return config.__dict__.get("_attn_implementation_internal", getattr(config, "_attn_implementation", None))


def _set_impl(config, value) -> None:
    if "_attn_implementation_internal" in config.__dict__:
        config._attn_implementation_internal = value  # the raw field: no recursion into sub-configs
    else:  # transformers without the internal field
        config._attn_implementation = value


def _mentions(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_mentions(v) for v in value.values())
    return isinstance(value, str) and value in _NAMES


def _wrap_set_attn_implementation(original):
    @functools.wraps(original)
    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        configs, orphans = _config_tree(self)
        before = {i: _get_impl(c) for i, c in configs.items()}
        if not _mentions(attn_implementation) and not any(_mentions(v) for v in before.values()):
            return original(self, attn_implementation, *args, **kwargs)
        try:
            result = original(self, attn_implementation, *args, **kwargs)
            # configs that followed their model's implementation follow it again (transformers leaves them behind)
            for orphan, owner in orphans:
                was, now = before[id(orphan)], _get_impl(owner)
                if was == before[id(owner)] and now != was and (_mentions(was) or _mentions(now)):
                    _set_impl(orphan, now)
            if any(_mentions(_get_impl(c)) for c in configs.values()):
                _check_model(self)
        except BaseException:
            for i, c in configs.items():  # refused (or transformers raised): leave the model as it was
                _set_impl(c, before[i])
            raise
        return result

    return set_attn_implementation


def _wrap_check_and_adjust(original):
    @functools.wraps(original)
    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        if _mentions(attn_implementation):
            reason = _class_refusal(type(self))
            if reason is not None:
                _refuse(type(self).__name__, reason)
            if attn_implementation == FLASH_ATTN_IMPLEMENTATION:
                # transformers would try to import a FlashAttention package or Hub kernel for a name with "flash" in
                # it; this one is registered with the attention interface and needs neither
                return attn_implementation
        return original(self, attn_implementation, *args, **kwargs)

    return _check_and_adjust_attn_implementation


def _wrap_post_init(original):
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        config = getattr(self, "config", None)
        if _mentions(_implementation(config)):
            _check_model(self)
        return result

    return post_init


_WRAPPERS = {
    "set_attn_implementation": _wrap_set_attn_implementation,
    "_check_and_adjust_attn_implementation": _wrap_check_and_adjust,
    "post_init": _wrap_post_init,
}
_WRAPPED_ATTR = "__fastvit_wrapped__"


def _install_model_hooks() -> None:
    """Wrap three ``PreTrainedModel`` methods (idempotent): ``set_attn_implementation`` (configs that followed their
    model follow a switch to / from ``"fastvit"``; a model that cannot take it is refused and left as it was),
    ``_check_and_adjust_attn_implementation`` (the class-level refusal, before any layer is built) and ``post_init``
    (the same checks for a model built with ``"fastvit"``). Each does nothing unless ``"fastvit"`` is involved."""
    from transformers import PreTrainedModel

    for name, wrap in _WRAPPERS.items():
        original = PreTrainedModel.__dict__.get(name)
        if original is None or getattr(original, _WRAPPED_ATTR, False):
            continue
        wrapped = wrap(original)
        setattr(wrapped, _WRAPPED_ATTR, True)
        setattr(PreTrainedModel, name, wrapped)


# ------------------------------------------------------------------------------------------------ registration
def register_attention() -> None:
    """Register ``"fastvit"`` and ``"fastvit_flash"`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface``, and install the ``PreTrainedModel`` checks below.

    After it, ``Model.from_pretrained(..., attn_implementation="fastvit")``, ``Model._from_config(config,
    attn_implementation="fastvit")`` and ``model.set_attn_implementation("fastvit")`` run every attention layer of
    a model that supports the attention interface (``_supports_attention_backend``: ViT, DINOv2, SigLIP / SigLIP-2,
    CLIP, ViT-MAE, Idefics3, Pixtral, the Qwen-VL towers, ...) through :func:`fastvit_attention_forward`. The mask
    entry is transformers' ``sdpa_mask`` (boolean masks, ``True`` = attend; ``None`` where nothing is masked), so
    padding masks reach the attention function. ``"fastvit_flash"`` is the same function under a name transformers
    takes for a FlashAttention-style one (so Qwen-VL / Pixtral towers pass ``cu_seq_lens_q``); transformers'
    FlashAttention import check, which would look for a Hub kernel of that name, is skipped for it.

    ``PreTrainedModel`` gets three wrapped methods (once; each does nothing unless one of the two names is
    involved):

    * ``set_attn_implementation``: configs that plain modules hold and transformers does not visit -- ViT-MAE's
      decoder config, a ``deepcopy`` of the model's -- follow their model's switch to or from ``"fastvit"`` when they
      followed it before; a model that cannot take it is refused (``ValueError``) and left as it was;
    * ``_check_and_adjust_attn_implementation`` (called when a model is built and when it is switched): refuses,
      before any layer is built, a model whose attention layers come from a ``*_ATTENTION_CLASSES`` table without
      ``"fastvit"`` (SAM, SAM-HQ, Data2Vec-Vision, GIT: transformers would otherwise raise ``KeyError: 'fastvit'``
      inside a layer, or switch silently and keep its SDPA layers);
    * ``post_init`` (the end of every model's ``__init__``): for a model built with ``"fastvit"``, refuses it when none
      of its attention modules calls the attention interface, and warns once
      (:class:`FastvitAttentionNotCoveredWarning`) about attention modules that compute attention themselves
      (``nn.MultiheadAttention`` pooling heads of SigLIP / SigLIP-2, AIMv2's pooling head).

    Idempotent (registering again replaces the entries with the same functions, and wraps nothing twice).
    ``import fastvit`` calls it when ``transformers`` was imported first. Imports ``transformers``
    (``modeling_utils``, ``masking_utils``).

    Raises:
        ImportError: ``transformers`` is not installed, or too old to have ``AttentionInterface`` (4.48+).

    Source: transformers' "Attention interface" documentation (``AttentionInterface.register``,
    ``AttentionMaskInterface.register``).
    """
    from transformers import AttentionInterface

    for name in _NAMES:
        AttentionInterface.register(name, fastvit_attention_forward)
    _install_model_hooks()
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds masks without an interface (SDPA-style for unknown names)
        return
    for name in _NAMES:
        AttentionMaskInterface.register(name, sdpa_mask)
