"""Packed variable-length attention at the ops layer: ``cu_seqlens`` / ``max_seqlen`` checks, the call description
dispatch sees, and the eager backend against per-sequence attention in float64.

The Triton kernels are tested in ``test_varlen_triton.py``, the CUDA ones in ``test_varlen_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastvit import backends, ops
from fastvit.backends import Capabilities


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _reference_sequence(qkv: torch.Tensor, num_heads: int, scale: float | None) -> torch.Tensor:
    """Attention of one (n, 3·C) sequence, written out in float64 from the definition."""
    n, c3 = qkv.shape
    C = c3 // 3
    D = C // num_heads
    q, k, v = qkv.double().split(C, dim=-1)
    q, k, v = (t.reshape(n, num_heads, D).transpose(0, 1) for t in (q, k, v))  # (H, n, D)
    s = (q @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(n, C)


def _reference(qkv: torch.Tensor, num_heads: int, lengths, scale=None) -> torch.Tensor:
    parts, start = [], 0
    for n in lengths:
        parts.append(_reference_sequence(qkv[start : start + n], num_heads, scale))
        start += n
    return torch.cat(parts)


@pytest.mark.parametrize("lengths", [(197, 50, 1, 257), (61, 145), (5, 33, 17), (4, 0, 3)])
def test_eager_packed_attention_matches_per_sequence_fp64(lengths):
    torch.manual_seed(0)
    H, D = 2, 8
    T = sum(lengths)
    qkv = torch.randn(T, 3 * H * D, dtype=torch.float64, requires_grad=True)
    out = ops.attention(qkv, H, cu_seqlens=_cu(lengths), backend="eager")
    ref_qkv = qkv.detach().clone().requires_grad_(True)
    ref = _reference(ref_qkv, H, lengths)
    assert out.shape == (T, H * D)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, ref_qkv, grad)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_packed_attention_isolates_sequences():
    # Changing one sequence's tokens must not move another sequence's outputs (no attention across sequences).
    torch.manual_seed(0)
    lengths = (6, 9)
    qkv = torch.randn(15, 3 * 16)
    cu = _cu(lengths)
    out = ops.attention(qkv, 2, cu_seqlens=cu)
    qkv2 = qkv.clone()
    qkv2[6:] = torch.randn(9, 48)
    out2 = ops.attention(qkv2, 2, cu_seqlens=cu)
    torch.testing.assert_close(out2[:6], out[:6], rtol=0, atol=0)
    assert not torch.allclose(out2[6:], out[6:])


def test_packed_sdpa_matches_packed_attention_and_scale():
    torch.manual_seed(0)
    lengths, H, D = (5, 33, 17), 2, 8
    T = sum(lengths)
    qkv = torch.randn(T, 3 * H * D, dtype=torch.float64)
    cu = _cu(lengths)
    q, k, v = qkv.view(T, 3, H, D).unbind(1)  # strided views, last dim contiguous
    out = ops.scaled_dot_product_attention(q, k, v, cu_seqlens=cu, scale=0.3)
    assert out.shape == (T, H, D)
    torch.testing.assert_close(out.reshape(T, H * D), _reference(qkv, H, lengths, 0.3), rtol=0, atol=1e-12)


def test_call_describes_packed_attention():
    qkv = torch.randn(13, 3 * 32)
    call = ops.describe_call("attention", qkv, 4, cu_seqlens=_cu((5, 1, 7)))
    assert (call.varlen, call.batch, call.num_tokens, call.num_kv_tokens, call.head_dim) == (True, 3, 7, 7, 8)
    call = ops.describe_call("attention", qkv, 4, cu_seqlens=_cu((5, 1, 7)), max_seqlen=10)
    assert call.num_tokens == 10
    dense = ops.describe_call("attention", qkv.view(1, 13, 96), 4)
    assert not dense.varlen and dense.batch == 1


def test_kernel_without_varlen_capability_declines_packed_calls(monkeypatch):
    calls = []

    def dense_only(qkv, num_heads, *, scale=None, dropout_p=0.0):
        calls.append(tuple(qkv.shape))
        return torch.zeros(*qkv.shape[:-1], qkv.shape[-1] // 3, dtype=qkv.dtype)

    triton = backends.get_backend("triton")
    saved = dict(triton.kernels)
    monkeypatch.setattr(triton, "availability", lambda: [])
    monkeypatch.setattr(triton, "automatic", lambda: True)
    try:
        triton.kernels.clear()
        backends.register_kernel("triton", "attention", dense_only, Capabilities(devices=None))
        qkv = torch.randn(7, 48)
        call = ops.describe_call("attention", qkv, 2, cu_seqlens=_cu((3, 4)))
        assert any("cu_seqlens" in r for r in triton.kernels["attention"].capabilities.reasons(call))
        with pytest.raises(backends.BackendNotSupportedError, match="cu_seqlens"):
            ops.attention(qkv, 2, cu_seqlens=_cu((3, 4)), backend="triton")
        packed = ops.attention(qkv, 2, cu_seqlens=_cu((3, 4)))  # automatic: eager serves it
        torch.testing.assert_close(packed, ops.attention(qkv, 2, cu_seqlens=_cu((3, 4)), backend="eager"))
        assert calls == []
        ops.attention(qkv[None], 2)  # a dense call still reaches the kernel
        assert calls == [(1, 7, 48)]
    finally:
        triton.kernels.clear()
        triton.kernels.update(saved)


# ----------------------------------------------------------------------------------------------- bad input
_QKV = torch.randn(13, 48)


@pytest.mark.parametrize(
    "cu_seqlens, max_seqlen, exc, match",
    [
        ([0, 5, 13], None, TypeError, "int32"),  # int64
        ("list", None, TypeError, "cu_seqlens must be a torch.Tensor"),
        ([[0, 13]], None, ValueError, "1-D"),
        ([0], None, ValueError, "S \\+ 1 >= 2"),
        ([1, 5, 13], None, ValueError, "start at 0"),
        ([0, 7, 5, 13], None, ValueError, "non-decreasing.*cu_seqlens\\[1\\] = 7 > cu_seqlens\\[2\\] = 5"),
        ([0, 5, 12], None, ValueError, "end at the number of packed tokens T = 13"),
        ([0, 5, 14], None, ValueError, "end at"),
        ([0, 5, 13], 7, ValueError, "max_seqlen = 7 is less than the longest sequence"),
        ([0, 5, 13], 8.0, TypeError, "max_seqlen must be an int"),
        ([0, 5, 13], -1, ValueError, "max_seqlen must be >= 0"),
    ],
)
def test_bad_cu_seqlens_is_a_clear_error(cu_seqlens, max_seqlen, exc, match):
    if cu_seqlens == "list":
        cu = [0, 13]
    else:
        dtype = torch.int64 if exc is TypeError and match == "int32" else torch.int32
        cu = torch.tensor(cu_seqlens, dtype=dtype)
    with pytest.raises(exc, match=match):
        ops.attention(_QKV, 2, cu_seqlens=cu, max_seqlen=max_seqlen)
    if isinstance(cu, torch.Tensor):
        q = _QKV.view(13, 3, 2, 8)[:, 0]
        with pytest.raises(exc, match=match):
            ops.scaled_dot_product_attention(q, q, q, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_packed_layout_errors_name_the_argument():
    cu = _cu((5, 8))
    with pytest.raises(ValueError, match=r"qkv must be 2-D \(T, 3·C\) when cu_seqlens is given"):
        ops.attention(_QKV[None], 2, cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_seqlen is only meaningful with cu_seqlens"):
        ops.attention(_QKV[None], 2, max_seqlen=13)
    q = torch.randn(13, 2, 8)
    with pytest.raises(ValueError, match=r"k must be 3-D \(T, H, D\)"):
        ops.scaled_dot_product_attention(q, q[None], q, cu_seqlens=cu)
    with pytest.raises(ValueError, match="k must have q's shape"):
        ops.scaled_dot_product_attention(q, q[:, :1], q[:, :1], cu_seqlens=cu)
    if torch.device("meta") != q.device:
        with pytest.raises(ValueError, match="cu_seqlens is on meta but qkv is on cpu"):
            ops.attention(_QKV, 2, cu_seqlens=cu.to("meta"))


def test_packed_attention_on_meta_needs_no_values():
    qkv = torch.empty(13, 48, device="meta")
    out = ops.attention(qkv, 2, cu_seqlens=torch.empty(3, dtype=torch.int32, device="meta"), max_seqlen=8)
    assert out.shape == (13, 16) and out.device.type == "meta"
    assert math.isclose(ops.describe_call("attention", qkv, 2, cu_seqlens=_cu((5, 8)).to("meta")).num_tokens, 13)
