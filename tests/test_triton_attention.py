"""Triton FlashAttention-2 (fastvit.kernels.attention via fastvit.families.attention) against the oracle.

``attention`` (packed qkv) and ``scaled_dot_product_attention`` (strided (B, H, N, D)), forward and every
gradient, fp32 / fp16 / bf16, token tails and non-power-of-two head dims. Runs in the Triton interpreter on the
CPU (keep B·H and N small: the interpreter is slow) or on CUDA.

The oracle's ``pt`` is the *same math in the input precision* (FlashAttention's rule): :func:`_naive_sdpa`
(``fastvit.reference`` with ``plain=True``) does scores, softmax and PV in the dtype it is given -- no upcast -- so
``ref`` (float64) is exact and ``pt`` shows the error the input precision forces. (The reference's default upcasts
half inputs to fp32, which would make ``pt`` tighter than any kernel that, like FlashAttention, feeds P and dS to the
tensor cores in half precision.)

Outputs are poisoned: under PyTorch's deterministic mode with ``fill_uninitialized_memory`` every
``torch.empty`` the op allocates is NaN-filled, so an element the kernels never write fails the oracle.
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


def _naive_sdpa(
    q, k, v, scale=None
):  # the oracle's pt: the math in the input precision (one helper, fastvit.reference)
    return reference.scaled_dot_product_attention(q, k, v, scale=scale, plain=True)


def _naive_attention(qkv, num_heads, scale=None):
    return reference.attention(qkv, num_heads, scale=scale, plain=True)


def _triton_attention(qkv, num_heads, scale=None):
    return fastvit.ops.attention(qkv, num_heads, scale=scale, backend="triton")


def _triton_sdpa(q, k, v, scale=None):
    return fastvit.ops.scaled_dot_product_attention(q, k, v, scale=scale, backend="triton")


# (B, N, H, D): token tails (1, 50, 61), non-power-of-two head dims (80, 72), batch 3 with H = 1
ATTN_SHAPES = [(1, 1, 2, 32), (1, 50, 1, 64), (1, 61, 2, 80), (3, 17, 1, 72)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}N{}H{}D{}".format(*s))
def test_attention_oracle(dtype, shape, generator, device):
    B, N, H, D = shape
    inputs = make_inputs({"qkv": (B, N, 3 * H * D), "num_heads": H}, dtype=dtype, device=device, generator=generator)
    check_op(
        {"triton": _triton_attention},
        _naive_attention,
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name=f"attention {shape}",
    )


def test_attention_oracle_n197(generator, device):
    """ViT-B/16's 197 tokens: tails in every block size, in half precision."""
    dtype = torch.float16
    inputs = make_inputs(
        {"qkv": (1, 197, 3 * 64), "num_heads": 1, "scale": 0.1}, dtype=dtype, device=device, generator=generator
    )
    check_op(
        {"triton": _triton_attention},
        _naive_attention,
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name="attention N=197",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,D", [(33, 20, 32), (5, 61, 80), (19, 23, 104), (9, 40, 48)])
def test_sdpa_oracle(dtype, nq, nk, D, generator, device):
    """Cross attention (Nq != Nk) on contiguous (B, H, N, D) tensors, dq / dk / dv. The head dims cover every chunk
    split of the kernels (kernels.attention.head_dim_chunks): 32 one chunk, 80 = 64 + 16, 104 = 64 + 32 + 16 with 8
    masked columns, 48 = 32 + 16."""
    inputs = make_inputs(
        {"q": (1, 2, nq, D), "k": (1, 2, nk, D), "v": (1, 2, nk, D)}, dtype=dtype, device=device, generator=generator
    )
    check_op(
        {"triton": _triton_sdpa},
        _naive_sdpa,
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa Nq={nq} Nk={nk} D={D}",
    )


@pytest.mark.parametrize(
    "dtype,nq,nk,D", [(torch.float16, 32, 48, 16), (torch.bfloat16, 64, 128, 32), (torch.float32, 16, 16, 16)], ids=str
)
def test_sdpa_oracle_whole_blocks(dtype, nq, nk, D, generator, device):
    """Token counts that are multiples of the blocks (16 in the interpreter; 64 / 128 for the second case on a GPU):
    the kernels run their unmasked steady-state loops only, with no peeled tail block, in every axis."""
    inputs = make_inputs(
        {"q": (1, 2, nq, D), "k": (1, 2, nk, D), "v": (1, 2, nk, D)}, dtype=dtype, device=device, generator=generator
    )
    check_op(
        {"triton": _triton_sdpa},
        _naive_sdpa,
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa whole blocks Nq={nq} Nk={nk} D={D}",
    )


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-3])
@pytest.mark.parametrize("nk", [37, 32])
def test_sdpa_any_sign_of_scale(scale, nk, generator, device):
    """The forward reduces raw scores and scales the row max (max(s)·c), which holds for c >= 0 only; a negative scale
    takes the kernel's mirror loop (min(s)·c). Zero scale is uniform attention. Forward and every gradient against
    float64, with and without a key tail."""
    dtype = torch.float16
    inputs = make_inputs(
        {"q": (1, 2, 21, 32), "k": (1, 2, nk, 32), "v": (1, 2, nk, 32), "scale": scale},
        dtype=dtype,
        device=device,
        generator=generator,
    )
    check_op(
        {"triton": _triton_sdpa},
        _naive_sdpa,
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa scale={scale} Nk={nk}",
    )


