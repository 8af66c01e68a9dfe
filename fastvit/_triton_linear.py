"""The ``triton`` backend of ``linear_gelu`` and ``linear_residual``: registered ops around
:mod:`fastvit.kernels.linear`, autograd, dispatch entries. Same four layers and conventions as
:mod:`fastvit._triton` (whose helpers it reuses: ``_wrap``, ``input_precision``, ``_devices``, ``_DTYPES``).

Registered ops (``x`` is (..., K) viewed as (T, K) with T tokens; ``weight`` (N, K) as ``nn.Linear`` stores it):

=====================================  =================================================================================
``fastvit::linear_gelu_fwd``           (x, weight, bias?, approximate, save_h) -> (y (..., N), h (..., N) or (0,))
``fastvit::linear_gelu_bwd``           (dy, x, weight, h, approximate, has_bias) -> (dx, dweight, dbias or (0,))
``fastvit::linear_residual_fwd``       (x, weight, bias?, residual, gamma?, save_z) -> (y, z (..., N) or (0,))
``fastvit::linear_residual_bwd``       (dy, x, weight, gamma?, z?, has_bias) -> (dx, dweight, dbias, dgamma)
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
* ``linear_residual``: ``dx = (dy ⊙ γ) @ W``, ``dW = (dy ⊙ γ)ᵀ x``, ``db = Σ dy ⊙ γ`` (same kernels, γ as the
  prologue), ``dγ = Σ_tokens dy ⊙ z`` (one fp32 ``torch.sum``), ``dresidual = dy``.

Importing this module never fails: without triton (or with a torch lacking ``triton_op``) it registers nothing
here beyond what :mod:`fastvit._triton` decides; see :data:`REGISTERED`.
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

    from fastvit.kernels import linear as _lin_k
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR: Optional[str] = f"triton is not importable ({_exc})"
else:
    _IMPORT_ERROR = _base._IMPORT_ERROR

__all__ = ["REGISTERED", "linear_gelu", "linear_residual"]

#: Whether the ``fastvit::linear_*`` Triton ops were registered in this process.
REGISTERED = False


def _rows(t: Tensor) -> Tensor:
    """(..., F) -> a (T, F) view (copy only if the last dim is strided or the leading dims do not flatten)."""
    return _base._last_contiguous(t.reshape(-1, t.shape[-1]))


def _gemm(kernel, a, a_strides, b, b_strides, out, M, N, K, *, prologue=0, p=None, p_strides=(0, 0),
          epilogue=0, bias=None, residual=None, gamma=None, pre=None, row_sum=None):
    """Launch ``kernel`` (one of the autotuned :mod:`fastvit.kernels.linear` launches) for Out (M, N)."""
    dummy = out
    _base._wrap(kernel)[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
        a, b, p if p is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy, gamma if gamma is not None else dummy,
        out, pre if pre is not None else dummy, row_sum if row_sum is not None else dummy,
        M, N, K,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], p_strides[0], p_strides[1],
        residual.stride(0) if residual is not None else 0, out.stride(0), pre.stride(0) if pre is not None else 0,
        PROLOGUE=prologue, EPILOGUE=epilogue,
        HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, STORE_PRE=pre is not None,
        ROW_SUM=row_sum is not None, INPUT_PRECISION=_base.input_precision(a.dtype),
    )


def _forward_gemm(x, weight, save_pre, *, epilogue, **operands):
    """y (..., N) = epilogue(x Wᵀ + b) for x (..., K), weight (N, K); the pre-epilogue ``x Wᵀ + b`` (..., N) is
    stored too when ``save_pre`` (else an empty (0,) tensor is returned in its place). ``operands``: the bias /
    residual / gamma keywords of :func:`_gemm`."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = _rows(x)
    w = _base._last_contiguous(weight)
    T = x2.shape[0]
    y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
    pre = torch.empty((*x.shape[:-1], N) if save_pre else (0,), device=x.device, dtype=x.dtype)
    if T and N:
        _gemm(_lin_k.linear_fwd, x2, (x2.stride(0), 1), w, (1, w.stride(0)), y.view(T, N), T, N, K,
              epilogue=epilogue, pre=pre.view(T, N) if save_pre else None, **operands)
    return y, pre


def _backward_gemms(dy2, x2, w, prologue, p, p_dx_strides, p_dw_strides, need_db):
    """dx (T, K) = prologue(dy) @ W and dW (N, K) = prologue(dy)ᵀ @ x, plus fp32 Σ_tokens prologue(dy) (N,)."""
    T, N = dy2.shape
    K = x2.shape[1]
    dx = torch.empty((T, K), device=x2.device, dtype=x2.dtype)
    dw = torch.empty((N, K), device=x2.device, dtype=x2.dtype)
    db = torch.empty((N,) if need_db else (0,), device=x2.device, dtype=torch.float32)
    if T and K:
        _gemm(_lin_k.linear_dgrad, dy2, (dy2.stride(0), 1), w, (w.stride(0), 1), dx, T, K, N,
              prologue=prologue, p=p, p_strides=p_dx_strides)
    if N and K:
        _gemm(_lin_k.linear_wgrad, dy2, (1, dy2.stride(0)), x2, (x2.stride(0), 1), dw, N, K, T,
              prologue=prologue, p=p, p_strides=p_dw_strides, row_sum=db if need_db else None)
    elif need_db and N:  # K == 0: no weight-gradient tile carries the row sums
        if prologue == _lin_k.PRO_NONE:
            db = dy2.float().sum(0)
        elif prologue == _lin_k.PRO_SCALE:
            db = dy2.float().sum(0) * p.float()
        else:
            db = _gelu_grad_eager(dy2, p, prologue).sum(0)
    return dx, dw, db


