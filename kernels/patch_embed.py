"""Patch embedding in Triton: im2col gather from NCHW + GEMM + bias + position add, forward and backward.

Sources: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), sec. 3.1 (patch projection = stride-P
convolution); He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), sec. 3 (the encoder
embeds only the kept patches, ``ids_keep``); timm ``PatchEmbed`` / ``VisionTransformer._pos_embed``.

Notation: images (B, C, Hi, Wi), weight (E, C, Ph, Pw) viewed as W (E, K) with K = C·Ph·Pw in (c, i, j) order,
the patch grid gh x gw (Np = gh·gw patches, row-major), ``ids_keep`` (B, Nk) int64, R prefix tokens, output
(B, R + Nk, E). Row ``j`` of batch ``b`` embeds patch ``p = ids_keep[b, j]`` (``p = j`` without ids_keep):

    A[b, j, k]      = images[b, c, (p // gw)·Ph + i, (p % gw)·Pw + jj]           (k = (c, i, jj); never stored)
    out[b, R + j]   = A[b, j] @ W^T + bias + pos[pos_off + p]                      (fp32 accumulate, one rounding)

``_pe_fwd``: one program per (BLOCK_M kept rows, BLOCK_N features, batch); the A tile is gathered straight from
NCHW for each BLOCK_K step and multiplied with ``tl.dot`` into an fp32 accumulator; the epilogue adds bias and
position and stores into the output at row offset R. ``_prefix_rows`` writes the R prefix rows (cls, registers,
+ their position rows) -- a tiny second launch.

Backward (every output element has one writer, no atomics, bit-reproducible):

* ``_pe_dw``: dW[e, k] = sum over all B·Nk rows of dOut[r, e] · A[r, k]; one program per (E block, K block)
  looping over the rows (A re-gathered from the images);
* ``_pe_dimg``: dA = dOut_patches @ W, scattered to the images pixel by pixel (patches do not overlap, so each
  pixel of a kept patch has one writer; the caller zero-fills the pixels of dropped patches);
* ``_batch_sum``: S[t] = sum_b dOut[b, row_b(t)] in fp32 -- for the patches ``row_b(p)`` is the kept row that
  holds patch ``p`` (the inverse of ``ids_keep``, -1 when dropped), for the prefix rows the row itself. Then
  d pos_patches = S, d bias = S.sum(0), d cls / d reg / d pos_prefix = the prefix rows' S.

fp32 inputs: ``tl.dot`` uses ``INPUT_PRECISION`` ("tf32" or "ieee") chosen by the caller
(:func:`fastvit.runtime.triton.input_precision`). Scalar sizes are lowercase except ``C`` and ``E``; pointers capitalised.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton 3.9's interpreter multiplies bf16 tiles wrongly in tl.dot; under it both operands are upcast to fp32
# (exact: products of two bf16 / fp16 numbers are representable in fp32). Folded away when compiled.
_UPCAST_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


#: GEMM tiles (BLOCK_M output rows, BLOCK_N output columns, BLOCK_K reduction step) shared by the three GEMMs.
GEMM_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 64, 32, 4, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(64, 64, 32, 4, 2),
    _cfg(32, 64, 32, 4, 2),
    _cfg(32, 32, 32, 4, 2),
]
#: fp32 with IEEE dots (no tensor cores) gets only the small tiles (as the attention kernels).
INTERPRET_CONFIG = _cfg(16, 16, 16, 4, 1)

#: Rows per program / feature chunk of the batch-sum and prefix kernels.
SUM_BLOCK_T = 16
MAX_BLOCK_E = 256


def block_e(E: int) -> int:
    """Feature chunk of the batch-sum / prefix kernels (next power of two between 16 and 256)."""
    return min(MAX_BLOCK_E, max(16, triton.next_power_of_2(E)))


def _prune(configs, nargs, **kwargs):
    """Drop tiles far larger than the problem (``m_rows`` x ``n_cols``); fp32 with IEEE dots keeps only the
    smallest tile (the FMA path holds far more live registers), fp32 with TF32 only tiles up to 64 x 64 (larger
    ones spill on sm_80 / sm_90 per ``ptxas -v``). Always keeps at least one config."""
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    esize = _esize(nargs)
    if kwargs.get("INPUT_PRECISION") == "ieee" and esize == 4:
        return [smallest]
    m, n = nargs["m_rows"], nargs["n_cols"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(m))
        and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(n))
        and (esize < 4 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)
    ]
    return kept or [smallest]


def _esize(nargs) -> int:
    """Element size of the kernel's activations (fp32: 4), from whichever of its tensors the launch passed."""
    for name in ("Img", "DImg", "DOut"):
        t = nargs.get(name)
        if t is not None and hasattr(t, "element_size"):
            return t.element_size()
    return 2


