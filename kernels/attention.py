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

Head dims that are not powers of two (72, 80, 88, 104) are handled with a BLOCK_D = next_power_of_2(D) register
tile whose extra columns are masked on load and store -- never padded in memory. Token tails (N = 197) are
masked in the peeled tail block: out-of-range keys get P = 0, out-of-range queries are never stored.

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
    bd = max(16, triton.next_power_of_2(nargs["HEAD_DIM"]))
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
KEY = ["N_Q", "N_KV", "HEAD_DIM", "INPUT_PRECISION", "VARLEN"]


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


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _load_tile(ptrs, row_mask, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile: rows masked only with ``MASK_ROWS``, head-dim columns only when BLOCK_D > HEAD_DIM
    (constexpr branches: the unmasked forms load with no predicates at all)."""
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            t = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return t


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, cols, n_kv, d_mask, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASK_N: tl.constexpr,
    NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax, ``m`` in scaled log2 units: the row max of s·c is max(s)·c, or min(s)·c
    with ``NEG_SCALE`` (c < 0). With ``MASK_N`` the keys at ``cols >= n_kv`` are masked (the tail block); without it
    no token mask is computed at all."""
    n_mask = cols < n_kv
    k = _load_tile(k_ptrs, n_mask, d_mask, HEAD_DIM, BLOCK_D, MASK_N)
    s = _dot(q, tl.trans(k), INPUT_PRECISION)
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
    v = _load_tile(v_ptrs, n_mask, d_mask, HEAD_DIM, BLOCK_D, MASK_N)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(
    q, k_base, v_base, stride_kn, stride_vn, n_kv, offs_n, offs_d, d_mask, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """All key blocks: the full ones in a loop with no token mask, then the partial one (if any), peeled off."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n + offs_n, n_kv, d_mask, qk_scale,
            HEAD_DIM, BLOCK_D, INPUT_PRECISION, MASK_N=False, NEG_SCALE=NEG_SCALE,
        )  # fmt: skip
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if n_full < n_kv:
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full + offs_n, n_kv, d_mask, qk_scale,
            HEAD_DIM, BLOCK_D, INPUT_PRECISION, MASK_N=True, NEG_SCALE=NEG_SCALE,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _fwd_rows(
    q, k_base, v_base, o_base, lse_ptr, stride_kn, stride_vn, stride_on, n_kv, offs_m, offs_n, offs_d, m_mask, d_mask,
    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    acc, l_i, m_i = _fwd_loop(
        q, k_base, v_base, stride_kn, stride_vn, n_kv, offs_n, offs_d, d_mask, qk_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, NEG_SCALE,
    )  # fmt: skip
    acc = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_on + offs_d[None, :],
        acc.to(o_base.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
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
):
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
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < HEAD_DIM

    q = tl.load(
        q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
    )
    # m is kept in scaled log2 units and the scores are reduced raw -- max(s)·c == max(s·c) for c >= 0, exactly (fp
    # rounding is monotone) -- so each probability is exp2(s·c - m): one FFMA and one MUFU.EX2 per score. A negative
    # scale (legal, if odd) takes the mirror loop, min(s)·c; negating q instead would pull Q out of shared memory
    # into registers (+20 registers, one CTA per SM fewer, checked on sm_90).
    if qk_scale < 0:
        _fwd_rows(
            q, k_base, v_base, o_base, LSE + lse_row, stride_kn, stride_vn, stride_on, n_kv, offs_m, offs_n, offs_d,
            m_mask, d_mask, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, NEG_SCALE=True,
        )  # fmt: skip
    else:
        _fwd_rows(
            q, k_base, v_base, o_base, LSE + lse_row, stride_kn, stride_vn, stride_on, n_kv, offs_m, offs_n, offs_d,
            m_mask, d_mask, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, NEG_SCALE=False,
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
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, rows, offs_m, n_q, d_mask, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASK_M: tl.constexpr,
):  # fmt: skip
    """One query block of dK / dV (transposed scores, keys x queries). With ``MASK_M`` (the tail block) queries at
    ``rows >= n_q`` load a log-sum-exp of +inf, so their P is exp2(-inf) = 0 and they add nothing -- no select on the
    scores; without it nothing is masked at all."""
    m_mask = rows < n_q
    q = _load_tile(q_ptrs, m_mask, d_mask, HEAD_DIM, BLOCK_D, MASK_M)
    do = _load_tile(do_ptrs, m_mask, d_mask, HEAD_DIM, BLOCK_D, MASK_M)
    if MASK_M:
        lse = tl.load(lse_ptrs + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_ptrs + offs_m, mask=m_mask, other=0.0)
    else:
        lse = tl.load(lse_ptrs + offs_m)
        delta = tl.load(delta_ptrs + offs_m)
    s_t = _dot(k, tl.trans(q), INPUT_PRECISION)
    p_t = tl.exp2(s_t * qk_scale - (lse * 1.4426950408889634)[None, :])
    dv += _dot(p_t.to(do.dtype), do, INPUT_PRECISION)
    dp_t = _dot(v, tl.trans(do), INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, cols, n_kv, d_mask, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASK_N: tl.constexpr,
):  # fmt: skip
    """One key block of dQ; with ``MASK_N`` (the tail block) keys at ``cols >= n_kv`` get P = 0."""
    n_mask = cols < n_kv
    k = _load_tile(k_ptrs, n_mask, d_mask, HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_tile(v_ptrs, n_mask, d_mask, HEAD_DIM, BLOCK_D, MASK_N)
    s = _dot(q, tl.trans(k), INPUT_PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where(n_mask[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, INPUT_PRECISION)
    return dq


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
):
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
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < n_kv
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]

    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :]
    m_full = (n_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(
            dk, dv, k, v, q_ptrs, do_ptrs, LSE + row_base + start_m, Delta + row_base + start_m, start_m + offs_m,
            offs_m, n_q, d_mask, qk_scale, HEAD_DIM, BLOCK_D, INPUT_PRECISION, MASK_M=False,
        )  # fmt: skip
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
    if m_full < n_q:
        dk, dv = _dkdv_step(
            dk, dv, k, v, q_ptrs, do_ptrs, LSE + row_base + m_full, Delta + row_base + m_full, m_full + offs_m,
            offs_m, n_q, d_mask, qk_scale, HEAD_DIM, BLOCK_D, INPUT_PRECISION, MASK_M=True,
        )  # fmt: skip

    dk = dk * sm_scale
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


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
):
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
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask[None, :]

    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n + offs_n, n_kv, d_mask, qk_scale,
            HEAD_DIM, BLOCK_D, INPUT_PRECISION, MASK_N=False,
        )  # fmt: skip
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if n_full < n_kv:
        dq = _dq_step(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, n_full + offs_n, n_kv, d_mask, qk_scale,
            HEAD_DIM, BLOCK_D, INPUT_PRECISION, MASK_N=True,
        )  # fmt: skip

    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


attn_bwd_dq_kernel = _attn_bwd_dq_body
attn_bwd_dq = _autotune(BWD_DQ_CONFIGS, prune_dq)(_attn_bwd_dq_body)


def block_d(head_dim: int) -> int:
    """The register tile for head dim ``D``: next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(head_dim))
