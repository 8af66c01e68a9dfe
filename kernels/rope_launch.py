"""Launchers of the attention kernels' rotary path (``ROPE``, :mod:`fastvit.kernels.attention`): self-attention on a
packed ``qkv`` with timm's 2D RoPE applied to q and k inside the kernels (EVA-02, DINOv3, Perception Encoder,
``vit_*_rope_*``).

A thin, test-facing layer over the same forward, preprocess, dK/dV and dQ kernels the ops launch (the public path is
``fastvit.ops.attention(qkv, num_heads, rope=cat([sin, cos], -1), num_prefix_tokens=..., rotate_half=...)``, whose
Triton backend passes the same rotary arguments through the ``fastvit::attention_fwd`` / ``_bwd`` ops and their
varlen and SDPA siblings, with the table's gradient; see :mod:`fastvit.families.attention`)::

    out, lse = rope_attention_fwd(qkv, num_heads, sin, cos, num_prefix_tokens, scale)
    dqkv = rope_attention_bwd(do, qkv, out, lse, num_heads, sin, cos, num_prefix_tokens, scale)
    out = rope_attention(qkv, num_heads, sin, cos, num_prefix_tokens, scale)      # autograd (dqkv only)

``qkv`` is (B, N, 3·C) from a ``qkv`` Linear (q, k, v the column slices, heads of D = C / num_heads columns each, as
timm's ``qkv.reshape(B, N, 3, H, D)``), or with ``cu_seqlens`` (S + 1,) int32 and ``max_seqlen`` a packed (T, 3·C)
batch of S sequences (FlashAttention's varlen layout). Outputs: ``out`` (B, N, C) or (T, C) in qkv's dtype, ``lse``
(B, H, N) or (H, T) fp32 -- the natural-log log-sum-exp of the scaled scores.

Tables: ``sin`` and ``cos`` of shape (N_rot, D) shared by the heads, or (H, N_rot, D) per head (timm's
``RotaryEmbeddingMixed``), i.e. ``emb.chunk(2, -1)`` of timm's ``cat([sin, cos], -1)`` rope tensor, shared by the
batch; or one table per sample, (B, 1, N_rot, D) or (B, H, N_rot, D) (timm's NaFlexVit and patch dropout) --
packed, one per sequence, (S, 1 or H, N_rot, D), sequence s rotated with table s; cast to fp32 when they are not. Column layout: ``rotate_half=True`` pairs column j with j + D/2 (timm's ``half=True``), False pairs
columns 2i and 2i + 1. Each pair must hold one angle (both of its columns equal in each table), as every timm table
does; the kernels read the pair's first column.

Position convention: the token at position ``p`` within its sequence (its batch row; with ``cu_seqlens``, counted
from the sequence's first row ``cu_seqlens[s]``) is rotated by table row ``p - num_prefix_tokens``; the first
``num_prefix_tokens`` tokens of every sequence (cls, registers) are not rotated. So N_rot must be at least
``N - num_prefix_tokens`` (``max_seqlen - num_prefix_tokens`` packed) -- exactly timm's ``EvaAttention`` on each
sequence.

Gradients: ``dqkv`` only here (the public op adds the table's gradient in PyTorch from dq / dk). Keyword ``rope=False`` runs the same kernels with the rotary path compiled out
(the tables are ignored): plain attention, as the ``fastvit::attention_fwd`` op computes it.
"""

from __future__ import annotations

import torch
import triton

from fastvit.kernels import attention as A
from fastvit.runtime import triton as triton_rt


