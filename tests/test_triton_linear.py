"""Triton GEMM + epilogue kernels (fastvit.kernels.linear via fastvit.families.linear) against the oracle.

``linear_gelu`` (fc1 + bias + GELU, erf or tanh) and ``linear_residual`` (fc2/proj + bias + LayerScale + residual)
on backend "triton", forward and every gradient (x, weight, bias, residual, gamma), fp32 / fp16 / bf16, against
``fastvit.reference`` under the oracle of docs/ARCHITECTURE.md (tests/oracle.py). Runs on the CPU through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on a CUDA device otherwise; the interpreter's single
config uses 32 × 32 × 32 tiles, so K = 40 / 72, N = 96 / 200 and M = 1 / 50 / 183 all end in partial tiles.

Every output the kernels allocate is poisoned with NaN (PyTorch's ``fill_uninitialized_memory`` under
deterministic mode fills ``torch.empty`` with NaN), so an element a kernel forgets to write fails the oracle's
finiteness check. The module imports fastvit.families.linear itself, so it runs before fastvit.ops imports it.
"""

from __future__ import annotations

import pytest
import torch
from oracle import check_op, make_inputs, randn

import fastvit.ops
from fastvit import reference
from fastvit.backends import BackendNotSupportedError

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py


def _gelu_impl(approximate):
    def fn(x, weight, bias):
        return fastvit.ops.linear_gelu(x, weight, bias, approximate=approximate, backend="triton")

    return fn


def _gelu_naive(approximate):
    def fn(x, weight, bias):
        return reference.linear_gelu(x, weight, bias, approximate=approximate)

    return fn


def _res_impl(x, weight, bias, residual, gamma):
    return fastvit.ops.linear_residual(x, weight, bias, residual, gamma=gamma, backend="triton")


def _res_naive(x, weight, bias, residual, gamma):
    return reference.linear_residual(x, weight, bias, residual, gamma=gamma)


def _gelu_inputs(lead, K, N, dtype, device, generator, with_bias=True):
    specs = {"x": (*lead, K), "weight": ((N, K), K**-0.5), "bias": ((N,), 0.5) if with_bias else None}
    return make_inputs(specs, dtype=dtype, device=device, generator=generator)


def _res_inputs(lead, K, N, dtype, device, generator, with_bias=True, with_gamma=True):
    specs = {
        "x": (*lead, K),
        "weight": ((N, K), K**-0.5),
        "bias": ((N,), 0.5) if with_bias else None,
        "residual": (*lead, N),
        "gamma": ((N,), 0.5) if with_gamma else None,
    }
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    if with_gamma:
        inputs["gamma"] = inputs["gamma"] + 1.0  # around 1, LayerScale-like but never ~0
    return inputs


# ------------------------------------------------------------------------------------------------ linear_gelu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_oracle(dtype, approximate, generator, device):
    inputs = _gelu_inputs((2, 25), 40, 96, dtype, device, generator)
    check_op(
        {"triton": _gelu_impl(approximate)},
        _gelu_naive(approximate),
        inputs,
        ["x", "weight", "bias"],
        dtype=dtype,
        generator=generator,
        name=f"linear_gelu {approximate}",
    )


@pytest.mark.parametrize("lead,K,N", [((1,), 72, 200), ((3, 61), 72, 200)], ids=["M1", "M183"])
def test_linear_gelu_awkward_shapes(lead, K, N, generator, device):
    dtype = torch.bfloat16
    inputs = _gelu_inputs(lead, K, N, dtype, device, generator)
    check_op(
        {"triton": _gelu_impl("none")},
        _gelu_naive("none"),
        inputs,
        ["x", "weight", "bias"],
        dtype=dtype,
        generator=generator,
        name=f"linear_gelu {lead} K={K} N={N}",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_gelu_without_bias(dtype, generator, device):
    inputs = _gelu_inputs((50,), 72, 96, dtype, device, generator, with_bias=False)
    check_op(
        {"triton": _gelu_impl("none")},
        _gelu_naive("none"),
        inputs,
        ["x", "weight"],
        dtype=dtype,
        generator=generator,
        name="linear_gelu no bias",
    )


# ------------------------------------------------------------------------------------------------ linear_residual
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "nogamma"])
def test_linear_residual_oracle(dtype, with_gamma, generator, device):
    inputs = _res_inputs((2, 25), 40, 96, dtype, device, generator, with_gamma=with_gamma)
    grads = ["x", "weight", "bias", "residual"] + (["gamma"] if with_gamma else [])
    check_op(
        {"triton": _res_impl},
        _res_naive,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"linear_residual gamma={with_gamma}",
    )


@pytest.mark.parametrize(
    "lead,K,N,with_bias", [((1,), 40, 200, True), ((3, 61), 72, 96, False)], ids=["M1", "M183-nobias"]
)
def test_linear_residual_awkward_shapes(lead, K, N, with_bias, generator, device):
    dtype = torch.float16
    inputs = _res_inputs(lead, K, N, dtype, device, generator, with_bias=with_bias)
    grads = ["x", "weight", "residual", "gamma"] + (["bias"] if with_bias else [])
    check_op(
        {"triton": _res_impl},
        _res_naive,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"linear_residual {lead} K={K} N={N}",
    )


