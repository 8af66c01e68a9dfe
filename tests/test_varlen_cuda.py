"""Packed variable-length (``cu_seqlens``) attention on the ``cuda`` backend (fastvit._C): the
``attention_varlen_*_cuda`` / ``sdpa_varlen_*_cuda`` ops (FlashAttention-2, Dao 2023, on the layout of
``flash_attn_varlen_func``).

* ``gpu``-marked: packed attention against the per-sequence float64 reference under the oracle of docs/ARCHITECTURE.md
  (:func:`fastvit.testing.check_op`), forward and every gradient, fp16 / bf16, lengths with tails, single tokens and
  sequences of different tiles, head dims 64 / 72 (masked columns) / 80; a deterministic backward; poisoned outputs
  (an unwritten row fails).
* CPU, always: the fakes' shapes and dtypes, and the registration declining packed calls for a build without
  ``attention_varlen``.
* CPU with a toolchain (nvcc, CUTLASS, a CUDA build of torch): the minimal extension built just in time (as
  tests/test_cuda_extension.py does), its varlen schemas, fakes under ``FakeTensorMode``, autograd on meta tensors,
  ``torch.library.opcheck``, and dispatch of packed calls to the cuda backend.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from oracle import check_op, make_inputs

import fastvit
import fastvit.ops
from fastvit import backends, reference
from fastvit.backends import Call, get_backend
from fastvit.families import attention as fam
from fastvit.runtime import cuda as _cuda
from fastvit.runtime import cuda_build as build

HALF = [torch.float16, torch.bfloat16]
DEV = "cuda"


def on_gpu(test):
    """gpu-marked (skipped without a CUDA device, by conftest), NaN-poisoned ``torch.empty``, and skipped with the
    reason when the cuda backend is unavailable (no fastvit._C)."""
    for mark in (
        pytest.mark.skipif(
            bool(get_backend("cuda").unavailable_reasons()),
            reason=f"cuda backend unavailable: {get_backend('cuda').unavailable_reasons()}",
        ),
        pytest.mark.usefixtures("poisoned_empty"),
        pytest.mark.gpu,
    ):
        test = mark(test)
    return test


needs_toolchain = pytest.mark.skipif(
    build.find_nvcc() is None
    or build.cutlass_include() is None
    or not os.path.isdir(build.CSRC)
    or torch.version.cuda is None,
    reason="needs nvcc, nvidia-cutlass, a source checkout and a CUDA build of torch",
)

#: Packed lengths: a 197 tail next to a single token and a sequence longer than every other (257: five 64-row tiles
#: with a one-row tail), two sequences of different tile counts, short sequences within one tile.
LENGTHS = [(197, 50, 1, 257), (61, 145), (5, 33, 17)]
HEAD_DIMS = [64, 72, 80]


def cu_seqlens_of(lengths, device=DEV) -> torch.Tensor:
    """int32 (S + 1,) offsets of ``lengths``: 0, then their running sum."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _naive_packed_attention(qkv, num_heads, cu_seqlens, max_seqlen=None):  # the oracle's pt (fastvit.reference)
    return reference.attention(qkv, num_heads, cu_seqlens=cu_seqlens, plain=True)


def _naive_packed_sdpa(q, k, v, cu_seqlens, max_seqlen=None):
    return reference.scaled_dot_product_attention(q, k, v, cu_seqlens=cu_seqlens, plain=True)


# ============================================================================================ GPU numerics
@on_gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda ls: "-".join(map(str, ls)))
@pytest.mark.parametrize("pass_max_seqlen", [True, False], ids=["max_seqlen", "no_max_seqlen"])
def test_packed_attention(dtype, head_dim, lengths, pass_max_seqlen, generator):
    H = 2
    T = sum(lengths)
    cu = cu_seqlens_of(lengths)
    max_seqlen = max(lengths) if pass_max_seqlen else None
    inputs = make_inputs({"qkv": (T, 3 * H * head_dim), "num_heads": H}, dtype=dtype, device=DEV, generator=generator)
    inputs["cu_seqlens"], inputs["max_seqlen"] = cu, max_seqlen
    check_op(
        {"cuda": partial(fastvit.ops.attention, backend="cuda")},
        _naive_packed_attention,
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name=f"packed attention {lengths} D{head_dim}",
    )


