"""MAE masked-token un-shuffle and reconstruction loss in Triton, forward and backward.

Source: He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), sec. 3, and the reference
code ``models_mae.py`` (``forward_decoder``'s mask-token fill + ``torch.gather`` un-shuffle, ``forward_loss``
with ``norm_pix_loss``).

Un-shuffle (decoder input), per batch row ``b`` with ``x`` (B, 1 + N_keep, C), ``ids_restore`` (B, N) int64 (a
permutation of 0..N-1), ``mask_token`` (C,), optional ``pos`` (1 + N, C)::

    out[b, 0]     = x[b, 0]                                                   (+ pos[0])
    out[b, 1 + n] = x[b, 1 + ids_restore[b, n]] if ids_restore[b, n] < N_keep else mask_token   (+ pos[1 + n])

One program per (block of BLOCK_T output rows, batch row), looping over C in BLOCK_C chunks: every output
element is written once, read from one source row -- no (B, N, C) int64 index as ``gather(..., ids.repeat)``
builds. The position add happens in fp32 and rounds once to the output dtype (as the eager reference).

Un-shuffle backward (``_unshuffle_bwd``, same grid): ``dx[b, 0] = dout[b, 0]``; for each output row ``1 + n``
whose source is kept, ``dx[b, 1 + ids_restore[b, n]] = dout[b, 1 + n]`` -- a scatter with unique indices (the
ids form a permutation, so each dx row has exactly one writer): no atomics, deterministic. The masked rows'
gradients are summed per program in fp32 into a ``(programs, C)`` partial buffer that the caller reduces
(``d mask_token``). ``_sum_over_batch`` writes ``d pos = sum_b dout[b]`` (fp32 accumulation, one program per
block of rows looping over the batch, so again no atomics).

Loss: for each patch row ``(b, n)`` (patches row-major over the ``h x w`` grid) the target is read straight out
of the NCHW image in MAE's ``(p, q, c)`` order (``patchify``): element ``k`` of the row is
``images[b, c, hp * P + p, wp * P + q]`` with ``p = k // (P C)``, ``q = (k // C) % P``, ``c = k % C``. With
``norm_pix`` the target is ``(t - mean) / sqrt(var + 1e-6)``, ``var`` unbiased. The kernel writes the row loss
``mean_k (pred - target)^2`` in fp32; the masked mean over rows is a torch reduction in the caller.
Loss backward: ``dpred = 2 (pred - target) / K * drow[b, n]`` (``drow`` = gradient of the row loss, fp32), and
optionally ``dimages`` (each pixel belongs to exactly one patch: a unique-index scatter), through the
normalisation when ``norm_pix``: ``dt = (g - mean(g) - that * sum(g that) / (K - 1)) / sigma`` with ``g = -dpred``.

All row-major views need a contiguous last dim; other dims are addressed by strides. Scalar sizes are lowercase
(``n_out``, ``n_keep``, ``row_len``) except ``C``; pointers are capitalised.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Largest P*P*C a loss row may have (one row lives in registers).
MAX_ROW = 8192
#: Feature chunk of the un-shuffle kernels.
MAX_BLOCK_C = 256
#: Output rows per program of the un-shuffle backward (fixed: it sizes the d mask_token partial buffer).
BWD_BLOCK_T = 16
#: Rows per program of the d pos_embed reduction.
SUM_BLOCK_T = 16

UNSHUFFLE_CONFIGS = [
    triton.Config({"BLOCK_T": 4}, num_warps=2),
    triton.Config({"BLOCK_T": 8}, num_warps=4),
    triton.Config({"BLOCK_T": 16}, num_warps=4),
    triton.Config({"BLOCK_T": 32}, num_warps=8),
]
#: Under the interpreter one small config keeps CPU tests fast.
INTERPRET_CONFIG = triton.Config({"BLOCK_T": 8}, num_warps=4)


def block_c(C: int) -> int:
    """Feature chunk for ``C`` features: next power of two, between 16 and :data:`MAX_BLOCK_C`."""
    return min(MAX_BLOCK_C, max(16, triton.next_power_of_2(C)))


def block_row(row_len: int) -> int:
    """Register tile of one loss row of ``row_len = P*P*C`` elements (next power of two, at least 16)."""
    return max(16, triton.next_power_of_2(row_len))


def loss_num_warps(row_len: int) -> int:
    """Warps of one loss row: one per 256 tile elements, between 1 and 8."""
    return min(max(block_row(row_len) // 256, 1), 8)


def prune_unshuffle(configs, nargs, **kwargs):
    """Drop row blocks far longer than the sequence (``n_out`` rows); keep at least the smallest."""
    n = nargs["n_out"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(4, triton.next_power_of_2(n))]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]


def _autotune(configs, prune, key):
    if _INTERPRET:
        return triton.autotune(configs=[INTERPRET_CONFIG], key=key)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


# ------------------------------------------------------------------------------------------------ un-shuffle
@triton.jit
def _unshuffle_fwd_body(
    X,
    MaskTok,
    Ids,
    Pos,
    Out,
    stride_xb,
    stride_xt,
    stride_ib,
    stride_pt,
    stride_ob,
    stride_ot,
    n_out,
    n_keep,
    C,
    HAS_POS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # output rows, 0 = cls
    rmask = rows < n_out
    ids = tl.load(Ids + b * stride_ib + (rows - 1).to(tl.int64), mask=rmask & (rows > 0), other=0)
    src = tl.where(rows > 0, ids + 1, 0).to(tl.int64)  # source row of x (valid where from_x)
    from_x = rmask & ((rows == 0) | (ids < n_keep))
    is_mask = rmask & (rows > 0) & (ids >= n_keep)
    rows64 = rows.to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        v = tl.load(
            X + b * stride_xb + src[:, None] * stride_xt + cols[None, :],
            mask=from_x[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        mt = tl.load(MaskTok + cols, mask=cmask, other=0.0).to(tl.float32)
        v = tl.where(is_mask[:, None], mt[None, :], v)
        if HAS_POS:
            v += tl.load(
                Pos + rows64[:, None] * stride_pt + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
        tl.store(
            Out + b * stride_ob + rows64[:, None] * stride_ot + cols[None, :],
            v.to(Out.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )


unshuffle_fwd = _autotune(UNSHUFFLE_CONFIGS, prune_unshuffle, ["n_out", "C"])(_unshuffle_fwd_body)
#: The plain jitted forward (for the compile check, which passes BLOCK_T itself).
unshuffle_fwd_kernel = _unshuffle_fwd_body


@triton.jit
def _unshuffle_bwd(
    DOut,
    Ids,
    DX,
    DMaskP,
    stride_db,
    stride_dt,
    stride_ib,
    stride_xb,
    stride_xt,
    n_out,
    n_keep,
    C,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    part = b.to(tl.int64) * tl.num_programs(0) + pid_t  # row of the (programs, C) partial buffer
    b = b.to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < n_out
    ids = tl.load(Ids + b * stride_ib + (rows - 1).to(tl.int64), mask=rmask & (rows > 0), other=0)
    dst = tl.where(rows > 0, ids + 1, 0).to(tl.int64)
    to_x = rmask & ((rows == 0) | (ids < n_keep))
    is_mask = rmask & (rows > 0) & (ids >= n_keep)
    rows64 = rows.to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.load(
            DOut + b * stride_db + rows64[:, None] * stride_dt + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        tl.store(
            DX + b * stride_xb + dst[:, None] * stride_xt + cols[None, :],
            g.to(DX.dtype.element_ty),
            mask=to_x[:, None] & cmask[None, :],
        )
        gm = tl.sum(tl.where(is_mask[:, None], g.to(tl.float32), 0.0), axis=0)
        tl.store(DMaskP + part * C + cols, gm, mask=cmask)


@triton.jit
def _sum_over_batch(
    G,
    Out,
    stride_gb,
    stride_gt,
    stride_ot,
    n_batch,
    n_rows,
    C,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``Out[t] = sum_b G[b, t]`` in fp32, one program per block of rows (rows of C contiguous elements)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rmask = rows < n_rows
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols < C)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for b in range(0, n_batch):
            b64 = tl.full([], b, tl.int64)  # the loop index is int32: b * stride_gb must not wrap
            acc += tl.load(G + b64 * stride_gb + rows[:, None] * stride_gt + cols[None, :], mask=m, other=0.0).to(
                tl.float32
            )
        tl.store(Out + rows[:, None] * stride_ot + cols[None, :], acc.to(Out.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ loss
@triton.jit
def _patch_target(
    Img, b, n, stride_ib, stride_ic, stride_ih, stride_iw, grid_w, patch, C, row_len, BLOCK_K: tl.constexpr
):
    """Offsets (into ``Img``), mask and fp32 values of patch ``n`` of image ``b`` in (p, q, c) order."""
    k = tl.arange(0, BLOCK_K)
    km = k < row_len
    p = k // (patch * C)
    q = (k // C) % patch
    c = k % C
    hp = n // grid_w
    wp = n % grid_w
    offs = (
        b * stride_ib
        + c.to(tl.int64) * stride_ic
        + (hp * patch + p).to(tl.int64) * stride_ih
        + (wp * patch + q).to(tl.int64) * stride_iw
    )
    t = tl.load(Img + offs, mask=km, other=0.0).to(tl.float32)
    return offs, km, t


@triton.jit
def _normalise(t, km, row_len):
    """MAE's norm_pix target: (t - mean) / sqrt(var + 1e-6), unbiased var; returns (that, 1 / sigma)."""
    mean = tl.sum(t, axis=0) / row_len
    tc = tl.where(km, t - mean, 0.0)
    var = tl.sum(tc * tc, axis=0) / (row_len - 1)
    rsig = 1.0 / tl.sqrt(var + 1e-6)
    return tc * rsig, rsig