def test_head_dim_chunks():
    """Non-power-of-two head dims are split into power-of-two chunks of at least 16 that cover D rounded up to 16, not
    the next power of two (80 -> 64 + 16, not 128), at most three of them."""
    from fastvit.kernels import attention as A

    expected = {16: (16,), 32: (32,), 48: (32, 16), 64: (64,), 72: (64, 16), 80: (64, 16), 88: (64, 32)}
    expected.update({96: (64, 32), 104: (64, 32, 16), 112: (64, 32, 16), 120: (128,), 128: (128,)})
    for D, chunks in expected.items():
        assert A.head_dim_chunks(D) == chunks, D
    for D in range(A.MIN_HEAD_DIM, A.MAX_HEAD_DIM + 1):
        chunks = A.head_dim_chunks(D)
        assert sum(chunks) == A.padded_head_dim(D) >= D and sum(chunks) - D < 16 and len(chunks) <= 3
        assert all(c >= 16 and c & (c - 1) == 0 for c in chunks) and list(chunks) == sorted(chunks, reverse=True)


def test_sdpa_strided_views(generator, device):
    """q / k / v as permuted views of one packed tensor (token stride 3·C, head stride D): no copies needed."""
    B, N, H, D = 2, 23, 2, 16
    qkv = randn((B, N, 3 * H * D), generator=generator, device=device).requires_grad_()
    q, k, v = reference.split_qkv(qkv, H)
    assert not q.is_contiguous()
    out = _triton_sdpa(q, k, v)
    do = randn(out.shape, generator=generator, device=device)
    (g,) = torch.autograd.grad(out, qkv, do)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = _naive_sdpa(*reference.split_qkv(qkv64, H))
    (g_ref,) = torch.autograd.grad(ref, qkv64, do.double())
    assert (out.double() - ref).abs().max() < 1e-5
    assert (g.double() - g_ref).abs().max() < 1e-5


def test_attention_backward_deterministic(generator, device):
    qkv = randn((1, 40, 3 * 2 * 32), generator=generator, device=device, dtype=torch.float16).requires_grad_()
    do = randn((1, 40, 64), generator=generator, device=device, dtype=torch.float16)
    grads = []
    for _ in range(2):
        out = _triton_attention(qkv, 2)
        (g,) = torch.autograd.grad(out, qkv, do)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


def test_attention_lse(generator, device):
    """The saved log-sum-exp is the natural log of Σ exp(scaled scores), (B, H, N) fp32."""
    B, N, H, D = 1, 19, 2, 16
    qkv = randn((B, N, 3 * H * D), generator=generator, device=device)
    _, lse = torch.ops.fastvit.attention_fwd(qkv, H, 0.3)
    q, k, _ = reference.split_qkv(qkv.double(), H)
    ref = torch.logsumexp((q @ k.transpose(-2, -1)) * 0.3, dim=-1)
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    assert (lse.double() - ref).abs().max() < 1e-5


def test_dropout_rejected_with_reasons(device):
    qkv = torch.randn(1, 5, 3 * 32, device=device)
    with pytest.raises(BackendNotSupportedError, match="dropout_p > 0 is not supported"):
        fastvit.ops.attention(qkv, 1, dropout_p=0.1, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="dropout"):
        with fastvit.use_backend("triton"):
            fastvit.ops.scaled_dot_product_attention(
                qkv[..., :32][:, None], qkv[..., :32][:, None], qkv[..., :32][:, None], dropout_p=0.5
            )
    # automatic selection falls back quietly
    assert fastvit.ops.attention(qkv, 1, dropout_p=0.1).shape == (1, 5, 32)


def test_head_dim_256_rejected_with_reasons(device):
    qkv = torch.randn(1, 3, 3 * 256, device=device)
    with pytest.raises(BackendNotSupportedError, match="head_dim 256"):
        fastvit.ops.attention(qkv, 1, backend="triton")
    out = fastvit.ops.attention(qkv, 1)  # automatic: eager
    assert out.shape == (1, 3, 256)


