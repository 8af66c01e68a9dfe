"""The ``triton`` backend of the MAE ops and of patch embedding: registered ``fastvit::`` ops, autograd, dispatch.

Kernels: :mod:`fastvit.kernels.mae` (decoder un-shuffle, reconstruction loss) and
:mod:`fastvit.kernels.patch_embed` (im2col + GEMM patch embedding). Same layering as :mod:`fastvit._triton`
(``triton_op`` + ``wrap_triton`` launches, ``register_autograd``, :func:`fastvit.backends.register_kernel`):

=================================  ==========================================================================
``fastvit::mae_unshuffle_fwd``     (x (B,1+Nk,C), mask_token (1,1,C), ids_restore (B,N) int64, pos (1,1+N,C)?)
                                   -> out (B,1+N,C)
``fastvit::mae_unshuffle_bwd``     (dout, ids_restore, n_keep, has_pos) -> (dx, dmask_token (1,1,C), dpos)
``fastvit::mae_loss_fwd``          (pred (B,N,P·P·C), images (B,C,Hi,Wi), P, norm_pix) -> row loss (B,N) fp32
``fastvit::mae_loss_bwd``          (drow (B,N) fp32, pred, images, P, norm_pix, compute_dimages)
                                   -> (dpred, dimages (empty unless computed))
=================================  ==========================================================================

The masked mean of :func:`fastvit.ops.mae_loss` (``(row * mask).sum() / mask.sum()``) is a torch reduction on the
fp32 row losses, so ``mask`` gets its gradient from autograd as in the eager reference.

Importing never fails: without triton nothing is registered; with a torch lacking ``triton_op`` the dispatch
entries exist and their ``extra_check`` says why they cannot run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastvit import _autograd
from fastvit import _triton as _base
from fastvit.backends import Capabilities, register_kernel

try:
    import triton

    from fastvit.kernels import mae as _mae_k
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR: Optional[str] = f"triton is not importable ({_exc})"
else:
    _IMPORT_ERROR = None

try:
    from fastvit.kernels import patch_embed as _pe_k
except ImportError:  # pragma: no cover
    _pe_k = None

__all__ = ["REGISTERED"]

#: Whether the ``fastvit::`` MAE / patch-embed Triton ops were registered in this process.
REGISTERED = False

_wrap = _base._wrap
_last_contiguous = _base._last_contiguous


def _register_mae_ops() -> None:
    triton_op = torch.library.triton_op

    # ---------------------------------------------------------------- un-shuffle
    @triton_op("fastvit::mae_unshuffle_fwd", mutates_args=())
    def mae_unshuffle_fwd(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Optional[Tensor]) -> Tensor:
        x = _last_contiguous(x)
        ids = _last_contiguous(ids_restore)
        B, T, C = x.shape
        N = ids.shape[1]
        mt = mask_token.reshape(C).contiguous()
        out = torch.empty((B, N + 1, C), device=x.device, dtype=x.dtype)
        pos = _last_contiguous(pos_embed[0]) if pos_embed is not None else out[0]
        if out.numel():
            _wrap(_mae_k.unshuffle_fwd)[lambda meta: (triton.cdiv(N + 1, meta["BLOCK_T"]), B)](
                x, mt, ids, pos, out,
                x.stride(0), x.stride(1), ids.stride(0), pos.stride(0), out.stride(0), out.stride(1),
                N + 1, T - 1, C,
                HAS_POS=pos_embed is not None, BLOCK_C=_mae_k.block_c(C),
            )
        return out

    @triton_op("fastvit::mae_unshuffle_bwd", mutates_args=())
    def mae_unshuffle_bwd(dout: Tensor, ids_restore: Tensor, n_keep: int, has_pos: bool
                          ) -> tuple[Tensor, Tensor, Tensor]:
        dout = _last_contiguous(dout)
        ids = _last_contiguous(ids_restore)
        B, T_out, C = dout.shape
        bt = _mae_k.BWD_BLOCK_T
        programs = triton.cdiv(T_out, bt)
        dx = torch.empty((B, 1 + n_keep, C), device=dout.device, dtype=dout.dtype)
        partial = torch.empty((B * programs, C), device=dout.device, dtype=torch.float32)
        dpos = torch.empty((1, T_out, C) if has_pos else (0,), device=dout.device, dtype=dout.dtype)
        if dout.numel():
            _wrap(_mae_k._unshuffle_bwd)[(programs, B)](
                dout, ids, dx, partial,
                dout.stride(0), dout.stride(1), ids.stride(0), dx.stride(0), dx.stride(1),
                T_out, n_keep, C,
                BLOCK_C=_mae_k.block_c(C), BLOCK_T=bt,
            )
            if has_pos:
                sb = _mae_k.SUM_BLOCK_T
                _wrap(_mae_k._sum_over_batch)[(triton.cdiv(T_out, sb),)](
                    dout, dpos, dout.stride(0), dout.stride(1), dpos.stride(1),
                    B, T_out, C,
                    BLOCK_C=_mae_k.block_c(C), BLOCK_T=sb,
                )
        dmask = partial.sum(0).to(dout.dtype).reshape(1, 1, C)
        return dx, dmask, dpos

    _autograd.attach("mae_unshuffle")

    # ---------------------------------------------------------------- loss
    def _loss_geometry(pred, images, patch_size):
        B, N, K = pred.shape
        _, C, Hi, Wi = images.shape
        return B, N, K, C, Wi // patch_size

    @triton_op("fastvit::mae_loss_fwd", mutates_args=())
    def mae_loss_fwd(pred: Tensor, images: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
        pred = _last_contiguous(pred)
        B, N, K, C, grid_w = _loss_geometry(pred, images, patch_size)
        row = torch.empty((B, N), device=pred.device, dtype=torch.float32)
        if row.numel():
            _wrap(_mae_k._mae_loss_fwd)[(N, B)](
                pred, images, row,
                pred.stride(0), pred.stride(1), *images.stride(),
                N, grid_w, patch_size, C, K,
                NORM_PIX=norm_pix, BLOCK_K=_mae_k.block_row(K), num_warps=_mae_k.loss_num_warps(K),
            )
        return row

    @triton_op("fastvit::mae_loss_bwd", mutates_args=())
    def mae_loss_bwd(drow: Tensor, pred: Tensor, images: Tensor, patch_size: int, norm_pix: bool,
                     compute_dimages: bool) -> tuple[Tensor, Tensor]:
        pred = _last_contiguous(pred)
        drow = drow.to(torch.float32).contiguous()
        B, N, K, C, grid_w = _loss_geometry(pred, images, patch_size)
        dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
        dimg = torch.empty(images.shape if compute_dimages else (0,), device=images.device, dtype=images.dtype)
        dimg_strides = dimg.stride() if compute_dimages else (0, 0, 0, 0)
        if dpred.numel():
            _wrap(_mae_k._mae_loss_bwd)[(N, B)](
                pred, images, drow, dpred, dimg if compute_dimages else dpred,
                pred.stride(0), pred.stride(1), *images.stride(),
                dpred.stride(0), dpred.stride(1), *dimg_strides,
                N, grid_w, patch_size, C, K,
                NORM_PIX=norm_pix, COMPUTE_DIMG=compute_dimages, BLOCK_K=_mae_k.block_row(K),
                num_warps=_mae_k.loss_num_warps(K),
            )
        return dpred, dimg

    _autograd.attach("mae_loss")


def _pe_geometry(images, weight, pos_embed, cls_token, reg_tokens):
    """(B, C, E, Ph, Pw, K, grid_w, Np, R, pos_off, prefix_has_pos)."""
    B, C, Hi, Wi = images.shape
    E, _, Ph, Pw = weight.shape
    Np = (Hi // Ph) * (Wi // Pw)
    R = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
    prefix_pos = pos_embed is not None and pos_embed.shape[1] == Np + R
    return B, C, E, Ph, Pw, C * Ph * Pw, Wi // Pw, Np, R, (R if prefix_pos else 0), prefix_pos


def _register_patch_embed_ops() -> None:
    triton_op = torch.library.triton_op

    @triton_op("fastvit::patch_embed_fwd", mutates_args=())
    def patch_embed_fwd(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                        cls_token: Optional[Tensor], reg_tokens: Optional[Tensor], ids_keep: Optional[Tensor]
                        ) -> Tensor:
        B, C, E, Ph, Pw, K, grid_w, Np, R, pos_off, prefix_pos = _pe_geometry(images, weight, pos_embed, cls_token,
                                                                              reg_tokens)
        w2 = weight.reshape(E, K).contiguous()
        ids = _last_contiguous(ids_keep) if ids_keep is not None else None
        Nk = ids.shape[1] if ids is not None else Np
        out = torch.empty((B, R + Nk, E), device=images.device, dtype=images.dtype)
        pos = _last_contiguous(pos_embed[0]) if pos_embed is not None else out[0]
        if B and Nk and E:
            _wrap(_pe_k.pe_fwd)[lambda meta: (triton.cdiv(Nk, meta["BLOCK_M"]), triton.cdiv(E, meta["BLOCK_N"]), B)](
                images, w2, bias if bias is not None else w2, ids if ids is not None else out, pos, out,
                *images.stride(), w2.stride(0), ids.stride(0) if ids is not None else 0, pos.stride(0),
                out.stride(0), out.stride(1),
                Nk, E, K, grid_w, Ph, Pw, R, pos_off,
                HAS_BIAS=bias is not None, HAS_IDS=ids is not None, HAS_POS=pos_embed is not None,
                INPUT_PRECISION=_base.input_precision(images.dtype),
            )
        if B and R and E:
            prefix = torch.cat([t.reshape(-1, E) for t in (cls_token, reg_tokens) if t is not None]).contiguous()
            _wrap(_pe_k._prefix_rows)[(R, B)](
                prefix, pos, out, pos.stride(0), out.stride(0), out.stride(1), E,
                HAS_POS=prefix_pos, BLOCK_E=_pe_k.block_e(E),
            )
        return out

    @triton_op("fastvit::patch_embed_bwd", mutates_args=())
    def patch_embed_bwd(dout: Tensor, images: Tensor, weight: Tensor, ids_keep: Optional[Tensor], pos_len: int,
                        n_cls: int, n_reg: int, compute_dimages: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> (dimages (empty unless computed), dweight, dbias (E,), dpos (1, pos_len, E) or empty, dcls, dreg)."""
        dout = _last_contiguous(dout)
        B, C, Hi, Wi = images.shape
        E, _, Ph, Pw = weight.shape
        K, grid_w, Np, R = C * Ph * Pw, Wi // Pw, (Hi // Ph) * (Wi // Pw), n_cls + n_reg
        dev, dt = images.device, images.dtype
        w2 = weight.reshape(E, K).contiguous()
        ids = _last_contiguous(ids_keep) if ids_keep is not None else None
        Nk = ids.shape[1] if ids is not None else Np
        prec = _base.input_precision(dt)
        # d weight
        dw = torch.empty((E, K), device=dev, dtype=weight.dtype)
        if E and K:
            _wrap(_pe_k.pe_dw)[lambda meta: (triton.cdiv(E, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]))](
                images, dout, ids if ids is not None else dout, dw,
                *images.stride(), ids.stride(0) if ids is not None else 0, dout.stride(0), dout.stride(1),
                dw.stride(0),
                E, K, B, Nk, grid_w, Ph, Pw, R,
                HAS_IDS=ids is not None, INPUT_PRECISION=prec,
            )
        # d images (pixels of dropped patches stay zero)
        if compute_dimages:
            dimg = torch.zeros(images.shape, device=dev, dtype=dt)
            if B and Nk and K:
                _wrap(_pe_k.pe_dimg)[lambda meta: (triton.cdiv(Nk, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]),
                                                   B)](
                    dout, w2, ids if ids is not None else dout, dimg,
                    dout.stride(0), dout.stride(1), w2.stride(0), ids.stride(0) if ids is not None else 0,
                    *dimg.stride(),
                    Nk, K, E, grid_w, Ph, Pw, R,
                    HAS_IDS=ids is not None, INPUT_PRECISION=prec,
                )
        else:
            dimg = torch.empty((0,), device=dev, dtype=dt)
        # batch sums: per patch (through the inverse of ids_keep) and per prefix row
        s_patch = torch.empty((Np, E), device=dev, dtype=torch.float32)
        s_prefix = torch.empty((R, E), device=dev, dtype=torch.float32)
        be, bt = _pe_k.block_e(E), _pe_k.SUM_BLOCK_T
        if ids is not None:
            inv = torch.full((B, Np), -1, device=dev, dtype=torch.int64)
            inv.scatter_(1, ids, torch.arange(Nk, device=dev, dtype=torch.int64).expand(B, Nk).contiguous())
        else:
            inv = s_patch
        dpatch = dout[:, R:]
        if Np and E:
            _wrap(_pe_k._batch_sum)[(triton.cdiv(Np, bt), triton.cdiv(E, be))](
                dpatch, inv, s_patch, dpatch.stride(0), dpatch.stride(1), inv.stride(0), s_patch.stride(0),
                B, Np, E, HAS_INV=ids is not None, BLOCK_E=be, BLOCK_T=bt,
            )
        if R and E:
            _wrap(_pe_k._batch_sum)[(triton.cdiv(R, bt), triton.cdiv(E, be))](
                dout, s_prefix, s_prefix, dout.stride(0), dout.stride(1), 0, s_prefix.stride(0),
                B, R, E, HAS_INV=False, BLOCK_E=be, BLOCK_T=bt,
            )
        db = s_patch.sum(0).to(dt)
        if pos_len == 0:
            dpos = torch.empty((0,), device=dev, dtype=dt)
        elif pos_len == Np:
            dpos = s_patch.to(dt).reshape(1, Np, E)
        else:
            dpos = torch.cat([s_prefix, s_patch]).to(dt).reshape(1, R + Np, E)
        dcls = s_prefix[:n_cls].to(dt).reshape(1, n_cls, E).clone()  # clones: returns must not alias
        dreg = s_prefix[n_cls:].to(dt).reshape(1, n_reg, E).clone()
        return dimg, dw.reshape(weight.shape), db, dpos, dcls, dreg

    _autograd.attach("patch_embed")


