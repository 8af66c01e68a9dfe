"""Packed variable-length (``cu_seqlens``) attention on the Triton backend against the oracle.

``fastvit.ops.attention(qkv (T, 3C), H, cu_seqlens=...)`` and ``fastvit.ops.scaled_dot_product_attention(q, k, v
(T, H, D), cu_seqlens=...)`` -- the FlashAttention-2 kernels of ``kernels/attention.py`` with ``VARLEN`` --
forward and every gradient, fp32 / fp16 / bf16, sequences of length 0 and 1, longer than a tile (the interpreter
runs 16 x 16 tiles) and with tails, head dims 64 / 72 / 80.

The reference is independent of every fastvit path: per-sequence attention in plain math, the sequences
concatenated. As in tests/test_triton_attention.py the oracle's ``pt`` is that math in the input precision (no
upcast) and ``ref`` the same in float64. Outputs are poisoned (``poisoned_empty``), so a token the kernels never
write -- a tail row, a sequence after an empty one -- fails the oracle.

The interpreter is slow: the long-sequence cases use one head, the rest small C.
"""

from __future__ import annotations

import pytest
import torch
from oracle import check_op, make_inputs, randn

import fastvit
import fastvit.ops
from fastvit import reference
from fastvit.backends import select

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py


def _cu(lengths) -> torch.Tensor:
    """int32 offsets (S + 1,) of sequences of ``lengths``."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _naive_sdpa_varlen(q, k, v, cu_seqlens, scale=None):  # the oracle's pt (one helper, fastvit.reference)
    return reference.scaled_dot_product_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens, plain=True)


def _naive_attention_varlen(qkv, num_heads, cu_seqlens, scale=None):
    return reference.attention(qkv, num_heads, scale=scale, cu_seqlens=cu_seqlens, plain=True)


def _triton_attention(qkv, num_heads, cu_seqlens, scale=None):
    return fastvit.ops.attention(qkv, num_heads, cu_seqlens=cu_seqlens, scale=scale, backend="triton")


def _triton_sdpa(q, k, v, cu_seqlens, scale=None):
    return fastvit.ops.scaled_dot_product_attention(q, k, v, cu_seqlens=cu_seqlens, scale=scale, backend="triton")


# (lengths, H, D, dtypes): long sequences with one head, short ones with every dtype; an empty sequence first,
# in the middle and last.
ATTN_CASES = [
    ((197, 50, 1, 257), 1, 64, [torch.float16]),
    ((61, 145), 1, 80, [torch.bfloat16]),
    ((5, 33, 17), 2, 72, [torch.float32, torch.float16, torch.bfloat16]),
    ((0, 7, 0, 20, 0), 2, 64, [torch.float32]),
]
ATTN_PARAMS = [
    pytest.param(lengths, H, D, dt, id=f"{lengths}-H{H}-D{D}-{dt}") for lengths, H, D, dts in ATTN_CASES for dt in dts
]


@pytest.mark.parametrize("lengths,H,D,dtype", ATTN_PARAMS)
def test_attention_varlen_oracle(lengths, H, D, dtype, generator, device):
    T = sum(lengths)
    inputs = make_inputs(
        {"qkv": (T, 3 * H * D), "num_heads": H, "cu_seqlens": _cu(lengths)},
        dtype=dtype,
        device=device,
        generator=generator,
    )
    check_op(
        {"triton": _triton_attention},
        _naive_attention_varlen,
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name=f"attention varlen {lengths}",
    )


SDPA_CASES = [
    ((61, 145), 1, 64, torch.float32),
    ((5, 33, 17), 2, 80, torch.bfloat16),
    ((5, 33, 17), 2, 64, torch.float16),
    ((0, 9, 24), 2, 72, torch.float32),
]


@pytest.mark.parametrize("lengths,H,D,dtype", SDPA_CASES, ids=lambda x: str(x))
def test_sdpa_varlen_strided_oracle(lengths, H, D, dtype, generator, device):
    """q / k / v as strided views of one packed (T, 3·C) tensor (``qkv.view(T, 3, H, D).unbind(1)``: token stride
    3·C, head stride D), gradients through all three into it."""
    T = sum(lengths)
    inputs = make_inputs(
        {"qkv": (T, 3 * H * D), "cu_seqlens": _cu(lengths), "scale": 0.15},
        dtype=dtype,
        device=device,
        generator=generator,
    )

    def split(fn):
        def run(qkv, cu_seqlens, scale):
            q, k, v = qkv.view(T, 3, H, D).unbind(1)
            return fn(q, k, v, cu_seqlens, scale)

        return run

    q, _, _ = inputs["qkv"].view(T, 3, H, D).unbind(1)
    assert not q.is_contiguous()
    check_op(
        {"triton": split(_triton_sdpa)},
        split(_naive_sdpa_varlen),
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa varlen {lengths}",
    )


def test_sdpa_varlen_separate_operands(generator, device):
    """Separate (T, H, D) q, k, v with different layouts (k head-major transposed, v contiguous): dq, dk, dv."""
    lengths, H, D, dtype = (3, 1, 26), 2, 64, torch.float16
    T = sum(lengths)
    k_hmajor = randn((H, T, D), generator=generator, dtype=dtype, device=device)
    inputs = make_inputs(
        {"q": (T, H, D), "k": k_hmajor, "v": (T, H, D), "cu_seqlens": _cu(lengths)},
        dtype=dtype,
        device=device,
        generator=generator,
    )

    def with_layout(fn):
        def run(q, k, v, cu_seqlens):
            return fn(q, k.transpose(0, 1), v, cu_seqlens)  # k: (T, H, D) with token stride D, head stride T·D

        return run

    check_op(
        {"triton": with_layout(_triton_sdpa)},
        with_layout(_naive_sdpa_varlen),
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name="sdpa varlen separate",
    )


def test_varlen_lse_layout(generator, device):
    """The saved log-sum-exp is (H, T) fp32, row h·T + cu[s] + m: FlashAttention's varlen layout."""
    lengths, H, D = (4, 0, 19, 1), 2, 16
    T, cu = sum(lengths), _cu(lengths).to(device)
    qkv = randn((T, 3 * H * D), generator=generator, device=device)
    _, lse = torch.ops.fastvit.attention_varlen_fwd(qkv, cu, max(lengths), H, 0.3)
    assert lse.shape == (H, T) and lse.dtype == torch.float32
    q, k, _ = qkv.double().view(T, 3, H, D).unbind(1)
    b = cu.tolist()
    for i, j in zip(b[:-1], b[1:]):
        if j > i:
            ref = torch.logsumexp(torch.einsum("mhd,nhd->hmn", q[i:j], k[i:j]) * 0.3, dim=-1)  # (H, n)
            assert (lse[:, i:j].double() - ref).abs().max() < 1e-5