def _autotune(key):
    """``key`` must hold INPUT_PRECISION: :func:`_prune` keeps a different set for fp32 IEEE and fp32 TF32 (the
    tensors' dtypes Triton adds to the key itself)."""
    if _INTERPRET:
        return triton.autotune(configs=[INTERPRET_CONFIG], key=key)
    return triton.autotune(configs=GEMM_CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _im2col_offsets(b, patch, k, grid_w, ph, pw, stride_ib, stride_ic, stride_ih, stride_iw):
    """Offsets of A[patch (rows), k (cols)] within image ``b`` (int32: one image holds < 2^31 elements; the caller
    adds the int64 batch offset to the base pointer): k = (c, i, jj) with c slowest."""
    c = k // (ph * pw)
    i = (k // pw) % ph
    jj = k % pw
    patch = patch.to(tl.int32)
    h = (patch // grid_w) * ph
    w = (patch % grid_w) * pw
    return c[None, :] * stride_ic + (h[:, None] + i[None, :]) * stride_ih + (w[:, None] + jj[None, :]) * stride_iw


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _pe_fwd_body(
    Img,
    W,
    Bias,
    Ids,
    Pos,
    Out,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_we,
    stride_idb,
    stride_pt,
    stride_ob,
    stride_ot,
    m_rows,
    n_cols,
    k_len,
    grid_w,
    ph,
    pw,
    row_off,
    pos_off,
    HAS_BIAS: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_POS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # kept-row index j (m_rows = Nk)
    rmask = rows < m_rows
    if HAS_IDS:
        patch = tl.load(Ids + b * stride_idb + rows, mask=rmask, other=0).to(tl.int32)
    else:
        patch = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # features e (n_cols = n_embed)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_len
        a = tl.load(
            Img
            + b * stride_ib
            + _im2col_offsets(b, patch, k, grid_w, ph, pw, stride_ib, stride_ic, stride_ih, stride_iw),
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wt = tl.load(W + cols[None, :] * stride_we + k[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, wt, acc, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    if HAS_POS:
        acc += tl.load(Pos + (pos_off + patch)[:, None] * stride_pt + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    out_rows = row_off + rows
    tl.store(Out + b * stride_ob + out_rows[:, None] * stride_ot + cols[None, :], acc.to(Out.dtype.element_ty), mask=m2)


pe_fwd = _autotune(["m_rows", "n_cols", "k_len", "INPUT_PRECISION"])(_pe_fwd_body)
#: The plain jitted forward (the compile check passes the tile sizes itself).
pe_fwd_kernel = _pe_fwd_body


@triton.jit
def _prefix_rows(
    Prefix,
    Pos,
    Out,
    stride_pt,
    stride_ob,
    stride_ot,
    n_embed,
    HAS_POS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``Out[b, r] = Prefix[r] (+ Pos[r])`` for the R prefix rows; grid (R, B). Prefix is (R, n_embed) contiguous."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    for e0 in range(0, n_embed, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        cm = cols < n_embed
        v = tl.load(Prefix + r * n_embed + cols, mask=cm, other=0.0).to(tl.float32)
        if HAS_POS:
            v += tl.load(Pos + r * stride_pt + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(Out + b * stride_ob + r * stride_ot + cols, v.to(Out.dtype.element_ty), mask=cm)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _pe_dw_body(
    Img,
    DOut,
    Ids,
    DW,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_idb,
    stride_db,
    stride_dt,
    stride_dwe,
    m_rows,
    n_cols,
    n_batch,
    n_keep,
    grid_w,
    ph,
    pw,
    row_off,
    HAS_IDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW[e, k] = sum_r dOut[r, e] A[r, k] over the B·Nk patch rows; grid (n_embed blocks, K blocks).
    Here m_rows = n_embed and n_cols = K; BLOCK_K steps through the rows of each batch."""
    e = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    emask = e < m_rows
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = k < n_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, n_batch):
        b64 = tl.full([], b, tl.int64)
        for j0 in range(0, n_keep, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            jmask = j < n_keep
            if HAS_IDS:
                patch = tl.load(Ids + b64 * stride_idb + j, mask=jmask, other=0).to(tl.int32)
            else:
                patch = j
            g = tl.load(
                DOut + b64 * stride_db + (row_off + j)[None, :] * stride_dt + e[:, None],
                mask=emask[:, None] & jmask[None, :],
                other=0.0,
            )  # (BLOCK_M e, BLOCK_K rows)
            a = tl.load(
                Img
                + b64 * stride_ib
                + _im2col_offsets(b64, patch, k, grid_w, ph, pw, stride_ib, stride_ic, stride_ih, stride_iw),
                mask=jmask[:, None] & kmask[None, :],
                other=0.0,
            )  # (BLOCK_K rows, BLOCK_N k)
            acc = _dot(g.to(a.dtype), a, acc, INPUT_PRECISION)
    tl.store(
        DW + e[:, None] * stride_dwe + k[None, :], acc.to(DW.dtype.element_ty), mask=emask[:, None] & kmask[None, :]
    )


pe_dw = _autotune(["m_rows", "n_cols", "n_keep", "INPUT_PRECISION"])(_pe_dw_body)
pe_dw_kernel = _pe_dw_body


@triton.jit
def _pe_dimg_body(
    DOut,
    W,
    Ids,
    DImg,
    stride_db,
    stride_dt,
    stride_we,
    stride_idb,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    m_rows,
    n_cols,
    n_embed,
    grid_w,
    ph,
    pw,
    row_off,
    HAS_IDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dA = dOut_patches @ W scattered to the image (col2im, unique writers); grid (Nk blocks, K blocks, B).
    Here m_rows = Nk, n_cols = K and BLOCK_K steps through n_embed."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < m_rows
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = k < n_cols
    b = tl.program_id(2).to(tl.int64)
    if HAS_IDS:
        patch = tl.load(Ids + b * stride_idb + rows, mask=rmask, other=0).to(tl.int32)
    else:
        patch = rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e0 in range(0, n_embed, BLOCK_K):
        e = e0 + tl.arange(0, BLOCK_K)
        emask = e < n_embed
        g = tl.load(
            DOut + b * stride_db + (row_off + rows)[:, None] * stride_dt + e[None, :],
            mask=rmask[:, None] & emask[None, :],
            other=0.0,
        )
        wt = tl.load(W + e[:, None] * stride_we + k[None, :], mask=emask[:, None] & kmask[None, :], other=0.0)
        acc = _dot(g.to(wt.dtype), wt, acc, INPUT_PRECISION)
    offs = _im2col_offsets(b, patch, k, grid_w, ph, pw, stride_ib, stride_ic, stride_ih, stride_iw)
    tl.store(DImg + b * stride_ib + offs, acc.to(DImg.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])


pe_dimg = _autotune(["m_rows", "n_cols", "n_embed", "INPUT_PRECISION"])(_pe_dimg_body)
pe_dimg_kernel = _pe_dimg_body


@triton.jit
def _batch_sum(
    G,
    Inv,
    Sum,
    stride_gb,
    stride_gt,
    stride_invb,
    stride_ot,
    n_batch,
    n_rows,
    n_embed,
    HAS_INV: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``Sum[t] = sum_b G[b, src]`` in fp32 with ``src = Inv[b, t]`` (skipped when < 0) or ``t``; grid (row blocks,
    n_embed blocks). Each output element has one writer, the batch is summed in order: deterministic."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tmask = t < n_rows
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cm = cols < n_embed
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for b in range(0, n_batch):
        b64 = tl.full([], b, tl.int64)
        if HAS_INV:
            src = tl.load(Inv + b64 * stride_invb + t, mask=tmask, other=-1)
            valid = tmask & (src >= 0)
        else:
            src = t
            valid = tmask
        acc += tl.load(
            G + b64 * stride_gb + src[:, None] * stride_gt + cols[None, :], mask=valid[:, None] & cm[None, :], other=0.0
        ).to(tl.float32)
    tl.store(Sum + t[:, None] * stride_ot + cols[None, :], acc, mask=tmask[:, None] & cm[None, :])
