"""What every op family shares: registering autograd on a ``fastvit::`` forward op, and whether autograd will
want a backward at all.

Both kernel backends register the same op *schemas* (the CUDA ones carry a ``_cuda`` suffix:
``fastvit::attention_fwd`` is Triton's, ``fastvit::attention_fwd_cuda`` the extension's), so each family writes one
``setup_context`` / ``backward`` pair per op, parameterised by the backward op's name, and :func:`attach` registers
it with ``torch.library.register_autograd`` on each backend's forward op. Registering on the op (rather than
wrapping it in a ``torch.autograd.Function``) keeps ``torch.compile(fullgraph=True)`` tracing through it and lets
``torch.library.opcheck`` test the registration.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["MODES", "SELFTEST_BATCH", "attach", "autocast_cast", "by_mode", "needs_grad", "op", "permutations"]

#: ``builder(bwd_op_name) -> (setup_context, backward)``.
AutogradBuilder = Callable[[str], tuple[Callable, Callable]]


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a gradient through any of ``tensors`` (``None`` entries ignored): the forward ops
    store what their backward needs (a pre-activation, ``z``) only then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def op(name: str):
    """``torch.ops.fastvit.<name>``."""
    return getattr(torch.ops.fastvit, name)


def attach(name: str, builder: AutogradBuilder, suffix: str = "") -> None:
    """Register autograd on ``fastvit::{name}_fwd{suffix}``, differentiated by ``fastvit::{name}_bwd{suffix}``.

    Args:
        name: the op pair's stem (``"attention"``, ``"sdpa"``, ``"layer_norm"``, ...).
        builder: the family's ``(setup_context, backward)`` builder, given the backward op's name.
        suffix: ``""`` for the Triton ops, ``"_cuda"`` for the CUDA C++ ones.
    """
    setup, backward = builder(f"{name}_bwd{suffix}")
    torch.library.register_autograd(f"fastvit::{name}_fwd{suffix}", backward, setup_context=setup)


def autocast_cast(dtype: torch.dtype, *tensors):
    """``tensors`` cast to ``dtype`` as autocast casts an op's inputs: floating tensors other than fp64 that are not
    ``dtype`` already (``None`` and non-tensors pass through; the cast is differentiable, so fp32 parameters get fp32 gradients)."""
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.dtype is not dtype and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )


# ============================================================================================ declarations
#: The batch of every self-test shape.
SELFTEST_BATCH = 3


def permutations(B: int, N: int, g: torch.Generator) -> torch.Tensor:
    """(B, N) int64: B random permutations of ``0..N-1`` drawn from ``g`` (self-test indices)."""
    return torch.argsort(torch.rand(B, N, generator=g), dim=1)


#: Benchmark modes of the cost models: forward only, backward only, forward + backward.
MODES: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")


def by_mode(mode: str, fwd: int, bwd: int) -> int:
    """A cost model's count for ``mode`` from its forward and backward counts.

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """
    if mode == "fwd":
        return int(fwd)
    if mode == "bwd":
        return int(bwd)
    if mode == "fwd_bwd":
        return int(fwd + bwd)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