def test_fp64_rejected_with_reasons(device):
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=device)
    with pytest.raises(BackendNotSupportedError, match="dtype"):
        _triton_sdpa(q, q, q)


def test_attention_op_fake_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2, 197, 3 * 768, dtype=torch.bfloat16, device=device)
        o, lse = torch.ops.fastvit.attention_fwd(qkv, 12, 0.125)
        assert o.shape == (2, 197, 768) and o.dtype == torch.bfloat16
        assert lse.shape == (2, 12, 197) and lse.dtype == torch.float32
        dqkv = torch.ops.fastvit.attention_bwd(o, qkv, o, lse, 12, 0.125)
        assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
        q = torch.empty(2, 3, 50, 80, dtype=torch.float16, device=device)
        k = torch.empty(2, 3, 7, 80, dtype=torch.float16, device=device)
        o, lse = torch.ops.fastvit.sdpa_fwd(q, k, k, 0.1)
        assert o.shape == q.shape and lse.shape == (2, 3, 50)
        dq, dk, dv = torch.ops.fastvit.sdpa_bwd(o, q, k, k, o, lse, 0.1)
        assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


def test_attention_opcheck(generator, device):
    qkv = randn((1, 5, 3 * 16), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.attention_fwd, (qkv, 1, 0.25), test_utils=OPCHECK_UTILS)
    q = randn((1, 1, 5, 16), generator=generator, device=device).requires_grad_()
    k = randn((1, 1, 3, 16), generator=generator, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastvit.sdpa_fwd, (q, k, k, 0.25), test_utils=OPCHECK_UTILS)


def test_sdpa_ops_without_keys_or_queries_match_eager(device):
    """Called directly (dispatch itself never sends an empty sequence to a kernel), the registered ops give eager's
    answer for no keys -- zeros, and an lse of -inf -- and zero gradients, never uninitialised memory."""
    q = torch.randn(1, 2, 3, 32, device=device)
    none = torch.randn(1, 2, 0, 32, device=device)
    o, lse = torch.ops.fastvit.sdpa_fwd(q, none, none, 0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, none, none, scale=0.25)
    torch.testing.assert_close(o, expected, rtol=0, atol=0)
    assert torch.equal(lse, torch.full((1, 2, 3), float("-inf"), device=device))
    dq, dk, dv = torch.ops.fastvit.sdpa_bwd(torch.randn_like(o), q, none, none, o, lse, 0.25)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == none.shape
    dq, dk, dv = torch.ops.fastvit.sdpa_bwd(none, none, q, q, none, lse[:, :, :0], 0.25)  # no queries
    assert dq.shape == none.shape and torch.equal(dk, torch.zeros_like(q)) and torch.equal(dv, torch.zeros_like(q))


def test_autotune_key_holds_what_the_pruners_read():
    """The pruners keep different configs for fp32 with IEEE and with TF32 dots; Triton's autotune cache adds the
    tensors' dtypes to the key but not INPUT_PRECISION, so the key must name it, or a config tuned for one
    precision is reused for the other (only visible on a GPU: the interpreter has one config)."""
    from fastvit.kernels import attention as A

    for kernel in (A.attn_fwd, A.attn_bwd_dkdv, A.attn_bwd_dq):
        assert {"N_Q", "N_KV", "HEAD_DIM", "INPUT_PRECISION"} <= set(kernel.keys)


def test_sdpa_operands_keep_token_offsets_within_int32():
    """The kernels multiply token index by token stride in int32: a sequence-first view whose (N + 128) * stride
    exceeds 2^31 - 1 is copied to contiguous; an ordinary view passes through uncopied."""
    from fastvit.families import attention as _triton

    B, H, N, D = 256, 16, 4097, 128  # x.view(N, B, H, D).permute(1, 2, 0, 3): token stride B*H*D = 2^19
    seq_first = torch.empty(N * B * H * D, device="meta").view(N, B, H, D).permute(1, 2, 0, 3)
    fixed = _triton._bhnd_operand(seq_first)
    assert fixed.shape == seq_first.shape and fixed.is_contiguous() and fixed.stride(2) == D
    ordinary = torch.empty(2, 3, 50, 64, device="meta").transpose(1, 2).contiguous().transpose(1, 2)
    assert _triton._bhnd_operand(ordinary) is ordinary


def test_batch_beyond_the_grid_limit_is_declined():
    from fastvit.families import attention as _triton

    call = {"num_tokens": 4, "num_kv_tokens": 4}
    assert not any("batch" in r for r in _triton.triton_check({**call, "batch": 65535}))
    (reason,) = [r for r in _triton.triton_check({**call, "batch": 65536}) if "batch" in r]
    assert "65536 > 65535" in reason
