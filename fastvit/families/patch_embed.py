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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import reference
from fastvit.backends import Capabilities, _select, register_kernel
from fastvit.declare import Arg, OpDeclaration, SelftestShape, TinyCall, call_builder, declare
from fastvit.families._checks import (
    amp_dtype,
    check_index,
    check_index_rows,
    check_like,
    check_tensor,
    mixed_dtypes,
    vouched,
)
from fastvit.families._common import SELFTEST_BATCH, attach, autocast_cast, by_mode, op, permutations
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

# ============================================================================================ the op
_describe = call_builder("embed_dim")


# ----------------------------------------------------------------------------------------------- ops
def _prepare_patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    reg_tokens: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
) -> tuple:
    check_tensor("images", images, 4)
    amp = amp_dtype(images)
    if amp is not None:
        images, weight, bias = autocast_rule(amp, images, weight, bias)
    check_tensor("weight", weight, 4)
    check_like("weight", weight, "images", images)
    B, C, Hi, Wi = images.shape
    E, Cw, Ph, Pw = weight.shape
    if Cw != C:
        raise ValueError(f"images has {C} channels but weight expects {Cw} (weight shape {tuple(weight.shape)})")
    if Hi % Ph or Wi % Pw:
        raise ValueError(
            f"images spatial size {Hi}x{Wi} is not divisible by the patch size {Ph}x{Pw} (weight shape "
            f"{tuple(weight.shape)})"
        )
    check_like("bias", bias, "images", images, (E,))
    mixed_ok = amp is not None  # under autocast the epilogue operands keep their dtype
    check_like("cls_token", cls_token, "images", images, (1, 1, E), any_float=mixed_ok)
    if reg_tokens is not None:
        check_like("reg_tokens", reg_tokens, "images", images, any_float=mixed_ok)
        if reg_tokens.dim() != 3 or reg_tokens.shape[0] != 1 or reg_tokens.shape[2] != E:
            raise ValueError(f"reg_tokens must have shape (1, R, {E}), got {tuple(reg_tokens.shape)}")
    num_patches = (Hi // Ph) * (Wi // Pw)
    num_prefix = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
    if pos_embed is not None:
        check_like("pos_embed", pos_embed, "images", images, any_float=mixed_ok)
        allowed = {num_patches, num_patches + num_prefix}
        if (
            pos_embed.dim() != 3
            or pos_embed.shape[0] != 1
            or pos_embed.shape[2] != E
            or pos_embed.shape[1] not in allowed
        ):
            raise ValueError(
                f"pos_embed must have shape (1, L, {E}) with L in {sorted(allowed)} ({num_patches} patches for "
                f"{Hi}x{Wi} images, {num_prefix} prefix tokens), got {tuple(pos_embed.shape)}"
            )
    if ids_keep is not None:
        check_index("ids_keep", ids_keep, 2, "images", images)
        if ids_keep.shape[0] != B or ids_keep.shape[1] > num_patches:
            raise ValueError(f"ids_keep must have shape ({B}, N_keep <= {num_patches}), got {tuple(ids_keep.shape)}")
        if not vouched(ids_keep, num_patches):
            check_index_rows("ids_keep", ids_keep, num_patches, "each kept patch appears once")
        ids_keep = ids_keep.long()
    mixed = mixed_ok and mixed_dtypes(images, pos_embed, cls_token, reg_tokens)
    return (
        _describe(images.device, images.dtype, embed_dim=E, mixed_dtypes=mixed),
        images,
        weight,
        bias,
        pos_embed,
        cls_token,
        reg_tokens,
        ids_keep,
    )


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    reg_tokens: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embedding + position embedding + prefix tokens, optionally keeping only some patches (MAE).

    Equal to timm's ``PatchEmbed`` (a stride-P convolution, flattened) followed by ``VisionTransformer._pos_embed``,
    and to MAE's encoder embedding (``patch_embed``, ``+ pos_embed[:, 1:]``, masking, ``cls_token + pos_embed[:, :1]``
    prepended).

    Args:
        images: (B, C, Hi, Wi) float; Hi and Wi divisible by the patch size.
        weight: (E, C, Ph, Pw) projection, same dtype and device as ``images``.
        bias: (E,) or ``None``.
        pos_embed: (1, L, E) or ``None``. With L = Np + R (Np = (Hi/Ph)·(Wi/Pw) patches, R prefix tokens) the
            prefix tokens get ``pos_embed[:, :R]`` (timm's default, MAE); with L = Np only the patches get a position
            (timm's ``no_embed_class=True``).
        cls_token: (1, 1, E) or ``None``.
        reg_tokens: (1, R_reg, E) register tokens (Darcet et al., 2024) or ``None``; placed after the cls token.
        ids_keep: (B, N_keep) int64 patch indices to keep (after the position add), no repeats within a row, or
            ``None`` for all.
        backend: force a backend (see :mod:`fastvit.backends`).

    Returns:
        (B, R + N_keep, E) tokens in ``images``' dtype (N_keep = Np without ``ids_keep``).

    Raises:
        TypeError: a non-tensor, non-float or dtype-mismatched argument.
        ValueError: wrong ranks or shapes, image size not divisible by the patch size, channel mismatch,
            ``ids_keep`` out of range or repeating an index, tensors on different devices.

    Equivalent PyTorch code::

        x = F.conv2d(images, weight, bias, stride=(Ph, Pw)).flatten(2).transpose(1, 2)
        x = torch.cat([cls_token, reg_tokens, x], 1) + pos_embed          # L = Np + R
        # MAE: x = x[:, R:].gather(1, ids_keep[..., None].expand(-1, -1, E)), then prefix again
    """
    call, images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep = _prepare_patch_embed(
        images, weight, bias, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep
    )
    return _select("patch_embed", call, backend)[1](
        images, weight, bias, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep
    )


def _selftest_shape(grid: tuple[int, int], P: int, C: int, E: int, cls: bool, n_keep: int | None):
    def make(g):
        B, (gh, gw) = SELFTEST_BATCH, grid
        Np, R = gh * gw, int(cls)
        return {
            "images": (B, C, gh * P, gw * P),
            "weight": ((E, C, P, P), (C * P * P) ** -0.5),
            "bias": (E,),
            "pos_embed": (1, Np + R, E),
            "cls_token": (1, 1, E) if cls else None,
            "ids_keep": permutations(B, Np, g)[:, :n_keep] if n_keep is not None else None,
        }

    return make


def _tiny_calls(t, ids_restore) -> list[TinyCall]:
    return [TinyCall((t(2, 3, 8, 8), t(8, 3, 4, 4), t(8)), {"pos_embed": t(1, 5, 8), "cls_token": t(1, 1, 8)})]


@dataclass(frozen=True)
class PatchEmbedCost:
    """Patch embedding of (B, Cin, S, S) images with P×P patches into E channels, keeping ``Nk`` of the
    ``(S/P)²`` patches (all by default) and prepending ``prefix`` tokens.

    FLOPs: the GEMM ``2·B·Nk·E·Cin·P²`` plus one add per output element for the position embedding. Bytes: read the
    images (only the kept patches when masking), the weight, bias and position table; write (B, prefix + Nk, E);
    read the int64 ``ids_keep`` when masking. Backward: dW, db, dpos (no image gradient).
    """

    B: int
    Cin: int
    S: int
    P: int
    E: int
    prefix: int = 1
    Nk: int | None = None
    elem: int = 2

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode``."""
        nk = self._nk()
        fwd = 2 * self.B * nk * self.E * self.Cin * self.P * self.P + self.B * (nk + self.prefix) * self.E
        return by_mode(mode, fwd, fwd)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        nk, np_ = self._nk(), (self.S // self.P) ** 2
        e = self.elem
        w = self.E * self.Cin * self.P * self.P * e + self.E * e + (np_ + self.prefix) * self.E * e
        img = self.B * nk * self.Cin * self.P * self.P * e
        out = self.B * (nk + self.prefix) * self.E * e
        ids = self.B * nk * 8 if self.Nk is not None else 0
        return by_mode(mode, img + w + out + ids, out + img + w + ids)

    def _nk(self) -> int:
        return self.Nk if self.Nk is not None else (self.S // self.P) ** 2


DECLARATION = declare(
    OpDeclaration(
        name="patch_embed",
        family="patch_embed",
        args=(
            Arg("images", "tensor", "(B, C, Hi, Wi)"),
            Arg("weight", "tensor", "(E, C, Ph, Pw)"),
            Arg("bias", "tensor?", "(E,)"),
            Arg("pos_embed", "tensor?", "(1, L, E), L = Np or Np + R", keyword_only=True),
            Arg("cls_token", "tensor?", "(1, 1, E)", keyword_only=True),
            Arg("reg_tokens", "tensor?", "(1, R_reg, E)", keyword_only=True),
            Arg("ids_keep", "index", "(B, N_keep) in [0, Np)", keyword_only=True),
        ),
        call_fields=("embed_dim",),
        prepare=_prepare_patch_embed,
        function=patch_embed,
        reference=reference.patch_embed,
        # N = 1, 61, 197 tokens, E = 32, 72, 80, and MAE's kept patches (see fastvit.selftest)
        selftest=(
            SelftestShape("B3 N1 E32 (1 patch, no cls)", _selftest_shape((1, 1), 2, 3, 32, False, None)),
            SelftestShape("B3 N61 E72 (6x10 patches + cls)", _selftest_shape((6, 10), 2, 3, 72, True, None), True),
            SelftestShape("B3 N197 E80 (14x14 patches + cls)", _selftest_shape((14, 14), 2, 3, 80, True, None)),
            SelftestShape(
                "B3 N50 E32 (MAE: 49 of 196 patches + cls)", _selftest_shape((14, 14), 2, 3, 32, True, 49), True
            ),
        ),
        tiny_calls=_tiny_calls,
        costs={"patch_embed": PatchEmbedCost},
    )
)
OPS = (DECLARATION.name,)

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


# ============================================================================================ autocast
def autocast_rule(amp: torch.dtype, images, weight, bias):
    """Under autocast, as ``F.conv2d``: the GEMM operands (images, weight, bias) in the autocast dtype. The epilogue
    operands (pos_embed, cls / register tokens) keep their dtype, and the output has the promoted dtype of the two,
    as timm's ``cat`` + ``+ pos_embed`` on the convolution's output give (fp32 for fp32 parameters)."""
    return autocast_cast(amp, images, weight, bias)


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
