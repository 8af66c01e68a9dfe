"""``attn_implementation="fastvit"`` for Hugging Face ``transformers`` models (attention only).

:func:`register_attention` adds the name ``"fastvit"`` to transformers' ``AttentionInterface`` (the registry behind
``Model.from_pretrained(..., attn_implementation=...)`` and ``model.set_attn_implementation(...)``, through which
SDPA, FlashAttention and FlexAttention plug in) and the same name to ``AttentionMaskInterface`` (with
transformers' own ``sdpa_mask``: boolean ``(B, 1, Nq, Nk)`` masks, ``None`` when there is nothing to mask), so that
a model's padding mask still reaches the attention function instead of being dropped -- transformers hands no mask
at all to an implementation that has no mask entry.

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
* a key-padding mask (what HF vision towers build from ``attention_mask``), a causal or any other mask, an
  additive bias (``position_bias`` or a float mask), or ``is_causal`` -> transformers' own SDPA attention
  (``torch.nn.functional.scaled_dot_product_attention``), with a :class:`FastvitAttentionFallbackWarning` naming the
  reason, once per reason per process.

Source: transformers' "Attention interface" documentation (``transformers.AttentionInterface``) and its reference
implementation ``transformers/integrations/sdpa_attention.py`` (``sdpa_attention_forward``), whose signature and
return convention this follows.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Optional, Tuple

import torch

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FastvitAttentionFallbackWarning",
    "fastvit_attention_forward",
    "register_attention",
]

#: The name models are given: ``attn_implementation="fastvit"``.
ATTN_IMPLEMENTATION = "fastvit"


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
_KEY_PADDING = (
    "a key-padding attention mask (some keys masked for every query): fastvit's attention takes no mask; its "
    "packed attention (ops.attention with cu_seqlens) needs the tokens unpadded before the model, not per layer"
)
_CAUSAL_MASK = "a causal attention mask: fastvit's attention kernels are bidirectional and take no mask"
_OTHER_MASK = "an attention mask that is neither empty nor key-padding: fastvit's attention kernels take no mask"
_ADDITIVE = "an additive attention bias (a float mask with finite non-zero values): fastvit's kernels take no bias"
_IS_CAUSAL = (
    "is_causal=True (the is_causal argument, or module.is_causal): fastvit's attention kernels are bidirectional"
)
_POSITION_BIAS = "a position_bias (an additive attention bias): fastvit's attention kernels take no bias"


def _mask_reason(mask: Any) -> Optional[str]:
    """``None`` when ``mask`` masks nothing (fastvit can serve the call), else why the call falls back.

    ``mask`` is what transformers passes: ``None``, a boolean mask broadcastable to ``(B, H, Nq, Nk)`` with ``True``
    = attend (``sdpa_mask``), or an additive float mask (0 = attend, a very negative value or -inf = masked). A
    non-``None`` tensor costs one reduction and a host sync; transformers' mask creation already turns "no padding"
    into ``None``, so that happens only for masks a caller built.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        return f"an attention mask of type {type(mask).__name__} (not a tensor): fastvit's kernels take no mask"
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return None
        keep = mask
    else:
        if not bool(mask.any()):
            return None
        masked = mask <= torch.finfo(mask.dtype).min / 2  # -inf, finfo.min (HF's eager masks), and the like
        if not bool((masked | (mask == 0)).all()):
            return _ADDITIVE
        keep = ~masked
    if keep.dim() < 2:
        return _OTHER_MASK
    if bool((keep == keep[..., :1, :]).all()):
        return _KEY_PADDING
    n_q, n_k = keep.shape[-2], keep.shape[-1]
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=keep.device).tril(n_k - n_q)
    if bool((keep == causal).all()):
        return _CAUSAL_MASK
    return _OTHER_MASK


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv·n_rep, N, D), each key / value head repeated for its ``n_rep`` query heads (HF's
    ``repeat_kv``, i.e. ``repeat_interleave`` on dim 1). A copy: one head dim cannot express the repetition as a
    stride."""
    B, H_kv, N, D = t.shape
    return t[:, :, None].expand(B, H_kv, n_rep, N, D).reshape(B, H_kv * n_rep, N, D)


# ------------------------------------------------------------------------------------------------ the function
def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


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
            float mask. One that masks nothing runs on fastvit; any other falls back (see the module docstring).
        dropout: attention-probability dropout in [0, 1); transformers passes 0 outside training. Passed to fastvit
            as ``dropout_p`` (automatic dispatch then picks a backend with dropout: eager).
        scaling: the softmax scale; ``None`` means D ** -0.5.
        is_causal: causal attention; ``True`` (with Nq > 1 and no mask) falls back.
        **kwargs: ``position_bias`` (falls back), ``softcap`` / ``s_aux`` (attention-logit soft-capping and attention
            sinks: not supported, raise), and the rest of transformers' per-call kwargs (``output_attentions``,
            ``sliding_window`` -- encoded in the mask --, ...), which are ignored.

    Returns:
        ``(attn_output, None)``: ``attn_output`` (B, Nq, H, D) contiguous, in ``query``'s dtype (the kernels write
        (B, H, Nq, D); this transpose is the one copy, the same one transformers' SDPA function makes). No attention
        weights are materialised, so the second slot is always ``None`` (``output_attentions`` needs ``"eager"``).

    Raises:
        ValueError: ``H`` not a multiple of ``Hkv``; a ``softcap`` or ``s_aux`` argument; everything
            :func:`fastvit.ops.scaled_dot_product_attention` raises (mismatched dtypes / devices, a non-contiguous
            last dim, ``dropout`` outside [0, 1)).
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
    reason = None
    if kwargs.get("position_bias") is not None:
        reason = _POSITION_BIAS
    elif attention_mask is not None:
        reason = _mask_reason(attention_mask)
    elif is_causal and q_len > 1:
        reason = _IS_CAUSAL
    if reason is not None:
        _warn_once(reason)
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    H, H_kv = query.shape[1], key.shape[1]
    if H_kv != H:
        if H_kv < 1 or H % H_kv or value.shape[1] != H_kv:
            raise ValueError(
                f"query has {H} heads but key / value {H_kv} / {value.shape[1]}: grouped-query attention needs the "
                "key / value heads to divide the query heads"
            )
        key, value = _repeat_kv(key, H // H_kv), _repeat_kv(value, H // H_kv)
    out = ops.scaled_dot_product_attention(query, key, value, scale=scaling, dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------------ registration
def register_attention() -> None:
    """Register ``"fastvit"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    After it, ``Model.from_pretrained(..., attn_implementation="fastvit")``, ``Model._from_config(config,
    attn_implementation="fastvit")`` and ``model.set_attn_implementation("fastvit")`` run every attention layer of
    a model that supports the attention interface (``_supports_attention_backend``: ViT, DINOv2, SigLIP, CLIP,
    ViT-MAE, ...) through :func:`fastvit_attention_forward`. The mask entry is transformers' ``sdpa_mask`` (boolean
    masks, ``True`` = attend; ``None`` where nothing is masked), so padding masks reach the attention function.

    Idempotent (registering again replaces the entries with the same functions). ``import fastvit`` calls it when
    ``transformers`` was imported first. Imports ``transformers`` (``modeling_utils``, ``masking_utils``).

    Raises:
        ImportError: ``transformers`` is not installed, or too old to have ``AttentionInterface`` (4.48+).

    Source: transformers' "Attention interface" documentation (``AttentionInterface.register``,
    ``AttentionMaskInterface.register``).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fastvit_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds masks without an interface (SDPA-style for unknown names)
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
