"""The attention family: ``fastvit.ops.attention`` (fused-QKV self-attention on the packed ``qkv`` Linear output)
and ``fastvit.ops.scaled_dot_product_attention`` (per-head ``(B, H, N, D)`` tensors), on every backend.

One place for everything of the family but the public checked signatures (:mod:`fastvit.ops`) and the kernels
themselves (``kernels/attention.py``, ``csrc/attention/``):

* eager -- ``F.scaled_dot_product_attention`` on views of ``qkv`` (as timm does);
* autograd -- one ``setup_context`` / ``backward`` pair per op, shared by the Triton and the CUDA ops;
* Triton -- the registered ops, ``triton_op`` + ``wrap_triton`` launches of the FlashAttention-2 kernels (forward,
  preprocess, dK/dV, dQ), so fake implementations come from tracing the host code:

  =================================  ===============================================================================
  ``fastvit::attention_fwd``         (qkv (B,N,3C), num_heads, scale) -> (o (B,N,C), lse (B,H,N) fp32)
  ``fastvit::attention_bwd``         (do, qkv, o, lse, num_heads, scale) -> dqkv (B,N,3C)
  ``fastvit::sdpa_fwd``              (q, k, v (B,H,N*,D), scale) -> (o (B,H,Nq,D), lse (B,H,Nq) fp32)
  ``fastvit::sdpa_bwd``              (do, q, k, v, o, lse, scale) -> (dq, dk, dv)
  ``fastvit::attention_varlen_fwd``  (qkv (T,3C), cu_seqlens (S+1,) int32, max_seqlen, num_heads, scale) ->
                                     (o (T,C), lse (H,T) fp32)
  ``fastvit::attention_varlen_bwd``  (do, qkv, cu_seqlens, max_seqlen, o, lse, num_heads, scale) -> dqkv (T,3C)
  ``fastvit::sdpa_varlen_fwd``       (q, k, v (T,H,D), cu_seqlens, max_seqlen, scale) -> (o (T,H,D), lse (H,T) fp32)
  ``fastvit::sdpa_varlen_bwd``       (do, q, k, v, cu_seqlens, max_seqlen, o, lse, scale) -> (dq, dk, dv)
  =================================  ===============================================================================

  The ``_varlen`` ops take S sequences packed along the first dim (sequence ``s`` is rows
  ``cu_seqlens[s] : cu_seqlens[s + 1]``, attending only to itself; FlashAttention's ``flash_attn_varlen_func``
  convention); ``max_seqlen`` bounds every length and sizes the grid.

* CUDA -- fakes of the same schemas with a ``_cuda`` suffix (defined in ``csrc/``), dispatch entries, and the
  capability checks read from the build (head-dim buckets, the backward's shared memory, packed sequences). Packed
  variable-length sequences (``cu_seqlens``, FlashAttention's ``flash_attn_varlen_func`` layout) have their own ops,
  enabled only for a build that reports ``attention_varlen``:

  ====================================  ===============================================================================
  ``attention_varlen_fwd_cuda``         (qkv (T,3C), cu_seqlens int32 (S+1,), max_seqlen, num_heads, scale)
                                        -> (o (T,C), lse (H,T) fp32)
  ``attention_varlen_bwd_cuda``         (do, qkv, cu_seqlens, max_seqlen, o, lse, num_heads, scale) -> dqkv (T,3C)
  ``sdpa_varlen_fwd_cuda``              (q, k, v (T,H,D), cu_seqlens, max_seqlen, scale) -> (o (T,H,D), lse (H,T))
  ``sdpa_varlen_bwd_cuda``              (do, q, k, v, cu_seqlens, max_seqlen, o, lse, scale) -> (dq, dk, dv)
  ====================================  ===============================================================================

  Every CUDA op, as every Triton op, ends with the rotary arguments ``rope=None, num_prefix_tokens=0,
  rotate_half=False`` (q and k rotated as the kernels load them, dq and dk rotated back); the CUDA backend serves
  ``rope=`` calls only for a build that reports ``attention_rope``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import reference
from fastvit.backends import Capabilities, _select, register_kernel
from fastvit.declare import Arg, OpDeclaration, SelftestShape, TinyCall, call_builder, declare
from fastvit.families._checks import (
    amp_dtype,
    check_cu_seqlens,
    check_dropout,
    check_like,
    check_packed_dim,
    check_tensor,
)
from fastvit.families._common import SELFTEST_BATCH, attach, autocast_cast, by_mode, op
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

# ============================================================================================ the ops
_describe = call_builder("head_dim", "dropout_p", "batch", "num_tokens", "num_kv_tokens", "rope", "rope_per_sample")


def _check_rope(
    rope,
    num_prefix_tokens,
    rotate_half,
    ref: torch.Tensor,
    ref_name: str,
    num_heads: int,
    head_dim: int,
    n: int,
    batch: int,
    packed: bool,
) -> torch.Tensor | None:
    """The checked rotary table, as the kernels take it: (N_rot, 2·D) shared by the heads or (H, N_rot, 2·D) per
    head, both shared by the batch (leading singleton dims of timm's (1, H, N_rot, 2·D) / (1, N_rot, 2·D) forms
    dropped), or 4-D (``batch``, 1 or H, N_rot, 2·D): a table per sample, or per packed sequence (``packed``, then
    ``batch`` is S), with a leading dim > 1. ``n``: the tokens of the longest sequence. ``None`` without ``rope``."""
    if rope is None and num_prefix_tokens == 0 and rotate_half.__class__ is bool:  # no rotation (every plain call)
        return None
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if not isinstance(rotate_half, bool):
        raise TypeError(f"rotate_half must be a bool, got {type(rotate_half).__name__}")
    if rope is None:
        if num_prefix_tokens:
            raise ValueError(
                f"num_prefix_tokens={num_prefix_tokens} is only meaningful with rope (the tokens left unrotated); "
                "got rope=None"
            )
        return None
    check_tensor("rope", rope)
    if rope.device != ref.device:
        raise ValueError(f"rope is on {rope.device} but {ref_name} is on {ref.device}; expected the same device")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    shape = tuple(rope.shape)
    if rope.dim() == 4:
        lead = rope.shape[0]
        if lead == 1:  # timm's (1, H, N_rot, 2·D) / (1, 1, N_rot, 2·D): shared by the batch
            rope = rope[0]
        elif lead != batch:
            one = "sequence" if packed else "sample"
            many = f"the number of packed sequences S = {batch}" if packed else f"the batch B = {batch}"
            raise ValueError(
                f"rope's leading dim is {lead} (shape {shape}): a 4-D rope is (1, 1 or H, N_rot, 2·D), shared by the "
                f"batch, or a table per {one} (B or S, 1 or H, N_rot, 2·D) whose leading dim is {many}"
            )
        elif rope.shape[1] not in (1, num_heads):
            raise ValueError(
                f"rope has {rope.shape[1]} heads (shape {shape}: a table per sample), expected 1 or num_heads = "
                f"{num_heads}"
            )
    if rope.dim() == 3 and rope.shape[0] == 1:
        rope = rope[0]
    if rope.dim() not in (2, 3, 4):
        raise ValueError(
            f"rope must be (N_rot, 2·D), (H, N_rot, 2·D) or, a table per sample, (B, 1 or H, N_rot, 2·D) (timm's "
            f"cat([sin, cos], -1)), got {shape}"
        )
    if rope.dim() == 3 and rope.shape[0] != num_heads:
        raise ValueError(
            f"rope has {rope.shape[0]} heads (shape {shape}), expected 1 or num_heads = {num_heads} (a 3-D rope is a "
            "table per head; a table per sample is (B, 1 or H, N_rot, 2·D))"
        )
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dim (rotation pairs), got D = {head_dim}")
    if rope.shape[-1] != 2 * head_dim:
        raise ValueError(
            f"rope's last dim must be 2·D = {2 * head_dim} (timm's cat([sin, cos], -1) for head dim {head_dim}), "
            f"got {shape}"
        )
    need = n - num_prefix_tokens
    if rope.shape[-2] < need:
        raise ValueError(
            f"rope has {rope.shape[-2]} rows (shape {shape}) but the {need} tokens after the "
            f"num_prefix_tokens={num_prefix_tokens} prefix tokens need {need}"
        )
    return rope


def _prepare_attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
) -> tuple:
    packed = cu_seqlens is not None
    if packed:
        check_packed_dim("qkv", qkv, 2, packed, "(T, 3·C)")
    check_tensor("qkv", qkv, 2 if packed else 3)
    amp = amp_dtype(qkv)
    if amp is not None:
        (qkv,) = autocast_rule(amp, qkv)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    shape = qkv.shape
    C3 = shape[-1]
    if C3 % (3 * num_heads) or C3 == 0:
        raise ValueError(f"qkv's last dim ({C3}) must be a positive multiple of 3 * num_heads = {3 * num_heads}")
    if dropout_p != 0.0:
        check_dropout(dropout_p)
    head_dim = C3 // (3 * num_heads)
    plain = rope is None and num_prefix_tokens == 0 and rotate_half is False  # no rotary arguments to check
    if packed:
        S, n = check_cu_seqlens(cu_seqlens, max_seqlen, shape[0], "qkv", qkv)
        rope = _check_rope(rope, num_prefix_tokens, rotate_half, qkv, "qkv", num_heads, head_dim, n, S, True)
        call = _describe(
            qkv.device,
            qkv.dtype,
            head_dim=head_dim,
            dropout_p=dropout_p,
            batch=S,
            num_tokens=n,
            num_kv_tokens=n,
            rope=rope is not None,
            rope_per_sample=rope is not None and rope.dim() == 4,
            varlen=True,
        )
        return call, qkv, rope
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed sequences); got cu_seqlens=None")
    B, N, _ = shape
    if not plain:
        rope = _check_rope(rope, num_prefix_tokens, rotate_half, qkv, "qkv", num_heads, head_dim, N, B, False)
    call = _describe(
        qkv.device,
        qkv.dtype,
        head_dim=head_dim,
        dropout_p=dropout_p,
        batch=B,
        num_tokens=N,
        num_kv_tokens=N,
        rope=rope is not None,
        rope_per_sample=rope is not None and rope.dim() == 4,
    )
    return call, qkv, rope


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head self-attention read straight from the packed output of a ``qkv`` Linear.

    ``qkv`` is laid out as timm's / MAE's ``Attention.qkv`` output: the last dim is ``[q | k | v]``, each
    head-major (head h owns columns ``h·D : (h+1)·D`` of its third). Computes softmax(q kᵀ · scale) v per head
    (Vaswani et al., 2017) and returns the heads concatenated, ready for ``proj``.

    With ``cu_seqlens``, ``qkv`` holds S sequences of different lengths packed along its first dim, without padding
    (NaViT, Dehghani et al., 2023; the ``cu_seqlens`` convention of FlashAttention's ``flash_attn_varlen_*``):
    sequence ``s`` is rows ``cu_seqlens[s] : cu_seqlens[s + 1]`` and attends only to itself.

    With ``rope``, q and k are rotated first, exactly as timm's ``EvaAttention`` / ``AttentionRope`` do with the
    ``rope`` their ``forward(x, rope=...)`` receives (rotary position embeddings, RoFormer, Su et al., 2021,
    arXiv:2104.09864; 2D as in EVA-02, DINOv3, Perception Encoder, RoPE-ViT): the first ``num_prefix_tokens`` tokens
    of each sequence (cls, registers) are left as they are, and the token at position p >= ``num_prefix_tokens``
    (counted from its sequence's first row) becomes ``x·cos + rot(x)·sin`` with row ``p - num_prefix_tokens`` of
    the table (timm's ``apply_rot_embed_cat``, in fp32 for an fp32 table, rounded to ``qkv``'s dtype). The kernels
    rotate q and k as they load them (no rotated copy is written) and read one angle per rotation pair, so each pair
    of columns must hold one angle (``sin[..., j] == sin[..., j']`` for paired j, j', likewise ``cos``) with
    sin² + cos² = 1 -- as every timm rotary module's table does (``RotaryEmbeddingCat``, ``RotaryEmbeddingMixed``,
    ``RotaryEmbeddingDinoV3``). A table that requires grad (timm's learnable ``RotaryEmbeddingMixed`` frequencies)
    gets its gradient.

    Args:
        qkv: (B, N, 3·C) float, C = num_heads · D; with ``cu_seqlens``: (T, 3·C) for T packed tokens.
        num_heads: H >= 1.
        cu_seqlens: int32 (S + 1,) offsets on ``qkv``'s device: 0, then the running sum of the S lengths (so
            ``cu_seqlens[-1] == T``); ``None``: ``qkv`` is a dense batch.
        max_seqlen: the longest sequence (or any larger bound); ``None`` computes it from ``cu_seqlens`` (one host
            sync, which the value checks of ``cu_seqlens`` make anyway).
        scale: softmax scale; default D ** -0.5.
        dropout_p: attention-probability dropout (timm's ``attn_drop``), applied only when > 0.
        rope: timm's rotary table ``cat([sin, cos], -1)``, any float dtype (kept as given under autocast), on
            ``qkv``'s device: (N_rot, 2·D) shared by the heads (``RotaryEmbeddingCat`` / ``RotaryEmbeddingDinoV3``),
            or (H, N_rot, 2·D) per head (one block's ``RotaryEmbeddingMixed`` table), also as (1, H, N_rot, 2·D)
            / (1, N_rot, 2·D); or a table per sample, (B, 1, N_rot, 2·D) shared by the heads or (B, H, N_rot, 2·D)
            per head (timm's NaFlexVit, ``_generate_rope_naflex``, and Eva's patch dropout after the keep indices):
            sample b is rotated with table b; with ``cu_seqlens`` the leading dim is S and sequence s is rotated
            with table s (row ``p - num_prefix_tokens`` for its token at position p). A 3-D table is always per head.
            N_rot >= N - num_prefix_tokens (``max_seqlen - num_prefix_tokens`` packed), the first rows used.
            ``None``: no rotation.
        num_prefix_tokens: tokens at the start of each sequence that are not rotated (timm's ``num_prefix_tokens``:
            cls and register tokens); only with ``rope``.
        rotate_half: the table's column layout (timm's ``rotate_half`` / ``half``): True pairs column j with
            j + D/2 (GPT-NeoX style, FlashAttention's ``interleaved=False``), False (timm's default) pairs columns
            2i and 2i + 1 (FlashAttention's ``interleaved=True``).
        backend: force a backend.

    Returns:
        (B, N, C) -- with ``cu_seqlens``: (T, C) -- in ``qkv``'s dtype.

    Raises:
        TypeError: ``qkv`` not a float tensor, ``num_heads`` / ``max_seqlen`` not an int, ``cu_seqlens`` not int32.
        ValueError: ``qkv`` not 3-D (2-D with ``cu_seqlens``), its last dim not divisible by 3·num_heads,
            ``num_heads`` < 1, ``dropout_p`` outside [0, 1); ``cu_seqlens`` not 1-D with >= 2 entries, on another
            device, not starting at 0, decreasing, or not ending at T; ``max_seqlen`` below the longest sequence or
            given without ``cu_seqlens``; ``rope`` not a float tensor on ``qkv``'s device, of another rank, with a
            head count other than 1 or H, a 4-D leading dim other than 1 or B (S packed), a last dim other than
            2·D, an odd D, or fewer rows than the tokens after the prefix; ``num_prefix_tokens`` negative, not an int, or given without
            ``rope``; ``rotate_half`` not a bool.

    Equivalent PyTorch code::

        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        if rope is not None:  # timm's EvaAttention
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=rotate_half)], 2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=rotate_half)], 2).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, H * D)
        # with cu_seqlens: the same on each qkv[cu_seqlens[s]:cu_seqlens[s + 1]][None], concatenated (with rope[s]
        # for a table per sequence)
    """
    call, qkv, rope = _prepare_attention(
        qkv,
        num_heads,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        scale=scale,
        dropout_p=dropout_p,
        rope=rope,
        num_prefix_tokens=num_prefix_tokens,
        rotate_half=rotate_half,
    )
    fn = _select("attention", call, backend)[1]
    if rope is None and cu_seqlens is None:
        return fn(qkv, num_heads, scale=scale, dropout_p=dropout_p)
    kw = {} if rope is None else dict(rope=rope, num_prefix_tokens=num_prefix_tokens, rotate_half=rotate_half)
    if cu_seqlens is None:
        return fn(qkv, num_heads, scale=scale, dropout_p=dropout_p, **kw)
    return fn(qkv, num_heads, scale=scale, dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=call.num_tokens, **kw)


