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

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastvit import reference
from fastvit.backends import Capabilities, _select, register_kernel
from fastvit.declare import Arg, OpDeclaration, SelftestShape, TinyCall, call_builder, declare
from fastvit.families._checks import amp_dtype, check_index, check_index_rows, check_like, check_tensor, vouch, vouched
from fastvit.families._common import SELFTEST_BATCH, attach, autocast_cast, by_mode, op, permutations
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

# ============================================================================================ the ops
_describe_unshuffle = call_builder()
_describe_loss = call_builder("patch_row")


def random_masking(
    batch_size: int,
    seq_len: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking (He et al., 2022, sec. 3; ``models_mae.random_masking``).

    Keeps ``int(seq_len * (1 - mask_ratio))`` patches per sample: the ones with the smallest ``noise``.

    Args:
        batch_size: B >= 1.
        seq_len: number of patches N >= 1 (no cls token).
        mask_ratio: fraction to drop, in [0, 1).
        noise: (B, N) float, or ``None`` to draw uniform noise (with ``generator`` on ``device``).

    Returns:
        ``ids_keep`` (B, N_keep) int64, ``ids_restore`` (B, N) int64 (argsort of the shuffle), and ``mask``
        (B, N) float32 with 0 = kept, 1 = removed, in the original patch order. Given to :func:`patch_embed` /
        :func:`mae_unshuffle` unchanged, ``ids_keep`` / ``ids_restore`` skip those ops' value checks (they are
        valid by construction); indices from anywhere else, or written to in place since, are checked (one sort
        and one host sync).

    Raises:
        ValueError: ``mask_ratio`` outside [0, 1), non-positive sizes, ``noise`` of the wrong shape.
        TypeError: ``noise`` not a float tensor.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    if noise is not None:
        check_tensor("noise", noise, 2)
        if tuple(noise.shape) != (batch_size, seq_len):
            raise ValueError(f"noise must have shape ({batch_size}, {seq_len}), got {tuple(noise.shape)}")
    ids_keep, ids_restore, mask = reference.random_masking(
        batch_size, seq_len, mask_ratio, noise=noise, generator=generator, device=device
    )
    if not torch.compiler.is_compiling():
        vouch(ids_keep, seq_len)
        vouch(ids_restore, seq_len)
    return ids_keep, ids_restore, mask


def _prepare_mae_unshuffle(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
) -> tuple:
    check_tensor("x", x, 3)
    if amp_dtype(x) is not None:
        x, mask_token, pos_embed = autocast_unshuffle_rule(x, mask_token, pos_embed)
    B, T, C = x.shape
    check_like("mask_token", mask_token, "x", x, (1, 1, C))
    check_index("ids_restore", ids_restore, 2, "x", x)
    N = ids_restore.shape[1]
    if ids_restore.shape[0] != B:
        raise ValueError(f"ids_restore must have shape ({B}, N), got {tuple(ids_restore.shape)}")
    if not 1 <= T <= N + 1:
        raise ValueError(f"x must hold 1 + N_keep tokens with N_keep <= N = {N}, got {T} tokens")
    if not vouched(ids_restore, N):
        check_index_rows("ids_restore", ids_restore, N, "each row is a permutation of 0..N-1")
    check_like("pos_embed", pos_embed, "x", x, (1, N + 1, C))
    return (
        _describe_unshuffle(x.device, x.dtype),
        x,
        mask_token,
        ids_restore.long(),
        pos_embed,
    )


