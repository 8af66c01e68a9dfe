"""The LayerNorm family: ``fastvit.ops.layer_norm`` (Ba et al., 2016) and ``fastvit.ops.rms_norm`` (Zhang &
Sennrich, 2019) with fp32 statistics, each optionally fused with the residual add of a pre-norm block, on every
backend.

* eager -- ``F.layer_norm`` (through fp32 on the CPU for half inputs, whose CPU backward would sum the weight
  gradient in the input precision); ``F.rms_norm`` through fp32 for half inputs (timm's ``RmsNormFp32``);
* autograd -- shared by the Triton and CUDA ops;
* Triton -- ``kernels/layer_norm.py`` (RMSNorm is the same kernels with ``RMS=True``):

  ==============================  =====================================================================
  ``fastvit::layer_norm_fwd``     (x, weight?, bias?, residual?, eps) -> (y, h, mean, rstd)
  ``fastvit::layer_norm_bwd``     (dy, dh?, h, weight?, mean, rstd, has_bias) -> (dx, dweight, dbias)
  ``fastvit::rms_norm_fwd``       (x, weight?, residual?, eps) -> (y, h, rstd)
  ``fastvit::rms_norm_bwd``       (dy, dh?, h, weight?, rstd) -> (dx, dweight)
  ==============================  =====================================================================

  ``h = x + residual`` (empty without ``residual``); ``mean`` / ``rstd`` are (rows,) fp32; ``dweight`` is empty
  without ``weight`` (``dbias`` without ``has_bias``).
* CUDA -- fakes of the ``_cuda`` ops (``csrc/layer_norm/``: ``fastvit::layer_norm_{fwd,bwd}_cuda`` and
  ``fastvit::rms_norm_{fwd,bwd}_cuda``, the Triton ops' schemas) and their dispatch entries.
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
from fastvit.families._checks import amp_dtype, check_like, check_tensor, mixed_dtypes
from fastvit.families._common import SELFTEST_BATCH, attach, autocast_cast, by_mode, op
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

# ============================================================================================ the op
_describe = call_builder("features")


def _prepare_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
) -> tuple:
    """The check step of both norms (``rms_norm`` passes ``bias=None``): x with a non-empty last dim C, the affine
    operands (C,) and the residual x's shape, like x (any float dtype under autocast), eps a number >= 0."""
    check_tensor("x", x)
    shape = x.shape
    if not shape or shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(shape)}")
    mixed_ok = amp_dtype(x) is not None
    if mixed_ok:
        x, weight, bias, residual = autocast_rule(x.device.type, x, weight, bias, residual)
    C, dtype, device = shape[-1], x.dtype, x.device
    # Each operand compared with x inline, handed to check_like (which names it, or accepts autocast's mixed dtypes)
    # only when that fails: the acceptance of calling check_like every time, with x's attributes read once.
    try:
        same = (
            (weight is None or (weight.dtype is dtype and weight.device == device and weight.shape == (C,)))
            and (bias is None or (bias.dtype is dtype and bias.device == device and bias.shape == (C,)))
            and (
                residual is None or (residual.dtype is dtype and residual.device == device and residual.shape == shape)
            )
        )
    except AttributeError:  # a non-tensor operand: check_like names it
        same = False
    if not same:
        check_like("weight", weight, "x", x, (C,), any_float=mixed_ok)
        check_like("bias", bias, "x", x, (C,), any_float=mixed_ok)
        check_like("residual", residual, "x", x, shape, any_float=mixed_ok)
    if eps.__class__ is not float and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mixed = mixed_ok and mixed_dtypes(x, weight, bias, residual)
    return _describe(device, dtype, features=C, mixed_dtypes=mixed), x, weight, bias, residual


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim (Ba et al., 2016) with fp32 statistics, optionally fused with a residual add.

    Args:
        x: (..., C) float.
        weight: (C,) or ``None``; bias: (C,) or ``None``; same dtype and device as ``x``.
        eps: added to the (biased) variance; timm's ViT uses 1e-6, Hugging Face's 1e-12.
        residual: tensor of ``x``'s shape or ``None``.
        backend: force a backend.

    Returns:
        ``y`` (x's shape and dtype), or ``(y, h)`` with ``h = x + residual`` and ``y = LayerNorm(h)`` when
        ``residual`` is given (the fused add of a pre-norm block).

    Raises:
        TypeError / ValueError: non-float input, mismatched shapes, dtypes or devices, eps < 0.

    Equivalent PyTorch code: ``h = x + residual; y = F.layer_norm(h, (C,), weight, bias, eps)``.
    """
    call, x, weight, bias, residual = _prepare_layer_norm(x, weight, bias, eps, residual=residual)
    return _select("layer_norm", call, backend)[1](x, weight, bias, eps, residual=residual)


def _selftest_shape(N: int, C: int, residual: bool):
    def make(g):
        B = SELFTEST_BATCH
        return {
            "x": (B, N, C),
            "weight": ((C,), 1.0),
            "bias": (C,),
            "eps": 1e-6,
            "residual": (B, N, C) if residual else None,
        }

    return make


def _tiny_calls(t, ids_restore) -> list[TinyCall]:
    x = t(2, 5, 8)
    return [TinyCall((x, t(8), t(8), 1e-6)), TinyCall((x, t(8), t(8), 1e-6), {"residual": t(2, 5, 8)}, "+residual")]


@dataclass(frozen=True)
class LayerNormCost:
    """LayerNorm over C of M rows (optionally with a fused residual add that also writes the sum).

    FLOPs: about ``8·M·C`` forward (sum, sum of squares, subtract, scale, affine; the add counts one more) and twice
    that backward. Bytes: forward reads x (and the residual), writes y (and h = x + residual) plus the (C,) weight and
    bias; backward reads x, dy and writes dx (and a second dx for the residual branch) plus dweight, dbias.
    """

    M: int
    C: int
    elem: int = 2
    residual: bool = False

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode`` (approximate: elementwise ops counted as one FLOP each)."""
        fwd = (8 + int(self.residual)) * self.M * self.C
        return by_mode(mode, fwd, 2 * fwd)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        tok = self.M * self.C * self.elem
        r = int(self.residual)
        return by_mode(mode, (2 + 2 * r) * tok + 2 * self.C * self.elem, (3 + r) * tok + 4 * self.C * self.elem)


DECLARATION = declare(
    OpDeclaration(
        name="layer_norm",
        family="layer_norm",
        args=(
            Arg("x", "tensor", "(..., C)"),
            Arg("weight", "tensor?", "(C,)"),
            Arg("bias", "tensor?", "(C,)"),
            Arg("eps", "float"),
            Arg("residual", "tensor?", "x's shape", keyword_only=True),
        ),
        call_fields=("features",),
        prepare=_prepare_layer_norm,
        function=layer_norm,
        reference=reference.layer_norm,
        # N = 1, 61, 197 tokens, C = 32, 72, 80 (see fastvit.selftest)
        selftest=(
            SelftestShape("B3 N1 C32 +residual", _selftest_shape(1, 32, True)),
            SelftestShape("B3 N61 C72 +residual", _selftest_shape(61, 72, True), quick=True),
            SelftestShape("B3 N197 C80", _selftest_shape(197, 80, False)),
        ),
        tiny_calls=_tiny_calls,
        costs={"layer_norm": LayerNormCost},
    )
)


def _prepare_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
) -> tuple:
    call, x, weight, _, residual = _prepare_layer_norm(x, weight, None, eps, residual=residual)
    return call, x, weight, residual


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim (Zhang & Sennrich, 2019) with fp32 statistics, optionally fused with a residual add.

    ``y = h * rsqrt(mean(h², -1) + eps) * weight`` with ``h = x`` (or ``x + residual``, rounded to ``x``'s dtype):
    no mean is subtracted and there is no bias. The statistics and the scaling run in fp32 and ``y`` is rounded once,
    as timm's ``RmsNormFp32``; timm's ``RmsNorm`` and ``F.rms_norm`` on half inputs round in between and agree
    within the test oracle.

    Args:
        x: (..., C) float16, bfloat16, float32 or float64.
        weight: (C,) or ``None`` (weight = 1); same dtype and device as ``x``.
        eps: added to the mean square; timm's ``RmsNorm`` uses 1e-6 (``F.rms_norm``'s ``None``, the dtype's
            machine epsilon, is not taken: pass the number).
        residual: tensor of ``x``'s shape, dtype and device, or ``None``.
        backend: force a backend.

    Returns:
        ``y`` (x's shape and dtype), or ``(y, h)`` with ``h = x + residual`` and ``y = RMSNorm(h)`` when
        ``residual`` is given (the fused add of a pre-norm block).

    Under ``torch.autocast`` on CUDA every operand runs in fp32 and ``y`` is fp32, as ``F.rms_norm`` does there;
    elsewhere autocast leaves the operands alone (any float dtype for ``weight`` / ``residual``).

    Raises:
        TypeError: ``x``, ``weight`` or ``residual`` not a float tensor, or of another dtype than ``x``; ``eps`` not
            a number.
        ValueError: ``x`` with an empty last dim; ``weight`` not of shape (C,), ``residual`` not of ``x``'s shape,
            either on another device; ``eps`` < 0.

    Equivalent PyTorch code: ``h = x + residual; y = F.rms_norm(h.float(), (C,), weight.float(), eps).to(h.dtype)``.
    """
    call, x, weight, residual = _prepare_rms_norm(x, weight, eps, residual=residual)
    return _select("rms_norm", call, backend)[1](x, weight, eps, residual=residual)


def _rms_selftest_shape(N: int, C: int, residual: bool):
    def make(g):
        B = SELFTEST_BATCH
        return {
            "x": (B, N, C),
            "weight": ((C,), 1.0),
            "eps": 1e-6,
            "residual": (B, N, C) if residual else None,
        }

    return make


def _rms_tiny_calls(t, ids_restore) -> list[TinyCall]:
    x = t(2, 5, 8)
    return [TinyCall((x, t(8), 1e-6)), TinyCall((x, t(8), 1e-6), {"residual": t(2, 5, 8)}, "+residual")]


@dataclass(frozen=True)
class RmsNormCost:
    """RMSNorm over C of M rows (optionally with a fused residual add that also writes the sum).

    FLOPs: about ``4·M·C`` forward (square, sum, scale, weight; the add counts one more) and twice that backward.
    Bytes: forward reads x (and the residual), writes y (and h = x + residual) plus the (C,) weight; backward reads
    x, dy (and the gradient of h) and writes dx plus the weight and dweight.
    """

    M: int
    C: int
    elem: int = 2
    residual: bool = False

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode`` (approximate: elementwise ops counted as one FLOP each)."""
        fwd = (4 + int(self.residual)) * self.M * self.C
        return by_mode(mode, fwd, 2 * fwd)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        tok = self.M * self.C * self.elem
        r = int(self.residual)
        return by_mode(mode, (2 + 2 * r) * tok + self.C * self.elem, (3 + r) * tok + 2 * self.C * self.elem)


RMS_DECLARATION = declare(
    OpDeclaration(
        name="rms_norm",
        family="layer_norm",
        args=(
            Arg("x", "tensor", "(..., C)"),
            Arg("weight", "tensor?", "(C,)"),
            Arg("eps", "float"),
            Arg("residual", "tensor?", "x's shape", keyword_only=True),
        ),
        call_fields=("features",),
        prepare=_prepare_rms_norm,
        function=rms_norm,
        reference=reference.rms_norm,
        # N = 1, 61, 197 tokens, C = 32, 72, 80 (see fastvit.selftest)
        selftest=(
            SelftestShape("B3 N1 C32 +residual", _rms_selftest_shape(1, 32, True)),
            SelftestShape("B3 N61 C72 +residual", _rms_selftest_shape(61, 72, True), quick=True),
            SelftestShape("B3 N197 C80", _rms_selftest_shape(197, 80, False)),
        ),
        tiny_calls=_rms_tiny_calls,
        costs={"rms_norm": RmsNormCost},
    )
)
#: This family's declarations, in declaration order.
DECLARATIONS = (DECLARATION, RMS_DECLARATION)
OPS = tuple(d.name for d in DECLARATIONS)

_k = triton_rt.kernel_module("layer_norm")


# ============================================================================================ eager
def layer_norm_eager(x, weight, bias, eps=1e-6, *, residual=None):
    """Eager :func:`fastvit.ops.layer_norm`."""
    if residual is not None:
        x = x + residual
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # PyTorch's CPU LayerNorm backward sums dweight / dbias in the input precision; go through fp32 instead.
        w = None if weight is None else weight.float()
        b = None if bias is None else bias.float()
        y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)
    else:
        y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, x)


