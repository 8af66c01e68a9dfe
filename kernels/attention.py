"""FlashAttention-2 in Triton on strided q / k / v: forward, and a deterministic two-kernel backward.

Every tensor is addressed by (batch, head, token) strides with a contiguous head dim, so one set of kernels
serves both layouts fastvit has:

* packed ``qkv`` (B, N, 3·C) from a ``qkv`` Linear: q, k, v are the column slices ``[0:C]``, ``[C:2C]``,
  ``[2C:3C]`` with strides (N·3C, D, 3C); the output (B, N, C) has strides (N·C, D, C) -- no permute, no copy;
* per-head (B, H, N, D) tensors with any strides (``scaled_dot_product_attention``).

Grid: (blocks along the token axis the program owns, H, B) -- B and H on the y/z axes (each up to 65535).

Packed variable-length sequences (``VARLEN``; FlashAttention's ``flash_attn_varlen_func`` convention): the same
kernels, with the batch axis of the grid running over the S sequences of a packed (T, ...) tensor. ``CU_SEQLENS``
holds the int32 offsets (S + 1,): sequence ``s`` is rows ``cu[s] : cu[s + 1]`` (its base is ``cu[s]`` times the
token stride; the batch strides are unused), its length replaces ``N_Q`` / ``N_KV`` -- which the caller sets to
``max_seqlen``, the autotune key and the grid's extent -- and a program whose block starts past its sequence's end
returns at once. The log-sum-exp and ``delta`` are (H, T) fp32, row ``h·T + cu[s] + m``, as in FlashAttention's
varlen kernels. Without ``VARLEN`` the packed branch is folded away at compile time and ``CU_SEQLENS`` is an unused
placeholder pointer.

Forward (Dao 2023, FlashAttention-2, Algorithm 1 / section 3.1): one program per (query block, head, batch);
keys and values stream through in BLOCK_N tiles while an online softmax keeps the running row max ``m`` and
row sum ``l`` in fp32; the 1/l rescale happens once at the end (section 3.1.1, "tweak 1"). The caller multiplies
the softmax scale by log2(e) (``qk_scale`` = c) so the inner loop uses ``exp2``, and ``m`` is kept in those scaled
units: the raw scores are reduced and the row max scaled once per row, so each probability is ``exp2(s·c - m)``,
one FFMA and one MUFU.EX2 per score. The kernel stores O and the natural-log log-sum-exp ``lse = m + log(l)`` of the
*scaled* scores, (B, H, Nq) fp32 ((H, T) when packed).

Lean loops (``python -m fastvit.kernels.check --loops`` reads them from the SASS; ``benchmarks/README.md``): every
kernel splits its token range into full blocks, which run in the steady-state loop with no token masks at all (no
predicates on the loads, no selects on the scores), and at most one partial block, peeled off after the loop with
the masks. In the dK/dV kernel the tail's out-of-range queries load a log-sum-exp of +inf, so their P is exactly 0
without a select.

Backward (Dao 2023, Algorithm 2 / section 3.2): a preprocess kernel computes ``delta = rowsum(dO ∘ O)``; then
``_attn_bwd_dkdv`` (one program per key block, looping over query blocks) recomputes ``P = exp(S - lse)`` and
accumulates dK and dV in registers, and ``_attn_bwd_dq`` (one program per query block, looping over key blocks)
recomputes P again and accumulates dQ. Every output element has exactly one writer: no atomics, so results are
bit-reproducible (FlashAttention-2 itself uses atomic adds for dQ; we trade one extra QKᵀ recompute for
determinism, as the Triton fused-attention tutorial does).

Head dims that are not powers of two (72 SigLIP, 80 ViT-H/14, 88, 104) are split into power-of-two column chunks of at
least 16 (:func:`head_dim_chunks`: 80 = 64 + 16, 104 -> 64 + 32 + 16), one ``tl.dot`` per chunk -- QKᵀ accumulates
over the chunks, O, dK, dV and dQ are held as one accumulator per chunk -- so the MMA work covers D rounded up to 16
(tl.dot's minimum K; 72 and 88 mask 8 columns of their last chunk), not the next power of two: at D = 80, 80 columns
instead of 128. Token tails (N = 197) are masked in the peeled tail block: out-of-range keys get P = 0,
out-of-range queries are never stored.

Rotary position embeddings (``ROPE``; timm's EVA-02 / DINOv3 / Perception Encoder / ``vit_*_rope_*`` attention, timm's
``apply_rot_embed_cat`` on q and k): with ``ROPE`` the kernels rotate q and k as they load them -- the forward its q
block once and each key block of k as it streams in, dK/dV its k block once and each query block of q, dQ its q block
once and each key block of k -- so no rotated copy of q or k is ever written. ``SIN`` / ``COS`` are fp32 tables of
shape (N_rot, D) shared by the heads (``stride_rope_h`` = 0) or per head (H, N_rot, D), shared by the batch
(``stride_rope_b`` = 0) or one per sample -- per packed sequence with ``VARLEN`` -- (B or S, 1 or H, N_rot, D; timm's
NaFlexVit and patch dropout; a run-time stride, no new constexpr), row stride ``stride_rope_n``, unit column stride,
in timm's column layouts: ``ROPE_HALF`` (timm's ``rotate_half`` / ``half=True``: column j pairs with j + D/2,
``[f0, f1, .., f0, f1, ..]``) or interleaved pairs (2i, 2i + 1, ``[f0, f0, f1, f1, ..]``). Position convention: a
token at position ``p`` within its sequence (its batch row, or its packed sequence from ``cu_seqlens[s]``) reads
table row ``p - num_prefix`` of its sample's (sequence's) table; tokens with ``p < num_prefix``
(cls, registers) are not rotated. The kernels read one cos / sin per rotation pair (the pair's first column) --
a rotation by angle θ per pair, which timm's tables are (both columns of a pair hold the same value). Inside the
kernels a rotated chunk holds its columns in pair order (x[a], x[a'], x[b], x[b'], ...): the scores sum over the
columns in any order, and dQ / dK come out in the same order, so only the loads and the dQ / dK stores know the
layout. The backward computes dQ and dK with respect to the rotated q and k and rotates them back (by -θ, the
transpose) before storing; dV is unchanged. Without ``ROPE`` (the default) every rotary branch is folded away at
compile time and the tables are unused (``None``).

fp32 inputs: ``tl.dot`` uses ``INPUT_PRECISION`` ("tf32" or "ieee"), chosen by the caller from
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.get_float32_matmul_precision()``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Head dims the kernels accept (tl.dot needs K >= 16; beyond 128 the tiles stop fitting in registers).
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton 3.9's interpreter multiplies bfloat16 tiles wrongly in tl.dot (garbage of order 1e10; fp16 and fp32 are
# fine), so under the interpreter both operands are upcast to fp32 first -- exact, since a product of two
# bf16 / fp16 numbers is representable in fp32, i.e. the same numbers the tensor cores produce. Compiled kernels
# never take this branch (it is folded away at compile time).
_UPCAST_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr):
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def _dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b``, accumulated by the tensor cores in place (wgmma / mma accumulator)."""
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


# ------------------------------------------------------------------------------------------------ configs
def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


