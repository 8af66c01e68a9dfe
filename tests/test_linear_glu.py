"""``fastvit.ops.linear_glu`` (issue 23 item 2): a gated MLP's fc1 + gating as one op.

* eager and Triton (interpreter on the CPU) forward and every gradient (x, both weights, both biases) against
  ``fastvit.reference.linear_glu`` (float64) under the oracle, fp32 / bf16 / fp16, SiLU / GELU (and tanh GELU,
  sigmoid), split and packed layouts (gate first and last), with and without bias, K / M tails (72, 80),
  1 and 61 tokens;
* timm's ``SwiGLU``, ``GluMlp`` (sigmoid, GELU, gate_last both ways) and ``SwiGLUPacked`` through the forwards of
  ``fastvit.integrations._timm_glu`` against timm's own forward, outputs and gradients;
* errors naming the argument, the CUDA backend's reasons (its kernel: tests/test_cuda_extension.py for the schemas,
  fakes and dispatch without a GPU, tests/test_cuda_ops.py for the numerics on one), the registered ops' fakes and
  schema, the self-test.

Outputs the kernels allocate are poisoned with NaN (see tests/conftest.py), so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch
from oracle import check_op, make_inputs, randn
from torch import nn

import fastvit
import fastvit.ops
from fastvit import backends, reference
from fastvit.declare import DECLARATIONS

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _impl(backend, activation, gate_last=False):
    def fn(x, weight, bias, weight_value=None, bias_value=None):
        return fastvit.ops.linear_glu(
            x, weight, bias, weight_value, bias_value, activation=activation, gate_last=gate_last, backend=backend
        )

    return fn


def _naive(activation, gate_last=False):
    def fn(x, weight, bias, weight_value=None, bias_value=None):
        return reference.linear_glu(
            x, weight, bias, weight_value, bias_value, activation=activation, gate_last=gate_last
        )

    return fn


def _inputs(lead, K, M, dtype, device, generator, *, packed=False, bias=True):
    w = ((2 * M if packed else M, K), K**-0.5)
    specs = {"x": (*lead, K), "weight": w, "bias": ((w[0][0],), 0.5) if bias else None}
    if not packed:
        specs["weight_value"] = ((M, K), K**-0.5)
        specs["bias_value"] = ((M,), 0.5) if bias else None
    inputs = make_inputs(specs, dtype=dtype, device=device, generator=generator)
    return inputs, [n for n, v in inputs.items() if v is not None]


def _check(lead, K, M, dtype, activation, device, generator, *, packed=False, gate_last=False, bias=True):
    inputs, grads = _inputs(lead, K, M, dtype, device, generator, packed=packed, bias=bias)
    check_op(
        {"triton": _impl("triton", activation, gate_last), "eager": _impl("eager", activation, gate_last)},
        _naive(activation, gate_last),
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"linear_glu {activation} {'packed' if packed else 'split'} {lead} K={K} M={M}",
    )


# ------------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_split_oracle(dtype, activation, generator, device):
    """SwiGLU / GeGLU with separate gate and value weights: 61 tokens, K = 72, M = 80 (tails in every dim)."""
    _check((61,), 72, 80, dtype, activation, device, generator)


@pytest.mark.parametrize(
    "dtype,activation,gate_last",
    [
        (torch.float32, "silu", False),
        (torch.bfloat16, "sigmoid", True),
        (torch.float16, "gelu_tanh", True),
        (torch.bfloat16, "gelu", False),
    ],
    ids=["fp32-silu-first", "bf16-sigmoid-last", "fp16-tanh-last", "bf16-gelu-first"],
)
def test_packed_oracle(dtype, activation, gate_last, generator, device):
    """timm's GluMlp layout: one (2·M, K) weight, gate first or last; K = 80, M = 72."""
    _check((61,), 80, 72, dtype, activation, device, generator, packed=True, gate_last=gate_last)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_bias(packed, dtype, generator, device):
    _check((61,), 72, 72, dtype, "silu", device, generator, packed=packed, bias=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_token(dtype, generator, device):
    _check((1,), 80, 72, dtype, "silu", device, generator)


def test_leading_dims_and_half_bias(generator, device):
    """(B, N, K) input, only the gate has a bias (bias_value None): its gradient alone comes back."""
    inputs, _ = _inputs((2, 5), 32, 40, torch.float32, device, generator)
    inputs["bias_value"] = None
    check_op(
        {"triton": _impl("triton", "gelu"), "eager": _impl("eager", "gelu")},
        _naive("gelu"),
        inputs,
        ["x", "weight", "bias", "weight_value"],
        dtype=torch.float32,
        generator=generator,
        name="linear_glu (2, 5) gate bias only",
    )


def test_backward_deterministic(generator, device):
    """Two backward passes give bit-identical gradients (no atomics)."""
    inputs, names = _inputs((61,), 72, 80, torch.bfloat16, device, generator)
    dy = randn((61, 80), dtype=torch.bfloat16, device=device, generator=generator)
    runs = []
    for _ in range(2):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y = _impl("triton", "silu")(**leaves)
        runs.append(torch.autograd.grad(y, [leaves[n] for n in names], dy))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


def test_no_grad_skips_saved_activations(generator, device):
    x = randn((5, 40), generator=generator, device=device)
    w = randn((48, 40), generator=generator, device=device)
    y, h = torch.ops.fastvit.linear_glu_fwd(x, w, None, w, None, "silu", False)
    assert y.shape == (5, 48) and h.numel() == 0
    y, h = torch.ops.fastvit.linear_glu_fwd(x, w, None, w, None, "silu", True)
    assert h.shape == (5, 96)  # [h_g | h_x]


def test_empty_in_features(device):
    """K = 0: y = act(b_g) ⊙ b_x; the bias gradients come from the K = 0 path (no weight-gradient tile)."""
    x = torch.zeros(3, 0, device=device, requires_grad=True)
    w = torch.zeros(16, 0, device=device, requires_grad=True)
    b = torch.linspace(-2, 2, 16, device=device, requires_grad=True)
    ys = [fastvit.ops.linear_glu(x, w, b, backend=be) for be in ("triton", "eager")]
    torch.testing.assert_close(ys[0], ys[1])
    grads = [torch.autograd.grad(y.sum(), b)[0] for y in ys]
    torch.testing.assert_close(grads[0], grads[1])


def test_autocast_casts_like_linear(generator):
    """Under CPU autocast (bf16) fp32 parameters are cast as F.linear casts them: bf16 out, fp32 gradients."""
    x = randn((4, 24), generator=generator).requires_grad_()
    w = randn((32, 24), generator=generator).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastvit.ops.linear_glu(x, w, None, activation="gelu", gate_last=True, backend="eager")
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16)
    (gw,) = torch.autograd.grad(y.float().sum(), w)
    assert gw.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ timm
