"""Autograd for the registered ``fastvit::`` kernel ops, shared by the Triton and the CUDA C++ backends.

Both backends register the same op *schemas* (the CUDA ones carry a ``_cuda`` suffix: ``fastvit::attention_fwd``
is Triton's, ``fastvit::attention_fwd_cuda`` the extension's), so one ``setup_context`` / ``backward`` pair per
family serves both: :func:`attach` registers them with ``torch.library.register_autograd`` on the forward op of a
backend, and the backward calls that backend's ``*_bwd`` op. Registering on the op (rather than wrapping it in a
``torch.autograd.Function``) keeps ``torch.compile(fullgraph=True)`` tracing through it.

Schemas (``?`` = optional; every ``*_bwd`` op is a registered op too):

=====================  ==========================================================  ==================================
forward op             arguments                                                   returns
=====================  ==========================================================  ==================================
attention_fwd          qkv (B, N, 3C), num_heads, scale                            o (B, N, C), lse (B, H, N) fp32
sdpa_fwd               q, k, v (B, H, N, D), scale                                 o (B, H, Nq, D), lse (B, H, Nq)
layer_norm_fwd         x, weight?, bias?, residual?, eps                           y, h (x + residual or empty),
                                                                                   mean, rstd (rows,) fp32
linear_gelu_fwd        x, weight, bias?, approximate, save_h                       y, h (pre-activation or empty)
linear_residual_fwd    x, weight, bias?, residual, gamma?, save_z                  y, z (x Wᵀ + b or empty)
patch_embed_fwd        images, weight, bias?, pos_embed?, cls_token?,              out (B, R + N_keep, E)
                       reg_tokens?, ids_keep?
mae_unshuffle_fwd      x, mask_token, ids_restore, pos_embed?                      out (B, 1 + N, C)
mae_loss_fwd           pred, images, patch_size, norm_pix                          row (B, N) fp32
=====================  ==========================================================  ==================================
"""

from __future__ import annotations

import torch

__all__ = ["FAMILIES", "attach", "masked_mean", "needs_grad"]


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a gradient through any of ``tensors`` (``None`` entries ignored): the forward ops
    store what their backward needs (a pre-activation, ``z``) only then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _op(name: str):
    return getattr(torch.ops.fastvit, name)


# ------------------------------------------------------------------------------------------- attention
def _attention(bwd: str):
    def setup(ctx, inputs, output):
        qkv, num_heads, scale = inputs
        o, lse = output
        ctx.save_for_backward(qkv, o, lse)
        ctx.num_heads, ctx.scale = num_heads, scale

    def backward(ctx, do, dlse):
        qkv, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        return _op(bwd)(do, qkv, o, lse, ctx.num_heads, ctx.scale), None, None

    return setup, backward