register_kernel("eager", "layer_norm", layer_norm_eager, eager_rt.ANY_DEVICE)

_HALF = (torch.float16, torch.bfloat16)


def rms_norm_eager(x, weight, eps=1e-6, *, residual=None):
    """Eager :func:`fastvit.ops.rms_norm`: ``F.rms_norm``, through fp32 (one rounding of ``y``) for half inputs or a
    weight of another dtype (autocast's mixed operands), as timm's ``RmsNormFp32``."""
    if residual is not None:
        x = x + residual
    if x.dtype in _HALF or (weight is not None and weight.dtype is not x.dtype):
        acc = torch.promote_types(x.dtype, torch.float32)
        w = None if weight is None else weight.to(acc)
        y = F.rms_norm(x.to(acc), x.shape[-1:], w, eps).to(x.dtype)
    else:
        y = F.rms_norm(x, x.shape[-1:], weight, eps)
    return y if residual is None else (y, x)


register_kernel("eager", "rms_norm", rms_norm_eager, eager_rt.ANY_DEVICE)


# ============================================================================================ autocast
#: Device types whose autocast runs ``layer_norm`` and ``rms_norm`` in fp32 (PyTorch's CUDA "autocast to float32"
#: list has both). Elsewhere (CPU) autocast leaves ``F.layer_norm`` / ``F.rms_norm`` alone, which take a half ``x``
#: with fp32 weights and return ``x``'s dtype.
_FP32_LAYER_NORM_DEVICES = frozenset({"cuda"})


