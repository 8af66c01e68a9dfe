"""The ``triton`` backend: registered ``fastvit::`` ops around :mod:`fastvit.kernels`, autograd, dispatch entries.

Layers (see DESIGN.md, "Four layers per op"):

1. kernels -- :mod:`fastvit.kernels.attention` (FlashAttention-2 forward, preprocess, dK/dV, dQ) and
   :mod:`fastvit.kernels.layer_norm` (fused residual add + LayerNorm forward and backward);
2. registered ops -- ``torch.library.triton_op`` with ``torch.library.wrap_triton`` launches, so fake (meta)
   implementations come for free by tracing the host code and ``torch.compile(fullgraph=True)`` sees the
   kernels themselves:

   ==============================  =====================================================================
   ``fastvit::attention_fwd``      (qkv (B,N,3C), num_heads, scale) -> (o (B,N,C), lse (B,H,N) fp32)
   ``fastvit::attention_bwd``      (do, qkv, o, lse, num_heads, scale) -> dqkv (B,N,3C)
   ``fastvit::sdpa_fwd``           (q, k, v (B,H,N*,D), scale) -> (o (B,H,Nq,D), lse (B,H,Nq) fp32)
   ``fastvit::sdpa_bwd``           (do, q, k, v, o, lse, scale) -> (dq, dk, dv)
   ``fastvit::layer_norm_fwd``     (x, weight?, bias?, residual?, eps) -> (y, h, mean, rstd)
   ``fastvit::layer_norm_bwd``     (dy, dh?, h, weight?, mean, rstd, has_bias) -> (dx, dweight, dbias)
   ==============================  =====================================================================

3. autograd -- ``register_autograd`` on the forward ops, through :func:`fastvit._autograd.attach` (shared with the
   CUDA C++ backend, whose ops have the same schemas). Chosen over a ``torch.autograd.Function`` because the
   op itself becomes differentiable: ``torch.ops.fastvit.*`` works with autograd directly, ``opcheck`` tests the
   registration, and ``torch.compile`` / AOTAutograd see one custom op whose backward is another registered op,
   with no Python-level Function to trace. Per-call overhead on the GPU still has to be measured (DESIGN.md);
   the switch is local to this file.
4. dispatch -- :func:`fastvit.backends.register_kernel` for ``attention``, ``scaled_dot_product_attention`` and
   ``layer_norm``.

Importing this module never fails: without triton it registers nothing (the backend then reports "the triton
package is not installed"); with a torch that lacks ``triton_op`` / ``wrap_triton`` (< 2.6) it registers entries
whose ``extra_check`` explains why they cannot run.
"""

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from fastvit import _autograd
from fastvit.backends import Capabilities, empty_sequence_reasons, register_kernel

try:
    import triton

    from fastvit.kernels import attention as _attn_k
    from fastvit.kernels import layer_norm as _ln_k
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR: Optional[str] = f"triton is not importable ({_exc})"
else:
    _IMPORT_ERROR = None

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = ["REGISTERED", "input_precision"]

#: Whether the ``fastvit::`` Triton ops were registered in this process.
REGISTERED = False


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for ``dtype``: "tf32" for fp32 only when PyTorch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision() != "highest"``),
    else "ieee". Half inputs ignore it (their products are exact in fp32)."""
    if dtype != torch.float32:
        return "ieee"
    try:
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    except Exception:  # pragma: no cover - very old or very new torch
        tf32 = False
    return "tf32" if tf32 else "ieee"


def _bhn(t: torch.Tensor, head_dim: int) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, N, H·D) head-major view or a (B, H, N, D) tensor."""
    if t.dim() == 3:
        return t.stride(0), head_dim * t.stride(2), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


#: The attention kernels compute per-token offsets (token index x token stride) in int32; batch and head offsets
#: are int64.
_INT32_MAX = 2**31 - 1