timm = pytest.importorskip("timm")
from timm.layers.mlp import GluMlp, SwiGLU, SwiGLUPacked  # noqa: E402

from fastvit.integrations import _timm_glu  # noqa: E402


def _randomise(m: nn.Module, generator) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5)
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return m


TIMM_CASES = {
    "SwiGLU": (lambda: SwiGLU(40, 48), _timm_glu.swiglu_forward),
    "SwiGLU-nobias-norm": (
        lambda: SwiGLU(40, 48, bias=False, norm_layer=nn.LayerNorm),
        _timm_glu.swiglu_forward,
    ),
    "GluMlp-sigmoid": (lambda: GluMlp(40, 96), _timm_glu.glu_mlp_forward),
    "GluMlp-gelu-gate_first": (lambda: GluMlp(40, 96, act_layer=nn.GELU, gate_last=False), _timm_glu.glu_mlp_forward),
    "SwiGLUPacked": (lambda: SwiGLUPacked(40, 96), _timm_glu.glu_mlp_forward),
}


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_module_equality(case, backend, generator):
    """A timm gated MLP's output and every gradient (x and each parameter) through the fused forward equal timm's
    own forward (fp32; the Triton kernels up to fp32 rounding)."""
    make, forward = TIMM_CASES[case]
    m = _randomise(make(), generator)
    x = randn((2, 7, 40), generator=generator).requires_grad_()
    names = [n for n, _ in m.named_parameters()]
    y_ref = m(x)
    g_ref = torch.autograd.grad(y_ref.sum(), [x, *m.parameters()])
    with fastvit.use_backend(backend):
        y = forward(m, x)
    g = torch.autograd.grad(y.sum(), [x, *m.parameters()])
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    for name, a, b in zip(["x", *names], g, g_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda msg, name=name: f"grad {name}: {msg}")