@on_gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda ls: "-".join(map(str, ls)))
def test_packed_sdpa(dtype, head_dim, lengths, generator):
    """q, k, v as strided (T, H, D) views of one (T, 3, H, D) tensor (row stride 3·H·D), as a packed Linear gives."""
    H, T = 3, sum(lengths)
    inputs = make_inputs(
        {"q": (T, H, head_dim), "k": (T, H, head_dim), "v": (T, H, head_dim)},
        dtype=dtype,
        device=DEV,
        generator=generator,
    )
    inputs["cu_seqlens"], inputs["max_seqlen"] = cu_seqlens_of(lengths), max(lengths)

    def strided(q, k, v, cu_seqlens, max_seqlen):
        both = torch.stack((q, k, v), dim=1)  # (T, 3, H, D): differentiable, so the gradients reach q, k, v
        return fastvit.ops.scaled_dot_product_attention(
            both[:, 0], both[:, 1], both[:, 2], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend="cuda"
        )

    check_op(
        {"cuda": strided, "cuda_contiguous": partial(fastvit.ops.scaled_dot_product_attention, backend="cuda")},
        _naive_packed_sdpa,
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name=f"packed sdpa {lengths} D{head_dim}",
    )


@on_gpu
def test_packed_matches_dense_batch_bitwise_for_equal_lengths(generator):
    """S sequences of one length N packed are the dense (S, N, 3C) batch: the same kernels' arithmetic, so the same
    bits (forward and backward)."""
    S, N, H, D = 3, 197, 2, 64
    dense = torch.randn(S, N, 3 * H * D, generator=generator).to(DEV, torch.bfloat16).requires_grad_()
    packed = dense.detach().reshape(S * N, -1).clone().requires_grad_()
    dout = torch.randn(S, N, H * D, generator=generator).to(DEV, torch.bfloat16)
    out_dense = fastvit.ops.attention(dense, H, backend="cuda")
    out_packed = fastvit.ops.attention(packed, H, cu_seqlens=cu_seqlens_of([N] * S), max_seqlen=N, backend="cuda")
    assert torch.equal(out_packed.view(S, N, -1), out_dense)
    out_dense.backward(dout)
    out_packed.backward(dout.reshape(S * N, -1))
    assert torch.equal(packed.grad.view(S, N, -1), dense.grad)


@on_gpu
def test_packed_backward_is_deterministic(generator):
    lengths = (197, 50, 1, 257)
    cu = cu_seqlens_of(lengths)
    qkv = torch.randn(sum(lengths), 3 * 4 * 64, generator=generator).to(DEV, torch.bfloat16).requires_grad_()
    dout = torch.randn(sum(lengths), 4 * 64, generator=generator).to(DEV, torch.bfloat16)
    grads = []
    for _ in range(2):
        qkv.grad = None
        fastvit.ops.attention(qkv, 4, cu_seqlens=cu, max_seqlen=max(lengths), backend="cuda").backward(dout)
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1])


@on_gpu
def test_packed_lse_layout_is_heads_by_tokens(generator):
    """LSE is (H, T) fp32: row h, column cu[s] + i holds the natural-log log-sum-exp of query i of sequence s."""
    lengths, H, D = (61, 145), 2, 80
    cu = cu_seqlens_of(lengths)
    qkv = torch.randn(sum(lengths), 3 * H * D, generator=generator).to(DEV, torch.float16)
    _, lse = torch.ops.fastvit.attention_varlen_fwd_cuda(qkv, cu, max(lengths), H, D**-0.5)
    assert lse.shape == (H, sum(lengths)) and lse.dtype == torch.float32
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        q, k, _ = reference.split_qkv(qkv[a:b][None].double(), H)
        want = torch.logsumexp((q @ k.transpose(-2, -1)) * D**-0.5, dim=-1)[0]  # (H, n)
        torch.testing.assert_close(lse[:, a:b].double(), want, atol=2e-3, rtol=0)


