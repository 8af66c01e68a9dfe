"""Tiled GEMM with fused prologues and epilogues in Triton: the fc1 + GELU and fc2/proj + residual kernels.

One kernel body, :func:`_gemm_body`, computes ``Out[M, N] = prologue(A)[M, K] @ B[K, N]`` with an fp32
accumulator and a fused epilogue. A and B are addressed through two strides each, so transposed operands are
read in place (no ``.t().contiguous()`` copies); ``Out``, ``R`` (residual) and ``Pre`` have unit column stride.
It is launched three ways (three autotuners over the same body, so each keeps its own tuned configs):

==================  ================================  =====================================================
launch              A (M×K) · B (K×N)                 fused
==================  ================================  =====================================================
:data:`linear_fwd`   x (tokens, in) · Wᵀ (in, out)    bias; then GELU (erf or tanh) storing the pre-activation
                                                      ``h``, or LayerScale ``gamma`` + residual add storing
                                                      ``z = x Wᵀ + b`` (needed for dgamma)
:data:`linear_dgrad` dy (tokens, out) · W (out, in)   prologue on the load of dy: ``dy ⊙ GELU'(h)`` or
                                                      ``dy ⊙ gamma``
:data:`linear_wgrad` dyᵀ (out, tokens) · x (tokens,   the same prologue on dyᵀ; optional fp32 row sums of the
                     in)                              prologued dyᵀ = the bias gradient
==================  ================================  =====================================================

A second body, :func:`_glu_body`, serves ``fastvit.ops.linear_glu`` (``act(x W_gᵀ + b_g) ⊙ (x W_xᵀ + b_x)``,
Shazeer 2020) through its own three launches (:data:`glu_fwd`: two accumulators over the same x tiles and the
gating epilogue; :data:`glu_dgrad` / :data:`glu_wgrad`: the gated backward prologue on dy and the saved h_g, h_x).
It is a separate kernel so the bodies above compile exactly as before.

The weight gradient reduces over all tokens inside one program per (out, in) tile: no split-K, no atomics, so
every backward is bit-reproducible run to run. (A deterministic split-K -- partial tiles plus a second-stage sum,
as the LayerNorm backward does for dγ -- is the obvious next step when out × in has too few tiles to fill the GPU.)

Tile order: programs are numbered along a 1-D grid and mapped to (tile row, tile column) in groups of
``GROUP_M`` tile rows, column-major inside a group, so programs running at the same time share A rows and
B columns in L2 (the "grouped ordering" of the Triton matrix-multiplication tutorial).

Tails: M, N and K need not be multiples of the blocks (K = 40, 72, N = 200, M = 197·B): loads are masked with
zero fill (zeros add nothing to the dot products), stores are masked.

GELU (Hendrycks & Gimpel 2016): exact ``0.5·h·(1 + erf(h/√2))`` or the tanh form
``0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³)))``; derivatives

* erf:  ``GELU'(h) = Φ(h) + h·φ(h) = 0.5·(1 + erf(h/√2)) + h·exp(-h²/2)/√(2π)``
* tanh: ``0.5·(1 + t) + 0.5·h·(1 - t²)·√(2/π)·(1 + 3·0.044715·h²)``, ``t = tanh(√(2/π)·(h + 0.044715·h³))``

all evaluated in fp32. ``tanh`` is written as ``1 - 2 / (1 + exp(2u))`` (exact limits ±1 for large |u|) because
``tl.math`` has no tanh in every Triton version we support (3.4+).

Operand precision: fp16 / bf16 tiles go to the tensor cores as they are; after a prologue the fp32 product is
rounded back to the input dtype first (that is the dtype the MMA takes). fp32 dots use ``INPUT_PRECISION``
("tf32" or "ieee", picked by the caller from PyTorch's matmul precision settings).

Source: the tiling, pointer arithmetic and grouped ordering follow the structure of the Triton tutorial
"Matrix Multiplication" (03-matrix-multiplication.py); epilogue fusion as in cuBLASLt's / CUTLASS's
bias + GELU and bias + residual epilogues.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton 3.9's interpreter returns garbage for tl.dot on bfloat16 tiles (see fastvit.kernels.attention): under the
# interpreter both operands are upcast to fp32 first, which is exact (a product of two 16-bit floats fits in fp32).
# Compiled kernels never take this branch (folded at compile time).
_UPCAST_DOT = tl.constexpr(_INTERPRET)

# Prologue modes (applied to each A tile in fp32 before the dot).
PRO_NONE = 0
PRO_SCALE = 1  # A ⊙ P (P: gamma broadcast along one axis through zero strides)
PRO_GELU_ERF = 2  # A ⊙ GELU'(P), P = the saved pre-activation h
PRO_GELU_TANH = 3

# Epilogue modes.
EPI_NONE = 0  # Out = acc (+ bias)
EPI_GELU_ERF = 1  # Pre = acc + bias; Out = GELU(Pre)
EPI_GELU_TANH = 2
EPI_RESIDUAL = 3  # Pre = acc + bias; Out = R + gamma ⊙ Pre (gamma optional)

# Globals read inside @triton.jit functions must be constexpr (the interpreter accepts plain floats, the compiler
# does not); the interpreter in turn wants them on the right of a tensor product (``h * C``, not ``C * h``).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_C = tl.constexpr(0.044715)


# ------------------------------------------------------------------------------------------------ math
@triton.jit
def _tanh(u):
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))


@triton.jit
def _gelu(h, TANH: tl.constexpr):
    if TANH:
        out = 0.5 * h * (1.0 + _tanh((h + h * h * h * _TANH_C) * _SQRT_2_OVER_PI))
    else:
        out = 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))
    return out


@triton.jit
def _gelu_grad(h, TANH: tl.constexpr):
    if TANH:
        t = _tanh((h + h * h * h * _TANH_C) * _SQRT_2_OVER_PI)
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + h * h * (3.0 * _TANH_C))
    else:
        out = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return out


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _gemm_body(
    A,
    B,
    P,
    Bias,
    R,
    G,
    Out,
    Pre,
    RowSum,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_pm,
    stride_pk,
    stride_rm,
    stride_om,
    stride_prem,
    PROLOGUE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ROW_SUM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Out (M, N) = prologue(A) (M, K) @ B (K, N), fp32 accumulation, fused epilogue (see the module docstring).

    P: prologue operand addressed like A (``stride_pm``, ``stride_pk``; zero strides broadcast a vector).
    Bias, G: (N,) vectors along Out's columns. R, Out, Pre: row-major with unit column stride.
    RowSum: (M,) fp32, the row sums of prologue(A) over all K (written by the programs of tile column 0).
    Unused pointers may alias any tensor; they are never dereferenced.
    """
    # ---- grouped tile order: GROUP_M tile rows walk the tile columns together
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    row0 = group * GROUP_M
    rows_here = tl.minimum(tiles_m - row0, GROUP_M)
    local = pid % per_group
    pid_m = row0 + local % rows_here
    pid_n = local // rows_here

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N

    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    p_ptrs = P + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if PROLOGUE != 0:
            p = tl.load(p_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            if PROLOGUE == 1:
                af = a.to(tl.float32) * p
            elif PROLOGUE == 2:
                af = a.to(tl.float32) * _gelu_grad(p, False)
            else:
                af = a.to(tl.float32) * _gelu_grad(p, True)
            if ROW_SUM:
                row_sum += tl.sum(af, axis=1)
            a = af.to(B.dtype.element_ty)
            p_ptrs += BLOCK_K * stride_pk
        elif ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        acc = _mma(a, b, acc, INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROW_SUM:
        if pid_n == 0:  # one writer per row: the programs of tile column 0
            tl.store(RowSum + offs_m, row_sum, mask=m_mask)

    # ---- epilogue
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    if STORE_PRE:
        tl.store(Pre + offs_m[:, None] * stride_prem + offs_n[None, :], acc.to(Pre.dtype.element_ty), mask=c_mask)
    if EPILOGUE == 1:
        out = _gelu(acc, False)
    elif EPILOGUE == 2:
        out = _gelu(acc, True)
    elif EPILOGUE == 3:
        if HAS_GAMMA:
            acc = acc * tl.load(G + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = acc + tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=c_mask, other=0.0).to(tl.float32)
    else:
        out = acc
    tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], out.to(Out.dtype.element_ty), mask=c_mask)