def test_max_seqlen_above_the_longest(generator, device):
    """A ``max_seqlen`` larger than every sequence (a bound, as FlashAttention allows): the extra blocks of the grid
    exit early, the result is the same as with the exact length."""
    lengths, H, D = (6, 18), 1, 32
    T, cu = sum(lengths), _cu(lengths).to(device)
    qkv = randn((T, 3 * H * D), generator=generator, device=device)
    exact = fastvit.ops.attention(qkv, H, cu_seqlens=cu, backend="triton")
    loose = fastvit.ops.attention(qkv, H, cu_seqlens=cu, max_seqlen=70, backend="triton")
    assert torch.equal(exact, loose)
    assert (exact.double() - _naive_attention_varlen(qkv.double(), H, cu)).abs().max() < 1e-5


def test_dispatch_picks_triton_for_packed_calls(device):
    """Packed calls reach the Triton kernels: the backend declares ``varlen`` and has no reason to decline them, and
    an explicit choice (argument or context) selects it. (Automatic selection skips the interpreter on the CPU by
    design -- the triton backend is not automatic under TRITON_INTERPRET=1 -- so this is what a CPU can check.)"""
    from fastvit.backends import get_backend

    qkv = torch.randn(12, 3 * 2 * 32, device=device)
    cu = _cu((5, 7)).to(device)
    call = fastvit.ops.describe_call("attention", qkv, 2, cu_seqlens=cu)
    assert call.varlen and call.batch == 2 and call.num_tokens == call.num_kv_tokens == 7
    assert get_backend("triton").not_supported_reasons("attention", call) == []
    assert select("attention", call, "triton")[0] == "triton"
    q = qkv[:, :64].view(12, 2, 32)
    call = fastvit.ops.describe_call("scaled_dot_product_attention", q, q, q, cu_seqlens=cu)
    assert get_backend("triton").not_supported_reasons("scaled_dot_product_attention", call) == []
    with fastvit.use_backend("triton"):
        assert select("scaled_dot_product_attention", call)[0] == "triton"
        out = fastvit.ops.scaled_dot_product_attention(q, q, q, cu_seqlens=cu)
    assert out.shape == (12, 2, 32)
    if device.type == "cuda":
        assert select("attention", fastvit.ops.describe_call("attention", qkv, 2, cu_seqlens=cu))[0] != "eager"