# ------------------------------------------------------------------------------------------------ properties
def test_backward_deterministic(generator, device):
    """Two backward passes give bit-identical gradients (no atomics, fixed reduction order)."""
    dtype = torch.bfloat16
    g_in = _gelu_inputs((50,), 72, 96, dtype, device, generator)
    r_in = _res_inputs((50,), 96, 40, dtype, device, generator)
    dy1 = randn((50, 96), dtype=dtype, device=device, generator=generator)
    dy2 = randn((50, 40), dtype=dtype, device=device, generator=generator)
    runs = []
    for _ in range(2):
        leaves_g = {k: v.detach().clone().requires_grad_() for k, v in g_in.items()}
        leaves_r = {k: v.detach().clone().requires_grad_() for k, v in r_in.items()}
        h = _gelu_impl("none")(**leaves_g)
        y = _res_impl(**leaves_r)
        runs.append(torch.autograd.grad([h, y], [*leaves_g.values(), *leaves_r.values()], [dy1, dy2]))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_linear_strided_input(generator, device):
    """x given as a column slice of a wider tensor (row stride > K) is read in place and gives the right answer."""
    K, N = 40, 96
    wide = randn((7, K + 24), generator=generator, device=device)
    x = wide[:, 8 : 8 + K]
    w = randn((N, K), generator=generator, device=device, scale=K**-0.5)
    b = randn((N,), generator=generator, device=device)
    got = fastvit.ops.linear_gelu(x, w, b, backend="triton")
    ref = reference.linear_gelu(x.double(), w.double(), b.double())
    assert (got.double() - ref).abs().max() < 1e-5


def test_no_grad_skips_saved_activation(generator, device):
    """Without autograd the op writes no pre-activation (the saved h / z outputs are empty)."""
    x = randn((5, 40), generator=generator, device=device)
    w = randn((96, 40), generator=generator, device=device)
    y, h = torch.ops.fastvit.linear_gelu_fwd(x, w, None, "none", False)
    assert y.shape == (5, 96) and h.numel() == 0
    r = randn((5, 96), generator=generator, device=device)
    y, z = torch.ops.fastvit.linear_residual_fwd(x, w, None, r, w[0].contiguous()[:0].new_ones(96), False)
    assert y.shape == (5, 96) and z.numel() == 0


def test_linear_fp64_rejected_with_reasons(device):
    x = torch.randn(3, 40, dtype=torch.float64, device=device)
    w = torch.randn(96, 40, dtype=torch.float64, device=device)
    with pytest.raises(BackendNotSupportedError, match="dtype"):
        fastvit.ops.linear_gelu(x, w, None, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="dtype"):
        fastvit.ops.linear_residual(x, w, None, torch.randn(3, 96, dtype=torch.float64), backend="triton")


def test_linear_ops_fake_shapes(device):
    """The registered ops' fake implementations (traced triton_op host code) give the right metadata."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 40, dtype=torch.bfloat16, device=device)
        w = torch.empty(96, 40, dtype=torch.bfloat16, device=device)
        b = torch.empty(96, dtype=torch.bfloat16, device=device)
        y, h = torch.ops.fastvit.linear_gelu_fwd(x, w, b, "tanh", True)
        assert y.shape == h.shape == (2, 5, 96) and y.dtype == h.dtype == torch.bfloat16
        dx, dw, db = torch.ops.fastvit.linear_gelu_bwd(y, x, w, h, "tanh", True)
        assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (96,)
        y, z = torch.ops.fastvit.linear_residual_fwd(x, w, b, y, b, True)
        assert y.shape == z.shape == (2, 5, 96)
        dx, dw, db, dg = torch.ops.fastvit.linear_residual_bwd(y, x, w, b, z, True)
        assert dx.shape == x.shape and dw.shape == w.shape and db.shape == dg.shape == (96,)


#: Under the interpreter wrap_triton hands back the interpreted kernel (no higher-order op), so AOT dispatch
#: would hand functional wrappers to the interpreter; that check runs on CUDA only (as for the other ops).
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_linear_opcheck(generator, device):
    K, N = 24, 40
    x = randn((3, K), generator=generator, device=device).requires_grad_()
    w = randn((N, K), generator=generator, device=device).requires_grad_()
    b = randn((N,), generator=generator, device=device).requires_grad_()
    r = randn((3, N), generator=generator, device=device).requires_grad_()
    g = randn((N,), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.linear_gelu_fwd, (x, w, b, "none", True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.fastvit.linear_residual_fwd, (x, w, b, r, g, True), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_zero_in_features(approximate, device):
    """K = 0 (an empty contraction) is valid: the output is the epilogue applied to the bias alone, and the bias
    gradient comes without a weight-gradient tile (the Triton path reshapes with the explicit token count and writes
    GELU's derivative out, as a custom op's backend runs below autograd)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 0, generator=g), torch.randn(5, 0, generator=g)
    b, r = torch.randn(5, generator=g), torch.randn(2, 3, 5, generator=g)
    for fn, ref, args, kw in (
        (fastvit.ops.linear_gelu, reference.linear_gelu, (x, w, b), {"approximate": approximate}),
        (fastvit.ops.linear_residual, reference.linear_residual, (x, w, b, r), {}),
    ):
        leaves = [a.detach().clone().to(device).requires_grad_() for a in args]
        out = fn(*leaves, **kw, backend="triton")
        out.backward(torch.ones_like(out))
        ref_leaves = [a.double().requires_grad_() for a in args]
        expect = ref(*ref_leaves, **kw)
        expect.backward(torch.ones_like(expect))
        torch.testing.assert_close(out.cpu().double(), expect, atol=1e-6, rtol=1e-6)
        for got, want in zip(leaves, ref_leaves):
            if want.numel() == 0:  # x and weight hold no elements: no gradient or an empty one
                assert got.grad is None or got.grad.shape == want.shape
                continue
            torch.testing.assert_close(got.grad.cpu().double(), want.grad, atol=1e-6, rtol=1e-6)
