"""``fastvit.ops.rms_norm`` (RMSNorm, Zhang & Sennrich 2019, with an optional fused residual add) on the eager and
Triton backends against the float64 reference under the oracle, against timm's ``RmsNormFp32`` / ``RmsNorm`` and
``F.rms_norm``, and its argument checks.

The Triton kernels are the LayerNorm ones with ``RMS=True`` (kernels/layer_norm.py); they run on the CPU through the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on a CUDA device otherwise. Outputs the
kernels allocate are poisoned with NaN (the ``poisoned_empty`` fixture), so an unwritten element fails the oracle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close_oracle, check_op, make_inputs, randn

import fastvit.ops
from fastvit import reference
from fastvit.families.layer_norm import autocast_rule

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py


def _rms(backend):
    def run(x, weight, residual=None, eps=1e-6):
        return fastvit.ops.rms_norm(x, weight, eps, residual=residual, backend=backend)

    return run


def _naive(x, weight, residual=None, eps=1e-6):
    return reference.rms_norm(x, weight, eps, residual=residual)


IMPLS = {"eager": _rms("eager"), "triton": _rms("triton")}


# ------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 61, 72), (2, 1, 80), (4, 7, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_rms_norm_oracle(dtype, shape, with_weight, with_residual, generator, device):
    """Forward (y, and h with the residual) and every gradient, eager and Triton, vs the float64 reference."""
    C = shape[-1]
    specs = {
        "x": shape,
        "weight": ((C,), 0.5) if with_weight else None,
        "residual": shape if with_residual else None,
    }
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    if with_weight:
        inputs["weight"] = inputs["weight"] + 1.0  # around 1, never zero
    grads = ["x"] + (["weight"] if with_weight else []) + (["residual"] if with_residual else [])
    check_op(
        IMPLS,
        _naive,
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"rms_norm {tuple(shape)}",
        output_names=["y", "h"] if with_residual else None,
    )


def test_rms_norm_strided_rows(generator, device):
    """Rows separated by a stride larger than C (a column slice of a wider tensor) are read in place."""
    C = 80
    wide = randn((7, C + 24), generator=generator, device=device)
    x = wide[:, 8 : 8 + C]
    w = randn((C,), generator=generator, device=device)
    ref = reference.rms_norm(x.double(), w.double())
    for backend in IMPLS:
        got = fastvit.ops.rms_norm(x, w, backend=backend)
        assert (got.double() - ref).abs().max() < 1e-5, backend


def test_rms_norm_only_h_used(generator, device):
    """A graph that uses only ``h`` (not ``y``) still differentiates through the Triton op (dy = 0)."""
    x = randn((2, 5, 72), generator=generator, device=device).requires_grad_()
    r = randn((2, 5, 72), generator=generator, device=device).requires_grad_()
    w = randn((72,), generator=generator, device=device).requires_grad_()
    _, h = fastvit.ops.rms_norm(x, w, residual=r, backend="triton")
    gx, gr = torch.autograd.grad(h.sum(), [x, r])
    assert torch.equal(gx, torch.ones_like(x)) and torch.equal(gr, torch.ones_like(r))


def test_rms_norm_backward_deterministic(generator, device):
    C = 200
    x = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    r = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    w = randn((C,), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    dy = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16)
    dh = randn((2, 9, C), generator=generator, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        y, h = fastvit.ops.rms_norm(x, w, residual=r, backend="triton")
        runs.append(torch.autograd.grad([y, h], [x, r, w], [dy, dh]))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


# ------------------------------------------------------------------------------------------- timm and PyTorch
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", list(IMPLS))
def test_rms_norm_matches_timm_and_torch(dtype, backend, generator, device):
    """fastvit's fp32 statistics are timm's ``RmsNormFp32`` (fp32 math, one rounding of y): equal to it up to the fp32
    summation order, i.e. within one ulp of the output dtype; timm's ``RmsNorm`` (input precision) and
    ``F.rms_norm`` (weight applied after rounding) are within the oracle, taken as its ``pt``."""
    from timm.layers import RmsNorm, RmsNormFp32

    C = 72
    x = randn((3, 61, C), generator=generator, device=device, dtype=dtype)
    w = (randn((C,), generator=generator, device=device, scale=0.5) + 1.0).to(dtype)
    fp32_mod = RmsNormFp32(C, eps=1e-6).to(device=device, dtype=dtype)
    mod = RmsNorm(C, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        fp32_mod.weight.copy_(w)
        mod.weight.copy_(w)
        want = fp32_mod(x)
        timm_lp = mod(x)
        torch_lp = F.rms_norm(x, (C,), w, 1e-6)
    got = fastvit.ops.rms_norm(x, w, 1e-6, backend=backend)
    assert got.dtype == want.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # the same fp32 value up to summation order, rounded once: at most one ulp apart
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got.float() - want.float()).abs() <= ulp).all()
    ref = reference.rms_norm(x.double(), w.double(), 1e-6)
    assert_close_oracle(got, ref, timm_lp, dtype, f"rms_norm[{backend}] vs timm RmsNorm")
    assert_close_oracle(got, ref, torch_lp, dtype, f"rms_norm[{backend}] vs F.rms_norm")


@pytest.mark.parametrize("backend", list(IMPLS))
def test_rms_norm_gradients_match_timm_fp32(backend, generator, device):
    """dx and dweight in fp32 agree with autograd through timm's ``RmsNormFp32``."""
    from timm.layers import RmsNormFp32

    C = 80
    x = randn((2, 13, C), generator=generator, device=device).requires_grad_()
    dy = randn((2, 13, C), generator=generator, device=device)
    mod = RmsNormFp32(C, eps=1e-6).to(device)
    with torch.no_grad():
        mod.weight.copy_(randn((C,), generator=generator, device=device, scale=0.5) + 1.0)
    w = mod.weight.detach().clone().requires_grad_()
    want = torch.autograd.grad(mod(x), [x, mod.weight], dy)
    got = torch.autograd.grad(fastvit.ops.rms_norm(x, w, 1e-6, backend=backend), [x, w], dy)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- autocast