def test_backward_deterministic(generator, device):
    """Two runs give bit-identical gradients (every output element has one writer; no atomics)."""
    lengths, H, D = (9, 0, 40, 1), 2, 32
    T, cu = sum(lengths), _cu(lengths).to(device)
    qkv = randn((T, 3 * H * D), generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
    do = randn((T, H * D), generator=generator, device=device, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        (g,) = torch.autograd.grad(_triton_attention(qkv, H, cu), qkv, do)
        q, k, v = qkv.view(T, 3, H, D).unbind(1)
        grads.append((g, *torch.autograd.grad(_triton_sdpa(q, k, v, cu), (q, k, v), do.view(T, H, D))))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_varlen_grid_limit_is_declined():
    from fastvit.families import attention as _fam

    call = {"num_tokens": 4, "num_kv_tokens": 4, "varlen": True}
    assert not any("sequences" in r for r in _fam.triton_check({**call, "batch": 65535}))
    (reason,) = [r for r in _fam.triton_check({**call, "batch": 65536}) if "sequences" in r]
    assert "65536 packed sequences > 65535" in reason


def test_varlen_op_fake_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(300, 3 * 768, dtype=torch.bfloat16, device=device)
        cu = torch.empty(4, dtype=torch.int32, device=device)
        o, lse = torch.ops.fastvit.attention_varlen_fwd(qkv, cu, 197, 12, 0.125)
        assert o.shape == (300, 768) and o.dtype == torch.bfloat16
        assert lse.shape == (12, 300) and lse.dtype == torch.float32
        dqkv = torch.ops.fastvit.attention_varlen_bwd(o, qkv, cu, 197, o, lse, 12, 0.125)
        assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
        q = torch.empty(300, 3, 80, dtype=torch.float16, device=device)
        o, lse = torch.ops.fastvit.sdpa_varlen_fwd(q, q, q, cu, 197, 0.1)
        assert o.shape == q.shape and lse.shape == (3, 300)
        dq, dk, dv = torch.ops.fastvit.sdpa_varlen_bwd(o, q, q, q, cu, 197, o, lse, 0.1)
        assert dq.shape == dk.shape == dv.shape == q.shape


OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_varlen_opcheck(generator, device):
    cu = _cu((2, 0, 5)).to(device)
    qkv = randn((7, 3 * 16), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.attention_varlen_fwd, (qkv, cu, 5, 1, 0.25), test_utils=OPCHECK_UTILS)
    q = randn((7, 1, 16), generator=generator, device=device).requires_grad_()
    k = randn((7, 1, 16), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.sdpa_varlen_fwd, (q, k, k, cu, 5, 0.25), test_utils=OPCHECK_UTILS)


@pytest.mark.gpu
def test_varlen_compiles_fullgraph_on_gpu(generator):
    """``torch.compile(fullgraph=True)`` traces the packed Triton ops (fake implementations from the traced host
    code, autograd registered on the op) and runs the same kernels: forward and gradient as uncompiled."""
    lengths, H, D = (50, 0, 197, 1), 2, 64
    T, cu = sum(lengths), _cu(lengths).cuda()
    qkv = randn((T, 3 * H * D), generator=generator, dtype=torch.bfloat16).cuda().requires_grad_()
    do = randn((T, H * D), generator=generator, dtype=torch.bfloat16).cuda()

    def fn(qkv, cu):
        return fastvit.ops.attention(qkv, H, cu_seqlens=cu, max_seqlen=max(lengths), backend="triton")

    out = fn(qkv, cu)
    (g,) = torch.autograd.grad(out, qkv, do)
    out_c = torch.compile(fn, fullgraph=True)(qkv, cu)
    (g_c,) = torch.autograd.grad(out_c, qkv, do)
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(g_c, g)