def _bhnd_operand(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, D) attention operand the kernels can index: unit last stride, and token offsets within int32 --
    a sequence-first view such as ``x.view(N, B, H, D).permute(1, 2, 0, 3)`` has token stride B·H·D, which
    overflows for long sequences and large batches; such a view is copied to contiguous (token stride D)."""
    t = _last_contiguous(t)
    if (t.shape[2] + 128) * t.stride(2) > _INT32_MAX:  # + 128: the kernels' padded query / key blocks
        t = t.contiguous()
    return t


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter: few programs, each looping over many rows


# ------------------------------------------------------------------------------------------- launches
def _is_fake(a: object) -> bool:
    return isinstance(a, torch.Tensor) and (a.is_meta or isinstance(a, torch._subclasses.FakeTensor))


class _InterpretedLaunch:
    """``kernel[grid](...)`` for the Triton interpreter, skipping launches on fake / meta tensors.

    Under ``TRITON_INTERPRET=1`` ``torch.library.wrap_triton`` returns the interpreted kernel itself (torch >= 2.9;
    older torch rejects it), so tracing the ``triton_op`` body for its fake implementation would run the kernel on
    fake tensors. Only shapes matter there, so the launch is skipped.
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if any(_is_fake(a) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)

        return launch


def _wrap(kernel):
    return _InterpretedLaunch(kernel) if _INTERPRET else torch.library.wrap_triton(kernel)


def _launch_fwd(q, k, v, o, lse, B, H, n_q, n_kv, D, scale):
    kern = _wrap(_attn_k.attn_fwd)
    kern[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), H, B)](
        q, k, v, o, lse,
        *_bhn(q, D), *_bhn(k, D), *_bhn(v, D), *_bhn(o, D),
        H, n_q, n_kv, D, scale * _attn_k.LOG2E,
        BLOCK_D=_attn_k.block_d(D), INPUT_PRECISION=input_precision(q.dtype),
    )


def _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, H, n_q, n_kv, D, scale):
    delta = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    bm = _attn_k.PREPROCESS_BLOCK_M
    _wrap(_attn_k.attn_bwd_preprocess)[(triton.cdiv(n_q, bm), H, B)](
        o, do, delta, *_bhn(o, D), *_bhn(do, D), H, n_q, D, BLOCK_M=bm, BLOCK_D=_attn_k.block_d(D),
    )
    prec = input_precision(q.dtype)
    _wrap(_attn_k.attn_bwd_dkdv)[lambda meta: (triton.cdiv(n_kv, meta["BLOCK_N"]), H, B)](
        q, k, v, do, lse, delta, dk, dv,
        *_bhn(q, D), *_bhn(k, D), *_bhn(v, D), *_bhn(do, D), *_bhn(dk, D), *_bhn(dv, D),
        H, n_q, n_kv, D, scale,
        BLOCK_D=_attn_k.block_d(D), INPUT_PRECISION=prec,
    )
    _wrap(_attn_k.attn_bwd_dq)[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), H, B)](
        q, k, v, do, lse, delta, dq,
        *_bhn(q, D), *_bhn(k, D), *_bhn(v, D), *_bhn(do, D), *_bhn(dq, D),
        H, n_q, n_kv, D, scale,
        BLOCK_D=_attn_k.block_d(D), INPUT_PRECISION=prec,
    )


