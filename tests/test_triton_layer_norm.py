"""Triton fused residual-add + LayerNorm (fastvit.kernels.layer_norm via fastvit.families.layer_norm) against the oracle.

Runs on the CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on a
CUDA device otherwise. Every output the kernels allocate is poisoned with NaN (PyTorch's
``fill_uninitialized_memory`` under deterministic mode fills ``torch.empty`` with NaN), so an unwritten element
fails the oracle's finiteness check.
"""

from __future__ import annotations

import pytest
import torch
from oracle import check_op, make_inputs, randn

import fastvit
import fastvit.ops
from fastvit import reference
from fastvit.backends import BackendNotSupportedError

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py


def _triton_ln(x, weight, bias, residual=None, eps=1e-6):
    return fastvit.ops.layer_norm(x, weight, bias, eps, residual=residual, backend="triton")


def _naive_ln(x, weight, bias, residual=None, eps=1e-6):
    return reference.layer_norm(x, weight, bias, eps, residual=residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [192, 200, 768])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_oracle(dtype, C, with_residual, generator, device):
    specs = {"x": (2, 3, C), "weight": ((C,), 0.5), "bias": (C,), "residual": (2, 3, C) if with_residual else None}
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    inputs["weight"] = inputs["weight"] + 1.0  # around 1, never zero
    grads = ["x", "weight", "bias"] + (["residual"] if with_residual else [])
    check_op(
        {"triton": _triton_ln}, _naive_ln, inputs, grads, dtype=dtype, generator=generator, name=f"layer_norm C={C}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_layer_norm_without_affine(dtype, affine, generator, device):
    C = 200
    specs = {"x": (5, C), "weight": (C,) if affine == "weight_only" else None, "bias": None, "residual": (5, C)}
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    grads = ["x", "residual"] + (["weight"] if affine == "weight_only" else [])
    check_op(
        {"triton": _triton_ln},
        _naive_ln,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"layer_norm affine={affine}",
    )


def test_layer_norm_strided_rows(generator, device):
    """Rows separated by a stride larger than C (a column slice of a wider tensor) are read in place."""
    C = 192
    wide = randn((7, C + 40), generator=generator, device=device)
    x = wide[:, 8 : 8 + C]
    w = randn((C,), generator=generator, device=device)
    b = randn((C,), generator=generator, device=device)
    got = _triton_ln(x, w, b)
    ref = reference.layer_norm(x.double(), w.double(), b.double())
    assert (got.double() - ref).abs().max() < 1e-5


def test_layer_norm_backward_deterministic(generator, device):
    C = 768
    x = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    r = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    w = randn((C,), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    b = randn((C,), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    dy = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16)
    dh = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        y, h = _triton_ln(x, w, b, r)
        runs.append(torch.autograd.grad([y, h], [x, r, w, b], [dy, dh]))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_layer_norm_fp64_rejected_with_reasons(device):
    x = torch.randn(2, 192, dtype=torch.float64, device=device)
    with pytest.raises(BackendNotSupportedError, match="dtype"):
        _triton_ln(x, None, None)
    # automatic selection falls back quietly
    assert fastvit.ops.layer_norm(x, None, None).dtype == torch.float64


def test_layer_norm_op_fake_shapes(device):
    """The registered op's fake implementation (traced host code of triton_op) gives the right metadata."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 200, dtype=torch.float16, device=device)
        w = torch.empty(200, dtype=torch.float16, device=device)
        y, h, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, w, w, x, 1e-6)
        assert y.shape == h.shape == x.shape and y.dtype == torch.float16
        assert mean.shape == rstd.shape == (10,) and mean.dtype == torch.float32
        dx, dw, db = torch.ops.fastvit.layer_norm_bwd(y, h, h, w, mean, rstd, True)
        assert dx.shape == x.shape and dw.shape == db.shape == (200,)


def test_layer_norm_opcheck(generator, device):
    C = 24
    x = randn((3, C), generator=generator, device=device).requires_grad_()
    r = randn((3, C), generator=generator, device=device).requires_grad_()
    w = randn((C,), generator=generator, device=device).requires_grad_()
    b = randn((C,), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.layer_norm_fwd, (x, w, b, r, 1e-6), test_utils=OPCHECK_UTILS)


#: Under the interpreter wrap_triton hands back the interpreted kernel (no higher-order op), so AOT dispatch
#: would hand functional wrappers to the interpreter; that check runs on CUDA only.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)