# ============================================================================================ CPU: fakes, caps
def test_fakes_give_shapes_and_dtypes():
    T, H, D = 31, 3, 64
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    qkv = torch.empty(T, 3 * H * D, dtype=torch.bfloat16, device="meta")
    o, lse = fam.attention_varlen_fwd_fake(qkv, cu, 17, H, 0.125)
    assert (o.shape, o.dtype, lse.shape, lse.dtype) == ((T, H * D), torch.bfloat16, (H, T), torch.float32)
    dqkv = fam.attention_varlen_bwd_fake(o, qkv, cu, 17, o, lse, H, 0.125)
    assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
    q = torch.empty(T, H, D, dtype=torch.float16, device="meta")
    o, lse = fam.sdpa_varlen_fwd_fake(q, q, q, cu, 17, 0.125)
    assert (o.shape, o.dtype, lse.shape, lse.dtype) == ((T, H, D), torch.float16, (H, T), torch.float32)
    grads = fam.sdpa_varlen_bwd_fake(o, q, q, q, cu, 17, o, lse, 0.125)
    assert [(g.shape, g.dtype) for g in grads] == [((T, H, D), torch.float16)] * 3


#: A full build's kernel facts (as tests/test_cuda_build.py's FULL_BUILD_FACTS), before and with the varlen ops.
_FACTS = {
    "attention_head_dim_bucket_bounds": "32,64,80,96,128",
    "attention_head_dim_buckets": "32,64,80,96,128",
    "attention_bwd_smem_bytes": "32:41984,64:74752,80:91136,96:107520,128:104960",
    "attention_head_dim_multiple": 8,
    "attention_max_head_dim": 128,
    "half_dtypes": "float16,bfloat16",
    "gemm_alignment": 8,
}


def test_registration_declines_packed_calls_for_a_build_without_varlen():
    packed = Call(device=torch.device("meta"), dtype=torch.bfloat16, head_dim=64, batch=3, num_tokens=257, varlen=True)
    old = fam.cuda_caps_for(_FACTS)  # a build from before the varlen ops: no attention_varlen key
    assert not fam.cuda_has_varlen(_FACTS) and old.varlen is False
    assert any("cu_seqlens" in r for r in old.reasons(packed))
    assert old.reasons(packed._replace(varlen=False)) == []
    assert fam.cuda_has_varlen({**_FACTS, "attention_varlen": 0}) is False
    new = fam.cuda_caps_for({**_FACTS, "attention_varlen": 1})
    assert new.varlen is True and new.reasons(packed) == []


def test_registration_of_a_build_without_varlen_defines_no_varlen_op(monkeypatch):
    """_register_cuda on an old build's facts registers fakes / autograd for the dense ops only (the varlen schemas
    do not exist there) and a cuda kernel that declines packed calls."""
    calls, registered = [], {}
    monkeypatch.setattr(fam, "_register_cuda_fakes", lambda: calls.append("dense fakes"))
    monkeypatch.setattr(fam, "_register_cuda_varlen_fakes", lambda: calls.append("varlen fakes"))
    monkeypatch.setattr(fam, "attach", lambda name, builder, suffix="": calls.append(name + suffix))
    monkeypatch.setattr(fam, "register_kernel", lambda backend, op, fn, caps, *a, **k: registered.__setitem__(op, caps))
    fam._register_cuda(_FACTS)
    assert calls == ["dense fakes", "attention_cuda", "sdpa_cuda"]
    assert {op: caps.varlen for op, caps in registered.items()} == {
        "attention": False,
        "scaled_dot_product_attention": False,
    }
    calls.clear()
    fam._register_cuda({**_FACTS, "attention_varlen": 1})
    assert calls == [
        "dense fakes",
        "attention_cuda",
        "sdpa_cuda",
        "varlen fakes",
        "attention_varlen_cuda",
        "sdpa_varlen_cuda",
    ]
    assert all(caps.varlen for caps in registered.values())


