"""The ``cuda`` backend (fastvit._C) on a GPU, against the oracle of docs/ARCHITECTURE.md: every op, forward and every gradient,
fp16 / bf16 (and fp32 for the memory-bound ops), awkward shapes, poisoned outputs, deterministic backward, and whole
models against eager. Marked ``gpu``: skipped (with the reason) on machines without a CUDA device; run by
benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from oracle import (
    FixedMaskMAE,
    check_op,
    compare_model_with_eager,
    make_inputs,
    oracle_compare,
    randn,
    run_forward_backward,
)

import fastvit
import fastvit.ops
from fastvit import reference
from fastvit.backends import get_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("poisoned_empty"),
    pytest.mark.skipif(
        bool(get_backend("cuda").unavailable_reasons()),
        reason=f"cuda backend unavailable: {get_backend('cuda').unavailable_reasons()}",
    ),
]

HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"


def _naive_sdpa(
    q, k, v, scale=None
):  # the oracle's pt: the math in the input precision (one helper, fastvit.reference)
    return reference.scaled_dot_product_attention(q, k, v, scale=scale, plain=True)


def _naive_attention(qkv, num_heads, scale=None):
    return reference.attention(qkv, num_heads, scale=scale, plain=True)


# (B, N, H, D): tails (1, 50, 61, 197), head dims in every bucket, masked head dims (72, 88, 104), batch 3
ATTN_SHAPES = [
    (1, 1, 2, 32),
    (3, 50, 2, 64),
    (2, 61, 3, 80),
    (3, 197, 2, 64),
    (1, 197, 2, 72),
    (2, 257, 1, 88),
    (1, 130, 2, 96),
    (1, 77, 1, 104),
    (2, 129, 2, 128),
    (1, 1025, 1, 64),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}N{}H{}D{}".format(*s))
def test_attention(dtype, shape, generator):
    B, N, H, D = shape
    inputs = make_inputs({"qkv": (B, N, 3 * H * D), "num_heads": H}, dtype=dtype, device=DEV, generator=generator)
    check_op(
        {"cuda": partial(fastvit.ops.attention, backend="cuda")},
        _naive_attention,
        inputs,
        ["qkv"],
        dtype=dtype,
        generator=generator,
        name=f"attention {shape}",
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("nq,nk,D", [(33, 20, 32), (5, 61, 80), (197, 197, 64)])
def test_sdpa(dtype, nq, nk, D, generator):
    inputs = make_inputs(
        {"q": (2, 3, nq, D), "k": (2, 3, nk, D), "v": (2, 3, nk, D)}, dtype=dtype, device=DEV, generator=generator
    )
    check_op(
        {"cuda": partial(fastvit.ops.scaled_dot_product_attention, backend="cuda")},
        _naive_sdpa,
        inputs,
        ["q", "k", "v"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa {nq}x{nk}x{D}",
    )


def test_attention_backward_is_deterministic(generator):
    qkv = torch.randn(2, 197, 3 * 4 * 64, device=DEV, dtype=torch.bfloat16, generator=None).requires_grad_()
    dout = torch.randn(2, 197, 4 * 64, device=DEV, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        qkv.grad = None
        fastvit.ops.attention(qkv, 4, backend="cuda").backward(dout)
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------ rotary embeddings
def _check_rope_op(impl, naive, inputs, grad_names, *, dtype, generator, name):
    """The oracle's ``check_op`` for one implementation, except that the fp32 table's gradient stays fp32 for half
    inputs (timm keeps its tables fp32 under autocast, and so is their gradient): judged with ``dtype``'s tolerance in
    its own dtype."""
    ref_fwd = run_forward_backward(naive, inputs, (), dtype=torch.float64)
    grad_outputs = [randn(o.shape, dtype=dtype, generator=generator).to(torch.float64) for o in ref_fwd.outputs]
    ref = run_forward_backward(naive, inputs, grad_names, grad_outputs, dtype=torch.float64)
    pt = run_forward_backward(naive, inputs, grad_names, grad_outputs)
    run = run_forward_backward(impl, inputs, grad_names, grad_outputs)
    pairs = [("out", run.outputs[0], ref.outputs[0], pt.outputs[0])]
    pairs += [(f"grad {g}", run.grads[g], ref.grads[g], pt.grads[g]) for g in grad_names]
    for label, o, r, p in pairs:
        own = label == "grad rope"
        assert o.dtype == (inputs["rope"].dtype if own else dtype), (label, o.dtype)
        result = oracle_compare(o, r, p, dtype, f"{name} {label}", check_dtype=not own)
        assert result.ok, result.message


# (dtype, D, rotate_half, prefix tokens, per-head table, N or packed lengths): every head-dim bucket, masked head dims
# whose half-layout pairs (j, j + D/2) start mid-chunk (72, 104: D/2 = 36, 52), tails, 0 / 1 / 5 prefix tokens.
ROPE_ATTN = [
    (torch.bfloat16, 64, True, 1, False, 197),
    (torch.float16, 72, True, 0, True, 61),
    (torch.bfloat16, 80, False, 5, False, 50),
    (torch.float16, 96, True, 1, False, 130),
    (torch.bfloat16, 128, False, 1, True, 129),
    (torch.float16, 32, False, 0, False, 1),
    (torch.bfloat16, 32, True, 1, False, (21, 1, 37)),
    (torch.float16, 104, True, 5, True, (9, 70, 33)),
    (torch.bfloat16, 64, False, 1, True, (197, 50, 1)),
]


@pytest.mark.parametrize("dtype,D,half,npt,per_head,n", ROPE_ATTN, ids=str)
def test_attention_with_rope(dtype, D, half, npt, per_head, n, generator):
    """``attention(qkv, H, rope=...)`` on the cuda backend against the eager reference (q and k rotated by timm's
    ``apply_rot_embed_cat``, then softmax attention), the output and the gradients of qkv and of the fp32 table."""
    from fastvit.families.attention import rope_table

    H = 2
    packed = isinstance(n, tuple)
    longest = max(n) if packed else n
    if packed:
        cu = torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        inputs = make_inputs({"qkv": (sum(n), 3 * H * D)}, dtype=dtype, device=DEV, generator=generator)
        inputs.update(cu_seqlens=cu, max_seqlen=longest)
    else:
        inputs = make_inputs({"qkv": (3, n, 3 * H * D)}, dtype=dtype, device=DEV, generator=generator)
    rope = rope_table(max(longest - npt, 1), D, H if per_head else None, half, generator).to(DEV)
    inputs.update(num_heads=H, rope=rope, num_prefix_tokens=npt, rotate_half=half)
    _check_rope_op(
        partial(fastvit.ops.attention, backend="cuda"),
        partial(reference.attention, plain=True),
        inputs,
        ["qkv", "rope"],
        dtype=dtype,
        generator=generator,
        name=f"cuda attention rope D={D} half={half} prefix={npt} per_head={per_head} n={n}",
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_sdpa_with_rope(dtype, packed, generator):
    """``scaled_dot_product_attention(q, k, v, rope=...)`` on strided (B, H, N, D) views of one projection (timm's
    qk-norm attentions) and packed (T, H, D) operands."""
    from fastvit.families.attention import rope_table

    H, D, npt = 2, 80, 1
    if packed:
        cu = torch.tensor([0, 13, 19, 80], dtype=torch.int32, device=DEV)
        inputs = make_inputs({x: (80, H, D) for x in "qkv"}, dtype=dtype, device=DEV, generator=generator)
        inputs.update(cu_seqlens=cu, max_seqlen=61)
        longest = 61
    else:
        x = randn((2, 61, 3, H, D), dtype=dtype, device=DEV, generator=generator).permute(2, 0, 3, 1, 4)
        inputs = dict(zip("qkv", x.unbind(0)))
        longest = 61
    rope = rope_table(longest - npt, D, H, True, generator).to(DEV)
    inputs.update(rope=rope, num_prefix_tokens=npt, rotate_half=True)
    _check_rope_op(
        partial(fastvit.ops.scaled_dot_product_attention, backend="cuda"),
        partial(reference.scaled_dot_product_attention, plain=True),
        inputs,
        ["q", "k", "v", "rope"],
        dtype=dtype,
        generator=generator,
        name=f"cuda sdpa rope packed={packed}",
    )


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("rows,C", [(1, 192), (3 * 61, 200), (2 * 197, 768), (5, 1664), (7, 4096)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(dtype, rows, C, residual, generator):
    spec = {"x": (rows, C), "weight": (C,), "bias": (C,)}
    if residual:
        spec["residual"] = (rows, C)
    inputs = make_inputs(spec, dtype=dtype, device=DEV, generator=generator)

    def impl(x, weight, bias, residual=None):
        return fastvit.ops.layer_norm(x, weight, bias, 1e-6, residual=residual, backend="cuda")

    def naive(x, weight, bias, residual=None):
        return reference.layer_norm(x, weight, bias, 1e-6, residual=residual)

    check_op({"cuda": impl}, naive, inputs, list(spec), dtype=dtype, generator=generator, name=f"layer_norm {C}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,K,N", [(1, 64, 256), (3 * 197, 192, 768), (61, 200, 96)])
def test_linear_gelu(dtype, approximate, M, K, N, generator):
    inputs = make_inputs({"x": (M, K), "weight": (N, K), "bias": (N,)}, dtype=dtype, device=DEV, generator=generator)
    check_op(
        {"cuda": partial(fastvit.ops.linear_gelu, approximate=approximate, backend="cuda")},
        partial(reference.linear_gelu, approximate=approximate),
        inputs,
        ["x", "weight", "bias"],
        dtype=dtype,
        generator=generator,
        name=f"linear_gelu {approximate}",
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("gamma", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 256, 64), (3 * 197, 768, 192), (61, 96, 200)])
def test_linear_residual(dtype, gamma, M, K, N, generator):
    spec = {"x": (M, K), "weight": (N, K), "bias": (N,), "residual": (M, N)}
    if gamma:
        spec["gamma"] = (N,)
    inputs = make_inputs(spec, dtype=dtype, device=DEV, generator=generator)

    def impl(x, weight, bias, residual, gamma=None):
        return fastvit.ops.linear_residual(x, weight, bias, residual, gamma=gamma, backend="cuda")

    check_op(
        {"cuda": impl},
        reference.linear_residual,
        inputs,
        list(spec),
        dtype=dtype,
        generator=generator,
        name="linear_residual",
    )


def _linear_glu(backend, activation, gate_last=False):
    def fn(x, weight, bias, weight_value=None, bias_value=None):
        return fastvit.ops.linear_glu(
            x, weight, bias, weight_value, bias_value, activation=activation, gate_last=gate_last, backend=backend
        )

    return fn


def _linear_glu_inputs(T, K, N, dtype, generator, *, packed, bias=True):
    w = ((2 * N if packed else N, K), K**-0.5)
    spec = {"x": (T, K), "weight": w, "bias": ((w[0][0],), 0.5) if bias else None}
    if not packed:
        spec["weight_value"] = ((N, K), K**-0.5)
        spec["bias_value"] = ((N,), 0.5) if bias else None
    inputs = make_inputs(spec, dtype=dtype, device=DEV, generator=generator)
    return inputs, [name for name, v in inputs.items() if v is not None]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "activation,packed,gate_last,bias",
    [
        ("silu", False, False, True),
        ("gelu", True, False, True),
        ("gelu_tanh", False, False, False),
        ("sigmoid", True, True, True),
        ("silu", True, True, False),
    ],
    ids=["silu-split", "gelu-packed", "tanh-split-nobias", "sigmoid-packed-last", "silu-packed-last-nobias"],
)
@pytest.mark.parametrize("T,K,N", [(1, 64, 72), (3 * 197, 192, 512), (61, 200, 96), (130, 776, 136)])
def test_linear_glu(dtype, activation, packed, gate_last, bias, T, K, N, generator):
    """The dual-GEMM forward and the gated backward (split weights: copied into the workspace; packed: used in place,
    either order) against the reference; token, column (64) and K (32) tiles all have tails."""
    inputs, grads = _linear_glu_inputs(T, K, N, dtype, generator, packed=packed, bias=bias)
    check_op(
        {"cuda": _linear_glu("cuda", activation, gate_last)},
        partial(reference.linear_glu, activation=activation, gate_last=gate_last),
        inputs,
        grads,
        dtype=dtype,
        generator=generator,
        name=f"linear_glu {activation} {'packed' if packed else 'split'} T={T} K={K} N={N}",
    )


def test_linear_glu_backward_is_deterministic_and_layouts_agree(generator):
    """Two backward passes give bit-identical gradients, and the packed and split layouts of the same weights give
    the same output and input gradient."""
    inputs, names = _linear_glu_inputs(197, 192, 256, torch.bfloat16, generator, packed=True)
    dy = randn((197, 256), dtype=torch.bfloat16, device=DEV, generator=generator)
    runs = []
    for _ in range(2):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y = _linear_glu("cuda", "silu")(**leaves)
        runs.append((y, *torch.autograd.grad(y, [leaves[n] for n in names], dy)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    w, b = inputs["weight"], inputs["bias"]
    halves = {"x": inputs["x"], "weight": w[:256], "bias": b[:256], "weight_value": w[256:], "bias_value": b[256:]}
    split = {k: v.detach().clone().requires_grad_() for k, v in halves.items()}
    y = _linear_glu("cuda", "silu")(**split)
    (dx,) = torch.autograd.grad(y, [split["x"]], dy)
    assert torch.equal(y, runs[0][0]) and torch.equal(dx, runs[0][1])


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("P,E,prefix_pos", [(16, 192, True), (14, 64, False), (8, 96, True)])
def test_patch_embed(dtype, keep, P, E, prefix_pos, generator):
    B, C, S = 3, 3, {16: 64, 14: 56, 8: 64}[P]
    Np = (S // P) ** 2
    spec = {
        "images": (B, C, S, S),
        "weight": (E, C, P, P),
        "bias": (E,),
        "cls_token": (1, 1, E),
        "reg_tokens": (1, 2, E),
        "pos_embed": (1, Np + (3 if prefix_pos else 0), E),
    }
    inputs = make_inputs(spec, dtype=dtype, device=DEV, generator=generator)
    if keep:
        inputs["ids_keep"] = torch.rand(B, Np, generator=generator).argsort(1)[:, : max(1, Np // 4)].to(DEV)

    check_op(
        {"cuda": partial(fastvit.ops.patch_embed, backend="cuda")},
        reference.patch_embed,
        inputs,
        list(spec),
        dtype=dtype,
        generator=generator,
        name=f"patch_embed P{P} keep={keep}",
    )


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("B,N,n_keep,C", [(1, 1, 0, 32), (3, 49, 12, 64), (2, 196, 49, 200)])
def test_mae_unshuffle(dtype, B, N, n_keep, C, generator):
    inputs = make_inputs(
        {"x": (B, 1 + n_keep, C), "mask_token": (1, 1, C), "pos_embed": (1, 1 + N, C)},
        dtype=dtype,
        device=DEV,
        generator=generator,
    )
    inputs["ids_restore"] = torch.rand(B, N, generator=generator).argsort(1).to(DEV)
    check_op(
        {"cuda": partial(fastvit.ops.mae_unshuffle, backend="cuda")},
        reference.mae_unshuffle,
        inputs,
        ["x", "mask_token", "pos_embed"],
        dtype=dtype,
        generator=generator,
        name="mae_unshuffle",
    )


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("P,S", [(4, 16), (16, 64)])
def test_mae_loss(dtype, norm_pix, P, S, generator):
    B, C = 3, 3
    N = (S // P) ** 2
    inputs = make_inputs(
        {"pred": (B, N, P * P * C), "images": (B, C, S, S)}, dtype=dtype, device=DEV, generator=generator
    )
    inputs["mask"] = (torch.rand(B, N, generator=generator) < 0.75).float().to(DEV)
    inputs["patch_size"] = P
    check_op(
        {"cuda": partial(fastvit.ops.mae_loss, norm_pix_loss=norm_pix, backend="cuda")},
        partial(reference.mae_loss, norm_pix_loss=norm_pix),
        inputs,
        ["pred", "images"],
        dtype=dtype,
        generator=generator,
        name=f"mae_loss norm_pix={norm_pix}",
    )


# ------------------------------------------------------------------------------------------- whole models
def _compare_with_eager(model, args, loss_fn, first, compiled):
    compare_model_with_eager(
        model,
        args,
        loss_fn,
        first,
        backend="cuda",
        ref_dtype=torch.float32,
        compile_backend="inductor" if compiled else None,
    )


# compiled=True: the same model under torch.compile(fullgraph=True) (inductor), which must trace through dispatch,
# the registered ops and their autograd without a graph break and give the same numbers.
COMPILED = pytest.mark.parametrize("compiled", [False, True], ids=["eager_mode", "compiled"])


@COMPILED
def test_vision_transformer_on_cuda_matches_eager(generator, compiled):
    model = fastvit.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, num_classes=10, init_values=1e-1, reg_tokens=1
    ).to(DEV, torch.bfloat16)
    images = torch.randn(3, 3, 64, 64, generator=generator).to(DEV, torch.bfloat16)
    weights = torch.linspace(-1, 1, 30, device=DEV).view(3, 10)
    _compare_with_eager(model, [images], lambda y: (y.float() * weights).sum(), lambda y: y, compiled)


@COMPILED
def test_masked_autoencoder_on_cuda_matches_eager(generator, compiled):
    model = fastvit.MaskedAutoencoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=128,
        depth=2,
        num_heads=2,
        decoder_embed_dim=64,
        decoder_depth=1,
        decoder_num_heads=1,
        norm_pix_loss=True,
    ).to(DEV, torch.bfloat16)
    images = torch.randn(3, 3, 64, 64, generator=generator).to(DEV, torch.bfloat16)
    noise = torch.rand(3, 16, generator=generator).to(DEV)

    _compare_with_eager(FixedMaskMAE(model), [images, noise], lambda out: out[0], lambda out: out[1], compiled)
