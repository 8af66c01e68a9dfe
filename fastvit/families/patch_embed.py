"""The patch-embedding family: ``fastvit.ops.patch_embed`` -- im2col gather from NCHW + GEMM + bias + position
embedding + cls / register tokens, optionally embedding only the ``ids_keep`` patches (MAE) -- on every backend.

* eager -- timm's order: a stride-P ``F.conv2d``, flatten, transpose, prefix tokens, position add (MAE's order with
  ``ids_keep``: position add, gather, prefix);
* autograd -- shared by the Triton and CUDA ops;
* Triton -- ``kernels/patch_embed.py``:

  =================================  ==========================================================================
  ``fastvit::patch_embed_fwd``       (images, weight, bias?, pos_embed?, cls_token?, reg_tokens?, ids_keep?)
                                     -> out (B, R + N_keep, E)
  ``fastvit::patch_embed_bwd``       (dout, images, weight, ids_keep?, pos_len, n_cls, n_reg, compute_dimages)
                                     -> (dimages, dweight, dbias, dpos, dcls, dreg)
  =================================  ==========================================================================

* CUDA -- fakes and dispatch entries of the ``_cuda`` ops (``csrc/patch_embed/``); E must be a multiple of the
  build's GEMM alignment.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit.backends import Capabilities, declare_ops, register_kernel
from fastvit.families._common import attach, op
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

OPS = declare_ops("patch_embed", ("patch_embed",))

_k = triton_rt.kernel_module("patch_embed")


# ============================================================================================ eager
def patch_embed_eager(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    """Eager :func:`fastvit.ops.patch_embed`."""
    B = images.shape[0]
    E = weight.shape[0]
    x = F.conv2d(images, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    prefix = [t.expand(B, -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    num_prefix = sum(t.shape[1] for t in prefix)
    if pos_embed is not None and pos_embed.shape[1] == x.shape[1] + num_prefix:
        if ids_keep is None:  # timm's order: concatenate, then add
            return torch.cat([*prefix, x], dim=1) + pos_embed if prefix else x + pos_embed
        x = x + pos_embed[:, num_prefix:]
        prefix = [torch.cat(prefix, dim=1) + pos_embed[:, :num_prefix]] if prefix else []
    elif pos_embed is not None:
        x = x + pos_embed
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, E))
    return torch.cat([*prefix, x], dim=1) if prefix else x


register_kernel("eager", "patch_embed", patch_embed_eager, eager_rt.ANY_DEVICE)


# ============================================================================================ autograd
def _patch_embed_autograd(bwd: str):
    def setup(ctx, inputs, output):
        images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep = inputs
        ctx.save_for_backward(images, weight, ids_keep)
        ctx.has_bias = bias is not None
        ctx.pos_len = pos_embed.shape[1] if pos_embed is not None else 0
        ctx.n_cls = 1 if cls_token is not None else 0
        ctx.n_reg = reg_tokens.shape[1] if reg_tokens is not None else 0
        ctx.has_reg = reg_tokens is not None

    def backward(ctx, dout):
        images, weight, ids_keep = ctx.saved_tensors
        dimg, dw, db, dpos, dcls, dreg = op(bwd)(
            dout, images, weight, ids_keep, ctx.pos_len, ctx.n_cls, ctx.n_reg, bool(ctx.needs_input_grad[0])
        )
        return (
            dimg if ctx.needs_input_grad[0] else None,
            dw,
            db if ctx.has_bias else None,
            dpos if ctx.pos_len else None,
            dcls if ctx.n_cls else None,
            dreg if ctx.has_reg else None,
            None,
        )

    return setup, backward


# ============================================================================================ triton
def _pe_geometry(images, weight, pos_embed, cls_token, reg_tokens):
    """(B, C, E, Ph, Pw, K, grid_w, Np, R, pos_off, prefix_has_pos)."""
    B, C, Hi, Wi = images.shape
    E, _, Ph, Pw = weight.shape
    Np = (Hi // Ph) * (Wi // Pw)
    R = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
    prefix_pos = pos_embed is not None and pos_embed.shape[1] == Np + R
    return B, C, E, Ph, Pw, C * Ph * Pw, Wi // Pw, Np, R, (R if prefix_pos else 0), prefix_pos


def _define_triton_ops() -> None:
    triton_op = torch.library.triton_op

    @triton_op("fastvit::patch_embed_fwd", mutates_args=())
    def patch_embed_fwd(
        images: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        pos_embed: Optional[Tensor],
        cls_token: Optional[Tensor],
        reg_tokens: Optional[Tensor],
        ids_keep: Optional[Tensor],
    ) -> Tensor:
        B, C, E, Ph, Pw, K, grid_w, Np, R, pos_off, prefix_pos = _pe_geometry(
            images, weight, pos_embed, cls_token, reg_tokens
        )
        w2 = weight.reshape(E, K).contiguous()
        ids = triton_rt.last_contiguous(ids_keep) if ids_keep is not None else None
        Nk = ids.shape[1] if ids is not None else Np
        out = torch.empty((B, R + Nk, E), device=images.device, dtype=images.dtype)
        pos = triton_rt.last_contiguous(pos_embed[0]) if pos_embed is not None else out[0]
        if B and Nk and E:
            triton_rt.wrap(_k.pe_fwd)[
                lambda meta: (triton_rt.triton.cdiv(Nk, meta["BLOCK_M"]), triton_rt.triton.cdiv(E, meta["BLOCK_N"]), B)
            ](
                images,
                w2,
                bias if bias is not None else w2,
                ids if ids is not None else out,
                pos,
                out,
                *images.stride(),
                w2.stride(0),
                ids.stride(0) if ids is not None else 0,
                pos.stride(0),
                out.stride(0),
                out.stride(1),
                Nk,
                E,
                K,
                grid_w,
                Ph,
                Pw,
                R,
                pos_off,
                HAS_BIAS=bias is not None,
                HAS_IDS=ids is not None,
                HAS_POS=pos_embed is not None,
                INPUT_PRECISION=triton_rt.input_precision(images.dtype),
            )
        if B and R and E:
            prefix = torch.cat([t.reshape(-1, E) for t in (cls_token, reg_tokens) if t is not None]).contiguous()
            triton_rt.wrap(_k._prefix_rows)[(R, B)](
                prefix,
                pos,
                out,
                pos.stride(0),
                out.stride(0),
                out.stride(1),
                E,
                HAS_POS=prefix_pos,
                BLOCK_E=_k.block_e(E),
            )
        return out

    @triton_op("fastvit::patch_embed_bwd", mutates_args=())
    def patch_embed_bwd(
        dout: Tensor,
        images: Tensor,
        weight: Tensor,
        ids_keep: Optional[Tensor],
        pos_len: int,
        n_cls: int,
        n_reg: int,
        compute_dimages: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> (dimages (empty unless computed), dweight, dbias (E,), dpos (1, pos_len, E) or empty, dcls, dreg)."""
        dout = triton_rt.last_contiguous(dout)
        B, C, Hi, Wi = images.shape
        E, _, Ph, Pw = weight.shape
        K, grid_w, Np, R = C * Ph * Pw, Wi // Pw, (Hi // Ph) * (Wi // Pw), n_cls + n_reg
        dev, dt = images.device, images.dtype
        w2 = weight.reshape(E, K).contiguous()
        ids = triton_rt.last_contiguous(ids_keep) if ids_keep is not None else None
        Nk = ids.shape[1] if ids is not None else Np
        prec = triton_rt.input_precision(dt)
        # d weight
        dw = torch.empty((E, K), device=dev, dtype=weight.dtype)
        if E and K:
            triton_rt.wrap(_k.pe_dw)[
                lambda meta: (triton_rt.triton.cdiv(E, meta["BLOCK_M"]), triton_rt.triton.cdiv(K, meta["BLOCK_N"]))
            ](
                images,
                dout,
                ids if ids is not None else dout,
                dw,
                *images.stride(),
                ids.stride(0) if ids is not None else 0,
                dout.stride(0),
                dout.stride(1),
                dw.stride(0),
                E,
                K,
                B,
                Nk,
                grid_w,
                Ph,
                Pw,
                R,
                HAS_IDS=ids is not None,
                INPUT_PRECISION=prec,
            )
        # d images (pixels of dropped patches stay zero)
        if compute_dimages:
            dimg = torch.zeros(images.shape, device=dev, dtype=dt)
            if B and Nk and K:
                triton_rt.wrap(_k.pe_dimg)[
                    lambda meta: (
                        triton_rt.triton.cdiv(Nk, meta["BLOCK_M"]),
                        triton_rt.triton.cdiv(K, meta["BLOCK_N"]),
                        B,
                    )
                ](
                    dout,
                    w2,
                    ids if ids is not None else dout,
                    dimg,
                    dout.stride(0),
                    dout.stride(1),
                    w2.stride(0),
                    ids.stride(0) if ids is not None else 0,
                    *dimg.stride(),
                    Nk,
                    K,
                    E,
                    grid_w,
                    Ph,
                    Pw,
                    R,
                    HAS_IDS=ids is not None,
                    INPUT_PRECISION=prec,
                )
        else:
            dimg = torch.empty((0,), device=dev, dtype=dt)
        # batch sums: per patch (through the inverse of ids_keep) and per prefix row
        s_patch = torch.empty((Np, E), device=dev, dtype=torch.float32)
        s_prefix = torch.empty((R, E), device=dev, dtype=torch.float32)
        be, bt = _k.block_e(E), _k.SUM_BLOCK_T
        if ids is not None:
            inv = torch.full((B, Np), -1, device=dev, dtype=torch.int64)
            inv.scatter_(1, ids, torch.arange(Nk, device=dev, dtype=torch.int64).expand(B, Nk).contiguous())
        else:
            inv = s_patch
        dpatch = dout[:, R:]
        if Np and E:
            triton_rt.wrap(_k._batch_sum)[(triton_rt.triton.cdiv(Np, bt), triton_rt.triton.cdiv(E, be))](
                dpatch,
                inv,
                s_patch,
                dpatch.stride(0),
                dpatch.stride(1),
                inv.stride(0),
                s_patch.stride(0),
                B,
                Np,
                E,
                HAS_INV=ids is not None,
                BLOCK_E=be,
                BLOCK_T=bt,
            )
        if R and E:
            triton_rt.wrap(_k._batch_sum)[(triton_rt.triton.cdiv(R, bt), triton_rt.triton.cdiv(E, be))](
                dout,
                s_prefix,
                s_prefix,
                dout.stride(0),
                dout.stride(1),
                0,
                s_prefix.stride(0),
                B,
                R,
                E,
                HAS_INV=False,
                BLOCK_E=be,
                BLOCK_T=bt,
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

    attach("patch_embed", _patch_embed_autograd)


def patch_embed_triton(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    """Triton backend of :func:`fastvit.ops.patch_embed` (inputs already validated there)."""
    return torch.ops.fastvit.patch_embed_fwd(images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep)


TRITON_REGISTERED = triton_rt.register_ops("patch_embed_fwd", _define_triton_ops)


def triton_check(call) -> list[str]:
    """Reasons beyond :class:`~fastvit.backends.Capabilities` the Triton patch embedding cannot serve ``call``."""
    return [] if TRITON_REGISTERED else [triton_rt.unregistered_reason()]


if _k is not None:
    register_kernel(
        "triton",
        "patch_embed",
        patch_embed_triton,
        Capabilities(devices=triton_rt.DEVICES, dtypes=triton_rt.DTYPES),
        triton_check,
        check_depends_on_call_only=True,
    )


# ============================================================================================ cuda
def _register_cuda_fakes() -> None:
    fake = torch.library.register_fake

    @fake("fastvit::patch_embed_fwd_cuda")
    def _(images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep):
        B, _, Hi, Wi = images.shape
        E, _, Ph, Pw = weight.shape
        R = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
        n_keep = ids_keep.shape[1] if ids_keep is not None else (Hi // Ph) * (Wi // Pw)
        return images.new_empty((B, R + n_keep, E))

    @fake("fastvit::patch_embed_bwd_cuda")
    def _(dout, images, weight, ids_keep, pos_len, n_cls, n_reg, compute_dimages):
        E = weight.shape[0]
        return (
            images.new_empty(images.shape if compute_dimages else (0,)),
            images.new_empty(weight.shape),
            images.new_empty((E,)),
            images.new_empty((1, pos_len, E) if pos_len else (0,)),
            images.new_empty((1, n_cls, E)),
            images.new_empty((1, n_reg, E)),
        )


def patch_embed_cuda(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    """CUDA backend of :func:`fastvit.ops.patch_embed` (im2col + CUTLASS GEMM; fp16 / bf16, E % alignment == 0)."""
    return torch.ops.fastvit.patch_embed_fwd_cuda(images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep)


def cuda_check_for(info: dict):
    """The cuda backend's extra check for this build: an embed dim the GEMM's 128-bit accesses can take."""
    align = int(info["gemm_alignment"])

    def check(call) -> list[str]:
        e = call.get("embed_dim")
        return [f"embed_dim = {e} is not a multiple of {align}"] if e is not None and e % align else []

    return check


def _register_cuda(info: dict) -> None:
    _register_cuda_fakes()
    attach("patch_embed", _patch_embed_autograd, "_cuda")
    caps = Capabilities(
        devices=cuda_rt.DEVICES,
        dtypes=cuda_rt.half_dtypes(info),
        min_compute_capability=cuda_rt.MIN_COMPUTE_CAPABILITY,
        dropout=False,
    )
    register_kernel(
        "cuda", "patch_embed", patch_embed_cuda, caps, cuda_check_for(info), check_depends_on_call_only=True
    )


cuda_rt.on_load(_register_cuda)
