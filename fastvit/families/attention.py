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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
_describe = call_builder("head_dim", "dropout_p", "batch", "num_tokens", "num_kv_tokens")


def _prepare_attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
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
    if qkv.shape[-1] % (3 * num_heads) or qkv.shape[-1] == 0:
        raise ValueError(
            f"qkv's last dim ({qkv.shape[-1]}) must be a positive multiple of 3 * num_heads = {3 * num_heads}"
        )
    if dropout_p != 0.0:
        check_dropout(dropout_p)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if packed:
        S, n = check_cu_seqlens(cu_seqlens, max_seqlen, qkv.shape[0], "qkv", qkv)
        call = _describe(
            qkv.device,
            qkv.dtype,
            head_dim=head_dim,
            dropout_p=dropout_p,
            batch=S,
            num_tokens=n,
            num_kv_tokens=n,
            varlen=True,
        )
        return call, qkv
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed sequences); got cu_seqlens=None")
    B, N, _ = qkv.shape
    call = _describe(
        qkv.device, qkv.dtype, head_dim=head_dim, dropout_p=dropout_p, batch=B, num_tokens=N, num_kv_tokens=N
    )
    return call, qkv


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
        call = _describe(
            q.device, q.dtype, head_dim=D, dropout_p=dropout_p, batch=S, num_tokens=n, num_kv_tokens=n, varlen=True
        )
        return call, q, k, v
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed sequences); got cu_seqlens=None")
    n_q, n_kv = q.shape[2], k.shape[2]
    call = _describe(q.device, q.dtype, head_dim=D, dropout_p=dropout_p, batch=B, num_tokens=n_q, num_kv_tokens=n_kv)
    return call, q, k, v


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


def _cu_seqlens(lengths: tuple[int, ...]) -> Tensor:
    from fastvit.nn.packed import cu_seqlens_from_lengths  # fastvit.nn imports fastvit.ops, which imports this

    return cu_seqlens_from_lengths(lengths)


def _attention_shape(N: int, H: int, D: int):
    return lambda g: {"qkv": (SELFTEST_BATCH, N, 3 * H * D), "num_heads": H}


def _attention_packed_shape(lengths: tuple[int, ...], H: int, D: int):
    return lambda g: {"qkv": (sum(lengths), 3 * H * D), "num_heads": H, "cu_seqlens": _cu_seqlens(lengths)}


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
)
_CALL_FIELDS = ("head_dim", "dropout_p", "batch", "num_tokens", "num_kv_tokens")
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


def attention_eager(qkv, num_heads, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
    """Eager :func:`fastvit.ops.attention`: SDPA on (B, H, N, D) views of ``qkv``, heads concatenated; packed
    sequences (``cu_seqlens``) one at a time."""
    if cu_seqlens is not None:
        return per_sequence(
            lambda part: attention_eager(part[None], num_heads, scale=scale, dropout_p=dropout_p)[0], cu_seqlens, qkv
        )
    B, N, C3 = qkv.shape
    q, k, v = reference.split_qkv(qkv, num_heads)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).reshape(B, N, C3 // 3)


def sdpa_eager(q, k, v, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
    """Eager :func:`fastvit.ops.scaled_dot_product_attention`: ``F.scaled_dot_product_attention``; packed sequences
    (``cu_seqlens``, (T, H, D) operands) one at a time."""
    if cu_seqlens is not None:
        return reference.per_sequence_sdpa(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale),
            q,
            k,
            v,
            cu_seqlens,
        )
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


register_kernel("eager", "attention", attention_eager, eager_rt.ANY_DEVICE)
register_kernel("eager", "scaled_dot_product_attention", sdpa_eager, eager_rt.ANY_DEVICE)


# ============================================================================================ autocast
def autocast_rule(amp: torch.dtype, *tensors):
    """Under autocast, as ``F.scaled_dot_product_attention``: qkv (or q, k, v) in the autocast dtype."""
    return autocast_cast(amp, *tensors)


# ============================================================================================ autograd
def _flash_autograd(bwd: str, n_diff: int, n_lead: int = 0):
    """``(setup_context, backward)`` of a FlashAttention-style op pair: the forward takes ``n_diff`` differentiable
    tensors then any further arguments ``*args`` (tensors such as ``cu_seqlens`` or plain values) and returns
    ``(o, lse)``; the backward op is ``bwd(do, *inputs, *args[:n_lead], o, lse, *args[n_lead:]) -> gradients of the
    inputs`` (the packed ops lead with ``cu_seqlens, max_seqlen``, as the forward does). Tensors among ``args`` are
    saved with ``save_for_backward``, plain values on ``ctx``."""

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
        return (*(grads if n_diff > 1 else (grads,)), *(None for _ in args))

    return setup, backward


def _attention_autograd(bwd: str):
    """Autograd of ``attention_fwd(qkv, num_heads, scale)``: ``bwd(do, qkv, o, lse, num_heads, scale) -> dqkv``."""
    return _flash_autograd(bwd, 1)


def _sdpa_autograd(bwd: str):
    """Autograd of ``sdpa_fwd(q, k, v, scale)``: ``bwd(do, q, k, v, o, lse, scale) -> (dq, dk, dv)``."""
    return _flash_autograd(bwd, 3)


def _attention_varlen_autograd(bwd: str):
    """Autograd of ``attention_varlen_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale)``:
    ``bwd(do, qkv, cu_seqlens, max_seqlen, o, lse, num_heads, scale) -> dqkv`` (Triton's and the CUDA op's)."""
    return _flash_autograd(bwd, 1, 2)


def _sdpa_varlen_autograd(bwd: str):
    """Autograd of ``sdpa_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale)``:
    ``bwd(do, q, k, v, cu_seqlens, max_seqlen, o, lse, scale) -> (dq, dk, dv)``."""
    return _flash_autograd(bwd, 3, 2)


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


def _launch_fwd(q, k, v, o, lse, B, H, n_q, n_kv, D, scale, cu_seqlens=None):
    """The forward kernel on (B, ...) operands, or with ``cu_seqlens`` on packed ones (B = S sequences, n_q = n_kv =
    max_seqlen, ``lse`` (H, T))."""
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
    )