def _sdpa(bwd: str):
    def setup(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale

    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _op(bwd)(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    return setup, backward


# ------------------------------------------------------------------------------------------- layer norm
def _layer_norm(bwd: str):
    def setup(ctx, inputs, output):
        x, weight, bias, residual, eps = inputs
        y, h, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)

    def backward(ctx, dy, dh, dmean, drstd):
        hx, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(hx)
        if not ctx.has_residual:
            dh = None
        dx, dw, db = _op(bwd)(dy, dh, hx, weight, mean, rstd, ctx.has_bias)
        return (
            dx,
            dw if weight is not None else None,
            db if ctx.has_bias else None,
            dx if ctx.has_residual else None,
            None,
        )

    return setup, backward


# ------------------------------------------------------------------------------------------- linear
def _linear_gelu(bwd: str):
    def setup(ctx, inputs, output):
        x, weight, bias, approximate, save_h = inputs
        y, h = output
        ctx.mark_non_differentiable(h)
        ctx.approximate, ctx.has_bias, ctx.save_h = approximate, bias is not None, save_h
        ctx.save_for_backward(x, weight, h)

    def backward(ctx, dy, dh):
        x, weight, h = ctx.saved_tensors
        if not ctx.save_h:
            raise RuntimeError(f"fastvit::{bwd.replace('_bwd', '_fwd')} was called with save_h=False, so its "
                               "pre-activation was not stored and it cannot be differentiated; call it with "
                               "save_h=True")
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dw, db = _op(bwd)(dy, x, weight, h, ctx.approximate, ctx.has_bias)
        return dx, dw, (db if ctx.has_bias else None), None, None

    return setup, backward


def _linear_residual(bwd: str):
    def setup(ctx, inputs, output):
        x, weight, bias, residual, gamma, save_z = inputs
        y, z = output
        ctx.mark_non_differentiable(z)
        ctx.has_bias, ctx.has_gamma, ctx.save_z = bias is not None, gamma is not None, save_z
        ctx.save_for_backward(x, weight, gamma, z)

    def backward(ctx, dy, dz):
        x, weight, gamma, z = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros((*x.shape[:-1], weight.shape[0]), device=x.device, dtype=x.dtype)
        if ctx.has_gamma and not ctx.save_z and ctx.needs_input_grad[4]:
            raise RuntimeError(f"fastvit::{bwd.replace('_bwd', '_fwd')} was called with save_z=False, so dgamma "
                               "cannot be computed; call it with save_z=True")
        dx, dw, db, dgamma = _op(bwd)(dy, x, weight, gamma, z if ctx.save_z else None, ctx.has_bias)
        return (dx, dw, db if ctx.has_bias else None, dy,
                dgamma if (ctx.has_gamma and ctx.save_z) else None, None)

    return setup, backward


# ------------------------------------------------------------------------------------------- patch embed
def _patch_embed(bwd: str):
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
        dimg, dw, db, dpos, dcls, dreg = _op(bwd)(
            dout, images, weight, ids_keep, ctx.pos_len, ctx.n_cls, ctx.n_reg, bool(ctx.needs_input_grad[0]))
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


# ------------------------------------------------------------------------------------------- MAE
def _mae_unshuffle(bwd: str):
    def setup(ctx, inputs, output):
        x, mask_token, ids_restore, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.n_keep = x.shape[1] - 1
        ctx.has_pos = pos_embed is not None

    def backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        dx, dmask, dpos = _op(bwd)(dout, ids_restore, ctx.n_keep, ctx.has_pos)
        return dx, dmask, None, (dpos if ctx.has_pos else None)

    return setup, backward


def _mae_loss(bwd: str):
    def setup(ctx, inputs, output):
        pred, images, patch_size, norm_pix = inputs
        ctx.save_for_backward(pred, images)
        ctx.patch_size, ctx.norm_pix = patch_size, norm_pix

    def backward(ctx, drow):
        pred, images = ctx.saved_tensors
        want_img = bool(ctx.needs_input_grad[1])
        dpred, dimg = _op(bwd)(drow, pred, images, ctx.patch_size, ctx.norm_pix, want_img)
        return dpred, (dimg if want_img else None), None, None

    return setup, backward


#: family -> builder of (setup_context, backward) given the backward op's name.
FAMILIES = {
    "attention": _attention,
    "sdpa": _sdpa,
    "layer_norm": _layer_norm,
    "linear_gelu": _linear_gelu,
    "linear_residual": _linear_residual,
    "patch_embed": _patch_embed,
    "mae_unshuffle": _mae_unshuffle,
    "mae_loss": _mae_loss,
}


def attach(family: str, suffix: str = "") -> None:
    """Register autograd on ``fastvit::{family}_fwd{suffix}``, differentiated by ``fastvit::{family}_bwd{suffix}``.

    Args:
        family: a key of :data:`FAMILIES`.
        suffix: ``""`` for the Triton ops, ``"_cuda"`` for the CUDA C++ ones.

    Raises:
        KeyError: unknown ``family``.
    """
    setup, backward = FAMILIES[family](f"{family}_bwd{suffix}")
    torch.library.register_autograd(f"fastvit::{family}_fwd{suffix}", backward, setup_context=setup)


def masked_mean(row: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MAE's reduction of per-patch losses: ``(row * mask).sum() / mask.sum()`` in fp32, returned in ``dtype``.

    Both kernel backends compute ``row`` (B, N) fp32 in a kernel (``mae_loss_fwd``) and finish with this.
    """
    m = mask.float() if mask.dtype in (torch.float16, torch.bfloat16) else mask
    return ((row * m).sum() / m.sum()).to(dtype)