def _prepare_scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
) -> tuple:
    packed = cu_seqlens is not None
    ndim = 3 if packed else 4
    if packed:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_packed_dim(name, t, 3, packed, "(T, H, D)")
    check_tensor("q", q, ndim)
    check_tensor("k", k, ndim)
    check_tensor("v", v, ndim)
    amp = amp_dtype(q)
    if amp is not None:
        q, k, v = autocast_rule(amp, q, k, v)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q, k.shape)
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
        check_dropout(dropout_p)
    if packed:
        S, n = check_cu_seqlens(cu_seqlens, max_seqlen, T, "q", q)
        rope = _check_rope(rope, num_prefix_tokens, rotate_half, q, "q", H, D, n, S, True)
        call = _describe(
            q.device,
            q.dtype,
            head_dim=D,
            dropout_p=dropout_p,
            batch=S,
            num_tokens=n,
            num_kv_tokens=n,
            rope=rope is not None,
            rope_per_sample=rope is not None and rope.dim() == 4,
            varlen=True,
        )
        return call, q, k, v, rope
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed sequences); got cu_seqlens=None")
    n_q, n_kv = q.shape[2], k.shape[2]
    if rope is not None and n_q != n_kv:
        raise ValueError(
            f"rope needs self-attention (one position per token for q and k): q has {n_q} tokens and k {n_kv}"
        )
    rope = _check_rope(rope, num_prefix_tokens, rotate_half, q, "q", H, D, n_q, B, False)
    call = _describe(
        q.device,
        q.dtype,
        head_dim=D,
        dropout_p=dropout_p,
        batch=B,
        num_tokens=n_q,
        num_kv_tokens=n_kv,
        rope=rope is not None,
        rope_per_sample=rope is not None and rope.dim() == 4,
    )
    return call, q, k, v, rope


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
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
        rope, num_prefix_tokens, rotate_half: rotary position embeddings on q and k, as :func:`attention` (self-
            attention only: Nq = Nk; q and k are taken after any qk-norm, as timm applies rope after it).
        backend: force a backend.

    Returns:
        (B, H, Nq, D) -- with ``cu_seqlens``: (T, H, D) -- in ``q``'s dtype.

    Raises:
        TypeError / ValueError: non-float or mismatched dtypes, devices or shapes; a last dim with stride != 1;
            malformed ``cu_seqlens`` / ``max_seqlen``, ``rope`` (a table per sample: leading dim B, or S packed),
            ``num_prefix_tokens`` or ``rotate_half`` (as :func:`attention`); ``rope`` with Nq != Nk.

    Equivalent PyTorch code: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)`` (with
    ``cu_seqlens``: on each sequence's ``(1, H, n, D)`` transpose, concatenated; with ``rope``: q and k rotated
    first, as in :func:`attention`).
    """
    call, q, k, v, rope = _prepare_scaled_dot_product_attention(
        q,
        k,
        v,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        scale=scale,
        dropout_p=dropout_p,
        rope=rope,
        num_prefix_tokens=num_prefix_tokens,
        rotate_half=rotate_half,
    )
    fn = _select("scaled_dot_product_attention", call, backend)[1]
    kw = {} if rope is None else dict(rope=rope, num_prefix_tokens=num_prefix_tokens, rotate_half=rotate_half)
    if cu_seqlens is None:
        return fn(q, k, v, scale=scale, dropout_p=dropout_p, **kw)
    return fn(q, k, v, scale=scale, dropout_p=dropout_p, cu_seqlens=cu_seqlens, max_seqlen=call.num_tokens, **kw)


def _cu_seqlens(lengths: tuple[int, ...]) -> Tensor:
    from fastvit.nn.packed import cu_seqlens_from_lengths  # fastvit.nn imports fastvit.ops, which imports this

    return cu_seqlens_from_lengths(lengths)


def _attention_shape(N: int, H: int, D: int):
    return lambda g: {"qkv": (SELFTEST_BATCH, N, 3 * H * D), "num_heads": H}


def _attention_packed_shape(lengths: tuple[int, ...], H: int, D: int):
    return lambda g: {"qkv": (sum(lengths), 3 * H * D), "num_heads": H, "cu_seqlens": _cu_seqlens(lengths)}


def rope_table(n_rot: int, head_dim: int, heads: int | None, rotate_half: bool, g: torch.Generator) -> Tensor:
    """A random rotary table in timm's form ``cat([sin, cos], -1)``: (n_rot, 2·D), or (heads, n_rot, 2·D) per head,
    one random angle per rotation pair (in both columns of the pair, ``rotate_half`` or interleaved), as timm's
    tables hold them; for the self-test and the tests."""
    lead = (n_rot,) if heads is None else (heads, n_rot)
    theta = torch.rand(*lead, head_dim // 2, generator=g, dtype=torch.float64) * 2 * torch.pi
    theta = torch.cat([theta, theta], -1) if rotate_half else theta.repeat_interleave(2, -1)
    return torch.cat([theta.sin(), theta.cos()], -1).float()


def _attention_rope_shape(N: int, H: int, D: int, npt: int, per_head: bool, rotate_half: bool):
    def make(g):
        rope = rope_table(N - npt, D, H if per_head else None, rotate_half, g)
        out = {"qkv": (SELFTEST_BATCH, N, 3 * H * D), "num_heads": H, "rope": rope}
        return out | {"num_prefix_tokens": npt, "rotate_half": rotate_half}

    return make


def _attention_rope_packed_shape(lengths: tuple[int, ...], H: int, D: int, npt: int, per_head: bool, half: bool):
    def make(g):
        rope = rope_table(max(lengths) - npt, D, H if per_head else None, half, g)
        out = {"qkv": (sum(lengths), 3 * H * D), "num_heads": H, "cu_seqlens": _cu_seqlens(lengths), "rope": rope}
        return out | {"num_prefix_tokens": npt, "rotate_half": half}

    return make


def _attention_rope_per_sample_shape(
    lengths: tuple[int, ...] | int, H: int, D: int, npt: int, per_head: bool, half: bool
):
    """A self-test call with a table per sample: ``lengths`` an int N (dense, SELFTEST_BATCH samples) or the packed
    sequences' lengths (one table per sequence); every table drawn separately, so each sample's differs."""

    def make(g):
        packed = not isinstance(lengths, int)
        n, count = (max(lengths), len(lengths)) if packed else (lengths, SELFTEST_BATCH)
        tables = torch.stack([rope_table(n - npt, D, H if per_head else None, half, g) for _ in range(count)])
        out = {"num_heads": H, "rope": tables if per_head else tables[:, None]}
        if packed:
            out |= {"qkv": (sum(lengths), 3 * H * D), "cu_seqlens": _cu_seqlens(lengths)}
        else:
            out |= {"qkv": (SELFTEST_BATCH, n, 3 * H * D)}
        return out | {"num_prefix_tokens": npt, "rotate_half": half}

    return make


def _sdpa_shape(Nq: int, Nk: int, H: int, D: int):
    B = SELFTEST_BATCH
    return lambda g: {"q": (B, H, Nq, D), "k": (B, H, Nk, D), "v": (B, H, Nk, D)}


def _sdpa_packed_shape(lengths: tuple[int, ...], H: int, D: int):
    T = sum(lengths)
    return lambda g: {"q": (T, H, D), "k": (T, H, D), "v": (T, H, D), "cu_seqlens": _cu_seqlens(lengths)}


def _attention_tiny(t, ids_restore) -> list[TinyCall]:
    return [TinyCall((t(2, 5, 24), 2))]


def _sdpa_tiny(t, ids_restore) -> list[TinyCall]:
    return [TinyCall((t(2, 2, 5, 4), t(2, 2, 5, 4), t(2, 2, 5, 4)))]


@dataclass(frozen=True)
class AttentionCost:
    """Self-attention on packed qkv: B batch, N tokens, H heads, D head dim, ``elem`` bytes per element.

    FLOPs (the FlashAttention paper's convention, Dao et al., 2022): forward ``4·B·H·N²·D`` (Q Kᵀ and P V, two
    FLOPs per multiply-add; softmax not counted); backward ``2.5 ×`` forward (five N×N×D matmuls, recomputing
    Q Kᵀ included). Bytes: the minimum a fused kernel moves -- forward reads q, k, v (``3·B·N·C``) and writes o
    (``B·N·C``); backward reads q, k, v, o, dO and writes dq, dk, dv (``8·B·N·C``); C = H·D.
    """

    B: int
    N: int
    H: int
    D: int
    elem: int = 2

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode`` (``fwd``, ``bwd`` or ``fwd_bwd``)."""
        fwd = 4 * self.B * self.H * self.N * self.N * self.D
        return by_mode(mode, fwd, int(2.5 * fwd))

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved to/from memory by ``mode``."""
        tok = self.B * self.N * self.H * self.D * self.elem
        return by_mode(mode, 4 * tok, 8 * tok)


_PACKED_ARGS = (
    Arg("cu_seqlens", "offsets", "(S + 1,) int32", keyword_only=True),
    Arg("max_seqlen", "int?", keyword_only=True),
    Arg("scale", "float?", keyword_only=True),
    Arg("dropout_p", "float", keyword_only=True),
    Arg(
        "rope",
        "tensor?",
        "(N_rot, 2·D), (H, N_rot, 2·D) or per sample (B or S, 1 or H, N_rot, 2·D), N_rot >= N - num_prefix_tokens",
        keyword_only=True,
    ),
    Arg("num_prefix_tokens", "int", keyword_only=True),
    Arg("rotate_half", "bool", keyword_only=True),
)
_CALL_FIELDS = ("head_dim", "dropout_p", "batch", "num_tokens", "num_kv_tokens", "rope", "rope_per_sample")
# N = 1, 61, 197 tokens, D = 32, 72, 80; packed: empty and one-token sequences among them (see fastvit.selftest)
DECLARATIONS = (
    declare(
        OpDeclaration(
            name="attention",
            family="attention",
            args=(Arg("qkv", "tensor", "(B, N, 3·C) or packed (T, 3·C)"), Arg("num_heads", "int")) + _PACKED_ARGS,
            call_fields=_CALL_FIELDS,
            prepare=_prepare_attention,
            function=attention,
            reference=reference.attention,
            pt=functools.partial(reference.attention, plain=True),
            selftest=(
                SelftestShape("B3 N1 H2 D32", _attention_shape(1, 2, 32)),
                SelftestShape("B3 N61 H2 D72", _attention_shape(61, 2, 72), quick=True),
                SelftestShape("B3 N197 H1 D80", _attention_shape(197, 1, 80)),
                SelftestShape("packed S4 (61, 0, 1, 17) H2 D72", _attention_packed_shape((61, 0, 1, 17), 2, 72)),
                SelftestShape("packed S2 (197, 50) H1 D80", _attention_packed_shape((197, 50), 1, 80)),
                SelftestShape("rope B3 N50 H2 D64 cls interleaved", _attention_rope_shape(50, 2, 64, 1, False, False)),
                SelftestShape(
                    "rope packed S3 (21, 1, 37) H2 D80 prefix 5 per-head half",
                    _attention_rope_packed_shape((21, 1, 37), 2, 80, 5, True, True),
                ),
                SelftestShape(
                    "rope per-sample B3 N61 H2 D64 cls per-head half",
                    _attention_rope_per_sample_shape(61, 2, 64, 1, True, True),
                ),
                SelftestShape(
                    "rope per-sequence packed S3 (9, 1, 30) H2 D72 prefix 1 heads-shared interleaved",
                    _attention_rope_per_sample_shape((9, 1, 30), 2, 72, 1, False, False),
                ),
            ),
            tiny_calls=_attention_tiny,
            costs={"attention": AttentionCost},
        )
    ),
    declare(
        OpDeclaration(
            name="scaled_dot_product_attention",
            family="attention",
            args=(
                Arg("q", "tensor", "(B, H, Nq, D) or packed (T, H, D)"),
                Arg("k", "tensor", "(B, H, Nk, D) or packed (T, H, D)"),
                Arg("v", "tensor", "k's shape"),
            )
            + _PACKED_ARGS,
            call_fields=_CALL_FIELDS,
            prepare=_prepare_scaled_dot_product_attention,
            function=scaled_dot_product_attention,
            reference=reference.scaled_dot_product_attention,
            pt=functools.partial(reference.scaled_dot_product_attention, plain=True),
            selftest=(
                SelftestShape("B3 H2 Nq1 Nk61 D32", _sdpa_shape(1, 61, 2, 32)),
                SelftestShape("B3 H1 Nq61 Nk197 D80", _sdpa_shape(61, 197, 1, 80)),
                SelftestShape("B3 H2 Nq61 Nk61 D72", _sdpa_shape(61, 61, 2, 72), quick=True),
                SelftestShape("packed S3 (5, 33, 17) H2 D64", _sdpa_packed_shape((5, 33, 17), 2, 64)),
            ),
            tiny_calls=_sdpa_tiny,
        )
    ),
)
OPS = tuple(d.name for d in DECLARATIONS)

_k = triton_rt.kernel_module("attention")


def empty_sequence_reasons(call) -> list[str]:
    """Reasons an attention kernel cannot serve ``call``: a ``num_tokens`` / ``num_kv_tokens`` below 1 (the kernels of
    both kernel backends need at least one query and one key; eager handles empty sequences). A plain loop, so that
    Dynamo traces it (it runs inside every compiled attention call)."""
    reasons = []
    for key in ("num_tokens", "num_kv_tokens"):
        n = call.get(key)
        if n is not None and n < 1:
            reasons.append(f"{key} = {n}: the kernels need at least one token")
    return reasons


def _no_dropout(backend: str, dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError(f"the {backend} attention kernels do not implement dropout (dropout_p must be 0)")


def _scale(head_dim: int, scale: float | None) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


# ============================================================================================ eager
#: The eager path of packed variable-length attention: one SDPA call per sequence.
per_sequence = reference.per_sequence


def _rotated(q, k, rope, num_prefix_tokens, rotate_half):
    """q and k (B, H, N, D) after timm's rotation (``apply_rot_embed_cat`` past the prefix tokens, in the promoted
    precision of q and the table, rounded to q's dtype); unchanged without ``rope``."""
    if rope is None:
        return q, k
    rot = functools.partial(reference.rotary, rope=rope, num_prefix_tokens=num_prefix_tokens, plain=True)
    return rot(q, rotate_half=rotate_half), rot(k, rotate_half=rotate_half)