def mae_unshuffle(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE decoder input: fill the removed positions with ``mask_token``, undo the shuffle, add position.

    Args:
        x: (B, 1 + N_keep, C) decoder-embedded encoder output, cls token first.
        mask_token: (1, 1, C).
        ids_restore: (B, N) int64 from :func:`random_masking`: each row a permutation of 0..N-1.
        pos_embed: (1, 1 + N, C) decoder position embedding, or ``None``.
        backend: force a backend.

    Returns:
        (B, 1 + N, C) in ``x``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices, N_keep > N, ``ids_restore`` not a permutation.

    Equivalent PyTorch code (models_mae.forward_decoder)::

        x_ = torch.cat([x[:, 1:], mask_token.repeat(B, N + 1 - x.shape[1], 1)], 1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, C))
        out = torch.cat([x[:, :1], x_], 1) + pos_embed
    """
    call, x, mask_token, ids_restore, pos_embed = _prepare_mae_unshuffle(
        x, mask_token, ids_restore, pos_embed=pos_embed
    )
    return _select("mae_unshuffle", call, backend)[1](x, mask_token, ids_restore, pos_embed=pos_embed)


def _prepare_mae_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix_loss: bool = False,
) -> tuple:
    check_tensor("pred", pred, 3)
    check_tensor("images", images, 4)
    if amp_dtype(pred) is not None:
        pred, images = autocast_loss_rule(pred, images)
    check_tensor("mask", mask, 2)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    B, C, Hi, Wi = images.shape
    if Hi % patch_size or Wi % patch_size:
        raise ValueError(f"images spatial size {Hi}x{Wi} is not divisible by patch_size {patch_size}")
    N = (Hi // patch_size) * (Wi // patch_size)
    expected = (B, N, patch_size * patch_size * C)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {expected} for images {tuple(images.shape)}, got {tuple(pred.shape)}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must have shape {(B, N)}, got {tuple(mask.shape)}")
    for name, t in (("images", images), ("mask", mask)):
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device} but pred is on {pred.device}; expected the same device")
    call = _describe_loss(pred.device, pred.dtype, patch_row=pred.shape[-1])
    return call, pred, images


def mae_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix_loss: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE's reconstruction loss: mean squared error on the removed patches only (He et al., 2022, sec. 3).

    Args:
        pred: (B, N, P·P·C) decoder output, MAE's (p, q, c) order within a patch.
        images: (B, C, Hi, Wi), Hi and Wi divisible by P; same device as ``pred``.
        mask: (B, N), 1 for removed patches, 0 for kept ones.
        patch_size: P.
        norm_pix_loss: normalise each target patch by its mean and unbiased std (+1e-6 on the variance).
        backend: force a backend.

    Returns:
        0-D tensor in ``pred``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes or devices, image size not divisible by ``patch_size``.

    Equivalent PyTorch code: ``((pred - patchify(images)) ** 2).mean(-1).mul(mask).sum() / mask.sum()``.
    """
    call, pred, images = _prepare_mae_loss(pred, images, mask, patch_size, norm_pix_loss=norm_pix_loss)
    return _select("mae_loss", call, backend)[1](pred, images, mask, patch_size, norm_pix_loss=norm_pix_loss)


def _unshuffle_shape(N: int, n_keep: int, C: int, pos: bool):
    def make(g):
        B = SELFTEST_BATCH
        return {
            "x": (B, 1 + n_keep, C),
            "mask_token": (1, 1, C),
            "ids_restore": torch.argsort(permutations(B, N, g), 1),
            "pos_embed": (1, N + 1, C) if pos else None,
        }

    return make


def _loss_shape(grid: tuple[int, int], P: int, C: int, norm_pix: bool):
    def make(g):
        B, (gh, gw) = SELFTEST_BATCH, grid
        N = gh * gw
        mask = (torch.rand(B, N, generator=g) < 0.75).float()
        mask[0, 0] = 1.0  # at least one removed patch
        return {
            "pred": (B, N, P * P * C),
            "images": (B, C, gh * P, gw * P),
            "mask": mask,
            "patch_size": P,
            "norm_pix_loss": norm_pix,
        }

    return make


def _unshuffle_tiny(t, ids_restore) -> list[TinyCall]:
    # ids_restore as an MAE step makes them (vouched for: no value check), and as a user might (value-checked)
    given = torch.stack([torch.randperm(ids_restore.shape[1]) for _ in range(ids_restore.shape[0])])
    given = given.to(ids_restore.device)
    N = ids_restore.shape[1]
    return [
        TinyCall((t(2, 3, 8), t(1, 1, 8), ids_restore), {"pos_embed": t(1, 1 + N, 8)}),
        TinyCall((t(2, 3, 8), t(1, 1, 8), given), {"pos_embed": t(1, 1 + N, 8)}, "+given_ids", value_check=True),
    ]


def _loss_tiny(t, ids_restore) -> list[TinyCall]:
    mask = (t(2, 4) > 0).to(t(1).dtype)
    return [TinyCall((t(2, 4, 48), t(2, 3, 8, 8), mask, 4))]