def _heads_strides(t: torch.Tensor, head_dim: int, packed: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of a head-major (B, N, H·D) or, packed, (T, H·D) view (batch stride unused)."""
    if packed:
        return 0, head_dim * t.stride(1), t.stride(0)
    return t.stride(0), head_dim * t.stride(2), t.stride(1)


def _tables(sin, cos, num_heads: int, head_dim: int, rows_needed: int, batch: int):
    """``(sin, cos, stride_b, stride_h, stride_n)`` of validated fp32 tables with one set of strides and unit column
    stride; ``batch``: B, or S packed sequences (the leading dim of a table per sample / sequence)."""
    if sin.shape != cos.shape:
        raise ValueError(f"sin {tuple(sin.shape)} and cos {tuple(cos.shape)} differ in shape")
    if sin.dim() not in (2, 3, 4) or sin.shape[-1] != head_dim:
        raise ValueError(
            f"rope tables must be (N_rot, {head_dim}), (H, N_rot, {head_dim}) or per sample (B, 1 or H, N_rot, "
            f"{head_dim}), got {tuple(sin.shape)}"
        )
    if sin.dim() == 4 and sin.shape[0] != batch:
        raise ValueError(f"per-sample rope tables have {sin.shape[0]} tables, expected one per sample ({batch})")
    heads = sin.shape[-3] if sin.dim() >= 3 else 1
    if heads != num_heads and (sin.dim() == 3 or heads != 1):
        raise ValueError(f"per-head rope tables have {heads} heads, expected {num_heads}")
    if sin.shape[-2] < rows_needed:
        raise ValueError(f"rope tables have {sin.shape[-2]} rows, the tokens past the prefix need {rows_needed}")
    sin, cos = sin.float(), cos.float()
    if sin.stride(-1) != 1 or sin.stride() != cos.stride():
        sin, cos = sin.contiguous(), cos.contiguous()
    stride_b = sin.stride(0) if sin.dim() == 4 else 0
    stride_h = sin.stride(-3) if sin.dim() >= 3 and heads > 1 else 0
    return sin, cos, stride_b, stride_h, sin.stride(-2)


def _setup(qkv, num_heads, sin, cos, num_prefix_tokens, cu_seqlens, max_seqlen, rope):
    """Shapes, strides and table arguments shared by the forward and backward launchers."""
    packed = cu_seqlens is not None
    if packed:
        if qkv.dim() != 2 or max_seqlen is None:
            raise ValueError("with cu_seqlens, qkv must be (T, 3C) and max_seqlen given")
        batch, n = cu_seqlens.numel() - 1, int(max_seqlen)
    else:
        if qkv.dim() != 3:
            raise ValueError(f"qkv must be (B, N, 3C), got {tuple(qkv.shape)}")
        batch, n = qkv.shape[0], qkv.shape[1]
    c = qkv.shape[-1] // 3
    head_dim = c // num_heads
    if head_dim * num_heads * 3 != qkv.shape[-1]:
        raise ValueError(f"qkv's last dim {qkv.shape[-1]} is not 3 x num_heads x head_dim")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    if rope:
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        sin, cos, stride_b, stride_h, stride_n = _tables(
            sin, cos, num_heads, head_dim, max(n - num_prefix_tokens, 0), batch
        )
    else:
        sin = cos = None
        stride_b = stride_h = stride_n = 0
    rope_args = dict(
        SIN=sin,
        COS=cos,
        stride_rope_b=stride_b,
        stride_rope_h=stride_h,
        stride_rope_n=stride_n,
        num_prefix=int(num_prefix_tokens),
    )
    return packed, batch, n, c, head_dim, rope_args


def rope_attention_fwd(
    qkv: torch.Tensor,
    num_heads: int,
    sin: torch.Tensor | None,
    cos: torch.Tensor | None,
    num_prefix_tokens: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    rotate_half: bool = True,
    *,
    rope: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of self-attention with q and k rotated in the kernel (see the module docstring): ``(out, lse)``."""
    qkv = triton_rt.last_contiguous(qkv)
    packed, batch, n, c, head_dim, rope_args = _setup(
        qkv, num_heads, sin, cos, num_prefix_tokens, cu_seqlens, max_seqlen, rope
    )
    total = qkv.shape[0]
    out = torch.empty(qkv.shape[:-1] + (c,), device=qkv.device, dtype=qkv.dtype)
    lse_shape = (num_heads, total) if packed else (batch, num_heads, n)
    lse = torch.empty(lse_shape, device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    A.attn_fwd[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), num_heads, batch)](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens if packed else lse,  # unused placeholder pointer when dense
        *_heads_strides(q, head_dim, packed),
        *_heads_strides(k, head_dim, packed),
        *_heads_strides(v, head_dim, packed),
        *_heads_strides(out, head_dim, packed),
        num_heads,
        n,
        n,
        head_dim,
        scale * A.LOG2E,
        BLOCK_D=A.block_d(head_dim),
        INPUT_PRECISION=triton_rt.input_precision(qkv.dtype),
        VARLEN=packed,
        ROPE=rope,
        ROPE_HALF=rotate_half,
        **rope_args,
    )
    return out, lse