def attention_eager(
    qkv,
    num_heads,
    *,
    scale=None,
    dropout_p=0.0,
    cu_seqlens=None,
    max_seqlen=None,
    rope=None,
    num_prefix_tokens=0,
    rotate_half=False,
):
    """Eager :func:`fastvit.ops.attention`: SDPA on (B, H, N, D) views of ``qkv`` (q and k rotated first with
    ``rope``, as timm's ``EvaAttention``; a 4-D table per sample broadcasts over the batch), heads concatenated;
    packed sequences (``cu_seqlens``) one at a time, sequence s with table s of a table per sequence."""
    if cu_seqlens is not None:
        kw = dict(scale=scale, dropout_p=dropout_p, num_prefix_tokens=num_prefix_tokens, rotate_half=rotate_half)
        tables = reference.sequence_tables(rope)  # sequence s: table s of a table per sequence
        return per_sequence(
            lambda part: attention_eager(part[None], num_heads, rope=next(tables), **kw)[0], cu_seqlens, qkv
        )
    B, N, C3 = qkv.shape
    q, k, v = reference.split_qkv(qkv, num_heads)
    if rope is not None:
        q, k = _rotated(q, k, rope, num_prefix_tokens, rotate_half)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).reshape(B, N, C3 // 3)


def sdpa_eager(
    q,
    k,
    v,
    *,
    scale=None,
    dropout_p=0.0,
    cu_seqlens=None,
    max_seqlen=None,
    rope=None,
    num_prefix_tokens=0,
    rotate_half=False,
):
    """Eager :func:`fastvit.ops.scaled_dot_product_attention`: ``F.scaled_dot_product_attention`` (q and k rotated
    first with ``rope``); packed sequences (``cu_seqlens``, (T, H, D) operands) one at a time, sequence s with table
    s of a table per sequence."""

    def one(q, k, v, table=rope):
        if table is not None:
            q, k = _rotated(q, k, table, num_prefix_tokens, rotate_half)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)

    if cu_seqlens is not None:
        tables = reference.sequence_tables(rope)
        return reference.per_sequence_sdpa(lambda q, k, v: one(q, k, v, next(tables)), q, k, v, cu_seqlens)
    return one(q, k, v)


