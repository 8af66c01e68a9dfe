"""The ``cuda`` backend: fastvit's CUDA C++ kernels (``csrc/``), loaded, made differentiable and registered.

Layers (DESIGN.md, "Four layers per op"):

1. kernels -- ``csrc/<family>/*.cu``, torch-free, one params struct per op.
2. registered ops -- ``csrc/fastvit_api.cpp`` defines ``torch.ops.fastvit.*_cuda`` (``TORCH_LIBRARY``) with the
   same schemas as the Triton ops (see :mod:`fastvit._autograd`); this module adds their fake (meta)
   implementations, so ``torch.compile(fullgraph=True)`` and FakeTensor tracing see shapes without running them.
3. autograd -- :func:`fastvit._autograd.attach` on each forward op, shared with the Triton backend.
4. dispatch -- :func:`fastvit.backends.register_kernel` with capabilities read from the build (``build_info()``).

Where the extension comes from, in order: ``fastvit._C`` (built by ``pip install --no-build-isolation -e .`` on a
machine with nvcc and a CUDA build of torch), else a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load``
(cached under ``$TORCH_EXTENSIONS_DIR``): automatically on import when a GPU, nvcc, CUTLASS and the sources are
all present (for that GPU's arch; ``FASTVIT_CUDA_JIT=0`` turns it off), or on request (``FASTVIT_CUDA_JIT=1``,
:func:`load` with ``jit=True``). A full build compiles every (dtype, head-dim bucket) instantiation and takes a
while; ``FASTVIT_MINIMAL_BUILD=1`` compiles one per kernel template (bf16, head-dim bucket 64).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch
from torch import Tensor

from fastvit import _autograd
from fastvit import _cuda_build as build
from fastvit.backends import Capabilities, empty_sequence_reasons, register_kernel

__all__ = ["build_info", "load", "load_error"]

#: The loaded extension module (``fastvit._C`` or the JIT-built one), or ``None``.
_EXT: types.ModuleType | None = None
#: Why no extension is loaded (``None`` once one is).
_LOAD_ERROR: str | None = "not loaded yet"

#: Families whose ops the extension registers, for fakes and autograd.
_FAMILIES = ("attention", "sdpa", "layer_norm", "linear_gelu", "linear_residual", "patch_embed", "mae_unshuffle",
             "mae_loss")


def load_error() -> str | None:
    """Why the CUDA extension is not loaded, or ``None`` when it is."""
    return _LOAD_ERROR


def build_info() -> dict:
    """What the loaded extension compiled (archs, CUDA and CUTLASS versions, dtypes, head-dim buckets).

    Raises:
        RuntimeError: no extension is loaded (the message says why).
    """
    if _EXT is None:
        raise RuntimeError(f"the fastvit CUDA extension is not loaded: {_LOAD_ERROR}")
    return dict(_EXT.build_info())


def jit_build(*, minimal: bool | None = None, archs: str | None = None, verbose: bool = False,
              build_directory: str | None = None) -> types.ModuleType:
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load`` and return the loaded module.

    Args:
        minimal: one instantiation per kernel template (default: ``FASTVIT_MINIMAL_BUILD``).
        archs: ``';'``-separated compute capabilities (default: ``FASTVIT_CUDA_ARCHS`` or ``"8.0;9.0a"``).
        verbose: print the compiler's output.
        build_directory: where objects go (default: torch's extension cache, keyed by the flags).

    Raises:
        FileNotFoundError: no ``csrc/`` next to the package (installed without sources) or no CUTLASS headers.
        RuntimeError: the build failed (torch raises it with the compiler's output).
    """
    from torch.utils import cpp_extension

    if not os.path.isdir(build.CSRC):
        raise FileNotFoundError(f"no csrc/ at {build.CSRC}: the JIT build needs a source checkout")
    if build.cutlass_include() is None:
        raise FileNotFoundError("CUTLASS headers not found: pip install nvidia-cutlass")
    minimal = build.is_minimal() if minimal is None else minimal
    gencode = build.gencode_flags(archs)
    os.environ.setdefault("MAX_JOBS", str(build.max_jobs()))
    name = "fastvit_C_minimal" if minimal else "fastvit_C"
    home = build.cuda_home()
    if home is not None:  # torch guesses the toolkit from nvcc's location, which may be a wrapper's
        cpp_extension.CUDA_HOME = home
    return cpp_extension.load(
        name=name,
        sources=build.sources(minimal=minimal),
        extra_include_paths=build.include_dirs(),
        extra_cflags=[*build.CXX_FLAGS, *build.defines(minimal)],
        extra_cuda_cflags=[*build.NVCC_FLAGS, *build.defines(minimal), *gencode],
        build_directory=build_directory,
        verbose=verbose,
    )