#: Forward: BLOCK_M query rows per program, BLOCK_N keys per inner step.
FWD_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(128, 32, 8, 3),
    _cfg(64, 64, 4, 3),
    _cfg(64, 64, 4, 2),
    _cfg(64, 32, 4, 2),
    _cfg(32, 32, 4, 2),
]
#: dK/dV: BLOCK_N key rows per program (held in registers with their dK, dV), BLOCK_M queries per step.
BWD_DKDV_CONFIGS = [
    _cfg(32, 128, 8, 2),
    _cfg(64, 64, 8, 2),
    _cfg(32, 64, 4, 2),
    _cfg(16, 32, 4, 2),
]
#: dQ: BLOCK_M query rows per program, BLOCK_N keys per step.
BWD_DQ_CONFIGS = [
    _cfg(128, 32, 8, 2),
    _cfg(64, 64, 8, 2),
    _cfg(64, 32, 4, 2),
    _cfg(32, 16, 4, 2),
]
#: Under the interpreter one small config keeps CPU tests fast (there is nothing to tune).
INTERPRET_CONFIG = _cfg(16, 16, 4, 1)

PREPROCESS_BLOCK_M = 64


def _elem_size(nargs: dict) -> int:
    t = nargs.get("Q")
    return t.element_size() if t is not None and hasattr(t, "element_size") else 2


#: Shared-memory budgets of the estimates below: 160 KiB under sm_80's 163 KiB per block, 224 KiB under sm_90's
#: 227 KiB. A config must fit both (the pruner does not know the GPU); ``python -m fastvit.kernels.check``, which
#: compiles every config for both, is the authority.
SMEM_BUDGET_SM80 = 160 * 1024
SMEM_BUDGET_SM90 = 224 * 1024
#: 32-bit registers per thread that a config's register-resident tiles may take (beyond it ptxas spills).
WORDS_PER_THREAD = 128


def _smem_estimate(kind: str, bm: int, bn: int, bd: int, stages: int, esize: int, sm90: bool) -> int:
    """Shared memory Triton 3.x allocates (fitted to the sm_80 / sm_90 compiles of the check): the streamed
    tiles in ``stages - 1`` (sm_80) or ``stages`` (sm_90) buffers, the resident tiles once, plus on sm_80 an
    fp32 BM x BN layout-conversion scratch (twice in the backward)."""
    bufs = stages if sm90 else max(stages - 1, 1)
    scratch = 0 if sm90 else bm * bn * 4
    if kind == "fwd":  # Q resident; K, V streamed
        return (bm + 2 * bufs * bn) * bd * esize + scratch
    if kind == "dkdv":  # K, V resident; Q, dO streamed
        return (2 * bn + 2 * bufs * bm) * bd * esize + 2 * scratch
    return (2 * bm + 2 * bufs * bn) * bd * esize + 2 * scratch  # dQ: Q, dO resident; K, V streamed


def _words_per_thread(kind: str, bm: int, bn: int, bd: int, esize: int, warps: int) -> float:
    """Registers the resident tiles and fp32 accumulators need per thread."""
    if kind == "fwd":
        tiles = bm * bd * esize / 4 + bm * bd
    elif kind == "dkdv":
        tiles = 2 * bn * bd * esize / 4 + 2 * bn * bd
    else:
        tiles = 2 * bm * bd * esize / 4 + bm * bd
    return tiles / (32 * warps)


def _prune(kind: str, configs, nargs, precision=None):
    """Drop tiles far larger than the sequence (N = 50 needs no 128-row blocks), tiles whose estimated shared
    memory exceeds the budgets (fp32 with D = 128), and tiles that need more than :data:`WORDS_PER_THREAD`
    registers per thread for their resident tiles (they spill). fp32 with IEEE dots (no tensor cores: the FMA
    path keeps far more live values) gets only the smallest config -- larger ones spill tens of KB (checked with
    ``ptxas -v``). Always keeps at least one config."""
    n_q, n_kv = nargs["N_Q"], nargs["N_KV"]
    bd = padded_head_dim(nargs["HEAD_DIM"])  # the chunks' total width (head_dim_chunks)
    esize = _elem_size(nargs)
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    if esize == 4 and precision == "ieee":
        return [smallest]
    kept = []
    for c in configs:
        bm, bn, st, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps
        if bm > max(16, triton.next_power_of_2(n_q)) or bn > max(16, triton.next_power_of_2(n_kv)):
            continue
        if _smem_estimate(kind, bm, bn, bd, st, esize, False) > SMEM_BUDGET_SM80:
            continue
        if _smem_estimate(kind, bm, bn, bd, st, esize, True) > SMEM_BUDGET_SM90:
            continue
        if _words_per_thread(kind, bm, bn, bd, esize, w) > WORDS_PER_THREAD:
            continue
        kept.append(c)
    return kept or [smallest]


def prune_fwd(configs, nargs, **kwargs):
    """Autotune pruner of the forward kernel (see :func:`_prune`)."""
    return _prune("fwd", configs, nargs, kwargs.get("INPUT_PRECISION"))


def prune_dkdv(configs, nargs, **kwargs):
    """Autotune pruner of the dK/dV kernel (its BLOCK_N rows are keys, BLOCK_M steps are queries)."""
    return _prune("dkdv", configs, nargs, kwargs.get("INPUT_PRECISION"))


def prune_dq(configs, nargs, **kwargs):
    """Autotune pruner of the dQ kernel."""
    return _prune("dq", configs, nargs, kwargs.get("INPUT_PRECISION"))


#: Autotune key: everything the pruners read. INPUT_PRECISION must be in it (the tensors' dtypes are added by
#: Triton itself): fp32 with IEEE dots is pruned to the smallest tile, fp32 with TF32 is not, and without it a
#: config tuned for one precision would be reused for the other (spilling FMA tiles, or slow tiny TF32 tiles).
#: VARLEN is in it too: packed batches of many short sequences (N_Q = max_seqlen) are another workload than a dense
#: batch of the same N.
#: ROPE too (when a launcher passes it): the rotary loads change the loops' register and memory pressure.
KEY = ["N_Q", "N_KV", "HEAD_DIM", "INPUT_PRECISION", "VARLEN", "ROPE"]


def _autotune(configs, prune):
    if _INTERPRET:
        return triton.autotune(configs=[INTERPRET_CONFIG], key=KEY)
    return triton.autotune(
        configs=configs,
        key=KEY,
        prune_configs_by={"early_config_prune": prune},
    )


# ------------------------------------------------------------------------------------------------ packed sequences
@triton.jit
def _varlen_seq(CU_SEQLENS, off_s, off_h):
    """Sequence ``off_s`` of a packed batch: its first token (int64), its length (int32) and the first row of its
    (head ``off_h``) statistics in an (H, T) fp32 array -- T = cu[S], S the grid's z extent."""
    start = tl.load(CU_SEQLENS + off_s).to(tl.int64)
    end = tl.load(CU_SEQLENS + off_s + 1).to(tl.int64)
    total = tl.load(CU_SEQLENS + tl.num_programs(2)).to(tl.int64)
    return start, (end - start).to(tl.int32), off_h * total + start


@triton.jit
def _sequence(CU_SEQLENS, off_b, off_h, H, N_Q, VARLEN: tl.constexpr):
    """``(tok, n, row)`` of program row ``off_b``: with ``VARLEN`` the packed sequence ``off_b`` (its first token, its
    length, the first (H, T) statistics row of head ``off_h``, :func:`_varlen_seq`); else batch ``off_b`` of a dense
    batch (``tok`` unused, ``n = N_Q``, the row of its (B, H, N) statistics)."""
    if VARLEN:
        tok, n, row = _varlen_seq(CU_SEQLENS, off_b, off_h)
    else:
        tok, n, row = 0, N_Q, (off_b * H + off_h) * N_Q
    return tok, n, row


