"""Rotary position embeddings in ``fastvit.ops.attention`` / ``scaled_dot_product_attention`` (``rope=``,
``num_prefix_tokens=``, ``rotate_half=``) and timm's rotary attentions (``EvaAttention``, ``AttentionRope``) patched
by ``patch_timm_``.

* The ops against the float64 reference (:func:`fastvit.reference.rotary` then softmax attention) under the oracle of
  tests/oracle.py, on the eager and the Triton backend (interpreted on the CPU): fp32 / bf16 inputs with timm's fp32
  tables, shared (N_rot, 2·D) and per-head (H, N_rot, 2·D) tables, 0 / 1 / 5 prefix tokens, both column layouts,
  dense and packed; the output and every gradient -- qkv's (or q's, k's, v's) and the table's.
* The call description and the CUDA backend's capability (rope calls only with a build that reports
  ``attention_rope``), bad arguments.
* Whole timm rope models with random weights (``vit_*_rope_*``, ``*_rope_mixed_*``, EVA-02, DINOv3, Perception
  Encoder): patched against unpatched, output and every parameter gradient under the oracle, fp32 and bf16 autocast.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from oracle import ModelOracle, make_inputs, oracle_compare, randn, run_forward_backward

import fastvit.backends
import fastvit.ops as ops
from fastvit import reference
from fastvit.backends import Call, Capabilities
from fastvit.families.attention import rope_table

timm = pytest.importorskip("timm")
pytest.importorskip("triton")

from fastvit.integrations.timm import patch_report, patch_timm_  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_empty")  # see tests/conftest.py

F32, BF16 = torch.float32, torch.bfloat16
H = 2


def _timm_table(D: int, grid: tuple[int, int], half: bool) -> torch.Tensor:
    """A shared table from timm's own ``RotaryEmbeddingCat`` (what EVA-02 / RoPE-ViT pass), fp32 (N_rot, 2·D)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    return RotaryEmbeddingCat(D, in_pixels=False, feat_shape=list(grid), rotate_half=half).get_embed().float()


def _impls(op: str) -> dict:
    fn = getattr(ops, op)
    return {be: functools.partial(fn, backend=be) for be in ("eager", "triton")}


def check_op(impls, naive, inputs, grad_names, *, dtype, generator, name):
    """tests/oracle.py's ``check_op`` (ref in float64, pt in the input precision, every output and gradient under the
    oracle with ``dtype``'s tolerance), except that the fp32 table's gradient stays fp32 for bf16 inputs (timm's
    tables are fp32 under autocast, and so is their gradient): it is judged with bf16's tolerance in its own dtype."""
    ref_fwd = run_forward_backward(naive, inputs, (), dtype=torch.float64)
    grad_outputs = [randn(o.shape, dtype=dtype, generator=generator).to(torch.float64) for o in ref_fwd.outputs]
    ref = run_forward_backward(naive, inputs, grad_names, grad_outputs, dtype=torch.float64)
    pt = run_forward_backward(naive, inputs, grad_names, grad_outputs)
    for impl_name, impl in impls.items():
        run = run_forward_backward(impl, inputs, grad_names, grad_outputs)
        pairs = [("out", run.outputs[0], ref.outputs[0], pt.outputs[0])]
        pairs += [(f"grad {g}", run.grads[g], ref.grads[g], pt.grads[g]) for g in grad_names]
        for label, o, r, p in pairs:
            own = label == "grad rope"
            assert o.dtype == (inputs["rope"].dtype if own else dtype), (label, o.dtype)
            result = oracle_compare(o, r, p, dtype, f"{name}[{impl_name}] {label}", check_dtype=not own)
            assert result.ok, result.message