def test_varlen_autograd_builders_keep_the_shared_argument_order(monkeypatch):
    """One (setup, backward) pair serves the Triton and the CUDA varlen ops: inputs (qkv, cu_seqlens, max_seqlen,
    num_heads, scale) / (q, k, v, cu_seqlens, max_seqlen, scale), the backward op called in the schema's order."""
    seen = {}

    class Ctx:
        def save_for_backward(self, *t):
            self.saved_tensors = t

    def fake_bwd(*args):
        seen["args"] = args
        return args[1] if len(args) == 8 else (args[1], args[2], args[3])

    monkeypatch.setattr(fam, "op", lambda name: fake_bwd)
    setup, backward = fam._attention_varlen_autograd("attention_varlen_bwd_cuda")
    ctx = Ctx()
    qkv, cu, o, lse = torch.zeros(5, 12), torch.zeros(3, dtype=torch.int32), torch.zeros(5, 4), torch.zeros(2, 5)
    setup(ctx, (qkv, cu, 4, 2, 0.5), (o, lse))
    grads = backward(ctx, o, None)
    assert seen["args"][0] is o and seen["args"][1:] == (qkv, cu, 4, o, lse, 2, 0.5)
    assert grads[0] is qkv and grads[1:] == (None,) * 4

    setup, backward = fam._sdpa_varlen_autograd("sdpa_varlen_bwd_cuda")
    ctx = Ctx()
    q = torch.zeros(5, 2, 8)
    setup(ctx, (q, q, q, cu, 4, 0.5), (q, lse))
    grads = backward(ctx, q, None)
    assert seen["args"][1:] == (q, q, q, cu, 4, q, lse, 0.5) and grads[3:] == (None,) * 3


def test_cuda_check_baseline_matches_the_dense_kernel_under_its_old_name():
    """``python -m fastvit.cuda_check --baseline``: the dense forward, now ``attention_fwd_kernel<Cfg, false>``, is
    compared with its pre-varlen self ``attention_fwd_kernel<Cfg>`` (c++filt writes ``> >``); a register change
    fails, the varlen instantiation is new."""
    from fastvit import cuda_check

    cfg = "fastvit::attn::FwdConfig<cutlass::bfloat16_t, 64, 128, 32, 4>"
    old_name = f"void fastvit::attn::attention_fwd_kernel<{cfg} >(fastvit::AttentionFwdParams)"
    baseline = [
        {
            "kernels": [
                {
                    "arch": "sm_80",
                    "kernel": old_name,
                    "registers": 235,
                    "spill_stores": 0,
                    "spill_loads": 0,
                    "stack": 0,
                    "smem": 0,
                }
            ]
        }
    ]

    def result(dense_regs):
        kernels = [
            cuda_check.KernelInfo(
                "f.cu",
                "sm_80",
                f"void fastvit::attn::attention_fwd_kernel<{cfg}, {flag}>(fastvit::AttentionFwdParams)",
                registers=regs,
            )
            for flag, regs in (("false", dense_regs), ("true", 219))
        ]
        return [cuda_check.FileResult("f.cu", True, 0.0, kernels, "")]

    changed, new = cuda_check.compare_with_baseline(result(235), baseline)
    assert changed == [] and len(new) == 1
    changed, _ = cuda_check.compare_with_baseline(result(237), baseline)
    assert len(changed) == 1 and "registers 235 -> 237" in changed[0]


# ============================================================================================ CPU: the extension
@pytest.fixture(scope="module")
def ext():
    if _cuda._EXT is None:
        _cuda.load(jit=True, minimal=True, archs="9.0a")
    assert _cuda.load_error() is None
    if not fam.cuda_has_varlen(_cuda.build_info()):
        pytest.fail("the loaded fastvit._C build does not report attention_varlen")
    return _cuda._EXT


