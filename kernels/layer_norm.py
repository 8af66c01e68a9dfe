"""Fused residual-add + LayerNorm (and RMSNorm) in Triton, forward and backward.

Forward (one row of C features per program): ``h = x + residual`` (when a residual is given; ``h`` is written
out, it is the next block's residual stream), ``y = (h - mean) * rstd * weight + bias`` with fp32 mean and
rstd saved per row for the backward.

``RMS=True`` turns both kernels into RMSNorm (Zhang & Sennrich, 2019): no mean is subtracted and there is no bias,
``rstd = 1 / sqrt(mean(h²) + eps)``, ``y = h * rstd * weight``; only ``rstd`` is saved. The backward then is

    xhat = h * rstd,  g = dy * weight
    dh   = rstd * (g - xhat * mean(g * xhat)) + dh_in

with ``dweight += dy * xhat`` as for LayerNorm. With ``RMS=False`` the kernels are the LayerNorm ones, unchanged
(the RMS branches are resolved at compile time).

Backward: each program owns a contiguous chunk of rows. For every row it computes, in fp32,

    xhat = (h - mean) * rstd,  g = dy * weight
    dh   = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh_in

(``dh_in`` is the gradient arriving on the ``h`` output; ``dh`` is the gradient of both ``x`` and ``residual``)
and accumulates ``dweight += dy * xhat`` and ``dbias += dy`` in registers; the per-program partial sums go to a
``(num_programs, C)`` fp32 buffer that the caller reduces (``buffer.sum(0)``). No atomics, so the backward is
deterministic. This follows the Triton layer-norm tutorial's two-stage reduction of dγ/dβ, without its locks.

Source: Ba, Kiros & Hinton, "Layer Normalization" (2016), eq. 3-4; Zhang & Sennrich, "Root Mean Square Layer
Normalization" (2019), eq. 4; the backward is the standard chain rule through the normalisation (e.g. Apex /
PyTorch ``native_layer_norm_backward``).

The kernels expect 2-D row-major views: rows of C contiguous elements separated by a row stride.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Largest feature size the kernels take (one row lives in registers; beyond this they would spill).
MAX_C = 8192


@triton.jit
def _ln_fwd_kernel(
    X,
    R,
    W,
    B,
    Y,
    HOut,
    Mean,
    Rstd,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    C,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RMS: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    h = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=cmask, other=0.0).to(tl.float32)
        # round the sum to the storage dtype first: the stored h and the normalised h must be the same numbers
        h = (h + r).to(HOut.dtype.element_ty)
        tl.store(HOut + row * stride_h + cols, h, mask=cmask)
        h = h.to(tl.float32)
    if RMS:
        hc = h  # out-of-row elements are 0 already (masked loads)
    else:
        mean = tl.sum(h, axis=0) / C
        hc = tl.where(cmask, h - mean, 0.0)
    var = tl.sum(hc * hc, axis=0) / C  # RMS: the mean square
    rstd = 1.0 / tl.sqrt(var + eps)
    y = hc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cmask)
    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    HIn,
    W,
    Mean,
    Rstd,
    DY,
    DHin,
    DH,
    DWp,
    DBp,
    stride_h,
    stride_dy,
    stride_dhin,
    stride_dh,
    M,
    C,
    ROWS_PER_PROGRAM,
    HAS_DH_IN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RMS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM):
        row = row_start + i
        rows = tl.full([BLOCK_C], 0, tl.int64) + row
        rmask = cmask & (rows < M)  # the last program's chunk may run past M
        h = tl.load(HIn + row * stride_h + cols, mask=rmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=rmask, other=0.0).to(tl.float32)
        if RMS:
            rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
            xhat = tl.where(rmask, h * rstd, 0.0)
        else:
            mean = tl.load(Mean + row, mask=row < M, other=0.0)
            rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
            xhat = tl.where(rmask, (h - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=0) / C
        if RMS:
            dh = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / C
            dh = (g - xhat * c1 - c2) * rstd
        if HAS_DH_IN:
            dh += tl.load(DHin + row * stride_dhin + cols, mask=rmask, other=0.0).to(tl.float32)
        tl.store(DH + row * stride_dh + cols, dh.to(DH.dtype.element_ty), mask=rmask)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
    if COMPUTE_DW:
        tl.store(DWp + pid * C + cols, dw, mask=cmask)
    if COMPUTE_DB:
        tl.store(DBp + pid * C + cols, db, mask=cmask)


def block_c(C: int) -> int:
    """The register tile for feature size ``C``: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(C))


def num_warps_for(C: int) -> int:
    """Warps per row: one warp per 256 elements of the tile, between 1 and 8 (as the Triton tutorial)."""
    return min(max(block_c(C) // 256, 1), 8)