def rope_attention_bwd(
    do: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    sin: torch.Tensor | None,
    cos: torch.Tensor | None,
    num_prefix_tokens: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    rotate_half: bool = True,
    *,
    rope: bool = True,
) -> torch.Tensor:
    """Backward of :func:`rope_attention_fwd`: ``dqkv`` (dq and dk with respect to the unrotated q and k)."""
    qkv = triton_rt.last_contiguous(qkv)
    do = triton_rt.last_contiguous(do)
    packed, batch, n, c, head_dim, rope_args = _setup(
        qkv, num_heads, sin, cos, num_prefix_tokens, cu_seqlens, max_seqlen, rope
    )
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    dq, dk, dv = dqkv[..., :c], dqkv[..., c : 2 * c], dqkv[..., 2 * c :]
    strides = [_heads_strides(t, head_dim, packed) for t in (q, k, v, do, out, dq, dk, dv)]
    sq, sk, sv, sdo, so, sdq, sdk, sdv = strides
    delta = torch.empty(lse.shape, device=qkv.device, dtype=torch.float32)
    cu = cu_seqlens if packed else delta  # unused placeholder pointer when dense
    bm = A.PREPROCESS_BLOCK_M
    A.attn_bwd_preprocess[(triton.cdiv(n, bm), num_heads, batch)](
        out, do, delta, cu, *so, *sdo, num_heads, n, head_dim, BLOCK_M=bm, BLOCK_D=A.block_d(head_dim), VARLEN=packed
    )
    common = dict(
        BLOCK_D=A.block_d(head_dim),
        INPUT_PRECISION=triton_rt.input_precision(qkv.dtype),
        VARLEN=packed,
        ROPE=rope,
        ROPE_HALF=rotate_half,
        **rope_args,
    )
    A.attn_bwd_dkdv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), num_heads, batch)](
        q, k, v, do, lse, delta, dk, dv, cu, *sq, *sk, *sv, *sdo, *sdk, *sdv, num_heads, n, n, head_dim, scale, **common
    )
    A.attn_bwd_dq[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), num_heads, batch)](
        q, k, v, do, lse, delta, dq, cu, *sq, *sk, *sv, *sdo, *sdq, num_heads, n, n, head_dim, scale, **common
    )
    return dqkv


class _RopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads, sin, cos, num_prefix_tokens, scale, cu_seqlens, max_seqlen, rotate_half, rope):
        out, lse = rope_attention_fwd(
            qkv, num_heads, sin, cos, num_prefix_tokens, scale, cu_seqlens, max_seqlen, rotate_half, rope=rope
        )
        ctx.save_for_backward(qkv, out, lse, sin, cos, cu_seqlens)
        ctx.args = (num_heads, num_prefix_tokens, scale, max_seqlen, rotate_half, rope)
        return out

    @staticmethod
    def backward(ctx, do):
        qkv, out, lse, sin, cos, cu_seqlens = ctx.saved_tensors
        num_heads, num_prefix_tokens, scale, max_seqlen, rotate_half, rope = ctx.args
        dqkv = rope_attention_bwd(
            do, qkv, out, lse, num_heads, sin, cos, num_prefix_tokens, scale, cu_seqlens, max_seqlen, rotate_half,
            rope=rope,
        )  # fmt: skip
        return dqkv, None, None, None, None, None, None, None, None, None


def rope_attention(
    qkv: torch.Tensor,
    num_heads: int,
    sin: torch.Tensor | None,
    cos: torch.Tensor | None,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    rotate_half: bool = True,
    *,
    rope: bool = True,
) -> torch.Tensor:
    """:func:`rope_attention_fwd`'s ``out`` with autograd through :func:`rope_attention_bwd` (gradient for ``qkv``
    only); ``scale`` defaults to D^-1/2."""
    head_dim = qkv.shape[-1] // 3 // num_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    return _RopeAttention.apply(
        qkv, num_heads, sin, cos, num_prefix_tokens, scale, cu_seqlens, max_seqlen, rotate_half, rope
    )