# ------------------------------------------------------------------------------------------- dispatch entries
def patch_embed(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    """Triton backend of :func:`fastvit.ops.patch_embed` (inputs already validated there)."""
    return torch.ops.fastvit.patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep)


def mae_unshuffle(x, mask_token, ids_restore, *, pos_embed=None):
    """Triton backend of :func:`fastvit.ops.mae_unshuffle` (inputs already validated there)."""
    return torch.ops.fastvit.mae_unshuffle_fwd(x, mask_token, ids_restore, pos_embed)


def mae_loss(pred, images, mask, patch_size, *, norm_pix_loss=False):
    """Triton backend of :func:`fastvit.ops.mae_loss`.

    Raises:
        ValueError: a patch row ``P·P·C`` longer than :data:`fastvit.kernels.mae.MAX_ROW` (one row lives in
            registers).
    """
    K = pred.shape[-1]
    if K > _mae_k.MAX_ROW:
        raise ValueError(f"the triton mae_loss kernel takes patch rows of at most {_mae_k.MAX_ROW} elements, got "
                         f"pred of shape {tuple(pred.shape)}")
    row = torch.ops.fastvit.mae_loss_fwd(pred, images, int(patch_size), bool(norm_pix_loss))
    return _autograd.masked_mean(row, mask, pred.dtype)


def _check(call: dict) -> list[str]:
    return [] if REGISTERED else [_base._unregistered_reason()]


def _register() -> None:
    global REGISTERED
    REGISTERED = _base._register_ops_once("mae_unshuffle_fwd", _register_mae_ops)
    if _pe_k is not None:
        _base._register_ops_once("patch_embed_fwd", _register_patch_embed_ops)
    caps = Capabilities(devices=_base._devices(), dtypes=_base._DTYPES, deterministic=True)
    register_kernel("triton", "mae_unshuffle", mae_unshuffle, caps, _check)
    register_kernel("triton", "mae_loss", mae_loss, caps, _check)
    if _pe_k is not None:
        register_kernel("triton", "patch_embed", patch_embed, caps, _check)


if _IMPORT_ERROR is None:
    _register()