def _jit_default() -> bool:
    """``FASTVIT_CUDA_JIT`` when set; otherwise build just in time exactly when it can work and matters: a CUDA
    device is present, torch is a CUDA build, and nvcc, CUTLASS and ``csrc/`` are here."""
    env = os.environ.get("FASTVIT_CUDA_JIT", "").strip().lower()
    if env:
        return env in {"1", "true", "yes", "on"}
    return (torch.version.cuda is not None and torch.cuda.is_available() and build.find_nvcc() is not None
            and build.cutlass_include() is not None and os.path.isdir(build.CSRC))


def _local_arch() -> str:
    """The current GPU's compute capability as a build arch (``"9.0a"`` on Hopper, whose kernels use the "a"
    features), unless ``FASTVIT_CUDA_ARCHS`` says otherwise."""
    if os.environ.get("FASTVIT_CUDA_ARCHS"):
        return os.environ["FASTVIT_CUDA_ARCHS"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def load(*, jit: bool | None = None, **jit_kwargs) -> types.ModuleType | None:
    """Load the extension (``fastvit._C``, else a JIT build when asked), register its ops' fakes and autograd and
    the ``cuda`` backend's kernels; return the module or ``None`` (then :func:`load_error` says why).

    Args:
        jit: build ``csrc/`` just in time when ``fastvit._C`` is missing. Default: ``FASTVIT_CUDA_JIT`` when set,
            else automatically when a GPU, nvcc, CUTLASS and ``csrc/`` are all present (for this GPU's arch only;
            a failure then only makes the backend unavailable, with the compiler's message in :func:`load_error`).
        **jit_kwargs: passed to :func:`jit_build`.

    Raises:
        RuntimeError / FileNotFoundError: only from an explicitly requested JIT build (``jit=True`` or
            ``FASTVIT_CUDA_JIT=1``) that fails.
    """
    global _EXT, _LOAD_ERROR
    if _EXT is not None:
        return _EXT
    ext = None
    if importlib.util.find_spec("fastvit._C") is None:
        _LOAD_ERROR = ("the extension fastvit._C is not built; build it with `pip install --no-build-isolation -e .` "
                       "on a machine with nvcc and a CUDA build of torch, or set FASTVIT_CUDA_JIT=1")
    else:
        try:
            ext = importlib.import_module("fastvit._C")
        except ImportError as exc:
            _LOAD_ERROR = f"the extension fastvit._C does not load: {exc}"
    if ext is None:
        explicit = jit is not None or os.environ.get("FASTVIT_CUDA_JIT", "").strip() != ""
        if jit is None:
            jit = _jit_default()
        if not jit:
            return None
        if explicit:
            ext = jit_build(**jit_kwargs)
        else:  # automatic: a failed build leaves the backend unavailable (with the reason), never breaks the import
            print("fastvit: fastvit._C is not built; building csrc/ just in time for this GPU (cached; "
                  "FASTVIT_CUDA_JIT=0 skips this)", file=sys.stderr)
            try:
                ext = jit_build(**{"archs": _local_arch(), **jit_kwargs})
            except Exception as exc:  # noqa: BLE001 -- reported through load_error()
                _LOAD_ERROR = f"the just-in-time build of csrc/ failed: {str(exc)[-2000:]}"
                return None
    _EXT, _LOAD_ERROR = ext, None
    _register_fakes()
    for family in _FAMILIES:
        _autograd.attach(family, "_cuda")
    _register_backend()
    return ext


# ------------------------------------------------------------------------------------------- fakes
def _empty(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)


def _out_shape(x: Tensor, n: int) -> tuple:
    return (*x.shape[:-1], n)


def _register_fakes() -> None:
    fake = torch.library.register_fake

    @fake("fastvit::attention_fwd_cuda")
    def _(qkv, num_heads, scale):
        B, N, C3 = qkv.shape
        return _empty((B, N, C3 // 3), qkv), _empty((B, num_heads, N), qkv, torch.float32)

    @fake("fastvit::attention_bwd_cuda")
    def _(dout, qkv, o, lse, num_heads, scale):
        return _empty(qkv.shape, qkv)

    @fake("fastvit::sdpa_fwd_cuda")
    def _(q, k, v, scale):
        return _empty(q.shape, q), _empty(q.shape[:3], q, torch.float32)

    @fake("fastvit::sdpa_bwd_cuda")
    def _(dout, q, k, v, o, lse, scale):
        return _empty(q.shape, q), _empty(k.shape, q), _empty(k.shape, q)

    @fake("fastvit::layer_norm_fwd_cuda")
    def _(x, weight, bias, residual, eps):
        rows = x.numel() // x.shape[-1]
        h = _empty(x.shape, x) if residual is not None else _empty((0,), x)
        return _empty(x.shape, x), h, _empty((rows,), x, torch.float32), _empty((rows,), x, torch.float32)

    @fake("fastvit::layer_norm_bwd_cuda")
    def _(dy, dh, h, weight, mean, rstd, has_bias):
        C = h.shape[-1]
        return (_empty(h.shape, h), _empty((C,) if weight is not None else (0,), h),
                _empty((C,) if has_bias else (0,), h))

    @fake("fastvit::linear_gelu_fwd_cuda")
    def _(x, weight, bias, approximate, save_h):
        shape = _out_shape(x, weight.shape[0])
        return _empty(shape, x), _empty(shape if save_h else (0,), x)

    @fake("fastvit::linear_gelu_bwd_cuda")
    def _(dy, x, weight, h, approximate, has_bias):
        return _empty(x.shape, x), _empty(weight.shape, x), _empty((weight.shape[0],) if has_bias else (0,), x)

    @fake("fastvit::linear_residual_fwd_cuda")
    def _(x, weight, bias, residual, gamma, save_z):
        shape = _out_shape(x, weight.shape[0])
        return _empty(shape, x), _empty(shape if save_z else (0,), x)

    @fake("fastvit::linear_residual_bwd_cuda")
    def _(dy, x, weight, gamma, z, has_bias):
        N = weight.shape[0]
        return (_empty(x.shape, x), _empty(weight.shape, x), _empty((N,) if has_bias else (0,), x),
                _empty((N,) if (gamma is not None and z is not None) else (0,), x))

    @fake("fastvit::patch_embed_fwd_cuda")
    def _(images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep):
        B, _, Hi, Wi = images.shape
        E, _, Ph, Pw = weight.shape
        R = (cls_token is not None) + (reg_tokens.shape[1] if reg_tokens is not None else 0)
        n_keep = ids_keep.shape[1] if ids_keep is not None else (Hi // Ph) * (Wi // Pw)
        return _empty((B, R + n_keep, E), images)

    @fake("fastvit::patch_embed_bwd_cuda")
    def _(dout, images, weight, ids_keep, pos_len, n_cls, n_reg, compute_dimages):
        E = weight.shape[0]
        return (_empty(images.shape if compute_dimages else (0,), images), _empty(weight.shape, images),
                _empty((E,), images), _empty((1, pos_len, E) if pos_len else (0,), images),
                _empty((1, n_cls, E), images), _empty((1, n_reg, E), images))

    @fake("fastvit::mae_unshuffle_fwd_cuda")
    def _(x, mask_token, ids_restore, pos_embed):
        B, _, C = x.shape
        return _empty((B, ids_restore.shape[1] + 1, C), x)

    @fake("fastvit::mae_unshuffle_bwd_cuda")
    def _(dout, ids_restore, n_keep, has_pos):
        B, T, C = dout.shape
        return (_empty((B, 1 + n_keep, C), dout), _empty((1, 1, C), dout),
                _empty((1, T, C) if has_pos else (0,), dout))

    @fake("fastvit::mae_loss_fwd_cuda")
    def _(pred, images, patch_size, norm_pix):
        return _empty(pred.shape[:2], pred, torch.float32)

    @fake("fastvit::mae_loss_bwd_cuda")
    def _(drow, pred, images, patch_size, norm_pix, compute_dimages):
        return _empty(pred.shape, pred), _empty(images.shape if compute_dimages else (0,), images)


# ------------------------------------------------------------------------------------------- dispatch entries
def _no_dropout(dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError("the cuda attention kernels do not implement dropout (dropout_p must be 0)")


def attention(qkv, num_heads, *, scale=None, dropout_p=0.0):
    """CUDA backend of :func:`fastvit.ops.attention` (FlashAttention-2 on packed qkv, fp16 / bf16, no dropout)."""
    _no_dropout(dropout_p)
    D = qkv.shape[-1] // (3 * num_heads)
    scale = D**-0.5 if scale is None else float(scale)
    return torch.ops.fastvit.attention_fwd_cuda(qkv, num_heads, scale)[0]


def scaled_dot_product_attention(q, k, v, *, scale=None, dropout_p=0.0):
    """CUDA backend of :func:`fastvit.ops.scaled_dot_product_attention` (fp16 / bf16, no dropout)."""
    _no_dropout(dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.fastvit.sdpa_fwd_cuda(q, k, v, scale)[0]


def layer_norm(x, weight, bias, eps=1e-6, *, residual=None):
    """CUDA backend of :func:`fastvit.ops.layer_norm` (fp16 / bf16 / fp32, any feature count)."""
    y, h, _, _ = torch.ops.fastvit.layer_norm_fwd_cuda(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)


def linear_gelu(x, weight, bias, *, approximate="none"):
    """CUDA backend of :func:`fastvit.ops.linear_gelu` (CUTLASS GEMM, bias + GELU epilogue; fp16 / bf16)."""
    save_h = _autograd.needs_grad(x, weight, bias)
    return torch.ops.fastvit.linear_gelu_fwd_cuda(x, weight, bias, approximate, save_h)[0]


def linear_residual(x, weight, bias, residual, *, gamma=None):
    """CUDA backend of :func:`fastvit.ops.linear_residual` (CUTLASS GEMM, bias + LayerScale + residual epilogue)."""
    save_z = gamma is not None and _autograd.needs_grad(gamma)
    return torch.ops.fastvit.linear_residual_fwd_cuda(x, weight, bias, residual, gamma, save_z)[0]


def patch_embed(images, weight, bias, *, pos_embed=None, cls_token=None, reg_tokens=None, ids_keep=None):
    """CUDA backend of :func:`fastvit.ops.patch_embed` (im2col + CUTLASS GEMM; fp16 / bf16, E % 8 == 0)."""
    return torch.ops.fastvit.patch_embed_fwd_cuda(images, weight, bias, pos_embed, cls_token, reg_tokens, ids_keep)


def mae_unshuffle(x, mask_token, ids_restore, *, pos_embed=None):
    """CUDA backend of :func:`fastvit.ops.mae_unshuffle`."""
    return torch.ops.fastvit.mae_unshuffle_fwd_cuda(x, mask_token, ids_restore, pos_embed)


def mae_loss(pred, images, mask, patch_size, *, norm_pix_loss=False):
    """CUDA backend of :func:`fastvit.ops.mae_loss`: per-patch losses in a kernel, the masked mean in torch."""
    row = torch.ops.fastvit.mae_loss_fwd_cuda(pred, images, int(patch_size), bool(norm_pix_loss))
    return _autograd.masked_mean(row, mask, pred.dtype)


# ------------------------------------------------------------------------------------------- capabilities
_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _head_dim_bucket(head_dim: int) -> int:
    return next((b for b in (32, 64, 80, 96, 128) if head_dim <= b), 0)


def _capabilities() -> dict[str, Capabilities]:
    info = build_info()
    half = frozenset(_HALF[d] for d in info["half_dtypes"].split(",") if d in _HALF)
    buckets = {int(b) for b in info["attention_head_dim_buckets"].split(",") if b.strip()}
    head_dims = frozenset(d for d in range(8, 129, 8) if _head_dim_bucket(d) in buckets)
    sm80 = (8, 0)
    every = frozenset({torch.float16, torch.bfloat16, torch.float32})
    # "meta": shape propagation through the fake implementations (a model on the meta device, FLOP counting).
    devices = frozenset({"cuda", "meta"})
    return {
        "attention": Capabilities(devices=devices, dtypes=half, head_dims=head_dims, min_compute_capability=sm80,
                                  dropout=False),
        "layer_norm": Capabilities(devices=devices, dtypes=every, min_compute_capability=sm80),
        "gemm": Capabilities(devices=devices, dtypes=half, min_compute_capability=sm80, dropout=False),
        "mae": Capabilities(devices=devices, dtypes=every, min_compute_capability=sm80),
    }


def _linear_check(call: dict) -> list[str]:
    reasons = []
    for key in ("in_features", "out_features"):
        n = call.get(key)
        if n is not None and n < 1:
            reasons.append(f"{key} = {n}: the CUTLASS GEMMs need at least one feature")
        elif n is not None and n % 8:
            reasons.append(f"{key} = {n} is not a multiple of 8 (the CUTLASS GEMMs use 128-bit accesses)")
    return reasons


def _patch_embed_check(call: dict) -> list[str]:
    e = call.get("embed_dim")
    return [f"embed_dim = {e} is not a multiple of 8"] if e is not None and e % 8 else []


#: Dynamic shared memory per block of the largest attention backward kernel (dK/dV) of the head-dim buckets 96 and
#: 128: 107,520 B (bucket 96; 104,960 B for 128), from ``Cfg::kSmemBytes`` in csrc/attention/attention_bwd.cuh as
#: ``python -m fastvit.cuda_check --all`` prints it. Buckets 32-80 need at most 80 KB. sm_80 / sm_90 allow
#: 163 / 227 KB per block; sm_86 / sm_89 (RTX 30xx / 40xx) only 99 KB.
_ATTENTION_BWD_SMEM_BYTES_D96_128 = 107_520


def _attention_check(call: dict) -> list[str]:
    reasons = empty_sequence_reasons(call)
    device, head_dim = call.get("device"), call.get("head_dim")
    if device is not None and device.type == "cuda" and head_dim is not None and _head_dim_bucket(head_dim) >= 96:
        # Not cached here: torch caches the properties, and Dynamo constant-folds this call (an lru_cache'd
        # wrapper would make it warn in every compiled attention call).
        limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        if limit < _ATTENTION_BWD_SMEM_BYTES_D96_128:
            reasons.append(f"head_dim {head_dim}: the backward needs {_ATTENTION_BWD_SMEM_BYTES_D96_128} B of shared "
                           f"memory per block and this GPU allows {limit} B")
    return reasons


def _register_backend() -> None:
    caps = _capabilities()
    register_kernel("cuda", "attention", attention, caps["attention"], _attention_check)
    register_kernel("cuda", "scaled_dot_product_attention", scaled_dot_product_attention, caps["attention"],
                    _attention_check)
    register_kernel("cuda", "layer_norm", layer_norm, caps["layer_norm"])
    register_kernel("cuda", "linear_gelu", linear_gelu, caps["gemm"], _linear_check)
    register_kernel("cuda", "linear_residual", linear_residual, caps["gemm"], _linear_check)
    register_kernel("cuda", "patch_embed", patch_embed, caps["gemm"], _patch_embed_check)
    register_kernel("cuda", "mae_unshuffle", mae_unshuffle, caps["mae"])
    register_kernel("cuda", "mae_loss", mae_loss, caps["mae"])


load()