#: The eager kernels serve every call, rotary ones included (tables per sample too).
_EAGER_CAPS = dataclasses.replace(eager_rt.ANY_DEVICE, rope=True, rope_per_sample=True)
register_kernel("eager", "attention", attention_eager, _EAGER_CAPS)
register_kernel("eager", "scaled_dot_product_attention", sdpa_eager, _EAGER_CAPS)


# ============================================================================================ autocast
def autocast_rule(amp: torch.dtype, *tensors):
    """Under autocast, as ``F.scaled_dot_product_attention``: qkv (or q, k, v) in the autocast dtype."""
    return autocast_cast(amp, *tensors)


# ============================================================================================ autograd
def _flash_autograd(bwd: str, n_diff: int, n_lead: int = 0, rope_at: int | None = None):
    """``(setup_context, backward)`` of a FlashAttention-style op pair: the forward takes ``n_diff`` differentiable
    tensors then any further arguments ``*args`` (tensors such as ``cu_seqlens`` or plain values) and returns
    ``(o, lse)``; the backward op is ``bwd(do, *inputs, *args[:n_lead], o, lse, *args[n_lead:]) -> gradients of the
    inputs`` (the packed ops lead with ``cu_seqlens, max_seqlen``, as the forward does). Tensors among ``args`` are
    saved with ``save_for_backward``, plain values on ``ctx``.

    ``rope_at``: where the Triton ops' rotary arguments ``rope, num_prefix_tokens, rotate_half`` start in ``args``
    (the last three, in the Triton and the CUDA ops alike); a ``rope`` table that requires grad gets it from
    :func:`_rope_table_grad` (the kernels give dq / dk only). A CUDA build from before the rotary arguments passes
    fewer ``args`` (and never a table)."""

    def setup(ctx, inputs, output):
        args = inputs[n_diff:]
        o, lse = output
        ctx.is_tensor = [isinstance(a, Tensor) for a in args]
        ctx.values = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*inputs[:n_diff], o, lse, *(a for a, t in zip(args, ctx.is_tensor) if t))

    def backward(ctx, do, dlse):
        saved = ctx.saved_tensors
        inputs, (o, lse), tensors = saved[:n_diff], saved[n_diff : n_diff + 2], iter(saved[n_diff + 2 :])
        args = [next(tensors) if t else a for a, t in zip(ctx.values, ctx.is_tensor)]
        if do is None:
            do = torch.zeros_like(o)
        grads = op(bwd)(do, *inputs, *args[:n_lead], o, lse, *args[n_lead:])
        grads = grads if n_diff > 1 else (grads,)
        rest = [None] * len(args)
        if rope_at is not None and len(args) == rope_at + 3 and args[rope_at] is not None:
            if ctx.needs_input_grad[n_diff + rope_at]:
                rest[rope_at] = _rope_table_grad(inputs, grads, args, n_lead, rope_at)
        return (*grads, *rest)

    return setup, backward


