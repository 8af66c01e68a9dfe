"""A lean FlashAttention-2 forward in Triton: the yardstick of ``python -m fastvit.kernels.check --loops``.

Not used by any op. It exists so that the loop report can set fastvit's attention forward beside a kernel written
the way a fast Triton FlashAttention forward is written, compiled at the same config by the same compiler -- the
role the Triton tutorial's fused-attention kernel (``python/tutorials/06-fused-attention.py``) plays in the issue
that asked for the report, without fetching anything. It is written from the algorithm (Dao 2023, FlashAttention-2,
Algorithm 1), not copied:

* one program per (query block, head, batch); Q held in registers, K and V streamed in BLOCK_N tiles;
* online softmax with the running row max ``m`` kept in *scaled log2 units*: the scores ``s = q kᵀ`` are reduced
  raw, the row max is scaled once per row (``max(s) · c``, c = scale · log2 e > 0), and each probability is
  ``exp2(s · c − m)`` -- one FFMA and one MUFU.EX2 per score element;
* the 1/l normalisation once at the end;
* the key range split into full BLOCK_N blocks, which run with no masks, and one masked tail block after them.

Dense (B, H, N, D) operands with any (batch, head, token) strides and a unit last stride, HEAD_DIM a power of two
(= BLOCK_D), ``qk_scale = scale · log2 e`` with scale > 0. It stores O and the natural-log log-sum-exp, so it can be
checked against float64 math (``tests/test_kernels_loops.py`` does, in the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _flash2_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, cols, N_KV, qk_scale, MASKED: tl.constexpr):
    if MASKED:
        valid = cols < N_KV
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, k)
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def flash2_fwd(
    Q,
    K,
    V,
    O,
    LSE,
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
):
    tl.static_assert(BLOCK_D == HEAD_DIM)
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < N_Q)[:, None], other=0.0)
    # K read as its transpose (D, BLOCK_N): the dot needs no tl.trans
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _flash2_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n + offs_n, N_KV, qk_scale, MASKED=False)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if n_full < N_KV:
        acc, l_i, m_i = _flash2_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full + offs_n, N_KV, qk_scale, MASKED=True)

    acc = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m < N_Q)[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + (off_b * H + off_h) * N_Q + offs_m, lse, mask=offs_m < N_Q)