# ------------------------------------------------------------------------------------------------ the ops
# (dtype, D, rotate_half, prefix tokens, per-head table, tokens or packed lengths). N and lengths leave tails in
# every block; D = 80 splits into column chunks (64 + 16) whose rotation pairs straddle them in the half layout.
ATTENTION = [
    (F32, 64, False, 1, False, 21),
    (BF16, 64, True, 0, True, 17),
    (F32, 80, True, 5, True, 23),
    (BF16, 80, False, 5, False, 19),
    (F32, 64, True, 1, False, (9, 1, 20)),
    (BF16, 80, False, 5, True, (25, 3, 14)),
    (F32, 64, False, 0, True, (11, 0, 16)),
]


def _ids(v):
    return str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v))


@pytest.mark.parametrize("dtype,D,half,npt,per_head,n", ATTENTION, ids=_ids)
def test_attention_with_rope_matches_reference(dtype, D, half, npt, per_head, n, generator):
    packed = isinstance(n, tuple)
    longest = max(n) if packed else n
    if packed:
        cu = torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
        inputs = make_inputs({"qkv": (sum(n), 3 * H * D)}, dtype=dtype, generator=generator)
        inputs.update(cu_seqlens=cu)
    else:
        inputs = make_inputs({"qkv": (2, n, 3 * H * D)}, dtype=dtype, generator=generator)
    if per_head or npt == 5:
        rope = rope_table(longest - npt, D, H if per_head else None, half, generator)
    else:  # timm's own table for a 4 x 5 grid (20 rows >= the tokens after the prefix)
        rope = _timm_table(D, (4, 5), half)
    # the table stays fp32 for bf16 inputs, as timm's rotary modules give it under autocast
    inputs.update(num_heads=H, rope=rope, num_prefix_tokens=npt, rotate_half=half)
    check_op(
        _impls("attention"),
        functools.partial(reference.attention, plain=True),
        inputs,
        ["qkv", "rope"],
        dtype=dtype,
        generator=generator,
        name=f"attention rope D={D} half={half} prefix={npt} per_head={per_head} n={n}",
    )


@pytest.mark.parametrize(
    "dtype,half,npt,per_head,packed",
    [(F32, True, 1, True, False), (BF16, False, 0, False, False), (F32, False, 5, True, True)],
    ids=_ids,
)
def test_sdpa_with_rope_matches_reference(dtype, half, npt, per_head, packed, generator):
    """``scaled_dot_product_attention(q, k, v, rope=...)`` -- the path of timm's qk-norm and separate-projection
    attentions -- on strided (B, H, N, D) views and packed (T, H, D) operands."""
    D = 64
    if packed:
        lens = (13, 6, 19)
        cu = torch.tensor([0, 13, 19, 38], dtype=torch.int32)
        spec = {name: (38, H, D) for name in "qkv"}
        longest = 19
    else:
        spec = {name: (2, H, 21, D) for name in "qkv"}
        longest = 21
    inputs = make_inputs(spec, dtype=dtype, generator=generator)
    if not packed:  # timm's layout: views of one (B, N, 3, H, D) projection
        x = torch.stack([inputs[n] for n in "qkv"]).permute(1, 3, 0, 2, 4).contiguous()
        inputs.update(zip("qkv", x.permute(2, 0, 3, 1, 4).unbind(0)))
    else:
        inputs.update(cu_seqlens=cu)
        assert sum(lens) == 38
    rope = rope_table(longest - npt, D, H if per_head else None, half, generator)
    inputs.update(rope=rope, num_prefix_tokens=npt, rotate_half=half)
    check_op(
        _impls("scaled_dot_product_attention"),
        functools.partial(reference.scaled_dot_product_attention, plain=True),
        inputs,
        ["q", "k", "v", "rope"],
        dtype=dtype,
        generator=generator,
        name=f"sdpa rope half={half} prefix={npt} per_head={per_head} packed={packed}",
    )