# ------------------------------------------------------------------------------------------------ gated (GLU) kernel
# Activations of the gate (ACT constexpr of :func:`_glu_body`; ``fastvit.ops.linear_glu``'s ``activation``).
ACT_SILU = 0  # h·σ(h): SwiGLU
ACT_GELU_ERF = 1  # GeGLU
ACT_GELU_TANH = 2
ACT_SIGMOID = 3  # σ(h): the original GLU (Dauphin et al. 2017), timm's GluMlp default

# Launch modes of the gated kernel.
GLU_FWD = 0  # Out1 = act(A B1 + b1) ⊙ (A B2 + b2), Pre1 / Pre2 = the two pre-activations
GLU_DGRAD = 1  # Out1 = dh_g B1 + dh_x B2 (the prologue makes dh_g, dh_x from A = dy and the saved h_g, h_x)
GLU_WGRAD = 2  # Out1 = dh_gᵀ B1, Out2 = dh_xᵀ B1 (A = dyᵀ), RowSum1 / RowSum2 = the bias gradients


@triton.jit
def _sigmoid(h):
    return 1.0 / (1.0 + tl.exp(-h))


@triton.jit
def _glu_act(h, ACT: tl.constexpr):
    if ACT == 0:
        out = h * _sigmoid(h)
    elif ACT == 1:
        out = _gelu(h, False)
    elif ACT == 2:
        out = _gelu(h, True)
    else:
        out = _sigmoid(h)
    return out


