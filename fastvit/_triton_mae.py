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

    def unshuffle_setup(ctx, inputs, output):
        x, mask_token, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.n_keep = x.shape[1] - 1
        ctx.has_pos = pos_embed is not None

    def unshuffle_backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        dx, dmask, dpos = torch.ops.fastvit.mae_unshuffle_bwd(dout, ids_restore, ctx.n_keep, ctx.has_pos)
        return dx, dmask, None, (dpos if ctx.has_pos else None)

    mae_unshuffle_fwd.register_autograd(unshuffle_backward, setup_context=unshuffle_setup)

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

    def loss_setup(ctx, inputs, output):
        pred, images, patch_size, norm_pix = inputs
        ctx.save_for_backward(pred, images)
        ctx.patch_size, ctx.norm_pix = patch_size, norm_pix

    def loss_backward(ctx, drow):
        pred, images = ctx.saved_tensors
        want_img = bool(ctx.needs_input_grad[1])
        dpred, dimg = torch.ops.fastvit.mae_loss_bwd(drow, pred, images, ctx.patch_size, ctx.norm_pix, want_img)
        return dpred, (dimg if want_img else None), None, None

    mae_loss_fwd.register_autograd(loss_backward, setup_context=loss_setup)


# ------------------------------------------------------------------------------------------- dispatch entries
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
    m = mask.float() if mask.dtype in (torch.float16, torch.bfloat16) else mask
    return ((row * m).sum() / m.sum()).to(pred.dtype)


def _check(call: dict) -> list[str]:
    return [] if REGISTERED else [_base._unregistered_reason()]


def _register() -> None:
    global REGISTERED
    if _base._HAS_TRITON_OP:
        try:
            torch.ops.fastvit.mae_unshuffle_fwd  # already registered (module reloaded)
        except (AttributeError, RuntimeError):
            _register_mae_ops()
        REGISTERED = True
    caps = Capabilities(devices=_base._devices(), dtypes=_base._DTYPES, deterministic=True)
    register_kernel("triton", "mae_unshuffle", mae_unshuffle, caps, _check)
    register_kernel("triton", "mae_loss", mae_loss, caps, _check)


if _IMPORT_ERROR is None:
    _register()