def _rot(x: Tensor, rotate_half: bool) -> Tensor:
    """timm's ``rope_rotate_half`` (``rotate_half``) or ``rot`` (interleaved pairs) on the last dim."""
    if rotate_half:
        x1, x2 = x.chunk(2, -1)
        return torch.cat([-x2, x1], -1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def _token_rows(inputs, n_lead: int, args) -> tuple[list[Tensor], Tensor, Tensor]:
    """The q and k operands of a forward's ``inputs`` as (M, H, D) token-major views with each token's position in
    its sequence (M,) and its sample -- batch row, or packed sequence -- (M,): packed qkv (T, 3C) / q, k (T, H, D)
    with ``cu_seqlens`` (``args[0]``), dense qkv (B, N, 3C) / q, k (B, H, N, D)."""
    if len(inputs) == 1:  # packed qkv, heads from num_heads (the arg after the packed ones)
        qkv, H = inputs[0], args[n_lead]
        C = qkv.shape[-1] // 3
        qk = [qkv[..., :C], qkv[..., C : 2 * C]]
        qk = [t.reshape(-1, H, C // H) for t in qk]
        n = qkv.shape[1] if n_lead == 0 else None
    else:
        q, k = inputs[0], inputs[1]
        if n_lead == 0:  # (B, H, N, D)
            n = q.shape[2]
            qk = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k)]
        else:
            n, qk = None, [q, k]
    M = qk[0].shape[0]
    tok = torch.arange(M, device=qk[0].device)
    if n is not None:
        n = max(n, 1)  # no tokens at all when n = 0
        return qk, tok % n, tok // n
    cu = args[0].long()
    seq = torch.searchsorted(cu[1:], tok, right=True)
    return qk, tok - cu[seq], seq


def _rope_table_grad(inputs, grads, args, n_lead: int, rope_at: int) -> Tensor:
    """The gradient of the rotary table ``args[rope_at]`` -- (N_rot, 2·D), (H, N_rot, 2·D), or a table per sample /
    packed sequence (B or S, 1 or H, N_rot, 2·D) -- from the forward's inputs and the kernels' gradients, in PyTorch
    (one pass over q, k, dq, dk, fp32 sums); same shape and dtype as the table.

    With y = x·cos + rot(x)·sin the rotated q (or k), timm's autograd gives d cos = Σ dy·x and d sin = Σ dy·rot(x)
    over the tokens at each table row (and the heads and batch, for a shared table; a table per sample sums its own
    sample's tokens only). The kernels return dx = Mᵀ dy with M the rotation by each pair's angle, so
    dy = M dx = dx·cos + rot(dx)·sin (M Mᵀ = 1 for a table of sines and cosines of one angle per pair, which the
    kernels require)."""
    rope, npt, half = args[rope_at : rope_at + 3]
    table = rope.detach().float()
    (x_q, x_k), pos, sample = _token_rows(inputs, n_lead, args)
    (d_q, d_k), _, _ = _token_rows(grads, n_lead, args)
    # the table as (samples, heads, N_rot, 2D): 1 sample for a table shared by the batch, 1 head for one shared by
    # the heads; its rows flattened sample-major, (samples · N_rot, heads, 2D)
    t4 = table.reshape((1,) * (4 - table.dim()) + tuple(table.shape))
    n_tab, n_head, n_rot, D2 = t4.shape
    pos = pos - npt
    keep = (pos >= 0)[:, None, None]
    idx = pos.clamp(0, max(n_rot - 1, 0))
    if n_tab > 1:
        idx = sample * n_rot + idx
    grad = table.new_zeros((n_tab * n_rot, n_head, D2))
    if n_rot and idx.numel():
        rows = t4.transpose(1, 2).reshape(n_tab * n_rot, n_head, D2)[idx]  # (M, heads, 2D)
        sin, cos = rows.chunk(2, -1)
        g = 0
        for x, dx in ((x_q, d_q), (x_k, d_k)):
            x, dx = x.float(), dx.float()
            dy = torch.where(keep, dx * cos + _rot(dx, half) * sin, 0.0)
            g = g + torch.cat([dy * _rot(x, half), dy * x], -1)
        if n_head == 1:
            g = g.sum(1, keepdim=True)
        grad.index_add_(0, idx, g)
    grad = grad.reshape(n_tab, n_rot, n_head, D2).transpose(1, 2).reshape(table.shape)
    return grad.to(rope.dtype)


def _attention_autograd(bwd: str):
    """Autograd of ``attention_fwd(qkv, num_heads, scale[, rope, num_prefix_tokens, rotate_half])``:
    ``bwd(do, qkv, o, lse, num_heads, scale[, rope, ...]) -> dqkv`` (Triton's and the CUDA op's)."""
    return _flash_autograd(bwd, 1, rope_at=2)


def _sdpa_autograd(bwd: str):
    """Autograd of ``sdpa_fwd(q, k, v, scale[, rope, num_prefix_tokens, rotate_half])``:
    ``bwd(do, q, k, v, o, lse, scale[, rope, ...]) -> (dq, dk, dv)``."""
    return _flash_autograd(bwd, 3, rope_at=1)


def _attention_varlen_autograd(bwd: str):
    """Autograd of ``attention_varlen_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale[, rope, ...])``:
    ``bwd(do, qkv, cu_seqlens, max_seqlen, o, lse, num_heads, scale[, rope, ...]) -> dqkv`` (Triton's and the CUDA
    op's)."""
    return _flash_autograd(bwd, 1, 2, rope_at=4)


def _sdpa_varlen_autograd(bwd: str):
    """Autograd of ``sdpa_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale[, rope, ...])``:
    ``bwd(do, q, k, v, cu_seqlens, max_seqlen, o, lse, scale[, rope, ...]) -> (dq, dk, dv)``."""
    return _flash_autograd(bwd, 3, 2, rope_at=3)


# ============================================================================================ triton
#: The attention kernels compute per-token offsets (token index x token stride) in int32; batch and head offsets
#: are int64.
_INT32_MAX = 2**31 - 1
#: CUDA's limit on a grid's y and z dimensions; the attention grids are (query blocks, H, B).
_MAX_GRID_YZ = 65535


def _bhn(t: Tensor, head_dim: int) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, N, H·D) head-major view or a (B, H, N, D) tensor."""
    if t.dim() == 3:
        return t.stride(0), head_dim * t.stride(2), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _bhnd_operand(t: Tensor) -> Tensor:
    """A (B, H, N, D) attention operand the kernels can index: unit last stride, and token offsets within int32 --
    a sequence-first view such as ``x.view(N, B, H, D).permute(1, 2, 0, 3)`` has token stride B·H·D, which
    overflows for long sequences and large batches; such a view is copied to contiguous (token stride D)."""
    t = triton_rt.last_contiguous(t)
    if (t.shape[2] + 128) * t.stride(2) > _INT32_MAX:  # + 128: the kernels' padded query / key blocks
        t = t.contiguous()
    return t


def _thd(t: Tensor, head_dim: int) -> tuple[int, int, int]:
    """(batch, head, token) strides of a packed operand -- a (T, H·D) head-major view or a (T, H, D) tensor; the
    batch stride is unused by the packed kernels (each sequence's base is ``cu_seqlens[s]`` times the token
    stride)."""
    if t.dim() == 2:
        return 0, head_dim * t.stride(1), t.stride(0)
    return 0, t.stride(1), t.stride(0)


def _thd_operand(t: Tensor, max_seqlen: int) -> Tensor:
    """A (T, H, D) packed attention operand the kernels can index: unit last stride, and in-sequence token offsets
    within int32 (as :func:`_bhnd_operand`; the sequence's base offset is int64)."""
    t = triton_rt.last_contiguous(t)
    if (max_seqlen + 128) * t.stride(0) > _INT32_MAX:
        t = t.contiguous()
    return t


def _rope_args(rope: Tensor | None, num_prefix_tokens: int, rotate_half: bool, head_dim: int) -> dict:
    """The kernels' rotary arguments for a checked ``rope`` table (N_rot, 2·D), (H, N_rot, 2·D) or per sample /
    packed sequence (B or S, 1 or H, N_rot, 2·D): fp32 ``SIN`` / ``COS`` views of its two halves (one copy only for
    another dtype or a strided last dim), their sample, head and row strides (0 for a dim the table shares),
    ``num_prefix``, ``ROPE`` and ``ROPE_HALF``; none without ``rope`` (``ROPE`` off: the kernels' defaults)."""
    if rope is None:
        return {}
    table = rope if rope.dtype == torch.float32 else rope.float()
    if table.stride(-1) != 1:
        table = table.contiguous()
    t4 = table.reshape((1,) * (4 - table.dim()) + tuple(table.shape)) if table.dim() < 4 else table  # a view
    return dict(
        SIN=table[..., :head_dim],
        COS=table[..., head_dim:],
        stride_rope_b=t4.stride(0) if t4.shape[0] > 1 else 0,
        stride_rope_h=t4.stride(1) if t4.shape[1] > 1 else 0,
        stride_rope_n=table.stride(-2),
        num_prefix=num_prefix_tokens,
        ROPE=True,
        ROPE_HALF=rotate_half,
    )


def _launch_fwd(q, k, v, o, lse, B, H, n_q, n_kv, D, scale, cu_seqlens=None, rope=None):
    """The forward kernel on (B, ...) operands, or with ``cu_seqlens`` on packed ones (B = S sequences, n_q = n_kv =
    max_seqlen, ``lse`` (H, T)); ``rope``: :func:`_rope_args`."""
    varlen = cu_seqlens is not None
    strides = _thd if varlen else _bhn
    triton_rt.wrap(_k.attn_fwd)[lambda meta: (triton_rt.triton.cdiv(n_q, meta["BLOCK_M"]), H, B)](
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens if varlen else lse,  # unused placeholder pointer when dense
        *strides(q, D),
        *strides(k, D),
        *strides(v, D),
        *strides(o, D),
        H,
        n_q,
        n_kv,
        D,
        scale * _k.LOG2E,
        BLOCK_D=_k.block_d(D),
        INPUT_PRECISION=triton_rt.input_precision(q.dtype),
        VARLEN=varlen,
        **(rope or {}),
    )


def _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, H, n_q, n_kv, D, scale, cu_seqlens=None, rope=None):
    """Preprocess, dK/dV and dQ kernels; with ``cu_seqlens`` on packed operands (see :func:`_launch_fwd`); ``rope``
    (:func:`_rope_args`): dq and dk come back with respect to the unrotated q and k."""
    cdiv = triton_rt.triton.cdiv
    varlen = cu_seqlens is not None
    strides = _thd if varlen else _bhn
    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)  # (B, H, Nq), or (H, T) when packed
    cu = cu_seqlens if varlen else delta  # unused placeholder pointer when dense
    bm = _k.PREPROCESS_BLOCK_M
    triton_rt.wrap(_k.attn_bwd_preprocess)[(cdiv(n_q, bm), H, B)](
        o,
        do,
        delta,
        cu,
        *strides(o, D),
        *strides(do, D),
        H,
        n_q,
        D,
        BLOCK_M=bm,
        BLOCK_D=_k.block_d(D),
        VARLEN=varlen,
    )
    prec = triton_rt.input_precision(q.dtype)
    triton_rt.wrap(_k.attn_bwd_dkdv)[lambda meta: (cdiv(n_kv, meta["BLOCK_N"]), H, B)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        cu,
        *strides(q, D),
        *strides(k, D),
        *strides(v, D),
        *strides(do, D),
        *strides(dk, D),
        *strides(dv, D),
        H,
        n_q,
        n_kv,
        D,
        scale,
        BLOCK_D=_k.block_d(D),
        INPUT_PRECISION=prec,
        VARLEN=varlen,
        **(rope or {}),
    )
    triton_rt.wrap(_k.attn_bwd_dq)[lambda meta: (cdiv(n_q, meta["BLOCK_M"]), H, B)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        cu,
        *strides(q, D),
        *strides(k, D),
        *strides(v, D),
        *strides(do, D),
        *strides(dq, D),
        H,
        n_q,
        n_kv,
        D,
        scale,
        BLOCK_D=_k.block_d(D),
        INPUT_PRECISION=prec,
        VARLEN=varlen,
        **(rope or {}),
    )