@triton.jit
def _head_base(P, off_b, off_h, tok, stride_b, stride_h, stride_n, VARLEN: tl.constexpr):
    """Where head ``off_h`` of a sequence starts in ``P``: at token ``tok`` of the packed rows (``VARLEN``), else in
    batch ``off_b``."""
    if VARLEN:
        base = P + tok * stride_n + off_h * stride_h
    else:
        base = P + off_b * stride_b + off_h * stride_h
    return base


# ------------------------------------------------------------------------------------------------ head-dim chunks
@triton.jit
def _load_chunk(rows, row_mask, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Columns ``C0 : C0 + W`` of the rows whose column-0 pointers are ``rows`` (R, 1): a (R, W) tile. Rows are masked
    only with ``MASK_ROWS``; columns only in the last chunk of a head dim that is not a multiple of 16 (constexpr
    branches: an unmasked load has no predicates at all)."""
    return _load_at(_chunk_ptrs(rows, C0, W), row_mask, C0, W, HEAD_DIM, MASK_ROWS)


@triton.jit
def _load_chunks(rows, row_mask, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The masked rows ``rows`` (R, 1) of a head split into its power-of-two column chunks ``D0 + D1 + D2``: three
    tiles (R, D0), (R, D1), (R, D2); an absent chunk (width 0) repeats the first as a placeholder, never used."""
    c0 = _load_chunk(rows, row_mask, 0, D0, HEAD_DIM, True)
    c1 = c0
    c2 = c0
    if D1 > 0:
        c1 = _load_chunk(rows, row_mask, D0, D1, HEAD_DIM, True)
    if D2 > 0:
        c2 = _load_chunk(rows, row_mask, D0 + D1, D2, HEAD_DIM, True)
    return c0, c1, c2


@triton.jit
def _chunk_ptrs(rows, C0: tl.constexpr, W: tl.constexpr):
    """The (R, W) pointer tile of columns ``C0 : C0 + W`` of the rows whose column-0 pointers are ``rows`` (R, 1)."""
    return rows + (C0 + tl.arange(0, W))[None, :]


@triton.jit
def _load_at(ptrs, row_mask, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):
    """:func:`_load_chunk` on a pointer tile from :func:`_chunk_ptrs` (streamed operands: the loops advance the
    tiles, which compiles to fewer address instructions than re-adding the column offsets each block)."""
    if C0 + W > HEAD_DIM:
        cols = C0 + tl.arange(0, W)
        if MASK_ROWS:
            t = tl.load(ptrs, mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        else:
            t = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        if MASK_ROWS:
            t = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _stream_ptrs(rows, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """The pointer tiles of the (up to three) chunks of a streamed operand; an absent chunk repeats the first."""
    p0 = _chunk_ptrs(rows, 0, D0)
    p1 = p0
    p2 = p0
    if D1 > 0:
        p1 = _chunk_ptrs(rows, D0, D1)
    if D2 > 0:
        p2 = _chunk_ptrs(rows, D0 + D1, D2)
    return p0, p1, p2


@triton.jit
def _advance(p0, p1, p2, step, D1: tl.constexpr, D2: tl.constexpr):
    """Advance the chunk pointer tiles of a streamed operand by ``step`` elements (absent chunks stay)."""
    p0 += step
    if D1 > 0:
        p1 += step
    if D2 > 0:
        p2 += step
    return p0, p1, p2


@triton.jit
def _store_chunk(rows, row_mask, val, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store ``val`` (R, W) to columns ``C0 : C0 + W`` of the masked rows (columns >= HEAD_DIM are not stored)."""
    cols = C0 + tl.arange(0, W)
    if C0 + W > HEAD_DIM:
        mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    else:
        mask = row_mask[:, None]
    tl.store(rows + cols[None, :], val.to(rows.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ rotary embeddings
@triton.jit
def _rope_cos_sin(
    COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, MASK_ROWS: tl.constexpr,
):  # fmt: skip
    """cos and sin (R, W/2) fp32 of the W/2 rotation pairs of the head-dim chunk ``C0 : C0 + W`` at the token positions
    ``pos`` (R,): table row ``pos - num_prefix``, one value per pair (its first column: pair index ``C0/2 + t`` with
    ``HALF``, column ``C0 + 2t`` interleaved). Prefix tokens (``pos < num_prefix``), rows outside ``row_ok`` (with
    ``MASK_ROWS``) and columns past the head get (1, 0): no rotation."""
    R: tl.constexpr = pos.shape[0]
    ok = pos >= num_prefix
    if MASK_ROWS:
        ok = ok & row_ok
    rows = (pos - num_prefix)[:, None] * stride_rope_n
    if HALF:
        cols = C0 // 2 + tl.arange(0, W // 2)
        if C0 + W > HEAD_DIM:
            mask = ok[:, None] & (cols < HEAD_DIM // 2)[None, :]
        else:
            mask = ok[:, None]
        c = tl.load(COS_H + rows + cols[None, :], mask=mask, other=1.0)
        s = tl.load(SIN_H + rows + cols[None, :], mask=mask, other=0.0)
    else:  # the whole chunk, contiguous (vector loads), then the first column of each pair
        cols = C0 + tl.arange(0, W)
        if C0 + W > HEAD_DIM:
            mask = ok[:, None] & (cols < HEAD_DIM)[None, :]
        else:
            mask = ok[:, None]
        c, _ = tl.split(tl.reshape(tl.load(COS_H + rows + cols[None, :], mask=mask, other=1.0), (R, W // 2, 2)))
        s, _ = tl.split(tl.reshape(tl.load(SIN_H + rows + cols[None, :], mask=mask, other=0.0), (R, W // 2, 2)))
    return c, s


@triton.jit
def _rope_load(rows, row_ok, c, s, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
               MASK_ROWS: tl.constexpr):  # fmt: skip
    """The head-dim chunk ``C0 : C0 + W`` of the rows ``rows`` (R, 1), rotated by (c, s) from :func:`_rope_cos_sin`:
    a (R, W) tile in the input dtype, its columns in pair order (first, second member of pair 0, of pair 1, ...).
    With ``HALF`` the chunk is the pairs ``C0/2 + t``, columns ``C0/2 + t`` and ``D/2 + C0/2 + t`` (two contiguous
    loads); interleaved it is columns ``C0 : C0 + W``, already in pair order. The rotation is timm's
    ``x * cos + rotate(x) * sin`` in fp32, rounded once to the input dtype."""
    R: tl.constexpr = c.shape[0]
    if HALF:
        p1 = _chunk_ptrs(rows, C0 // 2, W // 2)
        x1 = _load_at(p1, row_ok, C0 // 2, W // 2, HEAD_DIM // 2, MASK_ROWS)
        x2 = _load_at(p1 + HEAD_DIM // 2, row_ok, C0 // 2, W // 2, HEAD_DIM // 2, MASK_ROWS)
    else:
        x = _load_at(_chunk_ptrs(rows, C0, W), row_ok, C0, W, HEAD_DIM, MASK_ROWS)
        x1, x2 = tl.split(tl.reshape(x, (R, W // 2, 2)))
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return tl.reshape(tl.join(a * c - b * s, b * c + a * s), (R, W)).to(x1.dtype)


@triton.jit
def _rope_store(rows, row_ok, g, c, s, C0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """Store the gradient with respect to the unrotated chunk ``C0 : C0 + W`` of the rows ``rows`` given ``g`` (R, W)
    fp32, the gradient with respect to the rotated chunk in pair order (:func:`_rope_load`): the transpose rotation,
    by -θ -- (g1·c + g2·s, g2·c - g1·s) per pair."""
    R: tl.constexpr = c.shape[0]
    g1, g2 = tl.split(tl.reshape(g, (R, W // 2, 2)))
    d1 = g1 * c + g2 * s
    d2 = g2 * c - g1 * s
    if HALF:
        _store_chunk(rows, row_ok, d1, C0 // 2, W // 2, HEAD_DIM // 2)
        _store_chunk(rows + HEAD_DIM // 2, row_ok, d2, C0 // 2, W // 2, HEAD_DIM // 2)
    else:
        _store_chunk(rows, row_ok, tl.reshape(tl.join(d1, d2), (R, W)), C0, W, HEAD_DIM)


@triton.jit
def _rope_chunks(
    rows, row_ok, pos, COS_H, SIN_H, stride_rope_n, num_prefix, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, MASK_ROWS: tl.constexpr,
):  # fmt: skip
    """:func:`_load_chunks` with the rotation: the rows ``rows`` (R, 1) at token positions ``pos`` (R,), rotated, in
    the head's power-of-two chunks ``D0 + D1 + D2`` (pair order within each chunk); an absent chunk repeats the
    first."""
    c, s = _rope_cos_sin(COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, 0, D0, HEAD_DIM, HALF, MASK_ROWS)
    x0 = _rope_load(rows, row_ok, c, s, 0, D0, HEAD_DIM, HALF, MASK_ROWS)
    x1 = x0
    x2 = x0
    if D1 > 0:
        c, s = _rope_cos_sin(COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, D0, D1, HEAD_DIM, HALF, MASK_ROWS)
        x1 = _rope_load(rows, row_ok, c, s, D0, D1, HEAD_DIM, HALF, MASK_ROWS)
    if D2 > 0:
        c, s = _rope_cos_sin(
            COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, D0 + D1, D2, HEAD_DIM, HALF, MASK_ROWS
        )
        x2 = _rope_load(rows, row_ok, c, s, D0 + D1, D2, HEAD_DIM, HALF, MASK_ROWS)
    return x0, x1, x2


@triton.jit
def _rope_store_chunks(
    rows, row_ok, pos, g0, g1, g2, COS_H, SIN_H, stride_rope_n, num_prefix, D0: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Store dQ or dK, accumulated per chunk with respect to the rotated operand (``g0``, ``g1``, ``g2``), rotated back
    (:func:`_rope_store`); the tables are read again here rather than kept live through the main loop."""
    c, s = _rope_cos_sin(COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, 0, D0, HEAD_DIM, HALF, True)
    _rope_store(rows, row_ok, g0, c, s, 0, D0, HEAD_DIM, HALF)
    if D1 > 0:
        c, s = _rope_cos_sin(COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, D0, D1, HEAD_DIM, HALF, True)
        _rope_store(rows, row_ok, g1, c, s, D0, D1, HEAD_DIM, HALF)
    if D2 > 0:
        c, s = _rope_cos_sin(COS_H, SIN_H, pos, row_ok, stride_rope_n, num_prefix, D0 + D1, D2, HEAD_DIM, HALF, True)
        _rope_store(rows, row_ok, g2, c, s, D0 + D1, D2, HEAD_DIM, HALF)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_step(
    acc0, acc1, acc2, l_i, m_i, q0, q1, q2, kp0, kp1, kp2, vp0, vp1, vp2, cols, n_kv, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MASK_N: tl.constexpr, NEG_SCALE: tl.constexpr,
    k_base, stride_kn, COS_H, SIN_H, stride_rope_n, num_prefix, ROPE: tl.constexpr, ROPE_HALF: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax, ``m`` in scaled log2 units: the row max of s·c is max(s)·c, or min(s)·c
    with ``NEG_SCALE`` (c < 0). With ``MASK_N`` the keys at ``cols >= n_kv`` are masked (the tail block); without it
    no token mask is computed at all. Head-dim chunks: s = Σ q_c k_cᵀ (one dot per chunk), O_c += P V_c. With
    ``ROPE`` the key block is loaded rotated (rows ``k_base + cols·stride_kn``; the pointer tiles are unused)."""
    n_mask = cols < n_kv
    if ROPE:
        k0, k1, k2 = _rope_chunks(
            k_base + cols[:, None] * stride_kn, n_mask, cols, COS_H, SIN_H, stride_rope_n, num_prefix, D0, D1, D2,
            HEAD_DIM, ROPE_HALF, MASK_N,
        )  # fmt: skip
        s = _dot(q0, tl.trans(k0), INPUT_PRECISION)
        if D1 > 0:
            s = _dot_acc(q1, tl.trans(k1), s, INPUT_PRECISION)
        if D2 > 0:
            s = _dot_acc(q2, tl.trans(k2), s, INPUT_PRECISION)
    else:
        k0 = _load_at(kp0, n_mask, 0, D0, HEAD_DIM, MASK_N)
        s = _dot(q0, tl.trans(k0), INPUT_PRECISION)
        if D1 > 0:
            k1 = _load_at(kp1, n_mask, D0, D1, HEAD_DIM, MASK_N)
            s = _dot_acc(q1, tl.trans(k1), s, INPUT_PRECISION)
        if D2 > 0:
            k2 = _load_at(kp2, n_mask, D0 + D1, D2, HEAD_DIM, MASK_N)
            s = _dot_acc(q2, tl.trans(k2), s, INPUT_PRECISION)
    if NEG_SCALE:
        if MASK_N:
            m_new = tl.maximum(m_i, tl.min(tl.where(n_mask[None, :], s, float("inf")), axis=1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.min(s, axis=1) * qk_scale)
    else:
        if MASK_N:
            m_new = tl.maximum(m_i, tl.max(tl.where(n_mask[None, :], s, float("-inf")), axis=1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    if MASK_N:  # masked after the scale: a masked score of -inf times a zero scale would be nan
        p = tl.exp2(tl.where(n_mask[None, :], s * qk_scale - m_new[:, None], float("-inf")))
    else:
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v0 = _load_at(vp0, n_mask, 0, D0, HEAD_DIM, MASK_N)
    p = p.to(v0.dtype)
    acc0 = _dot_acc(p, v0, acc0 * alpha[:, None], INPUT_PRECISION)
    if D1 > 0:
        v1 = _load_at(vp1, n_mask, D0, D1, HEAD_DIM, MASK_N)
        acc1 = _dot_acc(p, v1, acc1 * alpha[:, None], INPUT_PRECISION)
    if D2 > 0:
        v2 = _load_at(vp2, n_mask, D0 + D1, D2, HEAD_DIM, MASK_N)
        acc2 = _dot_acc(p, v2, acc2 * alpha[:, None], INPUT_PRECISION)
    return acc0, acc1, acc2, l_i, m_new


@triton.jit
def _fwd_rows(
    q0, q1, q2, k_base, v_base, o_rows, lse_ptr, stride_kn, stride_vn, n_kv, offs_m, offs_n, m_mask, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, NEG_SCALE: tl.constexpr,
    COS_H, SIN_H, stride_rope_n, num_prefix, ROPE: tl.constexpr, ROPE_HALF: tl.constexpr,
):  # fmt: skip
    """All key blocks -- the full ones in a loop with no token mask, then the partial one (if any), peeled off --
    and the stores of O and the log-sum-exp."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)  # unused placeholder when D1 = 0
    acc2 = tl.zeros([BLOCK_M, D2 if D2 > 0 else 16], dtype=tl.float32)
    kp0, kp1, kp2 = _stream_ptrs(k_base + offs_n[:, None] * stride_kn, D0, D1, D2)
    vp0, vp1, vp2 = _stream_ptrs(v_base + offs_n[:, None] * stride_vn, D0, D1, D2)
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, acc2, l_i, m_i = _fwd_step(
            acc0, acc1, acc2, l_i, m_i, q0, q1, q2, kp0, kp1, kp2, vp0, vp1, vp2, start_n + offs_n, n_kv, qk_scale,
            HEAD_DIM, D0, D1, D2, INPUT_PRECISION, MASK_N=False, NEG_SCALE=NEG_SCALE, k_base=k_base,
            stride_kn=stride_kn, COS_H=COS_H, SIN_H=SIN_H, stride_rope_n=stride_rope_n, num_prefix=num_prefix,
            ROPE=ROPE, ROPE_HALF=ROPE_HALF,
        )  # fmt: skip
        kp0, kp1, kp2 = _advance(kp0, kp1, kp2, BLOCK_N * stride_kn, D1, D2)
        vp0, vp1, vp2 = _advance(vp0, vp1, vp2, BLOCK_N * stride_vn, D1, D2)
    if n_full < n_kv:
        acc0, acc1, acc2, l_i, m_i = _fwd_step(
            acc0, acc1, acc2, l_i, m_i, q0, q1, q2, kp0, kp1, kp2, vp0, vp1, vp2, n_full + offs_n, n_kv, qk_scale,
            HEAD_DIM, D0, D1, D2, INPUT_PRECISION, MASK_N=True, NEG_SCALE=NEG_SCALE, k_base=k_base,
            stride_kn=stride_kn, COS_H=COS_H, SIN_H=SIN_H, stride_rope_n=stride_rope_n, num_prefix=num_prefix,
            ROPE=ROPE, ROPE_HALF=ROPE_HALF,
        )  # fmt: skip
    _store_chunk(o_rows, m_mask, acc0 / l_i[:, None], 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_chunk(o_rows, m_mask, acc1 / l_i[:, None], D0, D1, HEAD_DIM)
    if D2 > 0:
        _store_chunk(o_rows, m_mask, acc2 / l_i[:, None], D0 + D1, D2, HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(lse_ptr + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_fwd_body(
    Q,
    K,
    V,
    O,
    LSE,
    CU_SEQLENS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    N_Q,
    N_KV,
    HEAD_DIM: tl.constexpr,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    SIN=None,
    COS=None,
    stride_rope_b=0,
    stride_rope_h=0,
    stride_rope_n=0,
    num_prefix=0,
    ROPE: tl.constexpr = False,
    ROPE_HALF: tl.constexpr = True,
):
    # the head dim in power-of-two chunks of at least 16 (see head_dim_chunks; BLOCK_D is not used)
    PAD_D: tl.constexpr = (HEAD_DIM + 15) // 16 * 16
    D0: tl.constexpr = 128 if PAD_D >= 128 else (64 if PAD_D >= 64 else (32 if PAD_D >= 32 else 16))
    D1: tl.constexpr = 32 if PAD_D - D0 >= 32 else (16 if PAD_D - D0 >= 16 else 0)
    D2: tl.constexpr = 16 if PAD_D - D0 - D1 >= 16 else 0
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, n_q, lse_row = _sequence(CU_SEQLENS, off_b, off_h, H, N_Q, VARLEN)  # with VARLEN off_b is the sequence
    if VARLEN:
        if pid_m * BLOCK_M >= n_q:
            return
        n_kv = n_q
    else:
        n_kv = N_KV
    q_base = _head_base(Q, off_b, off_h, tok, stride_qb, stride_qh, stride_qn, VARLEN)
    k_base = _head_base(K, off_b, off_h, tok, stride_kb, stride_kh, stride_kn, VARLEN)
    v_base = _head_base(V, off_b, off_h, tok, stride_vb, stride_vh, stride_vn, VARLEN)
    o_base = _head_base(O, off_b, off_h, tok, stride_ob, stride_oh, stride_on, VARLEN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < n_q
    q_rows = q_base + offs_m[:, None] * stride_qn
    if ROPE:  # this sample's (sequence's) and head's table; stride_rope_b / _h = 0 for tables the batch / heads share
        cos_h = COS + off_b * stride_rope_b + off_h * stride_rope_h
        sin_h = SIN + off_b * stride_rope_b + off_h * stride_rope_h
        q0, q1, q2 = _rope_chunks(
            q_rows, m_mask, offs_m, cos_h, sin_h, stride_rope_n, num_prefix, D0, D1, D2, HEAD_DIM, ROPE_HALF, True
        )
    else:
        cos_h = COS  # unused
        sin_h = SIN
        q0, q1, q2 = _load_chunks(q_rows, m_mask, D0, D1, D2, HEAD_DIM)
    o_rows = o_base + offs_m[:, None] * stride_on
    # m is kept in scaled log2 units and the scores are reduced raw -- max(s)·c == max(s·c) for c >= 0, exactly (fp
    # rounding is monotone) -- so each probability is exp2(s·c - m): one FFMA and one MUFU.EX2 per score. A negative
    # scale (legal, if odd) takes the mirror loop, min(s)·c; negating q instead would pull Q out of shared memory
    # into registers (+20 registers, one CTA per SM fewer, checked on sm_90).
    if qk_scale < 0:
        _fwd_rows(
            q0, q1, q2, k_base, v_base, o_rows, LSE + lse_row, stride_kn, stride_vn, n_kv, offs_m, offs_n, m_mask,
            qk_scale, HEAD_DIM, D0, D1, D2, BLOCK_M, BLOCK_N, INPUT_PRECISION, NEG_SCALE=True, COS_H=cos_h,
            SIN_H=sin_h, stride_rope_n=stride_rope_n, num_prefix=num_prefix, ROPE=ROPE, ROPE_HALF=ROPE_HALF,
        )  # fmt: skip
    else:
        _fwd_rows(
            q0, q1, q2, k_base, v_base, o_rows, LSE + lse_row, stride_kn, stride_vn, n_kv, offs_m, offs_n, m_mask,
            qk_scale, HEAD_DIM, D0, D1, D2, BLOCK_M, BLOCK_N, INPUT_PRECISION, NEG_SCALE=False, COS_H=cos_h,
            SIN_H=sin_h, stride_rope_n=stride_rope_n, num_prefix=num_prefix, ROPE=ROPE, ROPE_HALF=ROPE_HALF,
        )  # fmt: skip


attn_fwd_kernel = _attn_fwd_body
attn_fwd = _autotune(FWD_CONFIGS, prune_fwd)(_attn_fwd_body)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _attn_bwd_preprocess(
    O,
    DO,
    Delta,
    CU_SEQLENS,
    stride_ob,
    stride_oh,
    stride_on,
    stride_dob,
    stride_doh,
    stride_don,
    H,
    N_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, n_q, row = _sequence(CU_SEQLENS, off_b, off_h, H, N_Q, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= n_q:
            return
    o_base = _head_base(O, off_b, off_h, tok, stride_ob, stride_oh, stride_on, VARLEN)
    do_base = _head_base(DO, off_b, off_h, tok, stride_dob, stride_doh, stride_don, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_base + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + row + offs_m, tl.sum(o * do, axis=1), mask=offs_m < n_q)


attn_bwd_preprocess = _attn_bwd_preprocess


@triton.jit
def _dkdv_step(
    dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, qp0, qp1, qp2, dop0, dop1, dop2, lse_ptrs, delta_ptrs, rows,
    offs_m, n_q, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MASK_M: tl.constexpr,
    q_base, stride_qn, COS_H, SIN_H, stride_rope_n, num_prefix, ROPE: tl.constexpr, ROPE_HALF: tl.constexpr,
):  # fmt: skip
    """One query block of dK / dV (transposed scores, keys x queries). With ``MASK_M`` (the tail block) queries at
    ``rows >= n_q`` load a log-sum-exp of +inf, so their P is exp2(-inf) = 0 and they add nothing -- no select on the
    scores; without it nothing is masked at all. Head-dim chunks: Sᵀ = Σ K_c Q_cᵀ, dPᵀ = Σ V_c dO_cᵀ (one dot per
    chunk), dV_c += Pᵀ dO_c, dK_c += dSᵀ Q_c. With ``ROPE`` the query block is loaded rotated (rows
    ``q_base + rows·stride_qn``; the q pointer tiles are unused) and dK is with respect to the rotated keys."""
    m_mask = rows < n_q
    if ROPE:
        q0, q1, q2 = _rope_chunks(
            q_base + rows[:, None] * stride_qn, m_mask, rows, COS_H, SIN_H, stride_rope_n, num_prefix, D0, D1, D2,
            HEAD_DIM, ROPE_HALF, MASK_M,
        )  # fmt: skip
        do0 = _load_at(dop0, m_mask, 0, D0, HEAD_DIM, MASK_M)
        s_t = _dot(k0, tl.trans(q0), INPUT_PRECISION)
        if D1 > 0:
            do1 = _load_at(dop1, m_mask, D0, D1, HEAD_DIM, MASK_M)
            s_t = _dot_acc(k1, tl.trans(q1), s_t, INPUT_PRECISION)
        if D2 > 0:
            do2 = _load_at(dop2, m_mask, D0 + D1, D2, HEAD_DIM, MASK_M)
            s_t = _dot_acc(k2, tl.trans(q2), s_t, INPUT_PRECISION)
    else:
        q0 = _load_at(qp0, m_mask, 0, D0, HEAD_DIM, MASK_M)
        do0 = _load_at(dop0, m_mask, 0, D0, HEAD_DIM, MASK_M)
        s_t = _dot(k0, tl.trans(q0), INPUT_PRECISION)
        if D1 > 0:
            q1 = _load_at(qp1, m_mask, D0, D1, HEAD_DIM, MASK_M)
            do1 = _load_at(dop1, m_mask, D0, D1, HEAD_DIM, MASK_M)
            s_t = _dot_acc(k1, tl.trans(q1), s_t, INPUT_PRECISION)
        if D2 > 0:
            q2 = _load_at(qp2, m_mask, D0 + D1, D2, HEAD_DIM, MASK_M)
            do2 = _load_at(dop2, m_mask, D0 + D1, D2, HEAD_DIM, MASK_M)
            s_t = _dot_acc(k2, tl.trans(q2), s_t, INPUT_PRECISION)
    if MASK_M:
        lse = tl.load(lse_ptrs + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_ptrs + offs_m, mask=m_mask, other=0.0)
    else:
        lse = tl.load(lse_ptrs + offs_m)
        delta = tl.load(delta_ptrs + offs_m)
    p_t = tl.exp2(s_t * qk_scale - (lse * 1.4426950408889634)[None, :])
    p16 = p_t.to(do0.dtype)
    dv0 = _dot_acc(p16, do0, dv0, INPUT_PRECISION)
    dp_t = _dot(v0, tl.trans(do0), INPUT_PRECISION)
    if D1 > 0:
        dv1 = _dot_acc(p16, do1, dv1, INPUT_PRECISION)
        dp_t = _dot_acc(v1, tl.trans(do1), dp_t, INPUT_PRECISION)
    if D2 > 0:
        dv2 = _dot_acc(p16, do2, dv2, INPUT_PRECISION)
        dp_t = _dot_acc(v2, tl.trans(do2), dp_t, INPUT_PRECISION)
    ds16 = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
    dk0 = _dot_acc(ds16, q0, dk0, INPUT_PRECISION)
    if D1 > 0:
        dk1 = _dot_acc(ds16, q1, dk1, INPUT_PRECISION)
    if D2 > 0:
        dk2 = _dot_acc(ds16, q2, dk2, INPUT_PRECISION)
    return dk0, dk1, dk2, dv0, dv1, dv2


@triton.jit
def _dq_step(
    dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse2, delta, kp0, kp1, kp2, vp0, vp1, vp2, cols, n_kv, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MASK_N: tl.constexpr,
    k_base, stride_kn, COS_H, SIN_H, stride_rope_n, num_prefix, ROPE: tl.constexpr, ROPE_HALF: tl.constexpr,
):  # fmt: skip
    """One key block of dQ; with ``MASK_N`` (the tail block) keys at ``cols >= n_kv`` get P = 0. Head-dim chunks:
    S = Σ Q_c K_cᵀ, dP = Σ dO_c V_cᵀ, dQ_c += dS K_c. With ``ROPE`` the key block is loaded rotated (rows
    ``k_base + cols·stride_kn``; the k pointer tiles are unused) and dQ is with respect to the rotated queries."""
    n_mask = cols < n_kv
    if ROPE:
        k0, k1, k2 = _rope_chunks(
            k_base + cols[:, None] * stride_kn, n_mask, cols, COS_H, SIN_H, stride_rope_n, num_prefix, D0, D1, D2,
            HEAD_DIM, ROPE_HALF, MASK_N,
        )  # fmt: skip
        v0 = _load_at(vp0, n_mask, 0, D0, HEAD_DIM, MASK_N)
        s = _dot(q0, tl.trans(k0), INPUT_PRECISION)
        if D1 > 0:
            v1 = _load_at(vp1, n_mask, D0, D1, HEAD_DIM, MASK_N)
            s = _dot_acc(q1, tl.trans(k1), s, INPUT_PRECISION)
        if D2 > 0:
            v2 = _load_at(vp2, n_mask, D0 + D1, D2, HEAD_DIM, MASK_N)
            s = _dot_acc(q2, tl.trans(k2), s, INPUT_PRECISION)
    else:
        k0 = _load_at(kp0, n_mask, 0, D0, HEAD_DIM, MASK_N)
        v0 = _load_at(vp0, n_mask, 0, D0, HEAD_DIM, MASK_N)
        s = _dot(q0, tl.trans(k0), INPUT_PRECISION)
        if D1 > 0:
            k1 = _load_at(kp1, n_mask, D0, D1, HEAD_DIM, MASK_N)
            v1 = _load_at(vp1, n_mask, D0, D1, HEAD_DIM, MASK_N)
            s = _dot_acc(q1, tl.trans(k1), s, INPUT_PRECISION)
        if D2 > 0:
            k2 = _load_at(kp2, n_mask, D0 + D1, D2, HEAD_DIM, MASK_N)
            v2 = _load_at(vp2, n_mask, D0 + D1, D2, HEAD_DIM, MASK_N)
            s = _dot_acc(q2, tl.trans(k2), s, INPUT_PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where(n_mask[None, :], p, 0.0)
    dp = _dot(do0, tl.trans(v0), INPUT_PRECISION)
    if D1 > 0:
        dp = _dot_acc(do1, tl.trans(v1), dp, INPUT_PRECISION)
    if D2 > 0:
        dp = _dot_acc(do2, tl.trans(v2), dp, INPUT_PRECISION)
    ds16 = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = _dot_acc(ds16, k0, dq0, INPUT_PRECISION)
    if D1 > 0:
        dq1 = _dot_acc(ds16, k1, dq1, INPUT_PRECISION)
    if D2 > 0:
        dq2 = _dot_acc(ds16, k2, dq2, INPUT_PRECISION)
    return dq0, dq1, dq2


@triton.jit
def _attn_bwd_dkdv_body(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DK,
    DV,
    CU_SEQLENS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    N_Q,
    N_KV,
    HEAD_DIM: tl.constexpr,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    SIN=None,
    COS=None,
    stride_rope_b=0,
    stride_rope_h=0,
    stride_rope_n=0,
    num_prefix=0,
    ROPE: tl.constexpr = False,
    ROPE_HALF: tl.constexpr = True,
):
    PAD_D: tl.constexpr = (HEAD_DIM + 15) // 16 * 16  # head-dim chunks as in the forward
    D0: tl.constexpr = 128 if PAD_D >= 128 else (64 if PAD_D >= 64 else (32 if PAD_D >= 32 else 16))
    D1: tl.constexpr = 32 if PAD_D - D0 >= 32 else (16 if PAD_D - D0 >= 16 else 0)
    D2: tl.constexpr = 16 if PAD_D - D0 - D1 >= 16 else 0
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, n_q, row_base = _sequence(CU_SEQLENS, off_b, off_h, H, N_Q, VARLEN)
    if VARLEN:
        if pid_n * BLOCK_N >= n_q:
            return
        n_kv = n_q
    else:
        n_kv = N_KV
    q_base = _head_base(Q, off_b, off_h, tok, stride_qb, stride_qh, stride_qn, VARLEN)
    k_base = _head_base(K, off_b, off_h, tok, stride_kb, stride_kh, stride_kn, VARLEN)
    v_base = _head_base(V, off_b, off_h, tok, stride_vb, stride_vh, stride_vn, VARLEN)
    do_base = _head_base(DO, off_b, off_h, tok, stride_dob, stride_doh, stride_don, VARLEN)
    dk_base = _head_base(DK, off_b, off_h, tok, stride_dkb, stride_dkh, stride_dkn, VARLEN)
    dv_base = _head_base(DV, off_b, off_h, tok, stride_dvb, stride_dvh, stride_dvn, VARLEN)
    qk_scale = sm_scale * 1.4426950408889634

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < n_kv
    k_rows = k_base + offs_n[:, None] * stride_kn
    v_rows = v_base + offs_n[:, None] * stride_vn
    if ROPE:  # the sample's and head's table (stride_rope_b / _h = 0: shared by the batch / heads)
        cos_h = COS + off_b * stride_rope_b + off_h * stride_rope_h
        sin_h = SIN + off_b * stride_rope_b + off_h * stride_rope_h
        k0, k1, k2 = _rope_chunks(
            k_rows, n_mask, offs_n, cos_h, sin_h, stride_rope_n, num_prefix, D0, D1, D2, HEAD_DIM, ROPE_HALF, True
        )
    else:
        cos_h = COS  # unused
        sin_h = SIN
        k0, k1, k2 = _load_chunks(k_rows, n_mask, D0, D1, D2, HEAD_DIM)
    v0, v1, v2 = _load_chunks(v_rows, n_mask, D0, D1, D2, HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, D2 if D2 > 0 else 16], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, D2 if D2 > 0 else 16], dtype=tl.float32)

    qp0, qp1, qp2 = _stream_ptrs(q_base + offs_m[:, None] * stride_qn, D0, D1, D2)
    dop0, dop1, dop2 = _stream_ptrs(do_base + offs_m[:, None] * stride_don, D0, D1, D2)
    m_full = (n_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_step(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, qp0, qp1, qp2, dop0, dop1, dop2,
            LSE + row_base + start_m, Delta + row_base + start_m, start_m + offs_m, offs_m, n_q, qk_scale,
            HEAD_DIM, D0, D1, D2, INPUT_PRECISION, MASK_M=False, q_base=q_base, stride_qn=stride_qn, COS_H=cos_h,
            SIN_H=sin_h, stride_rope_n=stride_rope_n, num_prefix=num_prefix, ROPE=ROPE, ROPE_HALF=ROPE_HALF,
        )  # fmt: skip
        qp0, qp1, qp2 = _advance(qp0, qp1, qp2, BLOCK_M * stride_qn, D1, D2)
        dop0, dop1, dop2 = _advance(dop0, dop1, dop2, BLOCK_M * stride_don, D1, D2)
    if m_full < n_q:
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_step(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2, qp0, qp1, qp2, dop0, dop1, dop2,
            LSE + row_base + m_full, Delta + row_base + m_full, m_full + offs_m, offs_m, n_q, qk_scale,
            HEAD_DIM, D0, D1, D2, INPUT_PRECISION, MASK_M=True, q_base=q_base, stride_qn=stride_qn, COS_H=cos_h,
            SIN_H=sin_h, stride_rope_n=stride_rope_n, num_prefix=num_prefix, ROPE=ROPE, ROPE_HALF=ROPE_HALF,
        )  # fmt: skip

    dk_rows = dk_base + offs_n[:, None] * stride_dkn
    dv_rows = dv_base + offs_n[:, None] * stride_dvn
    if ROPE:  # dK with respect to the rotated keys, rotated back (by -θ) as it is stored
        _store_chunk(dv_rows, n_mask, dv0, 0, D0, HEAD_DIM)
        if D1 > 0:
            _store_chunk(dv_rows, n_mask, dv1, D0, D1, HEAD_DIM)
        if D2 > 0:
            _store_chunk(dv_rows, n_mask, dv2, D0 + D1, D2, HEAD_DIM)
        _rope_store_chunks(
            dk_rows, n_mask, offs_n, dk0 * sm_scale, dk1 * sm_scale, dk2 * sm_scale, cos_h, sin_h, stride_rope_n,
            num_prefix, D0, D1, D2, HEAD_DIM, ROPE_HALF,
        )  # fmt: skip
    else:
        _store_chunk(dk_rows, n_mask, dk0 * sm_scale, 0, D0, HEAD_DIM)
        _store_chunk(dv_rows, n_mask, dv0, 0, D0, HEAD_DIM)
        if D1 > 0:
            _store_chunk(dk_rows, n_mask, dk1 * sm_scale, D0, D1, HEAD_DIM)
            _store_chunk(dv_rows, n_mask, dv1, D0, D1, HEAD_DIM)
        if D2 > 0:
            _store_chunk(dk_rows, n_mask, dk2 * sm_scale, D0 + D1, D2, HEAD_DIM)
            _store_chunk(dv_rows, n_mask, dv2, D0 + D1, D2, HEAD_DIM)


attn_bwd_dkdv_kernel = _attn_bwd_dkdv_body
attn_bwd_dkdv = _autotune(BWD_DKDV_CONFIGS, prune_dkdv)(_attn_bwd_dkdv_body)


@triton.jit
def _attn_bwd_dq_body(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DQ,
    CU_SEQLENS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    H,
    N_Q,
    N_KV,
    HEAD_DIM: tl.constexpr,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    SIN=None,
    COS=None,
    stride_rope_b=0,
    stride_rope_h=0,
    stride_rope_n=0,
    num_prefix=0,
    ROPE: tl.constexpr = False,
    ROPE_HALF: tl.constexpr = True,
):
    PAD_D: tl.constexpr = (HEAD_DIM + 15) // 16 * 16  # head-dim chunks as in the forward
    D0: tl.constexpr = 128 if PAD_D >= 128 else (64 if PAD_D >= 64 else (32 if PAD_D >= 32 else 16))
    D1: tl.constexpr = 32 if PAD_D - D0 >= 32 else (16 if PAD_D - D0 >= 16 else 0)
    D2: tl.constexpr = 16 if PAD_D - D0 - D1 >= 16 else 0
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, n_q, row_base = _sequence(CU_SEQLENS, off_b, off_h, H, N_Q, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= n_q:
            return
        n_kv = n_q
    else:
        n_kv = N_KV
    q_base = _head_base(Q, off_b, off_h, tok, stride_qb, stride_qh, stride_qn, VARLEN)
    k_base = _head_base(K, off_b, off_h, tok, stride_kb, stride_kh, stride_kn, VARLEN)
    v_base = _head_base(V, off_b, off_h, tok, stride_vb, stride_vh, stride_vn, VARLEN)
    do_base = _head_base(DO, off_b, off_h, tok, stride_dob, stride_doh, stride_don, VARLEN)
    dq_base = _head_base(DQ, off_b, off_h, tok, stride_dqb, stride_dqh, stride_dqn, VARLEN)
    qk_scale = sm_scale * 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < n_q
    q_rows = q_base + offs_m[:, None] * stride_qn
    do_rows = do_base + offs_m[:, None] * stride_don
    if ROPE:  # the sample's and head's table (stride_rope_b / _h = 0: shared by the batch / heads)
        cos_h = COS + off_b * stride_rope_b + off_h * stride_rope_h
        sin_h = SIN + off_b * stride_rope_b + off_h * stride_rope_h
        q0, q1, q2 = _rope_chunks(
            q_rows, m_mask, offs_m, cos_h, sin_h, stride_rope_n, num_prefix, D0, D1, D2, HEAD_DIM, ROPE_HALF, True
        )
    else:
        cos_h = COS  # unused
        sin_h = SIN
        q0, q1, q2 = _load_chunks(q_rows, m_mask, D0, D1, D2, HEAD_DIM)
    do0, do1, do2 = _load_chunks(do_rows, m_mask, D0, D1, D2, HEAD_DIM)
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, D2 if D2 > 0 else 16], dtype=tl.float32)

    kp0, kp1, kp2 = _stream_ptrs(k_base + offs_n[:, None] * stride_kn, D0, D1, D2)
    vp0, vp1, vp2 = _stream_ptrs(v_base + offs_n[:, None] * stride_vn, D0, D1, D2)
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1, dq2 = _dq_step(
            dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse2, delta, kp0, kp1, kp2, vp0, vp1, vp2, start_n + offs_n,
            n_kv, qk_scale, HEAD_DIM, D0, D1, D2, INPUT_PRECISION, MASK_N=False, k_base=k_base, stride_kn=stride_kn,
            COS_H=cos_h, SIN_H=sin_h, stride_rope_n=stride_rope_n, num_prefix=num_prefix, ROPE=ROPE,
            ROPE_HALF=ROPE_HALF,
        )  # fmt: skip
        kp0, kp1, kp2 = _advance(kp0, kp1, kp2, BLOCK_N * stride_kn, D1, D2)
        vp0, vp1, vp2 = _advance(vp0, vp1, vp2, BLOCK_N * stride_vn, D1, D2)
    if n_full < n_kv:
        dq0, dq1, dq2 = _dq_step(
            dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, lse2, delta, kp0, kp1, kp2, vp0, vp1, vp2, n_full + offs_n,
            n_kv, qk_scale, HEAD_DIM, D0, D1, D2, INPUT_PRECISION, MASK_N=True, k_base=k_base, stride_kn=stride_kn,
            COS_H=cos_h, SIN_H=sin_h, stride_rope_n=stride_rope_n, num_prefix=num_prefix, ROPE=ROPE,
            ROPE_HALF=ROPE_HALF,
        )  # fmt: skip

    dq_rows = dq_base + offs_m[:, None] * stride_dqn
    if ROPE:  # dQ with respect to the rotated queries, rotated back (by -θ) as it is stored
        _rope_store_chunks(
            dq_rows, m_mask, offs_m, dq0 * sm_scale, dq1 * sm_scale, dq2 * sm_scale, cos_h, sin_h, stride_rope_n,
            num_prefix, D0, D1, D2, HEAD_DIM, ROPE_HALF,
        )  # fmt: skip
    else:
        _store_chunk(dq_rows, m_mask, dq0 * sm_scale, 0, D0, HEAD_DIM)
        if D1 > 0:
            _store_chunk(dq_rows, m_mask, dq1 * sm_scale, D0, D1, HEAD_DIM)
        if D2 > 0:
            _store_chunk(dq_rows, m_mask, dq2 * sm_scale, D0 + D1, D2, HEAD_DIM)


attn_bwd_dq_kernel = _attn_bwd_dq_body
attn_bwd_dq = _autotune(BWD_DQ_CONFIGS, prune_dq)(_attn_bwd_dq_body)


def block_d(head_dim: int) -> int:
    """The power-of-two tile of the preprocess kernel's head dim (next power of two, at least 16). The attention
    kernels take it as ``BLOCK_D`` for the launcher's sake but tile the head dim by :func:`head_dim_chunks`."""
    return max(16, triton.next_power_of_2(head_dim))


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels' MMA work covers: ``head_dim`` rounded up to a multiple of 16 (``tl.dot``'s minimum
    K) -- 72 -> 80, 80 -> 80, 88 -> 96, 104 -> 112; powers of two unchanged."""
    return -(-head_dim // 16) * 16


def head_dim_chunks(head_dim: int) -> tuple[int, ...]:
    """The power-of-two column chunks the attention kernels split the head dim into, one ``tl.dot`` each: the binary
    digits of :func:`padded_head_dim` -- 64 -> (64,), 72 -> (64, 16) (8 columns masked), 80 -> (64, 16), 88 -> (64,
    32) (8 masked), 104 -> (64, 32, 16) (8 masked), 128 -> (128,). The kernels compute the same widths as ``D0``,
    ``D1``, ``D2`` from ``HEAD_DIM`` (this function is their Python mirror, for the pruners, the check and tests)."""
    pad = padded_head_dim(head_dim)
    d0 = 128 if pad >= 128 else 64 if pad >= 64 else 32 if pad >= 32 else 16
    d1 = 32 if pad - d0 >= 32 else 16 if pad - d0 >= 16 else 0
    d2 = 16 if pad - d0 - d1 >= 16 else 0
    return tuple(d for d in (d0, d1, d2) if d)