def autocast_rule(device_type: str, x, weight, bias, residual):
    """Under autocast, what ``F.layer_norm`` / ``F.rms_norm`` (after ``x + residual``) does there: on CUDA every
    operand in fp32 and an fp32 output; on other devices the operands unchanged (statistics are fp32 on every backend
    regardless). ``rms_norm`` passes ``bias=None``."""
    if device_type in _FP32_LAYER_NORM_DEVICES:
        return autocast_cast(torch.float32, x, weight, bias, residual)
    return x, weight, bias, residual


# ============================================================================================ autograd
def _layer_norm_autograd(bwd: str):
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
        dx, dw, db = op(bwd)(dy, dh, hx, weight, mean, rstd, ctx.has_bias)
        return (
            dx,
            dw if weight is not None else None,
            db if ctx.has_bias else None,
            dx if ctx.has_residual else None,
            None,
        )

    return setup, backward


def _rms_norm_autograd(bwd: str):
    def setup(ctx, inputs, output):
        x, weight, residual, eps = inputs
        y, h, rstd = output
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if residual is not None else x, weight, rstd)

    def backward(ctx, dy, dh, drstd):
        hx, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(hx)
        if not ctx.has_residual:
            dh = None
        dx, dw = op(bwd)(dy, dh, hx, weight, rstd)
        return dx, dw if weight is not None else None, dx if ctx.has_residual else None, None

    return setup, backward