@pytest.fixture
def as_h100(monkeypatch):
    """Make dispatch believe an sm_90 device is present (the kernels themselves never run: tensors are fake)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@needs_toolchain
def test_build_reports_varlen_and_has_the_schemas(ext):
    assert _cuda.build_info()["attention_varlen"] == 1
    rotary = ["rope", "num_prefix_tokens", "rotate_half"]  # the trailing rotary arguments, as the Triton ops'
    args = {
        "attention_varlen_fwd_cuda": ["qkv", "cu_seqlens", "max_seqlen", "num_heads", "scale", *rotary],
        "attention_varlen_bwd_cuda": [
            "do",
            "qkv",
            "cu_seqlens",
            "max_seqlen",
            "o",
            "lse",
            "num_heads",
            "scale",
            *rotary,
        ],
        "sdpa_varlen_fwd_cuda": ["q", "k", "v", "cu_seqlens", "max_seqlen", "scale", *rotary],
        "sdpa_varlen_bwd_cuda": ["do", "q", "k", "v", "cu_seqlens", "max_seqlen", "o", "lse", "scale", *rotary],
    }
    for name, want in args.items():
        schema = getattr(torch.ops.fastvit, name).default._schema
        assert [a.name for a in schema.arguments] == want, name
    for stem in ("attention_varlen", "sdpa_varlen"):  # the Triton ops, once registered, take the same arguments
        if hasattr(torch.ops.fastvit, f"{stem}_fwd") and hasattr(getattr(torch.ops.fastvit, f"{stem}_fwd"), "default"):
            for kind in ("fwd", "bwd"):
                triton = getattr(torch.ops.fastvit, f"{stem}_{kind}").default._schema
                cuda = getattr(torch.ops.fastvit, f"{stem}_{kind}_cuda").default._schema
                assert [a.name for a in triton.arguments] == [a.name for a in cuda.arguments]
                types = [[str(a.type).replace("SymInt", "int") for a in s.arguments] for s in (triton, cuda)]
                assert types[0] == types[1], (stem, kind)


@needs_toolchain
def test_fake_varlen_ops_on_a_fake_cuda_device(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        T, H, D = 255, 2, 64
        cu = torch.empty(5, dtype=torch.int32, device="cuda")
        qkv = torch.empty(T, 3 * H * D, device="cuda", dtype=torch.bfloat16)
        o, lse = torch.ops.fastvit.attention_varlen_fwd_cuda(qkv, cu, 197, H, 0.125)
        assert o.shape == (T, H * D) and o.dtype == torch.bfloat16 and o.device.type == "cuda"
        assert lse.shape == (H, T) and lse.dtype == torch.float32
        dqkv = torch.ops.fastvit.attention_varlen_bwd_cuda(o, qkv, cu, 197, o, lse, H, 0.125)
        assert dqkv.shape == qkv.shape and dqkv.device.type == "cuda"
        q = torch.empty(T, H, D, device="cuda", dtype=torch.bfloat16)
        o, lse = torch.ops.fastvit.sdpa_varlen_fwd_cuda(q, q, q, cu, 197, 0.125)
        assert o.shape == q.shape and lse.shape == (H, T)
        dq, dk, dv = torch.ops.fastvit.sdpa_varlen_bwd_cuda(o, q, q, q, cu, 197, o, lse, 0.125)
        assert dq.shape == dk.shape == dv.shape == q.shape


@needs_toolchain
def test_varlen_forward_and_backward_on_meta_tensors(ext):
    T, H, D = 99, 2, 64
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    qkv = torch.empty(T, 3 * H * D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    o, lse = torch.ops.fastvit.attention_varlen_fwd_cuda(qkv, cu, 64, H, 0.125)
    o.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.dtype == torch.bfloat16
    q, k, v = (torch.empty(T, H, D, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o, lse = torch.ops.fastvit.sdpa_varlen_fwd_cuda(q, k, v, cu, 64, 0.125)
    o.sum().backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == (T, H, D)


@needs_toolchain
@pytest.mark.parametrize("case", ["attention", "sdpa"])
def test_opcheck_varlen_on_meta_tensors(ext, case):
    meta = {"device": "meta"}
    cu = torch.empty(3, dtype=torch.int32, **meta)
    if case == "attention":
        op = torch.ops.fastvit.attention_varlen_fwd_cuda.default
        args = (torch.randn(20, 3 * 64, dtype=torch.bfloat16, **meta).requires_grad_(), cu, 12, 1, 0.125)
    else:
        op = torch.ops.fastvit.sdpa_varlen_fwd_cuda.default
        q = [torch.randn(20, 2, 64, dtype=torch.bfloat16, **meta).requires_grad_() for _ in range(3)]
        args = (*q, cu, 12, 0.125)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_toolchain
def test_packed_calls_dispatch_to_the_cuda_backend(ext, as_h100):
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    qkv = torch.empty(40, 3 * 2 * 64, device="meta", dtype=torch.bfloat16)
    assert fastvit.ops.attention(qkv, 2, cu_seqlens=cu, max_seqlen=30, backend="cuda").shape == (40, 128)
    q = torch.empty(40, 2, 64, device="meta", dtype=torch.bfloat16)
    assert fastvit.ops.scaled_dot_product_attention(q, q, q, cu_seqlens=cu, max_seqlen=30, backend="cuda").shape == (
        40,
        2,
        64,
    )
    name, _ = backends.select(
        "attention",
        Call(
            device=torch.device("meta"),
            dtype=torch.bfloat16,
            head_dim=64,
            batch=2,
            num_tokens=30,
            num_kv_tokens=30,
            varlen=True,
        ),
        "cuda",
    )
    assert name == "cuda"