@triton.jit
def _mae_loss_fwd(
    Pred,
    Img,
    Loss,
    stride_pb,
    stride_pn,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    n_patch,
    grid_w,
    patch,
    C,
    row_len,
    NORM_PIX: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs, km, t = _patch_target(
        Img, b, n, stride_ib, stride_ic, stride_ih, stride_iw, grid_w, patch, C, row_len, BLOCK_K
    )
    if NORM_PIX:
        t, rsig = _normalise(t, km, row_len)
    k = tl.arange(0, BLOCK_K)
    x = tl.load(Pred + b * stride_pb + n * stride_pn + k, mask=km, other=0.0).to(tl.float32)
    d = tl.where(km, x - t, 0.0)
    tl.store(Loss + b * n_patch + n, tl.sum(d * d, axis=0) / row_len)


@triton.jit
def _mae_loss_bwd(
    Pred,
    Img,
    DRow,
    DPred,
    DImg,
    stride_pb,
    stride_pn,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_dpb,
    stride_dpn,
    stride_dib,
    stride_dic,
    stride_dih,
    stride_diw,
    n_patch,
    grid_w,
    patch,
    C,
    row_len,
    NORM_PIX: tl.constexpr,
    COMPUTE_DIMG: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs, km, t = _patch_target(
        Img, b, n, stride_ib, stride_ic, stride_ih, stride_iw, grid_w, patch, C, row_len, BLOCK_K
    )
    if NORM_PIX:
        t, rsig = _normalise(t, km, row_len)
    k = tl.arange(0, BLOCK_K)
    x = tl.load(Pred + b * stride_pb + n * stride_pn + k, mask=km, other=0.0).to(tl.float32)
    w = tl.load(DRow + b * n_patch + n)
    g = tl.where(km, (x - t) * (2.0 * w / row_len), 0.0)
    tl.store(DPred + b * stride_dpb + n * stride_dpn + k, g.to(DPred.dtype.element_ty), mask=km)
    if COMPUTE_DIMG:
        gt = -g  # gradient of the (normalised) target
        if NORM_PIX:
            gmean = tl.sum(gt, axis=0) / row_len
            gdot = tl.sum(gt * t, axis=0) / (row_len - 1)
            gt = tl.where(km, (gt - gmean - t * gdot) * rsig, 0.0)
        hp = n // grid_w
        wp = n % grid_w
        p = k // (patch * C)
        q = (k // C) % patch
        c = k % C
        doffs = (
            b * stride_dib
            + c.to(tl.int64) * stride_dic
            + (hp * patch + p).to(tl.int64) * stride_dih
            + (wp * patch + q).to(tl.int64) * stride_diw
        )
        tl.store(DImg + doffs, gt.to(DImg.dtype.element_ty), mask=km)