def _define_triton_ops() -> None:
    triton_op = torch.library.triton_op

    @triton_op("fastvit::attention_fwd", mutates_args=())
    def attention_fwd(
        qkv: Tensor,
        num_heads: int,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> tuple[Tensor, Tensor]:
        qkv = triton_rt.last_contiguous(qkv)
        B, N, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        o = torch.empty((B, N, C), device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
        if o.numel():
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
            _launch_fwd(q, k, v, o, lse, B, num_heads, N, N, D, scale, rope=r)
        return o, lse

    @triton_op("fastvit::attention_bwd", mutates_args=())
    def attention_bwd(
        do: Tensor,
        qkv: Tensor,
        o: Tensor,
        lse: Tensor,
        num_heads: int,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> Tensor:
        qkv = triton_rt.last_contiguous(qkv)
        do = triton_rt.last_contiguous(do)
        B, N, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        dqkv = torch.empty((B, N, C3), device=qkv.device, dtype=qkv.dtype)
        if dqkv.numel():
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
            dq, dk, dv = dqkv[..., :C], dqkv[..., C : 2 * C], dqkv[..., 2 * C :]
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, num_heads, N, N, D, scale, rope=r)
        return dqkv

    @triton_op("fastvit::sdpa_fwd", mutates_args=())
    def sdpa_fwd(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> tuple[Tensor, Tensor]:
        q, k, v = _bhnd_operand(q), _bhnd_operand(k), _bhnd_operand(v)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        o = torch.empty((B, H, n_q, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
        if o.numel() and n_kv:
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            _launch_fwd(q, k, v, o, lse, B, H, n_q, n_kv, D, scale, rope=r)
        elif o.numel():  # softmax over no keys: eager attention gives zeros; the log-sum-exp of nothing is -inf
            o.zero_()
            lse.fill_(float("-inf"))
        return o, lse

    @triton_op("fastvit::sdpa_bwd", mutates_args=())
    def sdpa_bwd(
        do: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        o: Tensor,
        lse: Tensor,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, do = _bhnd_operand(q), _bhnd_operand(k), _bhnd_operand(v), _bhnd_operand(do)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        dq = torch.empty((B, H, n_q, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, H, n_kv, D), device=q.device, dtype=q.dtype)
        dv = torch.empty((B, H, n_kv, D), device=q.device, dtype=q.dtype)
        if dq.numel() and n_kv:
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, H, n_q, n_kv, D, scale, rope=r)
        else:  # no queries or no keys: every gradient is zero
            dq.zero_()
            dk.zero_()
            dv.zero_()
        return dq, dk, dv

    @triton_op("fastvit::attention_varlen_fwd", mutates_args=())
    def attention_varlen_fwd(
        qkv: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        num_heads: int,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> tuple[Tensor, Tensor]:
        qkv = triton_rt.last_contiguous(qkv)
        T, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        S = cu_seqlens.shape[0] - 1
        o = torch.empty((T, C), device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty((num_heads, T), device=qkv.device, dtype=torch.float32)
        if o.numel() and max_seqlen > 0:
            q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            _launch_fwd(q, k, v, o, lse, S, num_heads, max_seqlen, max_seqlen, D, scale, cu_seqlens, r)
        return o, lse

    @triton_op("fastvit::attention_varlen_bwd", mutates_args=())
    def attention_varlen_bwd(
        do: Tensor,
        qkv: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        o: Tensor,
        lse: Tensor,
        num_heads: int,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> Tensor:
        qkv = triton_rt.last_contiguous(qkv)
        do = triton_rt.last_contiguous(do)
        T, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        S = cu_seqlens.shape[0] - 1
        dqkv = torch.empty((T, C3), device=qkv.device, dtype=qkv.dtype)
        if dqkv.numel() and max_seqlen > 0:
            q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
            dq, dk, dv = dqkv[:, :C], dqkv[:, C : 2 * C], dqkv[:, 2 * C :]
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, S, num_heads, max_seqlen, max_seqlen, D, scale, cu_seqlens, r)
        return dqkv

    @triton_op("fastvit::sdpa_varlen_fwd", mutates_args=())
    def sdpa_varlen_fwd(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> tuple[Tensor, Tensor]:
        q, k, v = (_thd_operand(t, max_seqlen) for t in (q, k, v))
        T, H, D = q.shape
        S = cu_seqlens.shape[0] - 1
        o = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
        if o.numel() and max_seqlen > 0:
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            _launch_fwd(q, k, v, o, lse, S, H, max_seqlen, max_seqlen, D, scale, cu_seqlens, r)
        return o, lse

    @triton_op("fastvit::sdpa_varlen_bwd", mutates_args=())
    def sdpa_varlen_bwd(
        do: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        o: Tensor,
        lse: Tensor,
        scale: float,
        rope: Optional[Tensor] = None,
        num_prefix_tokens: int = 0,
        rotate_half: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, do = (_thd_operand(t, max_seqlen) for t in (q, k, v, do))
        T, H, D = q.shape
        S = cu_seqlens.shape[0] - 1
        dq = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        dv = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        if dq.numel() and max_seqlen > 0:
            r = _rope_args(rope, num_prefix_tokens, rotate_half, D)
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, S, H, max_seqlen, max_seqlen, D, scale, cu_seqlens, r)
        return dq, dk, dv

    attach("attention", _attention_autograd)
    attach("sdpa", _sdpa_autograd)
    attach("attention_varlen", _attention_varlen_autograd)
    attach("sdpa_varlen", _sdpa_varlen_autograd)


def _max_seqlen(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    return int(cu_seqlens.diff().max()) if max_seqlen is None else max_seqlen


def attention_triton(
    qkv,
    num_heads,
    *,
    scale=None,
    dropout_p=0.0,
    cu_seqlens=None,
    max_seqlen=None,
    rope=None,
    num_prefix_tokens=0,
    rotate_half=False,
):
    """Triton backend of :func:`fastvit.ops.attention` (no dropout): FlashAttention-2 (Dao 2023) on the packed
    ``qkv`` (B, N, 3·C) -> (B, N, C); with ``cu_seqlens`` (int32 (S + 1,)) on packed variable-length sequences,
    (T, 3·C) -> (T, C), as ``flash_attn_varlen_qkvpacked_func`` (``max_seqlen`` ``None``: read from ``cu_seqlens``,
    one host sync); with ``rope`` (checked (N_rot, 2·D), (H, N_rot, 2·D) or per sample / sequence (B or S, 1 or H,
    N_rot, 2·D)) q and k rotated as the kernels load them.
    Checked arguments are :func:`fastvit.ops.attention`'s job; raises ``ValueError`` for ``dropout_p > 0``."""
    _no_dropout("triton", dropout_p)
    scale = _scale(qkv.shape[-1] // (3 * num_heads), scale)
    r = () if rope is None else (rope, num_prefix_tokens, rotate_half)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.attention_varlen_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale, *r)[0]
    return torch.ops.fastvit.attention_fwd(qkv, num_heads, scale, *r)[0]


def sdpa_triton(
    q, k, v, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None, rope=None, num_prefix_tokens=0,
    rotate_half=False,
):  # fmt: skip
    """Triton backend of :func:`fastvit.ops.scaled_dot_product_attention` (no dropout): q, k, v (B, H, N*, D) ->
    (B, H, Nq, D); with ``cu_seqlens`` (int32 (S + 1,)) packed (T, H, D) -> (T, H, D) with any token / head strides
    (last dim contiguous), as ``flash_attn_varlen_func`` with one ``cu_seqlens`` for q and k (Dao 2023,
    FlashAttention-2); ``rope`` as :func:`attention_triton`. Raises ``ValueError`` for ``dropout_p > 0``."""
    _no_dropout("triton", dropout_p)
    scale = _scale(q.shape[-1], scale)
    r = () if rope is None else (rope, num_prefix_tokens, rotate_half)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.sdpa_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, *r)[0]
    return torch.ops.fastvit.sdpa_fwd(q, k, v, scale, *r)[0]


TRITON_REGISTERED = triton_rt.register_ops("attention_fwd", _define_triton_ops)


def triton_check(call) -> list[str]:
    """Reasons beyond :class:`~fastvit.backends.Capabilities` the Triton attention kernels cannot serve ``call``."""
    reasons = [] if TRITON_REGISTERED else [triton_rt.unregistered_reason()]
    batch = call.get("batch")
    if batch is not None and batch > _MAX_GRID_YZ:
        if call.get("varlen"):
            reasons.append(
                f"{batch} packed sequences > {_MAX_GRID_YZ} (the kernels put the sequences on the CUDA grid's z "
                "dimension)"
            )
        else:
            reasons.append(
                f"batch = {batch} > {_MAX_GRID_YZ} (the kernels put the batch on the CUDA grid's z dimension)"
            )
    return reasons + empty_sequence_reasons(call)


if _k is not None:
    _triton_caps = Capabilities(
        devices=triton_rt.DEVICES,
        dtypes=triton_rt.DTYPES,
        head_dims=frozenset(range(_k.MIN_HEAD_DIM, _k.MAX_HEAD_DIM + 1)),
        dropout=False,
        varlen=True,
        rope=True,
        rope_per_sample=True,
    )
    register_kernel(
        "triton", "attention", attention_triton, _triton_caps, triton_check, check_depends_on_call_only=True
    )
    register_kernel(
        "triton",
        "scaled_dot_product_attention",
        sdpa_triton,
        _triton_caps,
        triton_check,
        check_depends_on_call_only=True,
    )


# ============================================================================================ cuda
def cuda_has_varlen(info: dict) -> bool:
    """Whether the loaded build has the packed variable-length attention ops (``build_info()['attention_varlen']``;
    a build from before them has no such key)."""
    return bool(int(info.get("attention_varlen", 0) or 0))


def cuda_has_rope(info: dict) -> bool:
    """Whether the loaded build's attention ops take the rotary arguments ``rope, num_prefix_tokens, rotate_half``
    (``build_info()['attention_rope']``; a build from before them has no such key, and its schemas lack them)."""
    return bool(int(info.get("attention_rope", 0) or 0))


# The CUDA fakes take the schemas' trailing rotary arguments (rope, num_prefix_tokens, rotate_half) with their
# defaults, so they serve builds from before them too; the shapes do not depend on them.
def attention_varlen_fwd_fake(qkv, cu_seqlens, max_seqlen, num_heads, scale, rope=None, num_prefix_tokens=0,
                              rotate_half=False):  # fmt: skip
    """Fake of ``attention_varlen_fwd_cuda``: qkv (T, 3C) -> (o (T, C) in qkv's dtype, lse (H, T) fp32)."""
    T, C3 = qkv.shape
    return qkv.new_empty((T, C3 // 3)), qkv.new_empty((num_heads, T), dtype=torch.float32)


def attention_varlen_bwd_fake(dout, qkv, cu_seqlens, max_seqlen, o, lse, num_heads, scale, rope=None,
                              num_prefix_tokens=0, rotate_half=False):  # fmt: skip
    """Fake of ``attention_varlen_bwd_cuda``: dqkv like qkv (T, 3C)."""
    return qkv.new_empty(qkv.shape)


def sdpa_varlen_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, rope=None, num_prefix_tokens=0, rotate_half=False):
    """Fake of ``sdpa_varlen_fwd_cuda``: q (T, H, D) -> (o (T, H, D), lse (H, T) fp32)."""
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


def sdpa_varlen_bwd_fake(dout, q, k, v, cu_seqlens, max_seqlen, o, lse, scale, rope=None, num_prefix_tokens=0,
                         rotate_half=False):  # fmt: skip
    """Fake of ``sdpa_varlen_bwd_cuda``: (dq, dk, dv) like q, k, v (T, H, D)."""
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


def _register_cuda_varlen_fakes() -> None:
    fake = torch.library.register_fake
    fake("fastvit::attention_varlen_fwd_cuda")(attention_varlen_fwd_fake)
    fake("fastvit::attention_varlen_bwd_cuda")(attention_varlen_bwd_fake)
    fake("fastvit::sdpa_varlen_fwd_cuda")(sdpa_varlen_fwd_fake)
    fake("fastvit::sdpa_varlen_bwd_cuda")(sdpa_varlen_bwd_fake)


def _register_cuda_fakes() -> None:
    fake = torch.library.register_fake

    @fake("fastvit::attention_fwd_cuda")
    def _(qkv, num_heads, scale, rope=None, num_prefix_tokens=0, rotate_half=False):
        B, N, C3 = qkv.shape
        return qkv.new_empty((B, N, C3 // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)

    @fake("fastvit::attention_bwd_cuda")
    def _(dout, qkv, o, lse, num_heads, scale, rope=None, num_prefix_tokens=0, rotate_half=False):
        return qkv.new_empty(qkv.shape)

    @fake("fastvit::sdpa_fwd_cuda")
    def _(q, k, v, scale, rope=None, num_prefix_tokens=0, rotate_half=False):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @fake("fastvit::sdpa_bwd_cuda")
    def _(dout, q, k, v, o, lse, scale, rope=None, num_prefix_tokens=0, rotate_half=False):
        return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape)


def _max_seqlen(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    # fastvit.ops always passes it; a direct caller may not (one host sync, as fastvit.ops's own checks).
    return int(cu_seqlens.diff().max()) if max_seqlen is None else max_seqlen


def attention_cuda(
    qkv,
    num_heads,
    *,
    scale=None,
    dropout_p=0.0,
    cu_seqlens=None,
    max_seqlen=None,
    rope=None,
    num_prefix_tokens=0,
    rotate_half=False,
):
    """CUDA backend of :func:`fastvit.ops.attention` (FlashAttention-2 on packed qkv, fp16 / bf16, no dropout); with
    ``cu_seqlens``, qkv (T, 3C) holds packed sequences (Dao 2023, as ``flash_attn_varlen_qkvpacked_func``); with
    ``rope`` (checked (N_rot, 2·D) or (H, N_rot, 2·D), any float dtype, read as fp32) q and k are rotated as the
    kernels load them (timm's ``apply_rot_embed_cat`` past ``num_prefix_tokens``; ``rotate_half`` the layout)."""
    _no_dropout("cuda", dropout_p)
    scale = _scale(qkv.shape[-1] // (3 * num_heads), scale)
    r = () if rope is None else (rope, num_prefix_tokens, rotate_half)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.attention_varlen_fwd_cuda(qkv, cu_seqlens, max_seqlen, num_heads, scale, *r)[0]
    return torch.ops.fastvit.attention_fwd_cuda(qkv, num_heads, scale, *r)[0]


def sdpa_cuda(
    q, k, v, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None, rope=None, num_prefix_tokens=0,
    rotate_half=False,
):  # fmt: skip
    """CUDA backend of :func:`fastvit.ops.scaled_dot_product_attention` (fp16 / bf16, no dropout); with
    ``cu_seqlens``, q, k, v (T, H, D) hold packed sequences (as ``flash_attn_varlen_func``); ``rope`` as
    :func:`attention_cuda` (self-attention: Nq = Nk)."""
    _no_dropout("cuda", dropout_p)
    scale = _scale(q.shape[-1], scale)
    r = () if rope is None else (rope, num_prefix_tokens, rotate_half)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.sdpa_varlen_fwd_cuda(q, k, v, cu_seqlens, max_seqlen, scale, *r)[0]
    return torch.ops.fastvit.sdpa_fwd_cuda(q, k, v, scale, *r)[0]


def cuda_check_for(info: dict):
    """The cuda backend's extra check for this build: empty sequences, and head dims whose backward needs more shared
    memory per block than the GPU allows (sm_86 / sm_89 allow 99 KB; the build reports each bucket's need)."""
    smem = cuda_rt.attention_bwd_smem_bytes(info)

    def check(call) -> list[str]:
        reasons = empty_sequence_reasons(call)
        device, head_dim = call.get("device"), call.get("head_dim")
        if device is not None and device.type == "cuda" and head_dim is not None:
            need = smem.get(cuda_rt.head_dim_bucket(head_dim, info), 0)
            # Not cached here: torch caches the properties, and Dynamo constant-folds this call (an lru_cache'd
            # wrapper would make it warn in every compiled attention call).
            limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
            if limit < need:
                reasons.append(
                    f"head_dim {head_dim}: the backward needs {need} B of shared memory per block and "
                    f"this GPU allows {limit} B"
                )
        return reasons

    return check


def cuda_caps_for(info: dict) -> Capabilities:
    """The cuda backend's :class:`~fastvit.backends.Capabilities` for a build: its dtypes and compiled head-dim
    buckets, ``varlen`` (packed ``cu_seqlens`` calls) only when the build has the varlen ops
    (:func:`cuda_has_varlen`), and ``rope`` (a rotary table shared by the batch) only when its ops take the rotary
    arguments (:func:`cuda_has_rope`)."""
    compiled = set(cuda_rt.compiled_head_dim_buckets(info))
    step = int(info["attention_head_dim_multiple"])
    head_dims = frozenset(
        d
        for d in range(step, int(info["attention_max_head_dim"]) + 1, step)
        if cuda_rt.head_dim_bucket(d, info) in compiled
    )
    return Capabilities(
        devices=cuda_rt.DEVICES,
        dtypes=cuda_rt.half_dtypes(info),
        head_dims=head_dims,
        min_compute_capability=cuda_rt.MIN_COMPUTE_CAPABILITY,
        dropout=False,
        varlen=cuda_has_varlen(info),
        rope=cuda_has_rope(info),
    )


def _register_cuda(info: dict) -> None:
    _register_cuda_fakes()
    attach("attention", _attention_autograd, "_cuda")
    attach("sdpa", _sdpa_autograd, "_cuda")
    if cuda_has_varlen(info):  # an older build has no such schemas: nothing to register, and no varlen dispatch
        _register_cuda_varlen_fakes()
        attach("attention_varlen", _attention_varlen_autograd, "_cuda")
        attach("sdpa_varlen", _sdpa_varlen_autograd, "_cuda")
    caps = cuda_caps_for(info)
    check = cuda_check_for(info)
    register_kernel("cuda", "attention", attention_cuda, caps, check, check_depends_on_call_only=True)
    register_kernel("cuda", "scaled_dot_product_attention", sdpa_cuda, caps, check, check_depends_on_call_only=True)


cuda_rt.on_load(_register_cuda)