def test_rms_norm_cuda_autocast_rule_is_fp32():
    """On CUDA autocast runs ``F.rms_norm`` in fp32 (its "autocast to float32" list); the check step does the same."""
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    w = torch.randn(8, dtype=torch.bfloat16)
    xc, wc, bc, rc = autocast_rule("cuda", x, w, None, x)
    assert xc.dtype == wc.dtype == rc.dtype == torch.float32 and bc is None
    assert autocast_rule("cpu", x, w, None, None)[:2] == (x, w)


def test_rms_norm_cpu_autocast_mixed_weight(generator):
    """Under CPU autocast the operands stay as given: a bf16 x with an fp32 weight returns bf16, as ``F.rms_norm``."""
    x = randn((3, 5, 72), generator=generator, dtype=torch.bfloat16)
    w = randn((72,), generator=generator) + 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call = fastvit.ops.describe_call("rms_norm", x, w)
        y = fastvit.ops.rms_norm(x, w)
        want = F.rms_norm(x, (72,), w, 1e-6)
    assert call.mixed_dtypes and y.dtype == want.dtype == torch.bfloat16
    ref = reference.rms_norm(x.double(), w.double())
    assert_close_oracle(y, ref, want, torch.bfloat16, "rms_norm under CPU autocast")


# ------------------------------------------------------------------------------------------- bad input
def _bad_calls():
    x = torch.randn(2, 3, 8)
    w = torch.randn(8)
    return [
        ("x", TypeError, "x must be a torch.Tensor", ([[1.0]], w), {}),
        (
            "x int",
            TypeError,
            "x must be float16, bfloat16, float32 or float64",
            (torch.ones(2, 8, dtype=torch.int64), None),
            {},
        ),
        ("x empty", ValueError, "x must have a non-empty last dimension", (torch.randn(2, 0), None), {}),
        ("x scalar", ValueError, "x must have a non-empty last dimension", (torch.tensor(1.0), None), {}),
        ("weight shape", ValueError, r"weight must have shape \(8,\)", (x, torch.randn(9)), {}),
        ("weight dtype", TypeError, "weight has dtype torch.float16 but x has torch.float32", (x, w.half()), {}),
        ("weight device", ValueError, "weight is on meta but x is on cpu", (x, w.to("meta")), {}),
        ("weight type", TypeError, "weight must be a torch.Tensor", (x, [1.0] * 8), {}),
        (
            "residual shape",
            ValueError,
            r"residual must have shape \(2, 3, 8\)",
            (x, w),
            {"residual": torch.randn(2, 8)},
        ),
        ("residual dtype", TypeError, "residual has dtype", (x, w), {"residual": x.double()}),
        ("eps negative", ValueError, "eps must be >= 0", (x, w, -1.0), {}),
        ("eps nan", ValueError, "eps must be >= 0", (x, w, float("nan")), {}),
        ("eps none", TypeError, "eps must be a float", (x, w, None), {}),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_rms_norm_bad_input_names_the_argument(case):
    _, exc, match, args, kwargs = case
    with pytest.raises(exc, match=match):
        fastvit.ops.rms_norm(*args, **kwargs)
    with pytest.raises(exc, match=match):  # the same check step describes the call
        fastvit.ops.describe_call("rms_norm", *args, **kwargs)


def test_rms_norm_triton_rejects_too_many_features_with_reasons(device):
    from fastvit.backends import BackendNotSupportedError
    from fastvit.kernels.layer_norm import MAX_C

    x = torch.randn(1, MAX_C + 1, device=device)
    with pytest.raises(BackendNotSupportedError, match=f"{MAX_C + 1} features"):
        fastvit.ops.rms_norm(x, None, backend="triton")


# ------------------------------------------------------------------------------------------- the registered ops
def test_rms_norm_op_fake_shapes(device):
    """The registered ops' fake implementations (traced host code of triton_op) give the right metadata."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 72, dtype=torch.bfloat16, device=device)
        w = torch.empty(72, dtype=torch.bfloat16, device=device)
        y, h, rstd = torch.ops.fastvit.rms_norm_fwd(x, w, x, 1e-6)
        assert y.shape == h.shape == x.shape and y.dtype == h.dtype == torch.bfloat16
        assert rstd.shape == (10,) and rstd.dtype == torch.float32
        _, h0, _ = torch.ops.fastvit.rms_norm_fwd(x, None, None, 1e-6)
        assert h0.shape == (0,)
        dx, dw = torch.ops.fastvit.rms_norm_bwd(y, h, h, w, rstd)
        assert dx.shape == x.shape and dw.shape == (72,)
        _, dw0 = torch.ops.fastvit.rms_norm_bwd(y, None, h, None, rstd)
        assert dw0.shape == (0,)


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_rms_norm_opcheck(with_weight, with_residual, generator, device):
    from test_triton_layer_norm import OPCHECK_UTILS

    C = 24
    x = randn((3, C), generator=generator, device=device).requires_grad_()
    r = randn((3, C), generator=generator, device=device).requires_grad_() if with_residual else None
    w = randn((C,), generator=generator, device=device).requires_grad_() if with_weight else None
    torch.library.opcheck(torch.ops.fastvit.rms_norm_fwd, (x, w, r, 1e-6), test_utils=OPCHECK_UTILS)