def _register_ops() -> None:
    triton_op = torch.library.triton_op

    # ---------------------------------------------------------------- attention on packed qkv
    @triton_op("fastvit::attention_fwd", mutates_args=())
    def attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
        qkv = _last_contiguous(qkv)
        B, N, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        o = torch.empty((B, N, C), device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
        if o.numel():
            _launch_fwd(qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :], o, lse, B, num_heads, N, N, D, scale)
        return o, lse

    @triton_op("fastvit::attention_bwd", mutates_args=())
    def attention_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, num_heads: int, scale: float) -> Tensor:
        qkv = _last_contiguous(qkv)
        do = _last_contiguous(do)
        B, N, C3 = qkv.shape
        C = C3 // 3
        D = C // num_heads
        dqkv = torch.empty((B, N, C3), device=qkv.device, dtype=qkv.dtype)
        if dqkv.numel():
            q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
            dq, dk, dv = dqkv[..., :C], dqkv[..., C : 2 * C], dqkv[..., 2 * C :]
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, num_heads, N, N, D, scale)
        return dqkv

    _autograd.attach("attention")

    # ---------------------------------------------------------------- attention on (B, H, N, D)
    @triton_op("fastvit::sdpa_fwd", mutates_args=())
    def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = _bhnd_operand(q), _bhnd_operand(k), _bhnd_operand(v)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        o = torch.empty((B, H, n_q, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
        if o.numel() and n_kv:
            _launch_fwd(q, k, v, o, lse, B, H, n_q, n_kv, D, scale)
        elif o.numel():  # softmax over no keys: eager attention gives zeros; the log-sum-exp of nothing is -inf
            o.zero_()
            lse.fill_(float("-inf"))
        return o, lse

    @triton_op("fastvit::sdpa_bwd", mutates_args=())
    def sdpa_bwd(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, do = _bhnd_operand(q), _bhnd_operand(k), _bhnd_operand(v), _bhnd_operand(do)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        dq = torch.empty((B, H, n_q, D), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, H, n_kv, D), device=q.device, dtype=q.dtype)
        dv = torch.empty((B, H, n_kv, D), device=q.device, dtype=q.dtype)
        if dq.numel() and n_kv:
            _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, B, H, n_q, n_kv, D, scale)
        else:  # no queries or no keys: every gradient is zero
            dq.zero_()
            dk.zero_()
            dv.zero_()
        return dq, dk, dv

    _autograd.attach("sdpa")

    # ---------------------------------------------------------------- layer norm
    @triton_op("fastvit::layer_norm_fwd", mutates_args=())
    def layer_norm_fwd(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        C = x.shape[-1]
        x2 = _last_contiguous(x.reshape(-1, C))
        M = x2.shape[0]
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        y2 = y.view(-1, C)
        mean = torch.empty((M,), device=x.device, dtype=torch.float32)
        rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
        if residual is not None:
            r2 = _last_contiguous(residual.reshape(-1, C))
            h = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            h2 = h.view(-1, C)
        else:
            r2, h2 = x2, y2  # unused pointers (HAS_RESIDUAL is False)
            h = torch.empty((0,), device=x.device, dtype=x.dtype)
        if M:
            _wrap(_ln_k._ln_fwd_kernel)[(M,)](
                x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
                y2, h2, mean, rstd,
                x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
                C, eps,
                HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_C=_ln_k.block_c(C), num_warps=_ln_k.num_warps_for(C),
            )
        return y, h, mean, rstd

    @triton_op("fastvit::layer_norm_bwd", mutates_args=())
    def layer_norm_bwd(
        dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        C = h.shape[-1]
        h2 = _last_contiguous(h.reshape(-1, C))
        dy2 = _last_contiguous(dy.reshape(-1, C))
        M = h2.shape[0]
        dx = torch.empty(h.shape, device=h.device, dtype=h.dtype)
        dx2 = dx.view(-1, C)
        dh2 = _last_contiguous(dh.reshape(-1, C)) if dh is not None else dy2
        rows = triton.cdiv(M, max(1, min(M, 4 * _num_sms(h.device)))) if M else 1
        programs = triton.cdiv(M, rows) if M else 0
        compute_dw, compute_db = weight is not None, has_bias
        dwp = torch.empty((programs if compute_dw else 0, C), device=h.device, dtype=torch.float32)
        dbp = torch.empty((programs if compute_db else 0, C), device=h.device, dtype=torch.float32)
        if M:
            _wrap(_ln_k._ln_bwd_kernel)[(programs,)](
                h2, weight if weight is not None else h2, mean, rstd, dy2, dh2, dx2,
                dwp if compute_dw else mean, dbp if compute_db else mean,
                h2.stride(0), dy2.stride(0), dh2.stride(0), dx2.stride(0),
                M, C, rows,
                HAS_DH_IN=dh is not None, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw,
                COMPUTE_DB=compute_db, BLOCK_C=_ln_k.block_c(C), num_warps=_ln_k.num_warps_for(C),
            )
        dw = dwp.sum(0).to(h.dtype) if compute_dw else torch.empty((0,), device=h.device, dtype=h.dtype)
        db = dbp.sum(0).to(h.dtype) if compute_db else torch.empty((0,), device=h.device, dtype=h.dtype)
        return dx, dw, db

    _autograd.attach("layer_norm")


# ------------------------------------------------------------------------------------------- dispatch entries
def attention(qkv, num_heads, *, scale=None, dropout_p=0.0):
    """Triton backend of :func:`fastvit.ops.attention` (no dropout)."""
    if dropout_p > 0.0:
        raise ValueError("the triton attention kernels do not implement dropout (dropout_p must be 0)")
    D = qkv.shape[-1] // (3 * num_heads)
    scale = D**-0.5 if scale is None else float(scale)
    return torch.ops.fastvit.attention_fwd(qkv, num_heads, scale)[0]


def scaled_dot_product_attention(q, k, v, *, scale=None, dropout_p=0.0):
    """Triton backend of :func:`fastvit.ops.scaled_dot_product_attention` (no dropout)."""
    if dropout_p > 0.0:
        raise ValueError("the triton attention kernels do not implement dropout (dropout_p must be 0)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.fastvit.sdpa_fwd(q, k, v, scale)[0]


def layer_norm(x, weight, bias, eps=1e-6, *, residual=None):
    """Triton backend of :func:`fastvit.ops.layer_norm`.

    Raises:
        ValueError: ``x.shape[-1]`` above :data:`fastvit.kernels.layer_norm.MAX_C` (one row must fit in registers).
    """
    C = x.shape[-1]
    if C > _ln_k.MAX_C:
        raise ValueError(f"the triton layer_norm kernel takes at most {_ln_k.MAX_C} features, got x of shape "
                         f"{tuple(x.shape)}")
    y, h, _, _ = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)


def _devices() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if _INTERPRET else frozenset({"cuda"})


_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


#: CUDA's limit on a grid's y and z dimensions; the attention grids are (query blocks, H, B).
_MAX_GRID_YZ = 65535


def _attention_check(call: dict) -> list[str]:
    reasons = []
    if not REGISTERED:
        reasons.append(_unregistered_reason())
    batch = call.get("batch")
    if batch is not None and batch > _MAX_GRID_YZ:
        reasons.append(f"batch = {batch} > {_MAX_GRID_YZ} (the kernels put the batch on the CUDA grid's z dimension)")
    return reasons + empty_sequence_reasons(call)


def _layer_norm_check(call: dict) -> list[str]:
    reasons = []
    if not REGISTERED:
        reasons.append(_unregistered_reason())
    c = call.get("features", call.get("num_features"))
    if c is not None and c > _ln_k.MAX_C:
        reasons.append(f"{c} features > {_ln_k.MAX_C} (one row must fit in registers)")
    return reasons


#: Whether this process can run Triton kernels at all: on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1.
#: Without either the ``fastvit::`` Triton ops are not registered: ``triton_op`` imports ``torch._inductor``, which
#: cost 1.4 s of a 3.4 s ``import fastvit`` on a CPU-only machine (``python -X importtime``), for a backend that
#: reports "no CUDA device" there anyway.
_CAN_RUN = _INTERPRET or torch.cuda.is_available()


def _unregistered_reason() -> str:
    if not _HAS_TRITON_OP:
        return (f"torch {torch.__version__} lacks torch.library.triton_op / wrap_triton (needs torch >= 2.6), so "
                "the fastvit:: Triton ops are not registered")
    return ("the fastvit:: Triton ops were not registered: no CUDA device was present when fastvit was imported "
            "(and TRITON_INTERPRET was not 1)")


def _register_ops_once(probe: str, register_ops) -> bool:
    """Call ``register_ops`` (which defines ``fastvit::`` Triton ops) unless ``torch.ops.fastvit.<probe>`` already
    exists (the module was reloaded); returns whether the ops are registered. Registers nothing, and returns
    ``False``, when torch lacks ``triton_op`` or this process cannot run Triton kernels (see ``_CAN_RUN``)."""
    if not (_HAS_TRITON_OP and _CAN_RUN):
        return False
    try:
        getattr(torch.ops.fastvit, probe)
    except (AttributeError, RuntimeError):
        register_ops()
    return True


def _register() -> None:
    global REGISTERED
    REGISTERED = _register_ops_once("attention_fwd", _register_ops)
    attn_caps = Capabilities(
        devices=_devices(),
        dtypes=_DTYPES,
        head_dims=frozenset(range(_attn_k.MIN_HEAD_DIM, _attn_k.MAX_HEAD_DIM + 1)),
        dropout=False,
        deterministic=True,
    )
    register_kernel("triton", "attention", attention, attn_caps, _attention_check)
    register_kernel("triton", "scaled_dot_product_attention", scaled_dot_product_attention, attn_caps,
                    _attention_check)
    ln_caps = Capabilities(devices=_devices(), dtypes=_DTYPES, deterministic=True)
    register_kernel("triton", "layer_norm", layer_norm, ln_caps, _layer_norm_check)


if _IMPORT_ERROR is None:
    _register()