def _gelu_grad_eager(dy2, h2, prologue):
    h = h2.float().requires_grad_()
    with torch.enable_grad():
        y = torch.nn.functional.gelu(h, approximate="tanh" if prologue == _lin_k.PRO_GELU_TANH else "none")
        return torch.autograd.grad(y, h, dy2.float())[0]


def _register_ops() -> None:
    triton_op = torch.library.triton_op

    # ---------------------------------------------------------------- fc1 + GELU
    @triton_op("fastvit::linear_gelu_fwd", mutates_args=())
    def linear_gelu_fwd(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str, save_h: bool
    ) -> tuple[Tensor, Tensor]:
        epilogue = _lin_k.EPI_GELU_TANH if approximate == "tanh" else _lin_k.EPI_GELU_ERF
        return _forward_gemm(x, weight, save_h, epilogue=epilogue, bias=bias)

    @triton_op("fastvit::linear_gelu_bwd", mutates_args=())
    def linear_gelu_bwd(
        dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, approximate: str, has_bias: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        N = weight.shape[0]
        x2, dy2, h2 = _rows(x), _rows(dy), _rows(h)
        w = _base._last_contiguous(weight)
        prologue = _lin_k.PRO_GELU_TANH if approximate == "tanh" else _lin_k.PRO_GELU_ERF
        dx, dw, db = _backward_gemms(dy2, x2, w, prologue, h2, (h2.stride(0), 1), (1, h2.stride(0)), has_bias)
        return dx.view(x.shape), dw, db.to(x.dtype)

    _autograd.attach("linear_gelu")

    # ---------------------------------------------------------------- fc2 / proj + LayerScale + residual
    @triton_op("fastvit::linear_residual_fwd", mutates_args=())
    def linear_residual_fwd(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor, gamma: Optional[Tensor], save_z: bool
    ) -> tuple[Tensor, Tensor]:
        return _forward_gemm(x, weight, save_z, epilogue=_lin_k.EPI_RESIDUAL, bias=bias, residual=_rows(residual),
                             gamma=gamma)

    @triton_op("fastvit::linear_residual_bwd", mutates_args=())
    def linear_residual_bwd(
        dy: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], z: Optional[Tensor], has_bias: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        N = weight.shape[0]
        x2, dy2 = _rows(x), _rows(dy)
        w = _base._last_contiguous(weight)
        if gamma is not None:
            g = _base._last_contiguous(gamma)
            dx, dw, db = _backward_gemms(dy2, x2, w, _lin_k.PRO_SCALE, g, (0, 1), (1, 0), has_bias)
        else:
            dx, dw, db = _backward_gemms(dy2, x2, w, _lin_k.PRO_NONE, None, (0, 0), (0, 0), has_bias)
        if gamma is not None and z is not None:
            dgamma = (dy2.float() * _rows(z).float()).sum(0).to(x.dtype)
        else:
            dgamma = torch.empty((0,), device=x.device, dtype=x.dtype)
        return dx.view(x.shape), dw, db.to(x.dtype), dgamma

    _autograd.attach("linear_residual")


# ------------------------------------------------------------------------------------------- dispatch entries
def linear_gelu(x, weight, bias, *, approximate="none"):
    """Triton backend of :func:`fastvit.ops.linear_gelu`: ``GELU(x Wᵀ + b)``.

    Args: x (..., K) fp16 / bf16 / fp32; weight (N, K); bias (N,) or None; approximate "none" | "tanh".
    Returns: (..., N) in x's dtype. The pre-activation is stored (input dtype) only when autograd needs it.
    """
    save_h = _autograd.needs_grad(x, weight, bias)
    y, _ = torch.ops.fastvit.linear_gelu_fwd(x, weight, bias, approximate, save_h)
    return y


def linear_residual(x, weight, bias, residual, *, gamma=None):
    """Triton backend of :func:`fastvit.ops.linear_residual`: ``residual + gamma ⊙ (x Wᵀ + b)``.

    Args: x (..., K); weight (N, K); bias, gamma (N,) or None; residual (..., N); all of x's dtype.
    Returns: (..., N) in x's dtype. ``z = x Wᵀ + b`` is stored only when gamma needs a gradient.
    """
    save_z = gamma is not None and _autograd.needs_grad(gamma)
    y, _ = torch.ops.fastvit.linear_residual_fwd(x, weight, bias, residual, gamma, save_z)
    return y


def _check(call: dict) -> list[str]:
    return [] if REGISTERED else [_base._unregistered_reason()]


def _register() -> None:
    global REGISTERED
    REGISTERED = _base._register_ops_once("linear_gelu_fwd", _register_ops)
    caps = Capabilities(devices=_base._devices(), dtypes=_base._DTYPES, dropout=False, deterministic=True)
    register_kernel("triton", "linear_gelu", linear_gelu, caps, _check)
    register_kernel("triton", "linear_residual", linear_residual, caps, _check)


if _IMPORT_ERROR is None:
    _register()
