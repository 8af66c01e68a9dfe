"""The linear family: ``fastvit.ops.linear_gelu`` (an MLP's fc1 with its GELU), ``fastvit.ops.linear_residual``
(``proj`` / ``fc2`` with bias, LayerScale and the residual add as the GEMM's epilogue) and ``fastvit.ops.linear_glu``
(a gated MLP's fc1 with its gating: SwiGLU / GeGLU / GLU), on every backend: the eager
implementations (``F.linear`` + ``F.gelu``, as timm), the autograd shared by both kernel backends, the Triton ops
around ``kernels/linear.py``, and the fakes, dispatch entries and checks of the CUDA ops (``csrc/linear/``).

Triton ops (``x`` is (..., K) viewed as (T, K) with T tokens; ``weight`` (N, K) as ``nn.Linear`` stores it):

=====================================  =================================================================================
``fastvit::linear_gelu_fwd``           (x, weight, bias?, approximate, save_h) -> (y (..., N), h (..., N) or (0,))
``fastvit::linear_gelu_bwd``           (dy, x, weight, h, approximate, has_bias) -> (dx, dweight, dbias or (0,))
``fastvit::linear_residual_fwd``       (x, weight, bias?, residual, gamma?, save_z) -> (y, z (..., N) or (0,))
``fastvit::linear_residual_bwd``       (dy, x, weight, gamma?, z?, has_bias) -> (dx, dweight, dbias, dgamma)
``fastvit::linear_glu_fwd``            (x, weight_gate, bias_gate?, weight_value, bias_value?, activation, save_h)
                                       -> (y (..., M), h = [h_g | h_x] (..., 2·M) or (0,))
``fastvit::linear_glu_bwd``            (dy, x, weight_gate, weight_value, h, activation, has_bias)
                                       -> (dx, dweight_gate, dweight_value, dbias_gate, dbias_value)
=====================================  =================================================================================

All outputs have ``x``'s dtype. ``h`` (the GELU input ``x Wᵀ + b``) and ``z`` (``x Wᵀ + b`` before LayerScale) are
saved activations for the backward, stored in the **input dtype**, not fp32: ``h`` is the widest activation of a
ViT block (4·C per token), and an fp32 copy would double the memory the fused kernel is meant to save; the
backward only needs GELU'(h), whose relative error from rounding h to bf16 (≤ 2⁻⁹ in h) is of the order of the
bf16 rounding of dy ⊙ GELU'(h) itself, which the tensor-core dgrad needs anyway. (That is also what eager PyTorch
under autocast keeps.) They are written only when ``save_h`` / ``save_z`` say so (autograd needs them), and are
outputs of the op, not differentiable (marked non-differentiable).

Backward (one registered op each, launched from ``register_autograd``):

* ``linear_gelu``: g = dy ⊙ GELU'(h) is never materialised: ``dx = g @ W`` (GELU' fused into the load of dy),
  ``dW = gᵀ x`` (the same prologue on dyᵀ, reduction over tokens inside each program: deterministic) and
  ``db = Σ_tokens g`` (fp32 row sums fused into the weight-gradient kernel).
* ``linear_glu`` (y = act(h_g) ⊙ h_x): the two pre-activations h_g, h_x are stored in the forward (input dtype, one
  (..., 2·M) tensor; not recomputed: recomputing would repeat both forward GEMMs). The prologue
  ``dh_g = dy ⊙ h_x ⊙ act'(h_g)``, ``dh_x = dy ⊙ act(h_g)`` (fp32, rounded to the input dtype for the MMA) is fused
  into the loads of the input-gradient launch (``dx = dh_g W_g + dh_x W_x``, one accumulator) and of the
  weight-gradient launch (``dW_g = dh_gᵀ x``, ``dW_x = dh_xᵀ x``, two accumulators sharing x's tiles, with the fp32
  row sums ``db_g``, ``db_x``); neither dh is materialised. A packed (2·M, K) weight reaches the op as two row
  views, so its gradient is assembled from the two halves by autograd (one weight-sized copy each).
* ``linear_residual``: ``dx = (dy ⊙ γ) @ W``, ``dW = (dy ⊙ γ)ᵀ x``, ``db = Σ dy ⊙ γ`` (same kernels, γ as the
  prologue), ``dγ = Σ_tokens dy ⊙ z`` (one fp32 ``torch.sum``), ``dresidual = dy``.

The CUDA ops (``*_cuda``, ``csrc/linear/``) have the same schemas and the same autograd; their GEMMs need K and M
to be multiples of the build's GEMM alignment (``build_info()["gemm_alignment"]``, 128-bit accesses), fp16 / bf16.
``linear_gelu`` / ``linear_residual`` run CUTLASS 2.x GEMMs with epilogue visitor trees (bias, GELU, LayerScale,
residual); their backward materialises the prologue ``g`` (dy ⊙ GELU'(h), or γ ⊙ dy) once in a workspace, then runs
an NN GEMM for dx and a TN GEMM (fp32, serial split-K: deterministic) for dW, with dbias from per-row-block fp32
column sums. ``linear_glu``:

* forward: one CuTe dual GEMM (``csrc/linear/linear_glu_fwd.cuh``): each 128-token × 64-column CTA tile keeps two
  fp32 accumulators, ``x W_gᵀ`` and ``x W_xᵀ``, over the same x tiles in shared memory (as the Triton kernel), and its
  epilogue adds the biases, stores h = [h_g | h_x] when autograd needs it and writes ``act(h_g) ⊙ h_x`` -- no
  pre-activation crosses global memory otherwise. (A CUTLASS GEMM over either weight, or over the packed one, cannot
  do this: no tile of one GEMM holds both the gate and the value column of an output.)
* backward: a SIMT prologue recomputes act(h_g) and act'(h_g) from the saved h and writes
  ``dh = [dh_g | dh_x]`` (fp32 math, rounded to the input dtype as the Triton prologue rounds it) with fp32 partial
  column sums for both bias gradients; then ``dx = dh · [W_g; W_x]`` is one NN GEMM over the 2·M reduction (fp32
  accumulation across both halves) and ``[dW_g; dW_x] = dhᵀ x`` one TN GEMM over the 2·M rows. A packed weight's two
  row views already lie stacked in memory (either order) and are used in place; split weights are copied into the
  workspace once per backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import reference
from fastvit.backends import Capabilities, _select, register_kernel
from fastvit.declare import Arg, OpDeclaration, SelftestShape, TinyCall, call_builder, declare
from fastvit.families._checks import amp_dtype, check_like, check_tensor, mixed_dtypes
from fastvit.families._common import SELFTEST_BATCH, attach, autocast_cast, by_mode, needs_grad, op
from fastvit.runtime import cuda as cuda_rt
from fastvit.runtime import eager as eager_rt
from fastvit.runtime import triton as triton_rt

# ============================================================================================ the ops
_describe = call_builder("in_features", "out_features")


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """Check a linear op's GEMM operands (after applying the autocast rule when autocast is on); returns
    ``(x, weight, bias, autocast_on, dtype, device, shape, M, K)`` -- x's dtype, device and shape and the weight's
    (out_features, in_features), read once for the caller's further checks.

    Each operand is compared with x inline and handed to :func:`check_like` (which raises naming it, or accepts what
    autocast leaves mixed) only when that comparison fails: the same acceptance as calling it every time, read once."""
    check_tensor("x", x)
    amp = amp_dtype(x)
    if amp is not None:
        x, weight, bias = autocast_rule(amp, x, weight, bias)
    dtype, device, shape = x.dtype, x.device, x.shape
    check_tensor("weight", weight, 2)
    if weight.dtype is not dtype or weight.device != device:
        check_like("weight", weight, "x", x)
    M, K = weight.shape
    if not shape or shape[-1] != K:
        raise ValueError(
            f"x's last dim ({shape[-1] if shape else 'scalar'}) must equal weight's in_features "
            f"(weight shape {tuple(weight.shape)} is (out_features, in_features))"
        )
    try:
        same = bias is None or (bias.dtype is dtype and bias.device == device and bias.shape == (M,))
    except AttributeError:  # not a tensor: check_like names it
        same = False
    if not same:
        check_like("bias", bias, "x", x, (M,))
    return x, weight, bias, amp is not None, dtype, device, shape, M, K


def _prepare_linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    approximate: str = "none",
) -> tuple:
    x, weight, bias, _, dtype, device, _, M, K = _check_linear(x, weight, bias)
    if approximate != "none" and approximate != "tanh":
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _describe(device, dtype, in_features=K, out_features=M), x, weight, bias


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """GELU(x Wᵀ + b): an MLP's fc1 with its activation (Hendrycks & Gimpel, 2016).

    Args:
        x: (..., K) float.
        weight: (M, K) as ``nn.Linear.weight``; bias: (M,) or ``None``.
        approximate: ``"none"`` (exact erf, timm / MAE / HF default) or ``"tanh"``.
        backend: force a backend.

    Returns:
        (..., M) in ``x``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices; unknown ``approximate``.

    Equivalent PyTorch code: ``F.gelu(F.linear(x, weight, bias), approximate=approximate)``.
    """
    call, x, weight, bias = _prepare_linear_gelu(x, weight, bias, approximate=approximate)
    return _select("linear_gelu", call, backend)[1](x, weight, bias, approximate=approximate)


def _prepare_linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
) -> tuple:
    x, weight, bias, mixed_ok, dtype, device, shape, M, K = _check_linear(x, weight, bias)
    try:  # residual: x's leading dims and M; gamma: (M,) (compared inline; check_like below names what differs)
        rs = residual.shape
        same = (
            residual.dtype is dtype
            and residual.device == device
            and rs[-1] == M
            and rs[:-1] == shape[:-1]
            and (gamma is None or (gamma.dtype is dtype and gamma.device == device and gamma.shape == (M,)))
        )
    except (AttributeError, IndexError):  # a non-tensor, or a 0-D residual
        same = False
    if not same:
        check_like("residual", residual, "x", x, (*shape[:-1], M), any_float=mixed_ok)
        check_like("gamma", gamma, "x", x, (M,), any_float=mixed_ok)
    mixed = mixed_ok and mixed_dtypes(x, residual, gamma)
    return _describe(device, dtype, in_features=K, out_features=M, mixed_dtypes=mixed), x, weight, bias, residual, gamma


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """residual + gamma · (x Wᵀ + b): a block's ``proj`` / ``fc2`` with LayerScale and the residual add.

    Args:
        x: (..., K) float.
        weight: (M, K); bias: (M,) or ``None``.
        residual: (..., M), x's leading shape.
        gamma: (M,) LayerScale (Touvron et al., 2021, "Going deeper with image transformers") or ``None``.
        backend: force a backend.

    Returns:
        (..., M) in ``x``'s dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices.

    Equivalent PyTorch code: ``residual + gamma * F.linear(x, weight, bias)``.
    """
    call, x, weight, bias, residual, gamma = _prepare_linear_residual(x, weight, bias, residual, gamma=gamma)
    return _select("linear_residual", call, backend)[1](x, weight, bias, residual, gamma=gamma)


#: ``linear_glu``'s gate activations (timm's activation names) -> the Triton kernels' ACT code.
GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid")


def _prepare_linear_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_value: torch.Tensor | None = None,
    bias_value: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    gate_last: bool = False,
) -> tuple:
    check_tensor("x", x)
    amp = amp_dtype(x)
    if amp is not None:
        x, weight, bias, weight_value, bias_value = autocast_cast(amp, x, weight, bias, weight_value, bias_value)
    check_tensor("weight", weight, 2)
    check_like("weight", weight, "x", x)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dim ({x.shape[-1] if x.dim() else 'scalar'}) must equal weight's in_features "
            f"(weight shape {tuple(weight.shape)} is (out_features, in_features))"
        )
    check_like("bias", bias, "x", x, (weight.shape[0],))
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(GLU_ACTIVATIONS)}, got {activation!r}")
    if not isinstance(gate_last, bool):
        raise TypeError(f"gate_last must be a bool, got {type(gate_last).__name__}")
    if weight_value is None:
        if bias_value is not None:
            raise ValueError(
                "bias_value was given without weight_value; with a packed weight (2·M, K) pass the packed (2·M,) "
                "bias as bias"
            )
        if weight.shape[0] % 2:
            raise ValueError(
                f"weight must be the packed (2·M, K) gate and value weights (timm's GluMlp fc1) when weight_value "
                f"is None, so its first dim must be even; got shape {tuple(weight.shape)}"
            )
        M = weight.shape[0] // 2
    else:
        if gate_last:
            raise ValueError(
                "gate_last applies to a packed weight only; with weight_value given, weight is the gate's "
                "(timm's SwiGLU fc1_g) and weight_value the value's (fc1_x)"
            )
        check_tensor("weight_value", weight_value, 2)
        check_like("weight_value", weight_value, "weight", weight, tuple(weight.shape))
        check_like("bias_value", bias_value, "x", x, (weight.shape[0],))
        M = weight.shape[0]
    call = _describe(x.device, x.dtype, in_features=weight.shape[1], out_features=M)
    return call, x, weight, bias, weight_value, bias_value


def linear_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_value: torch.Tensor | None = None,
    bias_value: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    gate_last: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """act(x W_gᵀ + b_g) ⊙ (x W_xᵀ + b_x): a gated MLP's first layer with its gating (Shazeer, 2020, "GLU Variants
    Improve Transformer"; SwiGLU with ``"silu"``, GeGLU with ``"gelu"``, the GLU of Dauphin et al. 2017 with
    ``"sigmoid"``).

    The gate and value weights come in either of timm's layouts, passed as the modules store them (no copy):

    * **split** (timm's ``SwiGLU``): ``weight`` = ``fc1_g.weight`` (M, K) is the gate's, ``weight_value`` =
      ``fc1_x.weight`` (M, K) the value's; ``bias`` / ``bias_value`` (M,) or ``None`` each.
    * **packed** (timm's ``GluMlp`` / ``SwiGLUPacked``; ``weight_value=None``): ``weight`` = ``fc1.weight``
      (2·M, K), ``bias`` (2·M,) or ``None``, split in two halves as ``chunk(2, dim=-1)`` splits fc1's output: the
      gate is the first half, or the second with ``gate_last=True`` (timm's ``GluMlp(gate_last=True)``, its
      default, and ``F.glu``'s order).

    Args:
        x: (..., K) float16 / bfloat16 / float32 (float64 on the eager backend).
        weight: (M, K) gate weight, or (2·M, K) packed gate and value weights; ``x``'s dtype and device.
        bias: (M,) / (2·M,) as ``weight``, or ``None``.
        weight_value: (M, K) value weight (split layout), or ``None`` (packed layout).
        bias_value: (M,) value bias (split layout only), or ``None``.
        activation: the gate's activation: ``"silu"`` (SwiGLU, default), ``"gelu"`` (exact erf), ``"gelu_tanh"``,
            ``"sigmoid"``.
        gate_last: packed layout only: the gate is the second half of ``weight``'s rows.
        backend: force a backend (``"cuda"``: fp16 / bf16, K and M multiples of 8).

    Returns:
        (..., M) in ``x``'s dtype (under autocast: the autocast dtype, as ``F.linear``).

    Raises:
        TypeError: a non-tensor, non-float or mismatched dtype (naming the argument), ``gate_last`` not a bool.
        ValueError: mismatched shapes or devices; an odd packed width; ``bias_value`` without ``weight_value``;
            ``gate_last=True`` with ``weight_value``; an unknown ``activation``.

    Equivalent PyTorch code (timm's forwards): split ``act(F.linear(x, weight, bias)) * F.linear(x, weight_value,
    bias_value)``; packed ``a, b = F.linear(x, weight, bias).chunk(2, dim=-1)`` then ``act(a) * b``, or
    ``a * act(b)`` with ``gate_last``. The fused kernels compute both products per tile in one pass (fp32
    accumulation) and apply the gate in the epilogue; the backward stores the two pre-activations (input dtype).
    """
    call, x, weight, bias, weight_value, bias_value = _prepare_linear_glu(
        x, weight, bias, weight_value, bias_value, activation=activation, gate_last=gate_last
    )
    return _select("linear_glu", call, backend)[1](
        x, weight, bias, weight_value, bias_value, activation=activation, gate_last=gate_last
    )


def _linear_gelu_shape(N: int, K: int, M: int, approximate: str):
    def make(g):
        return {"x": (SELFTEST_BATCH, N, K), "weight": ((M, K), K**-0.5), "bias": (M,), "approximate": approximate}

    return make


def _linear_residual_shape(N: int, K: int, M: int, bias: bool, gamma: bool):
    def make(g):
        B = SELFTEST_BATCH
        return {
            "x": (B, N, K),
            "weight": ((M, K), K**-0.5),
            "bias": (M,) if bias else None,
            "residual": (B, N, M),
            "gamma": (M,) if gamma else None,
        }

    return make


def _linear_gelu_tiny(t, ids_restore) -> list[TinyCall]:
    return [TinyCall((t(2, 5, 8), t(16, 8), t(16)))]


def _linear_residual_tiny(t, ids_restore) -> list[TinyCall]:
    return [TinyCall((t(2, 5, 16), t(8, 16), t(8), t(2, 5, 8)))]


def _linear_glu_shape(N: int, K: int, M: int, activation: str, packed: bool, gate_last: bool = False):
    def make(g):
        w = ((M, K), K**-0.5)
        if packed:
            return {
                "x": (SELFTEST_BATCH, N, K),
                "weight": ((2 * M, K), K**-0.5),
                "bias": (2 * M,),
                "activation": activation,
                "gate_last": gate_last,
            }
        return {
            "x": (SELFTEST_BATCH, N, K),
            "weight": w,
            "bias": (M,),
            "weight_value": w,
            "bias_value": (M,),
            "activation": activation,
        }

    return make


def _linear_glu_tiny(t, ids_restore) -> list[TinyCall]:
    return [TinyCall((t(2, 5, 8), t(16, 8), t(16), t(16, 8), t(16)))]


@dataclass(frozen=True)
class LinearCost:
    """``y = x Wᵀ + b`` with x (M, K), W (N, K): forward ``2·M·N·K`` FLOPs, backward twice that (dX and dW).

    Bytes: forward reads x, W, b and writes y; backward reads dY, x, W and writes dX, dW, db.
    ``epilogue_reads`` extra (M, N) tensors are read in the forward (a residual add) and the backward (none saved).
    """

    M: int
    N: int
    K: int
    elem: int = 2
    epilogue_reads: int = 0

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode``."""
        fwd = 2 * self.M * self.N * self.K
        return by_mode(mode, fwd, 2 * fwd)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        M, N, K, e = self.M, self.N, self.K, self.elem
        fwd = (M * K + N * K + N + M * N * (1 + self.epilogue_reads)) * e
        bwd = (M * N + M * K + N * K + M * K + N * K + N) * e
        return by_mode(mode, fwd, bwd)


@dataclass(frozen=True)
class MlpCost:
    """A ViT MLP with its residual: ``x + fc2(GELU(fc1(x)))`` on M tokens of width C with hidden width F.

    FLOPs are the two GEMMs (``2·M·F·C`` each, backward twice that) plus about 8 FLOPs per hidden element for exact
    GELU. Bytes: the sum of the two GEMMs' minimum traffic, the residual read once.
    """

    M: int
    C: int
    F: int
    elem: int = 2

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode``."""
        fc1 = LinearCost(self.M, self.F, self.C, self.elem)
        fc2 = LinearCost(self.M, self.C, self.F, self.elem, epilogue_reads=1)
        gelu = 8 * self.M * self.F
        return fc1.flops(mode) + fc2.flops(mode) + by_mode(mode, gelu, 2 * gelu)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        fc1 = LinearCost(self.M, self.F, self.C, self.elem)
        fc2 = LinearCost(self.M, self.C, self.F, self.elem, epilogue_reads=1)
        return fc1.bytes(mode) + fc2.bytes(mode)


@dataclass(frozen=True)
class GluCost:
    """``act(x W_gᵀ + b_g) ⊙ (x W_xᵀ + b_x)`` with x (M, K), W_g and W_x (N, K): two GEMMs, forward ``4·M·N·K``
    FLOPs, backward twice that (dX and both dW).

    Bytes: forward reads x, both weights and biases and writes y and the two saved pre-activations (M, N) each;
    backward reads dY, x, both weights and the pre-activations (twice: the input- and weight-gradient launches)
    and writes dX, both dW and db.
    """

    M: int
    N: int
    K: int
    elem: int = 2

    def flops(self, mode: str = "fwd") -> int:
        """FLOPs of ``mode``."""
        fwd = 4 * self.M * self.N * self.K
        return by_mode(mode, fwd, 2 * fwd)

    def bytes(self, mode: str = "fwd") -> int:
        """Minimum bytes moved by ``mode``."""
        M, N, K, e = self.M, self.N, self.K, self.elem
        fwd = (M * K + 2 * N * K + 2 * N + 3 * M * N) * e
        bwd = (2 * (M * N + 2 * M * N) + M * K + 2 * N * K + M * K + 2 * N * K + 2 * N) * e
        return by_mode(mode, fwd, bwd)


_ARGS = (Arg("x", "tensor", "(..., K)"), Arg("weight", "tensor", "(M, K)"), Arg("bias", "tensor?", "(M,)"))
DECLARATIONS = (
    declare(
        OpDeclaration(
            name="linear_gelu",
            family="linear",
            args=_ARGS + (Arg("approximate", "str", keyword_only=True),),
            call_fields=("in_features", "out_features"),
            prepare=_prepare_linear_gelu,
            function=linear_gelu,
            reference=reference.linear_gelu,
            selftest=(
                SelftestShape("B3 N1 K32 M72", _linear_gelu_shape(1, 32, 72, "none")),
                SelftestShape("B3 N61 K72 M80 tanh", _linear_gelu_shape(61, 72, 80, "tanh")),
                SelftestShape("B3 N61 K80 M72", _linear_gelu_shape(61, 80, 72, "none"), quick=True),
                SelftestShape("B3 N197 K80 M32", _linear_gelu_shape(197, 80, 32, "none")),
            ),
            tiny_calls=_linear_gelu_tiny,
            costs={"linear": LinearCost, "mlp": MlpCost},
        )
    ),
    declare(
        OpDeclaration(
            name="linear_residual",
            family="linear",
            args=_ARGS + (Arg("residual", "tensor", "(..., M)"), Arg("gamma", "tensor?", "(M,)", keyword_only=True)),
            call_fields=("in_features", "out_features"),
            prepare=_prepare_linear_residual,
            function=linear_residual,
            reference=reference.linear_residual,
            selftest=(
                SelftestShape("B3 N1 K32 M72 +gamma", _linear_residual_shape(1, 32, 72, True, True)),
                SelftestShape("B3 N61 K72 M80 +gamma", _linear_residual_shape(61, 72, 80, True, True), quick=True),
                SelftestShape("B3 N197 K80 M32 no bias", _linear_residual_shape(197, 80, 32, False, False)),
            ),
            tiny_calls=_linear_residual_tiny,
        )
    ),
    declare(
        OpDeclaration(
            name="linear_glu",
            family="linear",
            args=(
                Arg("x", "tensor", "(..., K)"),
                Arg("weight", "tensor", "(M, K) gate, or (2·M, K) packed"),
                Arg("bias", "tensor?", "(M,), or (2·M,) packed"),
                Arg("weight_value", "tensor?", "(M, K)"),
                Arg("bias_value", "tensor?", "(M,)"),
                Arg("activation", "str", keyword_only=True),
                Arg("gate_last", "bool", keyword_only=True),
            ),
            call_fields=("in_features", "out_features"),
            prepare=_prepare_linear_glu,
            function=linear_glu,
            reference=reference.linear_glu,
            selftest=(
                SelftestShape("B3 N1 K32 M72 gelu packed", _linear_glu_shape(1, 32, 72, "gelu", True)),
                SelftestShape("B3 N61 K72 M80 silu", _linear_glu_shape(61, 72, 80, "silu", False), quick=True),
                SelftestShape(
                    "B3 N61 K80 M72 sigmoid packed gate_last", _linear_glu_shape(61, 80, 72, "sigmoid", True, True)
                ),
                SelftestShape("B3 N197 K80 M32 gelu_tanh", _linear_glu_shape(197, 80, 32, "gelu_tanh", False)),
            ),
            tiny_calls=_linear_glu_tiny,
            costs={"glu": GluCost},
        )
    ),
)
OPS = tuple(d.name for d in DECLARATIONS)

_k = triton_rt.kernel_module("linear")


# ============================================================================================ eager
def linear_gelu_eager(x, weight, bias, *, approximate="none"):
    """Eager :func:`fastvit.ops.linear_gelu`: ``F.gelu(F.linear(x, weight, bias))``."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_residual_eager(x, weight, bias, residual, *, gamma=None):
    """Eager :func:`fastvit.ops.linear_residual`: ``residual + gamma * F.linear(x, weight, bias)``."""
    h = F.linear(x, weight, bias)
    return residual + (h * gamma if gamma is not None else h)


def _glu_activation(activation: str):
    """The PyTorch function of ``linear_glu``'s ``activation`` (what timm's act_layer modules call)."""
    if activation == "silu":
        return F.silu
    if activation == "sigmoid":
        return torch.sigmoid
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return lambda h: F.gelu(h, approximate=approximate)


def linear_glu_eager(x, weight, bias, weight_value=None, bias_value=None, *, activation="silu", gate_last=False):
    """Eager :func:`fastvit.ops.linear_glu`, timm's forwards: packed ``F.linear`` then ``chunk(2, dim=-1)``
    (``GluMlp``), or two ``F.linear`` (``SwiGLU``)."""
    act = _glu_activation(activation)
    if weight_value is None:
        a, b = F.linear(x, weight, bias).chunk(2, dim=-1)
        return a * act(b) if gate_last else act(a) * b
    return act(F.linear(x, weight, bias)) * F.linear(x, weight_value, bias_value)


def glu_halves(weight, bias, weight_value=None, bias_value=None, gate_last=False):
    """``(weight_gate, bias_gate, weight_value, bias_value)`` of either ``linear_glu`` layout: the split layout as
    given, the packed (2·M, K) weight / (2·M,) bias as row views of its halves (no copy)."""
    if weight_value is not None:
        return weight, bias, weight_value, bias_value
    M = weight.shape[0] // 2
    w1, w2 = weight[:M], weight[M:]
    b1, b2 = (bias[:M], bias[M:]) if bias is not None else (None, None)
    return (w2, b2, w1, b1) if gate_last else (w1, b1, w2, b2)


register_kernel("eager", "linear_gelu", linear_gelu_eager, eager_rt.ANY_DEVICE)
register_kernel("eager", "linear_glu", linear_glu_eager, eager_rt.ANY_DEVICE)
register_kernel("eager", "linear_residual", linear_residual_eager, eager_rt.ANY_DEVICE)


# ============================================================================================ autocast
def autocast_rule(amp: torch.dtype, x, weight, bias):
    """Under autocast, as ``F.linear``: x, weight and bias in the autocast dtype. ``linear_residual``'s epilogue
    operands (residual, gamma) keep their dtype, and its output has the promoted dtype, as ``residual + gamma * h``
    gives in eager code (fp32 for timm's fp32 residual stream)."""
    return autocast_cast(amp, x, weight, bias)


# ============================================================================================ autograd
def _linear_gelu_autograd(bwd: str):
    def setup(ctx, inputs, output):
        x, weight, bias, approximate, save_h = inputs
        y, h = output
        ctx.mark_non_differentiable(h)
        ctx.approximate, ctx.has_bias, ctx.save_h = approximate, bias is not None, save_h
        ctx.save_for_backward(x, weight, h)

    def backward(ctx, dy, dh):
        x, weight, h = ctx.saved_tensors
        if not ctx.save_h:
            raise RuntimeError(
                f"fastvit::{bwd.replace('_bwd', '_fwd')} was called with save_h=False, so its "
                "pre-activation was not stored and it cannot be differentiated; call it with "
                "save_h=True"
            )
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dw, db = op(bwd)(dy, x, weight, h, ctx.approximate, ctx.has_bias)
        return dx, dw, (db if ctx.has_bias else None), None, None

    return setup, backward


def _linear_residual_autograd(bwd: str):
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
            raise RuntimeError(
                f"fastvit::{bwd.replace('_bwd', '_fwd')} was called with save_z=False, so dgamma "
                "cannot be computed; call it with save_z=True"
            )
        dx, dw, db, dgamma = op(bwd)(dy, x, weight, gamma, z if ctx.save_z else None, ctx.has_bias)
        return (dx, dw, db if ctx.has_bias else None, dy, dgamma if (ctx.has_gamma and ctx.save_z) else None, None)

    return setup, backward


def _linear_glu_autograd(bwd: str):
    def setup(ctx, inputs, output):
        x, weight_gate, bias_gate, weight_value, bias_value, activation, save_h = inputs
        y, h = output
        ctx.mark_non_differentiable(h)
        ctx.activation, ctx.save_h = activation, save_h
        ctx.has_bias = (bias_gate is not None, bias_value is not None)
        ctx.save_for_backward(x, weight_gate, weight_value, h)

    def backward(ctx, dy, dh):
        x, weight_gate, weight_value, h = ctx.saved_tensors
        if not ctx.save_h:
            raise RuntimeError(
                f"fastvit::{bwd.replace('_bwd', '_fwd')} was called with save_h=False, so its "
                "pre-activations were not stored and it cannot be differentiated; call it with save_h=True"
            )
        if dy is None:
            dy = torch.zeros((*x.shape[:-1], weight_gate.shape[0]), device=x.device, dtype=x.dtype)
        has_bg, has_bx = ctx.has_bias
        dx, dwg, dwx, dbg, dbx = op(bwd)(dy, x, weight_gate, weight_value, h, ctx.activation, has_bg or has_bx)
        return dx, dwg, (dbg if has_bg else None), dwx, (dbx if has_bx else None), None, None

    return setup, backward


# ============================================================================================ triton
def _rows(t: Tensor) -> Tensor:
    """(..., F) -> a (T, F) view (copy only if the last dim is strided or the leading dims do not flatten)."""
    return triton_rt.last_contiguous(t.reshape(math.prod(t.shape[:-1]), t.shape[-1]))  # -1 is ambiguous at F = 0


def _gemm(
    kernel,
    a,
    a_strides,
    b,
    b_strides,
    out,
    M,
    N,
    K,
    *,
    prologue=0,
    p=None,
    p_strides=(0, 0),
    epilogue=0,
    bias=None,
    residual=None,
    gamma=None,
    pre=None,
    row_sum=None,
):
    """Launch ``kernel`` (one of the autotuned :mod:`fastvit.kernels.linear` launches) for Out (M, N)."""
    dummy = out
    triton_rt.wrap(kernel)[
        lambda meta: (triton_rt.triton.cdiv(M, meta["BLOCK_M"]) * triton_rt.triton.cdiv(N, meta["BLOCK_N"]),)
    ](
        a,
        b,
        p if p is not None else dummy,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        gamma if gamma is not None else dummy,
        out,
        pre if pre is not None else dummy,
        row_sum if row_sum is not None else dummy,
        M,
        N,
        K,
        a_strides[0],
        a_strides[1],
        b_strides[0],
        b_strides[1],
        p_strides[0],
        p_strides[1],
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        pre.stride(0) if pre is not None else 0,
        PROLOGUE=prologue,
        EPILOGUE=epilogue,
        HAS_BIAS=bias is not None,
        HAS_GAMMA=gamma is not None,
        STORE_PRE=pre is not None,
        ROW_SUM=row_sum is not None,
        INPUT_PRECISION=triton_rt.input_precision(a.dtype),
    )


def _forward_gemm(x, weight, save_pre, *, epilogue, **operands):
    """y (..., N) = epilogue(x Wᵀ + b) for x (..., K), weight (N, K); the pre-epilogue ``x Wᵀ + b`` (..., N) is
    stored too when ``save_pre`` (else an empty (0,) tensor is returned in its place). ``operands``: the bias /
    residual / gamma keywords of :func:`_gemm`."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = _rows(x)
    w = triton_rt.last_contiguous(weight)
    T = x2.shape[0]
    y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
    pre = torch.empty((*x.shape[:-1], N) if save_pre else (0,), device=x.device, dtype=x.dtype)
    if T and N:
        _gemm(
            _k.linear_fwd,
            x2,
            (x2.stride(0), 1),
            w,
            (1, w.stride(0)),
            y.view(T, N),
            T,
            N,
            K,
            epilogue=epilogue,
            pre=pre.view(T, N) if save_pre else None,
            **operands,
        )
    return y, pre


def _backward_gemms(dy2, x2, w, prologue, p, p_dx_strides, p_dw_strides, need_db):
    """dx (T, K) = prologue(dy) @ W and dW (N, K) = prologue(dy)ᵀ @ x, plus fp32 Σ_tokens prologue(dy) (N,)."""
    T, N = dy2.shape
    K = x2.shape[1]
    dx = torch.empty((T, K), device=x2.device, dtype=x2.dtype)
    dw = torch.empty((N, K), device=x2.device, dtype=x2.dtype)
    db = torch.empty((N,) if need_db else (0,), device=x2.device, dtype=torch.float32)
    if T and K:
        _gemm(
            _k.linear_dgrad,
            dy2,
            (dy2.stride(0), 1),
            w,
            (w.stride(0), 1),
            dx,
            T,
            K,
            N,
            prologue=prologue,
            p=p,
            p_strides=p_dx_strides,
        )
    if N and K:
        _gemm(
            _k.linear_wgrad,
            dy2,
            (1, dy2.stride(0)),
            x2,
            (x2.stride(0), 1),
            dw,
            N,
            K,
            T,
            prologue=prologue,
            p=p,
            p_strides=p_dw_strides,
            row_sum=db if need_db else None,
        )
    elif need_db and N:  # K == 0: no weight-gradient tile carries the row sums
        if prologue == _k.PRO_NONE:
            db = dy2.float().sum(0)
        elif prologue == _k.PRO_SCALE:
            db = dy2.float().sum(0) * p.float()
        else:
            db = _gelu_grad_eager(dy2, p, prologue).sum(0)
    return dx, dw, db


def _gelu_grad_eager(dy2, h2, prologue):
    """dy · GELU'(h) in fp32, written out (a custom op's backend runs below autograd, which would record nothing)."""
    h = h2.float()
    if prologue == _k.PRO_GELU_TANH:
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (h + 0.044715 * h**3))
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * h * h)
    else:
        d = 0.5 * (1.0 + torch.erf(h * math.sqrt(0.5))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return dy2.float() * d


def _define_triton_ops() -> None:
    triton_op = torch.library.triton_op

    # ---------------------------------------------------------------- fc1 + GELU
    @triton_op("fastvit::linear_gelu_fwd", mutates_args=())
    def linear_gelu_fwd(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str, save_h: bool
    ) -> tuple[Tensor, Tensor]:
        epilogue = _k.EPI_GELU_TANH if approximate == "tanh" else _k.EPI_GELU_ERF
        return _forward_gemm(x, weight, save_h, epilogue=epilogue, bias=bias)

    @triton_op("fastvit::linear_gelu_bwd", mutates_args=())
    def linear_gelu_bwd(
        dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, approximate: str, has_bias: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        x2, dy2, h2 = _rows(x), _rows(dy), _rows(h)
        w = triton_rt.last_contiguous(weight)
        prologue = _k.PRO_GELU_TANH if approximate == "tanh" else _k.PRO_GELU_ERF
        dx, dw, db = _backward_gemms(dy2, x2, w, prologue, h2, (h2.stride(0), 1), (1, h2.stride(0)), has_bias)
        return dx.view(x.shape), dw, db.to(x.dtype)

    attach("linear_gelu", _linear_gelu_autograd)

    # ---------------------------------------------------------------- fc2 / proj + LayerScale + residual
    @triton_op("fastvit::linear_residual_fwd", mutates_args=())
    def linear_residual_fwd(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor, gamma: Optional[Tensor], save_z: bool
    ) -> tuple[Tensor, Tensor]:
        return _forward_gemm(
            x, weight, save_z, epilogue=_k.EPI_RESIDUAL, bias=bias, residual=_rows(residual), gamma=gamma
        )

    @triton_op("fastvit::linear_residual_bwd", mutates_args=())
    def linear_residual_bwd(
        dy: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], z: Optional[Tensor], has_bias: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x2, dy2 = _rows(x), _rows(dy)
        w = triton_rt.last_contiguous(weight)
        if gamma is not None:
            g = triton_rt.last_contiguous(gamma)
            dx, dw, db = _backward_gemms(dy2, x2, w, _k.PRO_SCALE, g, (0, 1), (1, 0), has_bias)
        else:
            dx, dw, db = _backward_gemms(dy2, x2, w, _k.PRO_NONE, None, (0, 0), (0, 0), has_bias)
        if gamma is not None and z is not None:
            dgamma = (dy2.float() * _rows(z).float()).sum(0).to(x.dtype)
        else:
            dgamma = torch.empty((0,), device=x.device, dtype=x.dtype)
        return dx.view(x.shape), dw, db.to(x.dtype), dgamma

    attach("linear_residual", _linear_residual_autograd)


def linear_gelu_triton(x, weight, bias, *, approximate="none"):
    """Triton backend of :func:`fastvit.ops.linear_gelu`: ``GELU(x Wᵀ + b)``.

    Args: x (..., K) fp16 / bf16 / fp32; weight (N, K); bias (N,) or None; approximate "none" | "tanh".
    Returns: (..., N) in x's dtype. The pre-activation is stored (input dtype) only when autograd needs it.
    """
    y, _ = torch.ops.fastvit.linear_gelu_fwd(x, weight, bias, approximate, needs_grad(x, weight, bias))
    return y


def linear_residual_triton(x, weight, bias, residual, *, gamma=None):
    """Triton backend of :func:`fastvit.ops.linear_residual`: ``residual + gamma ⊙ (x Wᵀ + b)``.

    Args: x (..., K); weight (N, K); bias, gamma (N,) or None; residual (..., N); all of x's dtype.
    Returns: (..., N) in x's dtype. ``z = x Wᵀ + b`` is stored only when gamma needs a gradient.
    """
    save_z = gamma is not None and needs_grad(gamma)
    y, _ = torch.ops.fastvit.linear_residual_fwd(x, weight, bias, residual, gamma, save_z)
    return y


def _glu_launch(
    kernel,
    mode,
    act,
    M,
    N,
    K,
    a,
    a_strides,
    b1,
    b1_strides,
    out1,
    *,
    b2=None,
    b2_strides=(0, 0),
    out2=None,
    hg=None,
    hx=None,
    h_strides=(0, 0),
    bias1=None,
    bias2=None,
    pre1=None,
    pre2=None,
    row_sums=None,
):
    """Launch one of the gated :mod:`fastvit.kernels.linear` launches (``glu_fwd`` / ``glu_dgrad`` /
    ``glu_wgrad``) for Out1 (and Out2) (M, N); unused operands alias ``out1`` (never dereferenced)."""

    def _or(t):
        return out1 if t is None else t

    rs1, rs2 = row_sums if row_sums is not None else (None, None)
    triton_rt.wrap(kernel)[
        lambda meta: (triton_rt.triton.cdiv(M, meta["BLOCK_M"]) * triton_rt.triton.cdiv(N, meta["BLOCK_N"]),)
    ](
        a,
        b1,
        _or(b2),
        _or(hg),
        _or(hx),
        _or(bias1),
        _or(bias2),
        out1,
        _or(out2),
        _or(pre1),
        _or(pre2),
        _or(rs1),
        _or(rs2),
        M,
        N,
        K,
        a_strides[0],
        a_strides[1],
        b1_strides[0],
        b1_strides[1],
        b2_strides[0],
        b2_strides[1],
        h_strides[0],
        h_strides[1],
        out1.stride(0),
        pre1.stride(0) if pre1 is not None else 0,
        MODE=mode,
        ACT=act,
        HAS_BIAS1=bias1 is not None,
        HAS_BIAS2=bias2 is not None,
        STORE_PRE=pre1 is not None,
        ROW_SUM=row_sums is not None,
        INPUT_PRECISION=triton_rt.input_precision(a.dtype),
    )


def _token_rows(t: Tensor, T: int) -> Tensor:
    """(..., F) -> a (T, F) view, T the number of tokens given (so F = 0 reshapes too; see :func:`_rows`)."""
    return triton_rt.last_contiguous(t.reshape(T, t.shape[-1]))


def _glu_act_code(activation: str) -> int:
    return {
        "silu": _k.ACT_SILU,
        "gelu": _k.ACT_GELU_ERF,
        "gelu_tanh": _k.ACT_GELU_TANH,
        "sigmoid": _k.ACT_SIGMOID,
    }[activation]


def _glu_grads_eager(dy2, h2, activation):
    """fp32 (dh_g, dh_x) from dy (T, M) and the saved [h_g | h_x] (T, 2·M), in plain torch (the kernels' prologue):
    the K = 0 path of the bias gradients. Written out, not through autograd, which is off inside the op."""
    M = dy2.shape[1]
    hg, hx, dy = h2[:, :M].float(), h2[:, M:].float(), dy2.float()
    if activation in ("silu", "sigmoid"):
        s = torch.sigmoid(hg)
        a, da = (hg * s, s * (1 + hg * (1 - s))) if activation == "silu" else (s, s * (1 - s))
    elif activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(hg * 0.7071067811865476))
        a, da = hg * cdf, cdf + hg * torch.exp(-0.5 * hg * hg) * 0.3989422804014327
    else:
        t = torch.tanh(0.7978845608028654 * (hg + 0.044715 * hg**3))
        a = 0.5 * hg * (1 + t)
        da = 0.5 * (1 + t) + 0.5 * hg * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * hg * hg)
    return dy * hx * da, dy * a


def _define_glu_triton_ops() -> None:
    triton_op = torch.library.triton_op

    @triton_op("fastvit::linear_glu_fwd", mutates_args=())
    def linear_glu_fwd(
        x: Tensor,
        weight_gate: Tensor,
        bias_gate: Optional[Tensor],
        weight_value: Tensor,
        bias_value: Optional[Tensor],
        activation: str,
        save_h: bool,
    ) -> tuple[Tensor, Tensor]:
        K = x.shape[-1]
        M = weight_gate.shape[0]
        x2 = _token_rows(x, math.prod(x.shape[:-1]))
        wg = triton_rt.last_contiguous(weight_gate)
        wx = triton_rt.last_contiguous(weight_value)
        T = x2.shape[0]
        y = torch.empty((*x.shape[:-1], M), device=x.device, dtype=x.dtype)
        h = torch.empty((*x.shape[:-1], 2 * M) if save_h else (0,), device=x.device, dtype=x.dtype)
        if T and M:
            h2 = h.view(T, 2 * M) if save_h else None
            _glu_launch(
                _k.glu_fwd,
                _k.GLU_FWD,
                _glu_act_code(activation),
                T,
                M,
                K,
                x2,
                (x2.stride(0), 1),
                wg,
                (1, wg.stride(0)),
                y.view(T, M),
                b2=wx,
                b2_strides=(1, wx.stride(0)),
                bias1=bias_gate,
                bias2=bias_value,
                pre1=h2[:, :M] if save_h else None,
                pre2=h2[:, M:] if save_h else None,
            )
        return y, h

    @triton_op("fastvit::linear_glu_bwd", mutates_args=())
    def linear_glu_bwd(
        dy: Tensor,
        x: Tensor,
        weight_gate: Tensor,
        weight_value: Tensor,
        h: Tensor,
        activation: str,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        T = math.prod(x.shape[:-1])
        x2, dy2, h2 = _token_rows(x, T), _token_rows(dy, T), _token_rows(h, T)
        wg = triton_rt.last_contiguous(weight_gate)
        wx = triton_rt.last_contiguous(weight_value)
        K = x2.shape[1]
        M = wg.shape[0]
        act = _glu_act_code(activation)
        hg, hx = h2[:, :M], h2[:, M:]
        dx = torch.empty((T, K), device=x.device, dtype=x.dtype)
        dwg = torch.empty((M, K), device=x.device, dtype=x.dtype)
        dwx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        nb = M if has_bias else 0
        dbg = torch.empty((nb,), device=x.device, dtype=torch.float32)
        dbx = torch.empty((nb,), device=x.device, dtype=torch.float32)
        if T and K:
            _glu_launch(
                _k.glu_dgrad,
                _k.GLU_DGRAD,
                act,
                T,
                K,
                M,
                dy2,
                (dy2.stride(0), 1),
                wg,
                (wg.stride(0), 1),
                dx,
                b2=wx,
                b2_strides=(wx.stride(0), 1),
                hg=hg,
                hx=hx,
                h_strides=(h2.stride(0), 1),
            )
        if M and K:
            _glu_launch(
                _k.glu_wgrad,
                _k.GLU_WGRAD,
                act,
                M,
                K,
                T,
                dy2,
                (1, dy2.stride(0)),
                x2,
                (x2.stride(0), 1),
                dwg,
                out2=dwx,
                hg=hg,
                hx=hx,
                h_strides=(1, h2.stride(0)),
                row_sums=(dbg, dbx) if has_bias else None,
            )
        elif has_bias and M:  # K == 0: no weight-gradient tile carries the row sums
            dhg, dhx = _glu_grads_eager(dy2, h2, activation)
            dbg, dbx = dhg.sum(0), dhx.sum(0)
        return dx.view(x.shape), dwg, dwx, dbg.to(x.dtype), dbx.to(x.dtype)

    attach("linear_glu", _linear_glu_autograd)


def linear_glu_triton(x, weight, bias, weight_value=None, bias_value=None, *, activation="silu", gate_last=False):
    """Triton backend of :func:`fastvit.ops.linear_glu`: ``act(x W_gᵀ + b_g) ⊙ (x W_xᵀ + b_x)``.

    Args: as :func:`fastvit.ops.linear_glu` (packed weights are split into row views, no copy).
    Returns: (..., M) in x's dtype. The two pre-activations [h_g | h_x] (..., 2·M) are stored (input dtype) only
    when autograd needs them.
    """
    wg, bg, wx, bx = glu_halves(weight, bias, weight_value, bias_value, gate_last)
    save_h = needs_grad(x, weight, bias, weight_value, bias_value)
    y, _ = torch.ops.fastvit.linear_glu_fwd(x, wg, bg, wx, bx, activation, save_h)
    return y


TRITON_REGISTERED = triton_rt.register_ops("linear_gelu_fwd", _define_triton_ops)
TRITON_GLU_REGISTERED = triton_rt.register_ops("linear_glu_fwd", _define_glu_triton_ops)


def triton_check(call) -> list[str]:
    """Reasons beyond :class:`~fastvit.backends.Capabilities` the Triton GEMMs cannot serve ``call``."""
    return [] if TRITON_REGISTERED else [triton_rt.unregistered_reason()]


if _k is not None:
    _triton_caps = Capabilities(devices=triton_rt.DEVICES, dtypes=triton_rt.DTYPES, dropout=False)
    register_kernel(
        "triton", "linear_gelu", linear_gelu_triton, _triton_caps, triton_check, check_depends_on_call_only=True
    )
    register_kernel(
        "triton", "linear_residual", linear_residual_triton, _triton_caps, triton_check, check_depends_on_call_only=True
    )
    register_kernel(
        "triton", "linear_glu", linear_glu_triton, _triton_caps, triton_check, check_depends_on_call_only=True
    )


# ============================================================================================ cuda
def _register_cuda_fakes() -> None:
    fake = torch.library.register_fake

    @fake("fastvit::linear_gelu_fwd_cuda")
    def _(x, weight, bias, approximate, save_h):
        shape = (*x.shape[:-1], weight.shape[0])
        return x.new_empty(shape), x.new_empty(shape if save_h else (0,))

    @fake("fastvit::linear_gelu_bwd_cuda")
    def _(dy, x, weight, h, approximate, has_bias):
        return x.new_empty(x.shape), x.new_empty(weight.shape), x.new_empty((weight.shape[0],) if has_bias else (0,))

    @fake("fastvit::linear_residual_fwd_cuda")
    def _(x, weight, bias, residual, gamma, save_z):
        shape = (*x.shape[:-1], weight.shape[0])
        return x.new_empty(shape), x.new_empty(shape if save_z else (0,))

    @fake("fastvit::linear_residual_bwd_cuda")
    def _(dy, x, weight, gamma, z, has_bias):
        N = weight.shape[0]
        return (
            x.new_empty(x.shape),
            x.new_empty(weight.shape),
            x.new_empty((N,) if has_bias else (0,)),
            x.new_empty((N,) if (gamma is not None and z is not None) else (0,)),
        )

    @fake("fastvit::linear_glu_fwd_cuda")
    def _(x, weight_gate, bias_gate, weight_value, bias_value, activation, save_h):
        M = weight_gate.shape[0]
        return x.new_empty((*x.shape[:-1], M)), x.new_empty((*x.shape[:-1], 2 * M) if save_h else (0,))

    @fake("fastvit::linear_glu_bwd_cuda")
    def _(dy, x, weight_gate, weight_value, h, activation, has_bias):
        nb = (weight_gate.shape[0],) if has_bias else (0,)
        return (
            x.new_empty(x.shape),
            x.new_empty(weight_gate.shape),
            x.new_empty(weight_gate.shape),
            x.new_empty(nb),
            x.new_empty(nb),
        )


def linear_gelu_cuda(x, weight, bias, *, approximate="none"):
    """CUDA backend of :func:`fastvit.ops.linear_gelu` (CUTLASS GEMM, bias + GELU epilogue; fp16 / bf16)."""
    return torch.ops.fastvit.linear_gelu_fwd_cuda(x, weight, bias, approximate, needs_grad(x, weight, bias))[0]


def linear_residual_cuda(x, weight, bias, residual, *, gamma=None):
    """CUDA backend of :func:`fastvit.ops.linear_residual` (CUTLASS GEMM, bias + LayerScale + residual epilogue)."""
    save_z = gamma is not None and needs_grad(gamma)
    return torch.ops.fastvit.linear_residual_fwd_cuda(x, weight, bias, residual, gamma, save_z)[0]


def linear_glu_cuda(x, weight, bias, weight_value=None, bias_value=None, *, activation="silu", gate_last=False):
    """CUDA backend of :func:`fastvit.ops.linear_glu` (fp16 / bf16): one CuTe dual GEMM with the gating epilogue
    (gate and value accumulated over the same x tiles, ``act(h_g) ⊙ h_x`` in registers); packed weights are split
    into row views, no copy. The two pre-activations [h_g | h_x] are stored only when autograd needs them."""
    wg, bg, wx, bx = glu_halves(weight, bias, weight_value, bias_value, gate_last)
    save_h = needs_grad(x, weight, bias, weight_value, bias_value)
    return torch.ops.fastvit.linear_glu_fwd_cuda(x, wg, bg, wx, bx, activation, save_h)[0]


def cuda_check_for(info: dict):
    """The cuda backend's extra check for this build: feature counts the CUTLASS GEMMs can take."""
    align = int(info["gemm_alignment"])

    def check(call) -> list[str]:
        reasons = []
        for key in ("in_features", "out_features"):
            n = call.get(key)
            if n is not None and n < 1:
                reasons.append(f"{key} = {n}: the CUTLASS GEMMs need at least one feature")
            elif n is not None and n % align:
                reasons.append(f"{key} = {n} is not a multiple of {align} (the CUTLASS GEMMs use 128-bit accesses)")
        return reasons

    return check


def _register_cuda(info: dict) -> None:
    _register_cuda_fakes()
    attach("linear_gelu", _linear_gelu_autograd, "_cuda")
    attach("linear_residual", _linear_residual_autograd, "_cuda")
    attach("linear_glu", _linear_glu_autograd, "_cuda")
    caps = Capabilities(
        devices=cuda_rt.DEVICES,
        dtypes=cuda_rt.half_dtypes(info),
        min_compute_capability=cuda_rt.MIN_COMPUTE_CAPABILITY,
        dropout=False,
    )
    check = cuda_check_for(info)
    register_kernel("cuda", "linear_gelu", linear_gelu_cuda, caps, check, check_depends_on_call_only=True)
    register_kernel("cuda", "linear_residual", linear_residual_cuda, caps, check, check_depends_on_call_only=True)
    register_kernel("cuda", "linear_glu", linear_glu_cuda, caps, check, check_depends_on_call_only=True)


cuda_rt.on_load(_register_cuda)