# ============================================================================================ triton
def _define_triton_ops() -> None:
    triton_op = torch.library.triton_op
    last_contiguous = triton_rt.last_contiguous

    def forward(x, weight, bias, residual, eps, rms):
        """Launch ``_ln_fwd_kernel``; returns ``(y, h, mean, rstd)`` (``mean`` is ``None`` for RMSNorm)."""
        C = x.shape[-1]
        x2 = last_contiguous(x.reshape(-1, C))
        M = x2.shape[0]
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        y2 = y.view(-1, C)
        mean = None if rms else torch.empty((M,), device=x.device, dtype=torch.float32)
        rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
        if residual is not None:
            r2 = last_contiguous(residual.reshape(-1, C))
            h = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            h2 = h.view(-1, C)
        else:
            r2, h2 = x2, y2  # unused pointers (HAS_RESIDUAL is False)
            h = torch.empty((0,), device=x.device, dtype=x.dtype)
        if M:
            triton_rt.wrap(_k._ln_fwd_kernel)[(M,)](
                x2,
                r2,
                weight if weight is not None else x2,
                bias if bias is not None else x2,
                y2,
                h2,
                mean if mean is not None else rstd,  # unused with RMS
                rstd,
                x2.stride(0),
                r2.stride(0),
                y2.stride(0),
                h2.stride(0),
                C,
                eps,
                HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                BLOCK_C=_k.block_c(C),
                RMS=rms,
                num_warps=_k.num_warps_for(C),
            )
        return y, h, mean, rstd

    def backward(dy, dh, h, weight, mean, rstd, has_bias, rms):
        """Launch ``_ln_bwd_kernel``; returns ``(dx, dweight, dbias)`` (empty when not computed)."""
        cdiv = triton_rt.triton.cdiv
        C = h.shape[-1]
        h2 = last_contiguous(h.reshape(-1, C))
        dy2 = last_contiguous(dy.reshape(-1, C))
        M = h2.shape[0]
        dx = torch.empty(h.shape, device=h.device, dtype=h.dtype)
        dx2 = dx.view(-1, C)
        dh2 = last_contiguous(dh.reshape(-1, C)) if dh is not None else dy2
        rows = cdiv(M, max(1, min(M, 4 * triton_rt.num_sms(h.device)))) if M else 1
        programs = cdiv(M, rows) if M else 0
        compute_dw, compute_db = weight is not None, has_bias
        dwp = torch.empty((programs if compute_dw else 0, C), device=h.device, dtype=torch.float32)
        dbp = torch.empty((programs if compute_db else 0, C), device=h.device, dtype=torch.float32)
        if M:
            triton_rt.wrap(_k._ln_bwd_kernel)[(programs,)](
                h2,
                weight if weight is not None else h2,
                mean if mean is not None else rstd,  # unused with RMS
                rstd,
                dy2,
                dh2,
                dx2,
                dwp if compute_dw else rstd,
                dbp if compute_db else rstd,
                h2.stride(0),
                dy2.stride(0),
                dh2.stride(0),
                dx2.stride(0),
                M,
                C,
                rows,
                HAS_DH_IN=dh is not None,
                HAS_WEIGHT=weight is not None,
                COMPUTE_DW=compute_dw,
                COMPUTE_DB=compute_db,
                BLOCK_C=_k.block_c(C),
                RMS=rms,
                num_warps=_k.num_warps_for(C),
            )
        dw = dwp.sum(0).to(h.dtype) if compute_dw else torch.empty((0,), device=h.device, dtype=h.dtype)
        db = dbp.sum(0).to(h.dtype) if compute_db else torch.empty((0,), device=h.device, dtype=h.dtype)
        return dx, dw, db

    @triton_op("fastvit::layer_norm_fwd", mutates_args=())
    def layer_norm_fwd(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return forward(x, weight, bias, residual, eps, False)

    @triton_op("fastvit::layer_norm_bwd", mutates_args=())
    def layer_norm_bwd(
        dy: Tensor,
        dh: Optional[Tensor],
        h: Tensor,
        weight: Optional[Tensor],
        mean: Tensor,
        rstd: Tensor,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return backward(dy, dh, h, weight, mean, rstd, has_bias, False)

    @triton_op("fastvit::rms_norm_fwd", mutates_args=())
    def rms_norm_fwd(
        x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, h, _, rstd = forward(x, weight, None, residual, eps, True)
        return y, h, rstd

    @triton_op("fastvit::rms_norm_bwd", mutates_args=())
    def rms_norm_bwd(
        dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], rstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        dx, dw, _ = backward(dy, dh, h, weight, None, rstd, False, True)
        return dx, dw

    attach("layer_norm", _layer_norm_autograd)
    attach("rms_norm", _rms_norm_autograd)


def layer_norm_triton(x, weight, bias, eps=1e-6, *, residual=None):
    """Triton backend of :func:`fastvit.ops.layer_norm`.

    Raises:
        ValueError: ``x.shape[-1]`` above :data:`fastvit.kernels.layer_norm.MAX_C` (one row must fit in registers).
    """
    C = x.shape[-1]
    if C > _k.MAX_C:
        raise ValueError(
            f"the triton layer_norm kernel takes at most {_k.MAX_C} features, got x of shape {tuple(x.shape)}"
        )
    y, h, _, _ = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)


def rms_norm_triton(x, weight, eps=1e-6, *, residual=None):
    """Triton backend of :func:`fastvit.ops.rms_norm` (the LayerNorm kernels with ``RMS=True``).

    Raises:
        ValueError: ``x.shape[-1]`` above :data:`fastvit.kernels.layer_norm.MAX_C` (one row must fit in registers).
    """
    C = x.shape[-1]
    if C > _k.MAX_C:
        raise ValueError(
            f"the triton rms_norm kernel takes at most {_k.MAX_C} features, got x of shape {tuple(x.shape)}"
        )
    y, h, _ = torch.ops.fastvit.rms_norm_fwd(x, weight, residual, float(eps))
    return y if residual is None else (y, h)


TRITON_REGISTERED = triton_rt.register_ops("layer_norm_fwd", _define_triton_ops)


def triton_check(call) -> list[str]:
    """Reasons beyond :class:`~fastvit.backends.Capabilities` the Triton LayerNorm / RMSNorm cannot serve ``call``."""
    reasons = [] if TRITON_REGISTERED else [triton_rt.unregistered_reason()]
    c = call.get("features")
    if c is not None and c > _k.MAX_C:
        reasons.append(f"{c} features > {_k.MAX_C} (one row must fit in registers)")
    return reasons


if _k is not None:
    for _name, _fn in (("layer_norm", layer_norm_triton), ("rms_norm", rms_norm_triton)):
        register_kernel(
            "triton",
            _name,
            _fn,
            Capabilities(devices=triton_rt.DEVICES, dtypes=triton_rt.DTYPES),
            triton_check,
            check_depends_on_call_only=True,
        )
    del _name, _fn


# ============================================================================================ cuda
def _register_cuda_fakes() -> None:
    @torch.library.register_fake("fastvit::layer_norm_fwd_cuda")
    def _(x, weight, bias, residual, eps):
        rows = x.numel() // x.shape[-1]
        h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
        stat = x.new_empty((rows,), dtype=torch.float32)
        return x.new_empty(x.shape), h, stat, stat.new_empty((rows,))

    @torch.library.register_fake("fastvit::layer_norm_bwd_cuda")
    def _(dy, dh, h, weight, mean, rstd, has_bias):
        C = h.shape[-1]
        return (
            h.new_empty(h.shape),
            h.new_empty((C,) if weight is not None else (0,)),
            h.new_empty((C,) if has_bias else (0,)),
        )

    @torch.library.register_fake("fastvit::rms_norm_fwd_cuda")
    def _(x, weight, residual, eps):
        rows = x.numel() // x.shape[-1]
        h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
        return x.new_empty(x.shape), h, x.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake("fastvit::rms_norm_bwd_cuda")
    def _(dy, dh, h, weight, rstd):
        return h.new_empty(h.shape), h.new_empty((h.shape[-1],) if weight is not None else (0,))


def layer_norm_cuda(x, weight, bias, eps=1e-6, *, residual=None):
    """CUDA backend of :func:`fastvit.ops.layer_norm` (fp16 / bf16 / fp32, any feature count)."""
    y, h, _, _ = torch.ops.fastvit.layer_norm_fwd_cuda(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)


def rms_norm_cuda(x, weight, eps=1e-6, *, residual=None):
    """CUDA backend of :func:`fastvit.ops.rms_norm` (fp16 / bf16 / fp32, any feature count)."""
    y, h, _ = torch.ops.fastvit.rms_norm_fwd_cuda(x, weight, residual, float(eps))
    return y if residual is None else (y, h)


def _register_cuda(info: dict) -> None:
    _register_cuda_fakes()
    attach("layer_norm", _layer_norm_autograd, "_cuda")
    attach("rms_norm", _rms_norm_autograd, "_cuda")
    caps = Capabilities(
        devices=cuda_rt.DEVICES,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        min_compute_capability=cuda_rt.MIN_COMPUTE_CAPABILITY,
    )
    register_kernel("cuda", "layer_norm", layer_norm_cuda, caps)
    register_kernel("cuda", "rms_norm", rms_norm_cuda, caps)


cuda_rt.on_load(_register_cuda)