def test_timm_fused_path_runs_linear_glu(monkeypatch, generator):
    """Plain modules take the fused op once; a forward hook on fc1 makes the forward call fc1 as a module."""
    calls = []
    orig = fastvit.ops.linear_glu
    monkeypatch.setattr(fastvit.ops, "linear_glu", lambda *a, **k: calls.append(1) or orig(*a, **k))
    m = _randomise(SwiGLU(16, 24), generator)
    x = randn((3, 16), generator=generator)
    _timm_glu.swiglu_forward(m, x)
    assert len(calls) == 1
    seen = []
    m.fc1_g.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    y = _timm_glu.swiglu_forward(m, x)
    assert len(calls) == 1 and seen == [(3, 24)]
    torch.testing.assert_close(y, m(x))


def test_timm_dropout_active_is_applied(generator):
    """drop1 active (training, p > 0): the dropout module still runs after the fused gating (same mask as timm
    for the same RNG state)."""
    m = _randomise(SwiGLU(16, 24, drop=0.5), generator).train()
    x = randn((3, 16), generator=generator)
    torch.manual_seed(0)
    ref = m(x)
    torch.manual_seed(0)
    torch.testing.assert_close(_timm_glu.swiglu_forward(m, x), ref)


def test_timm_uncovered_configurations_fall_back():
    m = GluMlp(16, 32, act_layer=nn.ReLU)
    assert _timm_glu.glu_mlp_reasons(m) == ["activation ReLU not covered (SiLU / Swish, GELU, GELU-tanh, Sigmoid)"]
    x = torch.randn(2, 16)
    torch.testing.assert_close(_timm_glu.glu_mlp_forward(m, x), m(x))
    with pytest.raises(ValueError, match="activation ReLU not covered"):
        _timm_glu.glu_mlp_hidden(m, x)
    conv = GluMlp(16, 32, act_layer=nn.SiLU, use_conv=True)
    assert _timm_glu.glu_mlp_reasons(conv) == ["convolutional GluMlp (use_conv=True) not covered"]
    xc = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(_timm_glu.glu_mlp_forward(conv, xc), conv(xc))
    assert _timm_glu.swiglu_reasons(SwiGLU(16, 32, act_layer=nn.Hardswish))
    assert not _timm_glu.swiglu_reasons(SwiGLU(16, 32))
    assert _timm_glu.glu_activation(timm.layers.get_act_layer("gelu_tanh")()) == "gelu_tanh"