def test_timm_table_forms_give_timm_eva_attention(generator):
    """The rope forms timm passes -- (N_rot, 2·D), (1, N_rot, 2·D), (H, N_rot, 2·D), (1, H, N_rot, 2·D) -- all
    give what timm's EvaAttention computes with that table (eager: bit for bit; Triton within the oracle)."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    D, N, npt = 64, 13, 1
    qkv = torch.randn(2, N, 3 * H * D, generator=generator)
    shared = _timm_table(D, (3, 4), False)
    per_head = rope_table(N - npt, D, H, False, generator)
    for table in (shared, shared[None], per_head, per_head[None]):
        q, k, v = qkv.reshape(2, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], table)], 2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], table)], 2)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, N, H * D)
        got = ops.attention(qkv, H, rope=table, num_prefix_tokens=npt, backend="eager")
        assert torch.equal(got, want)
        got = ops.attention(qkv, H, rope=table, num_prefix_tokens=npt, backend="triton")
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ dispatch
def test_rope_call_description_and_cuda_reason():
    """``rope=`` sets ``Call.rope``; a backend without rotary kernels (the default :class:`Capabilities`, a CUDA build
    from before its rotary kernels) declines it with a reason naming the feature; Triton, eager and a CUDA build that
    reports ``attention_rope`` serve it."""
    from fastvit.families import attention as fam

    qkv = torch.randn(2, 9, 3 * H * 64)
    rope = rope_table(8, 64, None, False, torch.Generator().manual_seed(0))
    call = ops.describe_call("attention", qkv, H, rope=rope, num_prefix_tokens=1)
    assert call.rope is True and ops.describe_call("attention", qkv, H).rope is False
    q = torch.randn(2, H, 9, 64)
    assert ops.describe_call("scaled_dot_product_attention", q, q, q, rope=rope, num_prefix_tokens=1).rope is True
    assert Call().rope is False and Capabilities().rope is False  # a new last field: old calls keep working
    want = "rotary position embeddings (rope=) are not supported"
    assert Capabilities().reasons(call) == [want]
    facts = {  # a full CUDA build's kernel facts (tests/test_varlen_cuda.py)
        "attention_head_dim_bucket_bounds": "32,64,80,96,128",
        "attention_head_dim_buckets": "32,64,80,96,128",
        "attention_bwd_smem_bytes": "32:41984,64:74752,80:91136,96:107520,128:104960",
        "attention_head_dim_multiple": 8,
        "attention_max_head_dim": 128,
        "half_dtypes": "float16,bfloat16",
        "gemm_alignment": 8,
        "attention_varlen": 1,
    }
    half_call = call._replace(dtype=torch.bfloat16, device=torch.device("meta"))
    old_build = fam.cuda_caps_for(facts)  # no attention_rope key: its schemas lack the rotary arguments
    assert old_build.reasons(half_call) == [want]
    assert old_build.reasons(half_call._replace(rope=False)) == []
    assert fam.cuda_caps_for({**facts, "attention_rope": 1}).reasons(half_call) == []
    for name in ("triton", "eager"):
        assert fastvit.backends.get_backend(name).not_supported_reasons("attention", call) == []
    cuda = fastvit.backends._BACKENDS.get("cuda")
    if cuda is not None and "attention" in cuda.kernels and not cuda.unavailable_reasons():
        from fastvit.runtime import cuda as cuda_rt

        reasons = cuda.not_supported_reasons("attention", call._replace(device=torch.device("cuda")))
        assert (want in reasons) != fam.cuda_has_rope(cuda_rt.build_info())


# ------------------------------------------------------------------------------------------------ bad input
def _bad_calls():
    qkv = torch.randn(2, 9, 3 * H * 64)
    ok = torch.rand(8, 128)
    return [
        (dict(rope=ok.numpy()), TypeError, "rope must be a torch.Tensor"),
        (dict(rope=ok.int()), TypeError, "rope must be float16"),
        (dict(rope=ok.to("meta")), ValueError, "rope is on meta"),
        (dict(rope=torch.rand(7, 128)), ValueError, "rope has 7 rows"),
        (dict(rope=ok, num_prefix_tokens=0), ValueError, "rope has 8 rows .* need 9"),
        (dict(rope=torch.rand(8, 64), num_prefix_tokens=1), ValueError, "rope's last dim must be 2·D = 128"),
        (dict(rope=torch.rand(3, 8, 128), num_prefix_tokens=1), ValueError, "rope has 3 heads"),
        (dict(rope=torch.rand(3, 1, 8, 128), num_prefix_tokens=1), ValueError, "table per sample"),
        (dict(rope=torch.rand(128), num_prefix_tokens=1), ValueError, r"rope must be \(N_rot, 2·D\)"),
        (dict(rope=ok, num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be >= 0"),
        (dict(rope=ok, num_prefix_tokens=1.0), TypeError, "num_prefix_tokens must be an int"),
        (dict(rope=ok, num_prefix_tokens=1, rotate_half=1), TypeError, "rotate_half must be a bool"),
        (dict(num_prefix_tokens=1), ValueError, "num_prefix_tokens=1 is only meaningful with rope"),
        (dict(qkv=torch.randn(2, 9, 3 * H * 63), rope=torch.rand(8, 126), num_prefix_tokens=1), ValueError, "even"),
    ], qkv


@pytest.mark.parametrize("i", range(14))
def test_bad_rope_arguments_raise_naming_them(i):
    calls, qkv = _bad_calls()
    kwargs, exc, match = calls[i]
    x = kwargs.pop("qkv", qkv)
    with pytest.raises(exc, match=match):
        ops.attention(x, H, **kwargs)


def test_bad_rope_arguments_of_sdpa_and_packed():
    q = torch.randn(2, H, 9, 64)
    rope = torch.rand(9, 128)
    with pytest.raises(ValueError, match="rope needs self-attention"):
        ops.scaled_dot_product_attention(q, q[:, :, :5], q[:, :, :5], rope=rope)
    with pytest.raises(ValueError, match="rope has 9 rows"):  # packed: max_seqlen - prefix rows
        cu = torch.tensor([0, 4, 14], dtype=torch.int32)
        ops.attention(torch.randn(14, 3 * H * 64), H, cu_seqlens=cu, rope=rope)
    cu = torch.tensor([0, 4, 14], dtype=torch.int32)
    ops.attention(torch.randn(14, 3 * H * 64), H, cu_seqlens=cu, rope=rope, num_prefix_tokens=1)


# ------------------------------------------------------------------------------------------------ timm models
#: Small rope models from timm's own constructors (random weights): RoPE-ViT (AttentionRope, shared table),
#: RoPE-Mixed (AttentionRope, learnable per-head tables), EVA-02 (EvaAttention with q / v biases, SwiGLU),
#: DINOv3 (EvaAttention, 4 registers + cls, rotate_half, LayerScale), Perception Encoder (AttentionRope, cls).
MODELS = {
    "vit_base_patch16_rope_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
    "vit_base_patch16_rope_mixed_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
    "eva02_tiny_patch14_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=28),
    "vit_small_patch16_dinov3": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
    "vit_pe_core_tiny_patch16_384": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
}


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=5, **MODELS[name])
    with torch.no_grad():  # timm zero-inits some biases / scales: random values so that every path is exercised
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.train()


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_rope_model_matches_timm(name, amp, seed, monkeypatch):
    """The patched model (attention on Triton, interpreted; the other ops where dispatch puts them) against timm's own
    forward: output and every parameter gradient (the mixed models' learnable rope frequencies included) under the
    oracle."""
    m = _model(name, seed)
    for mod in m.modules():  # dropout-free training mode: deterministic, and gradients everywhere
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    size = MODELS[name]["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    context = (lambda: torch.autocast("cpu", torch.bfloat16)) if amp else None
    oracle = ModelOracle(
        m,
        [x],
        lambda out: out,
        ref_dtype=torch.float64 if not amp else torch.float32,
        loss_fn=lambda out: (out.float() ** 2).sum(),
        dtype=torch.bfloat16 if amp else None,
        context=context,
    )
    patched = patch_timm_(copy.deepcopy(m))
    rows = {r.name: r for r in patch_report(patched)}
    attn = [r for r in rows.values() if r.class_name in ("EvaAttention", "AttentionRope")]
    assert len(attn) == 2 and all(r.status == "patched" for r in attn), attn
    # fp32: every op on Triton; bf16 autocast: the attention ops on Triton, the rest where automatic selection puts
    # them (the autocast LayerNorms take operands of mixed dtypes, which only eager does)
    with monkeypatch.context() as mp, fastvit.backends.recording() as calls:
        for op in ("attention", "scaled_dot_product_attention"):
            mp.setattr(ops, op, functools.partial(getattr(ops, op), backend="triton"))
        results = oracle.judge(patched, backend=None if amp else "triton")
    attention_calls = [c for op, c in calls if op in ("attention", "scaled_dot_product_attention")]
    assert len(attention_calls) == 2 and all(c.rope for c in attention_calls)
    blocks = [r for r in rows.values() if r.class_name == "EvaBlock"]
    assert len(blocks) == 2 and all(r.status == "patched" for r in blocks), blocks
    # each EvaBlock's proj and fc2 (+ LayerScale + residual) as one linear_residual, in every forward judged
    assert sum(op == "linear_residual" for op, _ in calls) % 4 == 0 and any(op == "linear_residual" for op, _ in calls)
    for r in results:
        assert r.ok, r.message


def test_patched_eva_block_with_a_hook_calls_its_modules(seed):
    """A hook on an EvaBlock's ``mlp.fc2``: the block runs modular (attention and MLP called as modules), the hook
    fires with timm's tensors, the output is timm's, and patch_report names the cause."""
    m = _model("eva02_tiny_patch14_224", seed).eval()
    ref = copy.deepcopy(m)
    patched = patch_timm_(copy.deepcopy(m))
    seen = []
    patched.blocks[0].mlp.fc2.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    ref.blocks[0].mlp.fc2.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref(x), atol=2e-5, rtol=0)
    assert len(seen) == 2 and seen[0] == seen[1]
    row = {r.name: r for r in patch_report(patched)}["blocks.0"]
    assert row.status == "modular" and "mlp.fc2" in row.reason and "forward hook" in row.reason
    assert {r.name: r for r in patch_report(patched)}["blocks.1"].status == "patched"


def test_patched_rope_attention_falls_back_with_reasons(seed, monkeypatch):
    """Configurations and calls fastvit leaves on timm's forward: fused_attn=False (reported), attn_mask; separate
    q / k / v projections with grouped-query heads and qk-norm run on fastvit, with a shared or a per-sample rope
    table (patch dropout)."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    torch.manual_seed(seed)
    x = torch.randn(2, 9, 64)
    rope = rope_table(8, 32, None, False, torch.Generator().manual_seed(seed))
    gqa = AttentionRope(
        64, num_heads=2, qkv_fused=False, num_kv_heads=1, qk_norm=True, norm_layer=torch.nn.LayerNorm, gated=True
    )
    eva = EvaAttention(64, num_heads=2, qkv_fused=False, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    for m in (gqa, eva):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ref = copy.deepcopy(m)
        patch_timm_(m)
        assert patch_report(torch.nn.Sequential(m))[0].status == "patched"
        calls = {}

        def spy(*a, _orig=ops.scaled_dot_product_attention, _calls=calls, **k):
            _calls["sdpa"] = k.get("rope") is not None
            return _orig(*a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(ops, "scaled_dot_product_attention", spy)
            got = m(x, rope=rope)
        assert calls == {"sdpa": True}
        torch.testing.assert_close(got, ref(x, rope=rope), atol=2e-5, rtol=0)
        mask = torch.ones(9, 9, dtype=torch.bool)
        torch.testing.assert_close(m(x, rope=rope, attn_mask=mask), ref(x, rope=rope, attn_mask=mask))
        per_sample = rope[None, None].expand(2, 1, 8, 64)
        torch.testing.assert_close(m(x, rope=per_sample), ref(x, rope=per_sample))
    eva.fused_attn = False
    row = patch_report(torch.nn.Sequential(eva))[0]
    assert row.status == "fallback" and "fused_attn=False" in row.reason