@triton.jit
def _glu_act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        s = _sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    elif ACT == 1:
        out = _gelu_grad(h, False)
    elif ACT == 2:
        out = _gelu_grad(h, True)
    else:
        s = _sigmoid(h)
        out = s * (1.0 - s)
    return out


@triton.jit
def _glu_body(
    A,
    B1,
    B2,
    Hg,
    Hx,
    Bias1,
    Bias2,
    Out1,
    Out2,
    Pre1,
    Pre2,
    RowSum1,
    RowSum2,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_b1k,
    stride_b1n,
    stride_b2k,
    stride_b2n,
    stride_hm,
    stride_hk,
    stride_om,
    stride_prem,
    MODE: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS1: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ROW_SUM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The gated linear unit's three GEMMs (see :data:`GLU_FWD`, :data:`GLU_DGRAD`, :data:`GLU_WGRAD`), fp32
    accumulation; tile order, masking and operand precision as :func:`_gemm_body`.

    * forward: A = x (tokens, in), B1 = W_gᵀ, B2 = W_xᵀ: two accumulators per tile over the same A tiles; epilogue
      ``h_g = acc1 + b_g``, ``h_x = acc2 + b_x`` (stored to Pre1 / Pre2 when STORE_PRE), ``Out1 = act(h_g) ⊙ h_x``.
    * input gradient: A = dy (tokens, hidden); prologue ``dh_g = dy ⊙ h_x ⊙ act'(h_g)``, ``dh_x = dy ⊙ act(h_g)``
      from the saved Hg / Hx (addressed like A), each rounded to B's dtype; ``Out1 = dh_g W_g + dh_x W_x``.
    * weight gradient: A = dyᵀ (hidden, tokens) with the same prologue on the transposed tiles, B1 = x;
      ``Out1 = dh_gᵀ x``, ``Out2 = dh_xᵀ x``; ROW_SUM: fp32 sums of dh_gᵀ / dh_xᵀ over all tokens (the bias
      gradients) to RowSum1 / RowSum2, written by the programs of tile column 0.

    Out1, Out2, Pre1, Pre2 share ``stride_om`` / ``stride_prem`` and have unit column stride. Unused pointers may
    alias any tensor; they are never dereferenced.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    row0 = group * GROUP_M
    rows_here = tl.minimum(tiles_m - row0, GROUP_M)
    local = pid % per_group
    pid_m = row0 + local % rows_here
    pid_n = local // rows_here

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N

    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b1_ptrs = B1 + offs_k[:, None] * stride_b1k + offs_n[None, :] * stride_b1n
    b2_ptrs = B2 + offs_k[:, None] * stride_b2k + offs_n[None, :] * stride_b2n
    hg_ptrs = Hg + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk
    hx_ptrs = Hx + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk

    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_sum1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_sum2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        b_mask = k_mask[:, None] & n_mask[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b1 = tl.load(b1_ptrs, mask=b_mask, other=0.0)
        if MODE == 0:
            b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
            acc1 = _mma(a, b1, acc1, INPUT_PRECISION)
            acc2 = _mma(a, b2, acc2, INPUT_PRECISION)
        else:
            dy = a.to(tl.float32)
            hg = tl.load(hg_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            hx = tl.load(hx_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            dhg = dy * hx * _glu_act_grad(hg, ACT)
            dhx = dy * _glu_act(hg, ACT)
            if ROW_SUM:
                row_sum1 += tl.sum(dhg, axis=1)
                row_sum2 += tl.sum(dhx, axis=1)
            a1 = dhg.to(B1.dtype.element_ty)
            a2 = dhx.to(B1.dtype.element_ty)
            if MODE == 1:
                b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
                acc1 = _mma(a1, b1, acc1, INPUT_PRECISION)
                acc1 = _mma(a2, b2, acc1, INPUT_PRECISION)
            else:
                acc1 = _mma(a1, b1, acc1, INPUT_PRECISION)
                acc2 = _mma(a2, b1, acc2, INPUT_PRECISION)
            hg_ptrs += BLOCK_K * stride_hk
            hx_ptrs += BLOCK_K * stride_hk
        a_ptrs += BLOCK_K * stride_ak
        b1_ptrs += BLOCK_K * stride_b1k
        b2_ptrs += BLOCK_K * stride_b2k

    if ROW_SUM:
        if pid_n == 0:  # one writer per row: the programs of tile column 0
            tl.store(RowSum1 + offs_m, row_sum1, mask=m_mask)
            tl.store(RowSum2 + offs_m, row_sum2, mask=m_mask)

    c_mask = m_mask[:, None] & n_mask[None, :]
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    if MODE == 0:
        if HAS_BIAS1:
            acc1 += tl.load(Bias1 + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS2:
            acc2 += tl.load(Bias2 + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:
            pre_offs = offs_m[:, None] * stride_prem + offs_n[None, :]
            tl.store(Pre1 + pre_offs, acc1.to(Pre1.dtype.element_ty), mask=c_mask)
            tl.store(Pre2 + pre_offs, acc2.to(Pre2.dtype.element_ty), mask=c_mask)
        out = _glu_act(acc1, ACT) * acc2
        tl.store(Out1 + out_offs, out.to(Out1.dtype.element_ty), mask=c_mask)
    elif MODE == 1:
        tl.store(Out1 + out_offs, acc1.to(Out1.dtype.element_ty), mask=c_mask)
    else:
        tl.store(Out1 + out_offs, acc1.to(Out1.dtype.element_ty), mask=c_mask)
        tl.store(Out2 + out_offs, acc2.to(Out2.dtype.element_ty), mask=c_mask)


# ------------------------------------------------------------------------------------------------ configs
def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages
    )


#: GPU autotune space (A100 / H100 classics for 16-bit GEMMs, BLOCK_K = 32 tiles for the prologue launches, whose
#: fp32 A and P tiles take registers, and narrow tiles for few tokens or fp32). 128 x 256 tiles were dropped: they
#: spill with every epilogue, and 128 x 64 x 64 with 4 warps spilled 1 KB (``python -m fastvit.kernels.check``).
CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 64, 32, 8, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(64, 64, 32, 4, 2),
    _cfg(32, 64, 32, 4, 2),
    _cfg(16, 64, 64, 4, 2),
]
#: Under the interpreter one config (nothing to tune); 32 is not a divisor of the test shapes, so tails are hit.
INTERPRET_CONFIG = _cfg(32, 32, 32, 4, 1, group=4)

#: Shared-memory budgets (sm_80: 163 KiB per block, sm_90: 227 KiB, minus headroom). A config must fit both.
SMEM_BUDGET_SM80 = 160 * 1024
SMEM_BUDGET_SM90 = 224 * 1024


def _esize(nargs: dict) -> int:
    t = nargs.get("B")
    return t.element_size() if t is not None and hasattr(t, "element_size") else 2


def smem_estimate(bm: int, bn: int, bk: int, stages: int, esize: int, sm90: bool, prologue: bool = False) -> int:
    """Bytes of shared memory for the pipelined A and B tiles: ``stages - 1`` buffers on sm_80, ``stages`` on
    sm_90 (Triton 3.x); on sm_80 the fp32 epilogue layout-conversion scratch of BM × BN reuses the same memory
    after the loop (the allocator overlaps buffers whose lifetimes do not), hence the max. A prologue operand P is
    pipelined like A (one more BM x BK tile per buffer). Matches the sm_80 / sm_90 compiles of the check."""
    bufs = stages if sm90 else max(stages - 1, 1)
    pipeline = bufs * (bm * (2 if prologue else 1) + bn) * bk * esize
    return pipeline if sm90 else max(pipeline, bm * bn * 4)


#: 32-bit registers per thread that a config's tiles may take (fitted to ``ptxas -v``: beyond it, spills).
WORDS_PER_THREAD = 120


def words_per_thread(bm: int, bn: int, bk: int, esize: int, warps: int, prologue: bool) -> float:
    """Registers per thread for the fp32 accumulator, one A and one B tile, and with a prologue the fp32 A and P
    tiles it computes on."""
    words = bm * bn + (bm + bn) * bk * esize / 4 + (2 * bm * bk if prologue else 0)
    return words / (32 * warps)


def prune(configs, nargs, **kwargs):
    """Autotune pruner: drop tiles much larger than the problem (few tokens need no 128-row blocks), tiles whose
    shared memory exceeds either budget, tiles needing more than :data:`WORDS_PER_THREAD` registers per thread, and
    -- for fp32 with IEEE dots (FMA path, no tensor cores; larger tiles spill kilobytes) -- everything but the
    32 x 64 x 32 tile. Always keeps at least one config."""
    M, N, K = nargs["M"], nargs["N"], nargs["K"]
    esize = _esize(nargs)
    ieee32 = esize == 4 and kwargs.get("INPUT_PRECISION", "ieee") == "ieee"
    pro = bool(kwargs.get("PROLOGUE", 0))
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])
    kept = []
    for c in configs:
        bm, bn, bk, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages
        if bm > max(16, triton.next_power_of_2(M)) or bn > max(16, triton.next_power_of_2(N)):
            continue
        if bk > max(16, triton.next_power_of_2(K)):
            continue
        if ieee32 and (bm * bn > 32 * 64 or bk > 32):
            continue
        if smem_estimate(bm, bn, bk, st, esize, False, pro) > SMEM_BUDGET_SM80:
            continue
        if smem_estimate(bm, bn, bk, st, esize, True, pro) > SMEM_BUDGET_SM90:
            continue
        if words_per_thread(bm, bn, bk, esize, c.num_warps, pro) > WORDS_PER_THREAD:
            continue
        kept.append(c)
    return kept or [smallest]


#: Autotune key: the shape plus the fusion mode and dot precision (one tuned config per kind of launch).
KEY = ["M", "N", "K", "PROLOGUE", "EPILOGUE", "INPUT_PRECISION"]


def _autotune():
    if _INTERPRET:
        return triton.autotune(configs=[INTERPRET_CONFIG], key=KEY)
    return triton.autotune(configs=CONFIGS, key=KEY, prune_configs_by={"early_config_prune": prune})


#: The plain @triton.jit body (what ``python -m fastvit.kernels.check`` compiles).
gemm_kernel = _gemm_body
#: Forward (x Wᵀ + epilogue), input-gradient and weight-gradient launches: separate autotuners, separate caches.
linear_fwd = _autotune()(_gemm_body)
linear_dgrad = _autotune()(_gemm_body)
linear_wgrad = _autotune()(_gemm_body)


def glu_smem_estimate(bm: int, bn: int, bk: int, stages: int, esize: int, sm90: bool, mode: int) -> int:
    """:func:`smem_estimate` for the gated kernel: the forward pipelines one A and two B tiles, the input gradient
    three A-like tiles (dy, h_g, h_x) and two B tiles, the weight gradient three A-like tiles and one B tile."""
    a_tiles = 1 if mode == GLU_FWD else 3
    b_tiles = 1 if mode == GLU_WGRAD else 2
    bufs = stages if sm90 else max(stages - 1, 1)
    pipeline = bufs * (bm * a_tiles + bn * b_tiles) * bk * esize
    return pipeline if sm90 else max(pipeline, bm * bn * 4)


def glu_words_per_thread(bm: int, bn: int, bk: int, esize: int, warps: int, mode: int) -> float:
    """:func:`words_per_thread` for the gated kernel: two fp32 accumulators (forward, weight gradient) or one, the
    loaded tiles, and in the backward the fp32 dy, h_g, h_x tiles and the two products the prologue makes."""
    accs = 1 if mode == GLU_DGRAD else 2
    a_tiles = 1 if mode == GLU_FWD else 3
    b_tiles = 1 if mode == GLU_WGRAD else 2
    words = accs * bm * bn + (bm * a_tiles + bn * b_tiles) * bk * esize / 4 + (0 if mode == GLU_FWD else 5 * bm * bk)
    return words / (32 * warps)


#: The gated launches' autotune space: :data:`CONFIGS` plus narrow tiles for fp32, whose two accumulators (forward,
#: weight gradient) or five fp32 prologue tiles (backward) spill from 32 x 64 up (``python -m fastvit.kernels.check``).
GLU_CONFIGS = CONFIGS + [_cfg(32, 32, 32, 4, 2), _cfg(16, 32, 32, 4, 2)]
#: Registers per thread a gated config's tiles may take (:func:`glu_words_per_thread`; lower than
#: :data:`WORDS_PER_THREAD`: the gate's activation and its derivative keep more fp32 temporaries alive).
GLU_WORDS_PER_THREAD = 100


def prune_glu(configs, nargs, **kwargs):
    """Autotune pruner of the gated launches: :func:`prune`'s rules with the gated kernel's shared-memory and
    register estimates (:func:`glu_smem_estimate`, :func:`glu_words_per_thread` against
    :data:`GLU_WORDS_PER_THREAD`), BLOCK_K = 32 for the backward launches (prologue tiles, as for the other
    prologues), and tiles of at most 32 x 32 for fp32 (TF32 or IEEE; 16 x 32 for the weight gradient, whose two
    accumulators and five prologue tiles spilled at 32 x 32)."""
    M, N, K = nargs["M"], nargs["N"], nargs["K"]
    esize = _esize(nargs)
    mode = kwargs.get("MODE", GLU_FWD)
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])
    kept = []
    for c in configs:
        bm, bn, bk, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages
        if bm > max(16, triton.next_power_of_2(M)) or bn > max(16, triton.next_power_of_2(N)):
            continue
        if bk > max(16, triton.next_power_of_2(K)):
            continue
        if esize == 4 and (bm * bn > (16 if mode == GLU_WGRAD else 32) * 32 or bk > 32):
            continue
        if mode != GLU_FWD and bk > 32:
            continue
        if glu_smem_estimate(bm, bn, bk, st, esize, False, mode) > SMEM_BUDGET_SM80:
            continue
        if glu_smem_estimate(bm, bn, bk, st, esize, True, mode) > SMEM_BUDGET_SM90:
            continue
        if glu_words_per_thread(bm, bn, bk, esize, c.num_warps, mode) > GLU_WORDS_PER_THREAD:
            continue
        kept.append(c)
    return kept or [smallest]