# ------------------------------------------------------------------------------------------------ errors, dispatch
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (("x", _t(8, 4), None), {}, TypeError, "x must be a torch.Tensor"),
        ((_t(3, 4), _t(8, 5), None), {}, ValueError, "weight's in_features"),
        ((_t(3, 4), _t(7, 4), None), {}, ValueError, "weight must be the packed"),
        ((_t(3, 4), _t(8, 4), _t(4)), {}, ValueError, r"bias must have shape \(8,\)"),
        ((_t(3, 4), _t(8, 4, dtype=torch.float16), None), {}, TypeError, "weight has dtype"),
        ((_t(3, 4), _t(8, 4), None, _t(6, 4)), {}, ValueError, r"weight_value must have shape \(8, 4\)"),
        ((_t(3, 4), _t(8, 4), None, _t(8, 4), _t(4)), {}, ValueError, r"bias_value must have shape \(8,\)"),
        ((_t(3, 4), _t(8, 4), None, None, _t(4)), {}, ValueError, "bias_value was given without weight_value"),
        ((_t(3, 4), _t(8, 4), None, _t(8, 4)), {"gate_last": True}, ValueError, "gate_last applies to a packed"),
        ((_t(3, 4), _t(8, 4), None), {"activation": "relu"}, ValueError, "activation must be one of"),
        ((_t(3, 4), _t(8, 4), None), {"gate_last": 1}, TypeError, "gate_last must be a bool"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastvit.ops.linear_glu(*args, **kwargs)


def test_call_description_and_cuda_reason():
    """The call sets the declared fields (in_features K, out_features M = the gated width) and hands the caller's
    operands on; the CUDA backend's kernel registers with its extension (fastvit._C): once loaded it declines CPU
    tensors by their device, before that it says it has no kernel; dispatch picks another backend either way."""
    x, w, b = _t(2, 5, 24), _t(80, 24), _t(80)
    call = fastvit.ops.describe_call("linear_glu", x, w, b, activation="gelu", gate_last=True)
    assert (call.in_features, call.out_features) == (24, 40)
    prepared = DECLARATIONS["linear_glu"].prepare(x, w, b)
    assert prepared[1] is x and prepared[2] is w and prepared[3] is b and prepared[4] is None
    call = fastvit.ops.describe_call("linear_glu", x, w[:40], b[:40], w[40:], b[40:])
    assert (call.in_features, call.out_features) == (24, 40)
    cuda = backends.get_backend("cuda")
    saved = cuda.availability
    try:
        cuda.availability = lambda: []  # as on a machine with the extension built
        reasons = cuda.not_supported_reasons("linear_glu", call)
    finally:
        cuda.availability = saved
    if "linear_glu" in cuda.kernels:  # registered by fastvit.families.linear._register_cuda when fastvit._C loads
        # the device first; a build with fewer dtypes (the tests' minimal one is bf16 only) adds the dtype
        assert reasons[0] == "device 'cpu' not in ['cuda', 'meta']"
        assert all(r.startswith("dtype torch.float32 not in [") for r in reasons[1:]), reasons
    else:
        assert reasons == ["no cuda kernel for op 'linear_glu'"]
    assert backends.select("linear_glu", call)[0] != "cuda"


def test_fp64_rejected_by_triton_with_reasons():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    with pytest.raises(backends.BackendNotSupportedError, match="dtype"):
        fastvit.ops.linear_glu(x, w, None, backend="triton")
    torch.testing.assert_close(fastvit.ops.linear_glu(x, w, None), reference.linear_glu(x, w, None))


def test_ops_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 40, dtype=torch.bfloat16)
        w = torch.empty(48, 40, dtype=torch.bfloat16)
        b = torch.empty(48, dtype=torch.bfloat16)
        y, h = torch.ops.fastvit.linear_glu_fwd(x, w, b, w, None, "silu", True)
        assert y.shape == (2, 5, 48) and h.shape == (2, 5, 96) and y.dtype == h.dtype == torch.bfloat16
        dx, dwg, dwx, dbg, dbx = torch.ops.fastvit.linear_glu_bwd(y, x, w, w, h, "silu", True)
        assert dx.shape == x.shape and dwg.shape == dwx.shape == w.shape and dbg.shape == dbx.shape == (48,)


def test_opcheck(generator):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = randn((3, 24), generator=generator).requires_grad_()
    wg, wx = (randn((40, 24), generator=generator).requires_grad_() for _ in range(2))
    bg = randn((40,), generator=generator).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.linear_glu_fwd, (x, wg, bg, wx, None, "gelu", True), test_utils=utils)


def test_selftest_passes_under_the_interpreter():
    report = fastvit.selftest.run(backends="triton", ops="linear_glu", device="cpu", store=False)
    assert report.passed, report.table()
    assert report.results and not any(r.skipped for r in report.results)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
def test_empty_in_features_every_activation(activation, device):
    x = torch.zeros(2, 0, device=device, requires_grad=True)
    w = torch.zeros(8, 0, device=device)
    b = torch.linspace(-3, 3, 8, device=device, requires_grad=True)
    grads = [
        torch.autograd.grad(fastvit.ops.linear_glu(x, w, b, activation=activation, backend=be).sum(), b)[0]
        for be in ("triton", "eager")
    ]
    torch.testing.assert_close(grads[0], grads[1])