@dataclass(frozen=True)
class MaeUnshuffleCost:
    """MAE decoder input: (B, 1 + Nk, C) kept tokens -> (B, 1 + N, C) with mask tokens, un-shuffled, + pos-embed.

    FLOPs: one add per output element. Bytes: read the kept tokens, the (1 + N, C) position table, the mask token
    and the int64 ``ids_restore`` (B, N); write (B, 1 + N, C). Backward: read the output gradient, write the input
    gradient (and dpos, dmask_token).
    """

    B: int
    N: int
    Nk: int
    C: int
    elem: int = 2

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode``."""
        fwd = self.B * (1 + self.N) * self.C
        return by_mode(mode, fwd, fwd)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        e = self.elem
        kept = self.B * (1 + self.Nk) * self.C * e
        full = self.B * (1 + self.N) * self.C * e
        pos = (1 + self.N) * self.C * e
        ids = self.B * self.N * 8
        return by_mode(mode, kept + full + pos + ids + self.C * e, full + kept + pos + ids + self.C * e)


# N = 1, 61, 197 tokens, C (or the patch row P·P·C) = 32, 72, 80 (see fastvit.selftest)
DECLARATIONS = (
    declare(
        OpDeclaration(
            name="mae_unshuffle",
            family="mae",
            args=(
                Arg("x", "tensor", "(B, 1 + N_keep, C)"),
                Arg("mask_token", "tensor", "(1, 1, C)"),
                Arg("ids_restore", "index", "(B, N), each row a permutation"),
                Arg("pos_embed", "tensor?", "(1, 1 + N, C)", keyword_only=True),
            ),
            call_fields=(),
            prepare=_prepare_mae_unshuffle,
            function=mae_unshuffle,
            reference=reference.mae_unshuffle,
            selftest=(
                SelftestShape("B3 N2 C32 (1 patch, none kept)", _unshuffle_shape(1, 0, 32, True)),
                SelftestShape("B3 N61 C72 (15 of 60 kept)", _unshuffle_shape(60, 15, 72, True), quick=True),
                SelftestShape("B3 N197 C80 (49 of 196 kept, no pos)", _unshuffle_shape(196, 49, 80, False)),
            ),
            tiny_calls=_unshuffle_tiny,
            costs={"mae_unshuffle": MaeUnshuffleCost},
        )
    ),
    declare(
        OpDeclaration(
            name="mae_loss",
            family="mae",
            args=(
                Arg("pred", "tensor", "(B, N, P·P·C)"),
                Arg("images", "tensor", "(B, C, Hi, Wi)"),
                Arg("mask", "tensor", "(B, N)"),
                Arg("patch_size", "int"),
                Arg("norm_pix_loss", "bool", keyword_only=True),
            ),
            call_fields=("patch_row",),
            prepare=_prepare_mae_loss,
            function=mae_loss,
            reference=reference.mae_loss,
            selftest=(
                SelftestShape("B3 N1 P4 C2 (row 32)", _loss_shape((1, 1), 4, 2, False)),
                SelftestShape("B3 N61 P2 C18 (row 72) norm_pix", _loss_shape((1, 61), 2, 18, True), quick=True),
                SelftestShape("B3 N196 P4 C5 (row 80) norm_pix", _loss_shape((14, 14), 4, 5, True)),
            ),
            tiny_calls=_loss_tiny,
        )
    ),
)
OPS = tuple(d.name for d in DECLARATIONS)

_k = triton_rt.kernel_module("mae")

register_kernel("eager", "mae_unshuffle", reference.mae_unshuffle, eager_rt.ANY_DEVICE)
register_kernel("eager", "mae_loss", reference.mae_loss, eager_rt.ANY_DEVICE)


def masked_mean(row: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """MAE's reduction of per-patch losses: ``(row * mask).sum() / mask.sum()`` in fp32, returned in ``dtype``.

    Both kernel backends compute ``row`` (B, N) fp32 in a kernel (``mae_loss_fwd``) and finish with this.
    """
    m = mask.float() if mask.dtype in (torch.float16, torch.bfloat16) else mask
    return ((row * m).sum() / m.sum()).to(dtype)


# ============================================================================================ autocast
def autocast_unshuffle_rule(x, mask_token, pos_embed):
    """Under autocast, as MAE's ``cat`` / ``gather`` / ``+ pos_embed`` (no matmul): every operand in their promoted
    dtype (fp32 when the mask token and position table are fp32 parameters), which is the output's dtype."""
    dtype = x.dtype
    for t in (mask_token, pos_embed):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return autocast_cast(dtype, x, mask_token, pos_embed)


def autocast_loss_rule(pred, images):
    """Under autocast the reconstruction loss computes in fp32 (as ``(pred - target) ** 2`` against fp32 images does,
    and as PyTorch's autocast runs ``mse_loss``): pred and images in fp32, an fp32 loss."""
    return autocast_cast(torch.float32, pred, images)


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