def _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, H, n_q, n_kv, D, scale, cu_seqlens=None):
    """Preprocess, dK/dV and dQ kernels; with ``cu_seqlens`` on packed operands (see :func:`_launch_fwd`)."""
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
    )


def _define_triton_ops() -> None:
    triton_op = torch.library.triton_op

    @triton_op("fastvit::attention_fwd", mutates_args=())
    def attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
        qkv = triton_rt.last_contiguous(qkv)
        B, N, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        o = torch.empty((B, N, C), device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
        if o.numel():
            _launch_fwd(qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :], o, lse, B, num_heads, N, N, D, scale)
        return o, lse

    @triton_op("fastvit::attention_bwd", mutates_args=())
    def attention_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, num_heads: int, scale: float) -> Tensor:
        qkv = triton_rt.last_contiguous(qkv)
        do = triton_rt.last_contiguous(do)
        B, N, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        dqkv = torch.empty((B, N, C3), device=qkv.device, dtype=qkv.dtype)
        if dqkv.numel():
            q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
            dq, dk, dv = dqkv[..., :C], dqkv[..., C : 2 * C], dqkv[..., 2 * C :]
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, num_heads, N, N, D, scale)
        return dqkv

    @triton_op("fastvit::sdpa_fwd", mutates_args=())
    def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = _bhnd_operand(q), _bhnd_operand(k), _bhnd_operand(v)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        o = torch.empty((B, H, n_q, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
        if o.numel() and n_kv:
            _launch_fwd(q, k, v, o, lse, B, H, n_q, n_kv, D, scale)
        elif o.numel():  # softmax over no keys: eager attention gives zeros; the log-sum-exp of nothing is -inf
            o.zero_()
            lse.fill_(float("-inf"))
        return o, lse

    @triton_op("fastvit::sdpa_bwd", mutates_args=())
    def sdpa_bwd(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, do = _bhnd_operand(q), _bhnd_operand(k), _bhnd_operand(v), _bhnd_operand(do)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        dq = torch.empty((B, H, n_q, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, H, n_kv, D), device=q.device, dtype=q.dtype)
        dv = torch.empty((B, H, n_kv, D), device=q.device, dtype=q.dtype)
        if dq.numel() and n_kv:
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, H, n_q, n_kv, D, scale)
        else:  # no queries or no keys: every gradient is zero
            dq.zero_()
            dk.zero_()
            dv.zero_()
        return dq, dk, dv

    @triton_op("fastvit::attention_varlen_fwd", mutates_args=())
    def attention_varlen_fwd(
        qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float
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
            _launch_fwd(q, k, v, o, lse, S, num_heads, max_seqlen, max_seqlen, D, scale, cu_seqlens)
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
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, S, num_heads, max_seqlen, max_seqlen, D, scale, cu_seqlens)
        return dqkv

    @triton_op("fastvit::sdpa_varlen_fwd", mutates_args=())
    def sdpa_varlen_fwd(
        q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float
    ) -> tuple[Tensor, Tensor]:
        q, k, v = (_thd_operand(t, max_seqlen) for t in (q, k, v))
        T, H, D = q.shape
        S = cu_seqlens.shape[0] - 1
        o = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
        if o.numel() and max_seqlen > 0:
            _launch_fwd(q, k, v, o, lse, S, H, max_seqlen, max_seqlen, D, scale, cu_seqlens)
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, do = (_thd_operand(t, max_seqlen) for t in (q, k, v, do))
        T, H, D = q.shape
        S = cu_seqlens.shape[0] - 1
        dq = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        dv = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
        if dq.numel() and max_seqlen > 0:
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, S, H, max_seqlen, max_seqlen, D, scale, cu_seqlens)
        return dq, dk, dv

    attach("attention", _attention_autograd)
    attach("sdpa", _sdpa_autograd)
    attach("attention_varlen", _attention_varlen_autograd)
    attach("sdpa_varlen", _sdpa_varlen_autograd)


def _max_seqlen(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    return int(cu_seqlens.diff().max()) if max_seqlen is None else max_seqlen


def attention_triton(qkv, num_heads, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
    """Triton backend of :func:`fastvit.ops.attention` (no dropout): FlashAttention-2 (Dao 2023) on the packed
    ``qkv`` (B, N, 3·C) -> (B, N, C); with ``cu_seqlens`` (int32 (S + 1,)) on packed variable-length sequences,
    (T, 3·C) -> (T, C), as ``flash_attn_varlen_qkvpacked_func`` (``max_seqlen`` ``None``: read from ``cu_seqlens``,
    one host sync). Checked arguments are :func:`fastvit.ops.attention`'s job; raises ``ValueError`` for
    ``dropout_p > 0``."""
    _no_dropout("triton", dropout_p)
    scale = _scale(qkv.shape[-1] // (3 * num_heads), scale)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.attention_varlen_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale)[0]
    return torch.ops.fastvit.attention_fwd(qkv, num_heads, scale)[0]


def sdpa_triton(q, k, v, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
    """Triton backend of :func:`fastvit.ops.scaled_dot_product_attention` (no dropout): q, k, v (B, H, N*, D) ->
    (B, H, Nq, D); with ``cu_seqlens`` (int32 (S + 1,)) packed (T, H, D) -> (T, H, D) with any token / head strides
    (last dim contiguous), as ``flash_attn_varlen_func`` with one ``cu_seqlens`` for q and k (Dao 2023,
    FlashAttention-2). Raises ``ValueError`` for ``dropout_p > 0``."""
    _no_dropout("triton", dropout_p)
    scale = _scale(q.shape[-1], scale)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.sdpa_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale)[0]
    return torch.ops.fastvit.sdpa_fwd(q, k, v, scale)[0]


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


def attention_varlen_fwd_fake(qkv, cu_seqlens, max_seqlen, num_heads, scale):
    """Fake of ``attention_varlen_fwd_cuda``: qkv (T, 3C) -> (o (T, C) in qkv's dtype, lse (H, T) fp32)."""
    T, C3 = qkv.shape
    return qkv.new_empty((T, C3 // 3)), qkv.new_empty((num_heads, T), dtype=torch.float32)


def attention_varlen_bwd_fake(dout, qkv, cu_seqlens, max_seqlen, o, lse, num_heads, scale):
    """Fake of ``attention_varlen_bwd_cuda``: dqkv like qkv (T, 3C)."""
    return qkv.new_empty(qkv.shape)


def sdpa_varlen_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    """Fake of ``sdpa_varlen_fwd_cuda``: q (T, H, D) -> (o (T, H, D), lse (H, T) fp32)."""
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


def sdpa_varlen_bwd_fake(dout, q, k, v, cu_seqlens, max_seqlen, o, lse, scale):
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
    def _(qkv, num_heads, scale):
        B, N, C3 = qkv.shape
        return qkv.new_empty((B, N, C3 // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)

    @fake("fastvit::attention_bwd_cuda")
    def _(dout, qkv, o, lse, num_heads, scale):
        return qkv.new_empty(qkv.shape)

    @fake("fastvit::sdpa_fwd_cuda")
    def _(q, k, v, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @fake("fastvit::sdpa_bwd_cuda")
    def _(dout, q, k, v, o, lse, scale):
        return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape)


def _max_seqlen(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    # fastvit.ops always passes it; a direct caller may not (one host sync, as fastvit.ops's own checks).
    return int(cu_seqlens.diff().max()) if max_seqlen is None else max_seqlen


def attention_cuda(qkv, num_heads, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
    """CUDA backend of :func:`fastvit.ops.attention` (FlashAttention-2 on packed qkv, fp16 / bf16, no dropout); with
    ``cu_seqlens``, qkv (T, 3C) holds packed sequences (Dao 2023, as ``flash_attn_varlen_qkvpacked_func``)."""
    _no_dropout("cuda", dropout_p)
    scale = _scale(qkv.shape[-1] // (3 * num_heads), scale)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.attention_varlen_fwd_cuda(qkv, cu_seqlens, max_seqlen, num_heads, scale)[0]
    return torch.ops.fastvit.attention_fwd_cuda(qkv, num_heads, scale)[0]


def sdpa_cuda(q, k, v, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
    """CUDA backend of :func:`fastvit.ops.scaled_dot_product_attention` (fp16 / bf16, no dropout); with
    ``cu_seqlens``, q, k, v (T, H, D) hold packed sequences (as ``flash_attn_varlen_func``)."""
    _no_dropout("cuda", dropout_p)
    scale = _scale(q.shape[-1], scale)
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return torch.ops.fastvit.sdpa_varlen_fwd_cuda(q, k, v, cu_seqlens, max_seqlen, scale)[0]
    return torch.ops.fastvit.sdpa_fwd_cuda(q, k, v, scale)[0]


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
    buckets, and ``varlen`` (packed ``cu_seqlens`` calls) only when the build has the varlen ops
    (:func:`cuda_has_varlen`)."""
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
