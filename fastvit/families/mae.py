"""The MAE family: ``fastvit.ops.mae_unshuffle`` (the decoder input: mask-token fill + ``ids_restore`` scatter +
decoder position embedding, one indexed write) and ``fastvit.ops.mae_loss`` (reconstruction loss on the removed
patches, He et al., 2022, sec. 3), on every backend.

* eager -- :mod:`fastvit.reference` (MAE's own code: ``cat``, ``gather``, ``patchify``);
* autograd -- shared by the Triton and CUDA ops; the un-shuffle's backward scatters through unique indices (no
  atomics, deterministic);
* Triton -- ``kernels/mae.py``:

  =================================  ==========================================================================
  ``fastvit::mae_unshuffle_fwd``     (x (B,1+Nk,C), mask_token (1,1,C), ids_restore (B,N) int64, pos (1,1+N,C)?)
                                     -> out (B,1+N,C)
  ``fastvit::mae_unshuffle_bwd``     (dout, ids_restore, n_keep, has_pos) -> (dx, dmask_token (1,1,C), dpos)
  ``fastvit::mae_loss_fwd``          (pred (B,N,P·P·C), images (B,C,Hi,Wi), P, norm_pix) -> row loss (B,N) fp32
  ``fastvit::mae_loss_bwd``          (drow (B,N) fp32, pred, images, P, norm_pix, compute_dimages)
                                     -> (dpred, dimages (empty unless computed))
  =================================  ==========================================================================

  The masked mean (``(row * mask).sum() / mask.sum()``) is a torch reduction on the fp32 row losses
  (:func:`masked_mean`), so ``mask`` gets its gradient from autograd as in the eager reference.
* CUDA -- fakes and dispatch entries of the ``_cuda`` ops (``csrc/mae/``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastvit import reference
from fastvit.backends import Capabilities, declare_ops, register_kernel
from fastvit.families._common import attach, op
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

OPS = declare_ops("mae", ("mae_unshuffle", "mae_loss"))

_k = triton_rt.kernel_module("mae")

register_kernel("eager", "mae_unshuffle", reference.mae_unshuffle, eager_rt.ANY_DEVICE)
register_kernel("eager", "mae_loss", reference.mae_loss, eager_rt.ANY_DEVICE)


def masked_mean(row: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """MAE's reduction of per-patch losses: ``(row * mask).sum() / mask.sum()`` in fp32, returned in ``dtype``.

    Both kernel backends compute ``row`` (B, N) fp32 in a kernel (``mae_loss_fwd``) and finish with this.
    """
    m = mask.float() if mask.dtype in (torch.float16, torch.bfloat16) else mask
    return ((row * m).sum() / m.sum()).to(dtype)


# ============================================================================================ autograd
def _mae_unshuffle_autograd(bwd: str):
    def setup(ctx, inputs, output):
        x, mask_token, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.n_keep = x.shape[1] - 1
        ctx.has_pos = pos_embed is not None

    def backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        dx, dmask, dpos = op(bwd)(dout, ids_restore, ctx.n_keep, ctx.has_pos)
        return dx, dmask, None, (dpos if ctx.has_pos else None)

    return setup, backward


def _mae_loss_autograd(bwd: str):
    def setup(ctx, inputs, output):
        pred, images, patch_size, norm_pix = inputs
        ctx.save_for_backward(pred, images)
        ctx.patch_size, ctx.norm_pix = patch_size, norm_pix

    def backward(ctx, drow):
        pred, images = ctx.saved_tensors
        want_img = bool(ctx.needs_input_grad[1])
        dpred, dimg = op(bwd)(drow, pred, images, ctx.patch_size, ctx.norm_pix, want_img)
        return dpred, (dimg if want_img else None), None, None

    return setup, backward


# ============================================================================================ triton
def _define_triton_ops() -> None:
    triton_op = torch.library.triton_op

    # ---------------------------------------------------------------- un-shuffle
    @triton_op("fastvit::mae_unshuffle_fwd", mutates_args=())
    def mae_unshuffle_fwd(x: Tensor, mask_token: Tensor, ids_restore: Tensor, pos_embed: Optional[Tensor]) -> Tensor:
        x = triton_rt.last_contiguous(x)
        ids = triton_rt.last_contiguous(ids_restore)
        B, T, C = x.shape
        N = ids.shape[1]
        mt = mask_token.reshape(C).contiguous()
        out = torch.empty((B, N + 1, C), device=x.device, dtype=x.dtype)
        pos = triton_rt.last_contiguous(pos_embed[0]) if pos_embed is not None else out[0]
        if out.numel():
            triton_rt.wrap(_k.unshuffle_fwd)[lambda meta: (triton_rt.triton.cdiv(N + 1, meta["BLOCK_T"]), B)](
                x,
                mt,
                ids,
                pos,
                out,
                x.stride(0),
                x.stride(1),
                ids.stride(0),
                pos.stride(0),
                out.stride(0),
                out.stride(1),
                N + 1,
                T - 1,
                C,
                HAS_POS=pos_embed is not None,
                BLOCK_C=_k.block_c(C),
            )
        return out

    @triton_op("fastvit::mae_unshuffle_bwd", mutates_args=())
    def mae_unshuffle_bwd(
        dout: Tensor, ids_restore: Tensor, n_keep: int, has_pos: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        dout = triton_rt.last_contiguous(dout)
        ids = triton_rt.last_contiguous(ids_restore)
        B, T_out, C = dout.shape
        bt = _k.BWD_BLOCK_T
        programs = triton_rt.triton.cdiv(T_out, bt)
        dx = torch.empty((B, 1 + n_keep, C), device=dout.device, dtype=dout.dtype)
        partial = torch.empty((B * programs, C), device=dout.device, dtype=torch.float32)
        dpos = torch.empty((1, T_out, C) if has_pos else (0,), device=dout.device, dtype=dout.dtype)
        if dout.numel():
            triton_rt.wrap(_k._unshuffle_bwd)[(programs, B)](
                dout,
                ids,
                dx,
                partial,
                dout.stride(0),
                dout.stride(1),
                ids.stride(0),
                dx.stride(0),
                dx.stride(1),
                T_out,
                n_keep,
                C,
                BLOCK_C=_k.block_c(C),
                BLOCK_T=bt,
            )
            if has_pos:
                sb = _k.SUM_BLOCK_T
                triton_rt.wrap(_k._sum_over_batch)[(triton_rt.triton.cdiv(T_out, sb),)](
                    dout,
                    dpos,
                    dout.stride(0),
                    dout.stride(1),
                    dpos.stride(1),
                    B,
                    T_out,
                    C,
                    BLOCK_C=_k.block_c(C),
                    BLOCK_T=sb,
                )
        dmask = partial.sum(0).to(dout.dtype).reshape(1, 1, C)
        return dx, dmask, dpos

    attach("mae_unshuffle", _mae_unshuffle_autograd)

    # ---------------------------------------------------------------- loss
    def _loss_geometry(pred, images, patch_size):
        B, N, K = pred.shape
        _, C, Hi, Wi = images.shape
        return B, N, K, C, Wi // patch_size

    @triton_op("fastvit::mae_loss_fwd", mutates_args=())
    def mae_loss_fwd(pred: Tensor, images: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
        pred = triton_rt.last_contiguous(pred)
        B, N, K, C, grid_w = _loss_geometry(pred, images, patch_size)
        row = torch.empty((B, N), device=pred.device, dtype=torch.float32)
        if row.numel():
            triton_rt.wrap(_k._mae_loss_fwd)[(N, B)](
                pred,
                images,
                row,
                pred.stride(0),
                pred.stride(1),
                *images.stride(),
                N,
                grid_w,
                patch_size,
                C,
                K,
                NORM_PIX=norm_pix,
                BLOCK_K=_k.block_row(K),
                num_warps=_k.loss_num_warps(K),
            )
        return row

    @triton_op("fastvit::mae_loss_bwd", mutates_args=())
    def mae_loss_bwd(
        drow: Tensor, pred: Tensor, images: Tensor, patch_size: int, norm_pix: bool, compute_dimages: bool
    ) -> tuple[Tensor, Tensor]:
        pred = triton_rt.last_contiguous(pred)
        drow = drow.to(torch.float32).contiguous()
        B, N, K, C, grid_w = _loss_geometry(pred, images, patch_size)
        dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
        dimg = torch.empty(images.shape if compute_dimages else (0,), device=images.device, dtype=images.dtype)
        dimg_strides = dimg.stride() if compute_dimages else (0, 0, 0, 0)
        if dpred.numel():
            triton_rt.wrap(_k._mae_loss_bwd)[(N, B)](
                pred,
                images,
                drow,
                dpred,
                dimg if compute_dimages else dpred,
                pred.stride(0),
                pred.stride(1),
                *images.stride(),
                dpred.stride(0),
                dpred.stride(1),
                *dimg_strides,
                N,
                grid_w,
                patch_size,
                C,
                K,
                NORM_PIX=norm_pix,
                COMPUTE_DIMG=compute_dimages,
                BLOCK_K=_k.block_row(K),
                num_warps=_k.loss_num_warps(K),
            )
        return dpred, dimg

    attach("mae_loss", _mae_loss_autograd)


def mae_unshuffle_triton(x, mask_token, ids_restore, *, pos_embed=None):
    """Triton backend of :func:`fastvit.ops.mae_unshuffle` (inputs already validated there)."""
    return torch.ops.fastvit.mae_unshuffle_fwd(x, mask_token, ids_restore, pos_embed)


def mae_loss_triton(pred, images, mask, patch_size, *, norm_pix_loss=False):
    """Triton backend of :func:`fastvit.ops.mae_loss`.

    Raises:
        ValueError: a patch row ``P·P·C`` longer than :data:`fastvit.kernels.mae.MAX_ROW` (one row lives in
            registers; automatic dispatch never sends one here, see :func:`triton_check`).
    """
    K = pred.shape[-1]
    if K > _k.MAX_ROW:
        raise ValueError(
            f"the triton mae_loss kernel takes patch rows of at most {_k.MAX_ROW} elements, got "
            f"pred of shape {tuple(pred.shape)}"
        )
    row = torch.ops.fastvit.mae_loss_fwd(pred, images, int(patch_size), bool(norm_pix_loss))
    return masked_mean(row, mask, pred.dtype)


TRITON_REGISTERED = triton_rt.register_ops("mae_unshuffle_fwd", _define_triton_ops)


def triton_check(call) -> list[str]:
    """Reasons beyond :class:`~fastvit.backends.Capabilities` the Triton MAE kernels cannot serve ``call``."""
    reasons = [] if TRITON_REGISTERED else [triton_rt.unregistered_reason()]
    k = call.get("patch_row")
    if k is not None and k > _k.MAX_ROW:
        reasons.append(f"patch rows of {k} elements > {_k.MAX_ROW} (one row lives in registers)")
    return reasons


if _k is not None:
    _triton_caps = Capabilities(devices=triton_rt.DEVICES, dtypes=triton_rt.DTYPES)
    register_kernel(
        "triton", "mae_unshuffle", mae_unshuffle_triton, _triton_caps, triton_check, check_depends_on_call_only=True
    )
    register_kernel("triton", "mae_loss", mae_loss_triton, _triton_caps, triton_check, check_depends_on_call_only=True)


# ============================================================================================ cuda
def _register_cuda_fakes() -> None:
    fake = torch.library.register_fake

    @fake("fastvit::mae_unshuffle_fwd_cuda")
    def _(x, mask_token, ids_restore, pos_embed):
        B, _, C = x.shape
        return x.new_empty((B, ids_restore.shape[1] + 1, C))

    @fake("fastvit::mae_unshuffle_bwd_cuda")
    def _(dout, ids_restore, n_keep, has_pos):
        B, T, C = dout.shape
        return (
            dout.new_empty((B, 1 + n_keep, C)),
            dout.new_empty((1, 1, C)),
            dout.new_empty((1, T, C) if has_pos else (0,)),
        )

    @fake("fastvit::mae_loss_fwd_cuda")
    def _(pred, images, patch_size, norm_pix):
        return pred.new_empty(pred.shape[:2], dtype=torch.float32)

    @fake("fastvit::mae_loss_bwd_cuda")
    def _(drow, pred, images, patch_size, norm_pix, compute_dimages):
        return pred.new_empty(pred.shape), images.new_empty(images.shape if compute_dimages else (0,))


def mae_unshuffle_cuda(x, mask_token, ids_restore, *, pos_embed=None):
    """CUDA backend of :func:`fastvit.ops.mae_unshuffle`."""
    return torch.ops.fastvit.mae_unshuffle_fwd_cuda(x, mask_token, ids_restore, pos_embed)


def mae_loss_cuda(pred, images, mask, patch_size, *, norm_pix_loss=False):
    """CUDA backend of :func:`fastvit.ops.mae_loss`: per-patch losses in a kernel, the masked mean in torch."""
    row = torch.ops.fastvit.mae_loss_fwd_cuda(pred, images, int(patch_size), bool(norm_pix_loss))
    return masked_mean(row, mask, pred.dtype)


def _register_cuda(info: dict) -> None:
    _register_cuda_fakes()
    attach("mae_unshuffle", _mae_unshuffle_autograd, "_cuda")
    attach("mae_loss", _mae_loss_autograd, "_cuda")
    caps = Capabilities(
        devices=cuda_rt.DEVICES,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        min_compute_capability=cuda_rt.MIN_COMPUTE_CAPABILITY,
    )
    register_kernel("cuda", "mae_unshuffle", mae_unshuffle_cuda, caps)
    register_kernel("cuda", "mae_loss", mae_loss_cuda, caps)


cuda_rt.on_load(_register_cuda)