#: Autotune key of the gated launches.
GLU_KEY = ["M", "N", "K", "MODE", "ACT", "INPUT_PRECISION"]


def _autotune_glu():
    if _INTERPRET:
        return triton.autotune(configs=[INTERPRET_CONFIG], key=GLU_KEY)
    return triton.autotune(configs=GLU_CONFIGS, key=GLU_KEY, prune_configs_by={"early_config_prune": prune_glu})


#: The plain @triton.jit body of the gated launches (what ``python -m fastvit.kernels.check`` compiles).
glu_kernel = _glu_body
#: Gated forward, input-gradient and weight-gradient launches (``fastvit.ops.linear_glu``).
glu_fwd = _autotune_glu()(_glu_body)
glu_dgrad = _autotune_glu()(_glu_body)
glu_wgrad = _autotune_glu()(_glu_body)


# ------------------------------------------------------------------------------------------------ compile check
class _FakeOperand:
    """What :func:`prune` looks at: ``element_size()`` of B."""

    def __init__(self, size: int):
        self.size = size

    def element_size(self) -> int:
        return self.size


def _label(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}/w{cfg.num_warps}/s{cfg.num_stages}"


#: Fusion constexprs of each launch as the backend uses it (the heaviest variant of each).
_MODES = {
    "linear_fwd": dict(
        PROLOGUE=PRO_NONE, EPILOGUE=EPI_GELU_ERF, HAS_BIAS=True, HAS_GAMMA=False, STORE_PRE=True, ROW_SUM=False
    ),
    "linear_dgrad": dict(
        PROLOGUE=PRO_GELU_ERF, EPILOGUE=EPI_NONE, HAS_BIAS=False, HAS_GAMMA=False, STORE_PRE=False, ROW_SUM=False
    ),
    "linear_wgrad": dict(
        PROLOGUE=PRO_GELU_ERF, EPILOGUE=EPI_NONE, HAS_BIAS=False, HAS_GAMMA=False, STORE_PRE=False, ROW_SUM=True
    ),
}


def check_variants() -> list[dict]:
    """The compiles ``python -m fastvit.kernels.check`` runs for this family, in its variant format.

    * every autotune config of each launch (forward with the erf-GELU + stored-h epilogue, dgrad and wgrad with the
      erf-GELU' prologue, wgrad with the fused bias row sums) once, at the widest operands the pruner lets it see
      on a 4096³ problem: fp32 with TF32 dots if kept, else fp16 (bf16 has fp16's footprint);
    * the other fusions on the first config kept for a ViT-B fc1 shape (T = 197·64, C = 768 -> 3072): forward tanh
      GELU (bf16) and bias + gamma + residual (fp16); dgrad / wgrad with the gamma and tanh-GELU' prologues (bf16);
    * fp32 with IEEE dots (PyTorch's default precision) for each launch, on the config the pruner keeps.
    """
    out: list[dict] = []

    def add(kernel, cfg, dtype, prec, modes, dim):
        out.append(
            dict(
                family="linear",
                kernel=kernel,
                config=_label(cfg),
                dtype=dtype,
                dim=dim,
                constexprs=dict(modes, INPUT_PRECISION=prec, **cfg.kwargs),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )

    def kept(M, N, K, esize, prec, prologue=PRO_NONE):
        return prune(CONFIGS, dict(B=_FakeOperand(esize), M=M, N=N, K=K), INPUT_PRECISION=prec, PROLOGUE=prologue)

    for kernel, modes in _MODES.items():
        for cfg in CONFIGS:
            for dtype, esize, prec in (("fp32", 4, "tf32"), ("fp16", 2, "ieee")):
                if any(c is cfg for c in kept(4096, 4096, 4096, esize, prec, modes["PROLOGUE"])):
                    add(kernel, cfg, dtype, prec, modes, 4096)
                    break
            # a config this launch's pruner never keeps is simply not compiled for it
        cfg = kept(4096, 4096, 4096, 4, "ieee", modes["PROLOGUE"])[0]
        add(kernel, cfg, "fp32", "ieee", modes, 4096)
    T, C, H = 197 * 64, 768, 3072
    fwd = kept(T, H, C, 2, "ieee")[0]
    add("linear_fwd", fwd, "bf16", "ieee", dict(_MODES["linear_fwd"], EPILOGUE=EPI_GELU_TANH), C)
    add("linear_fwd", fwd, "fp16", "ieee", dict(_MODES["linear_fwd"], EPILOGUE=EPI_RESIDUAL, HAS_GAMMA=True), C)
    for kernel, (M, N, K) in (("linear_dgrad", (T, C, H)), ("linear_wgrad", (H, C, T))):
        cfg = kept(M, N, K, 2, "ieee", PRO_GELU_ERF)[0]
        for prologue in (PRO_SCALE, PRO_GELU_TANH):
            add(kernel, cfg, "bf16", "ieee", dict(_MODES[kernel], PROLOGUE=prologue), C)
    out.extend(_glu_check_variants())
    return out


#: Constexprs of each gated launch as the backend uses it (SiLU; biases, stored pre-activations, row sums on).
_GLU_MODES = {
    "glu_fwd": dict(MODE=GLU_FWD, ACT=ACT_SILU, HAS_BIAS1=True, HAS_BIAS2=True, STORE_PRE=True, ROW_SUM=False),
    "glu_dgrad": dict(MODE=GLU_DGRAD, ACT=ACT_SILU, HAS_BIAS1=False, HAS_BIAS2=False, STORE_PRE=False, ROW_SUM=False),
    "glu_wgrad": dict(MODE=GLU_WGRAD, ACT=ACT_SILU, HAS_BIAS1=False, HAS_BIAS2=False, STORE_PRE=False, ROW_SUM=True),
}


def _glu_check_variants() -> list[dict]:
    """The gated launches' compiles, as :func:`check_variants` does for the others: every config each launch's
    pruner keeps on a 4096³ problem (fp32 / TF32 if kept, else fp16) with SiLU, fp32 IEEE on the config it keeps,
    and the other activations (erf GELU, tanh GELU, sigmoid; bf16) on the first config kept for a ViT-B SwiGLU
    fc1 (T = 197·64, C = 768 -> 2 x 2048)."""
    out: list[dict] = []

    def add(kernel, cfg, dtype, prec, modes, dim):
        out.append(
            dict(
                family="linear",
                kernel=kernel,
                config=_label(cfg),
                dtype=dtype,
                dim=dim,
                constexprs=dict(modes, INPUT_PRECISION=prec, **cfg.kwargs),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )

    def kept(M, N, K, esize, prec, mode):
        return prune_glu(GLU_CONFIGS, dict(B=_FakeOperand(esize), M=M, N=N, K=K), INPUT_PRECISION=prec, MODE=mode)

    for kernel, modes in _GLU_MODES.items():
        for cfg in GLU_CONFIGS:
            for dtype, esize, prec in (("fp32", 4, "tf32"), ("fp16", 2, "ieee")):
                if any(c is cfg for c in kept(4096, 4096, 4096, esize, prec, modes["MODE"])):
                    add(kernel, cfg, dtype, prec, modes, 4096)
                    break
        add(kernel, kept(4096, 4096, 4096, 4, "ieee", modes["MODE"])[0], "fp32", "ieee", modes, 4096)
    T, C, H = 197 * 64, 768, 2048
    for kernel, (M, N, K) in (("glu_fwd", (T, H, C)), ("glu_dgrad", (T, C, H)), ("glu_wgrad", (H, C, T))):
        cfg = kept(M, N, K, 2, "ieee", _GLU_MODES[kernel]["MODE"])[0]
        for act in (ACT_GELU_ERF, ACT_GELU_TANH, ACT_SIGMOID):
            add(kernel, cfg, "bf16", "ieee", dict(_GLU_MODES[kernel], ACT=act), C)
    return out
