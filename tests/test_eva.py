"""fastvit's own Eva family (fastvit.nn.eva: EVA-02, DINOv3, Perception Encoder, RoPE ViTs) against timm's.

* Whole models with timm's weights (tiny depth / width, small images): output and every parameter gradient under the
  oracle of tests/oracle.py (fp32, CPU bf16 and fp16 autocast), against timm's own model -- DINOv3 (EvaAttention without
  bias, 4 registers, rotate-half rope, LayerScale, dynamic size), EVA-02 Ti (q / v-biased fused qkv, packed SwiGLU),
  EVA-02 B (separate q / k / v, SwiGLU with its LayerNorm, fp32 only), PE core (AttentionRope, pre-norm, attention
  pooling), RoPE-Mixed (learnable per-head tables);
* strict state_dict round trips, ``from_timm`` configurations, ``create_model`` names against timm's configs (meta);
* bad arguments; hooks on block submodules; ``import fastvit`` without timm.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from oracle import ModelOracle, assert_same_step, seeded_step

import fastvit
import fastvit.backends
from fastvit.nn.eva import AttentionRope, Eva, EvaAttention, GluMlp, eva_block_fusion_reasons
from fastvit.nn.factory import _EVA_CONFIGS

timm = pytest.importorskip("timm")

from fastvit.integrations import from_timm  # noqa: E402

#: name -> (tiny overrides, families' ops that must run)
TINY = {
    "vit_small_patch16_dinov3": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
    "eva02_tiny_patch14_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=28),
    "eva02_base_patch14_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=28),
    "vit_pe_core_tiny_patch16_384": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
    "vit_base_patch16_rope_mixed_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=32),
}
OPS = {
    "vit_small_patch16_dinov3": {"patch_embed", "attention", "layer_norm", "linear_gelu", "linear_residual"},
    "eva02_tiny_patch14_224": {"attention", "linear_glu", "linear_residual"},
    "eva02_base_patch14_224": {"scaled_dot_product_attention", "linear_glu", "linear_residual"},
    "vit_pe_core_tiny_patch16_384": {"attention", "scaled_dot_product_attention", "linear_gelu"},
    "vit_base_patch16_rope_mixed_224": {"attention", "linear_gelu", "linear_residual"},
}


def _timm_model(name: str, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=5, **{**TINY[name], **kw})
    with torch.no_grad():  # timm zero-inits biases / ones-inits norms: random values exercise every path
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    for mod in m.modules():  # dropout-free training mode: deterministic, gradients everywhere
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m.train()


def _ours(name: str, timm_model: nn.Module, **kw) -> Eva:
    m = fastvit.create_model(name, num_classes=5, **{**TINY[name], **kw})
    m.load_state_dict(timm_model.state_dict(), strict=True)
    return m.train(timm_model.training)


CASES = [(n, amp, None) for n in TINY for amp in (None, "bf16") if not (amp and n == "eva02_base_patch14_224")]
CASES += [(n, "fp16", None) for n in ("vit_small_patch16_dinov3", "vit_base_patch16_rope_mixed_224")]
CASES += [(n, None, "triton") for n in ("vit_small_patch16_dinov3", "vit_base_patch16_rope_mixed_224")]
_AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize(
    "name,amp,backend", CASES, ids=[f"{n}-{a or 'fp32'}{'-' + b if b else ''}" for n, a, b in CASES]
)
def test_eva_matches_timm(name, amp, backend, seed):
    """create_model(name) with timm's weights: output and every parameter gradient (the mixed rope's learnable
    frequencies included) under the oracle against timm's own model; the fused ops run. Automatic dispatch, and the
    Triton kernels (interpreted on the CPU) for a shared rotate-half table and for per-head tables."""
    kw = {"depth": 1} if backend == "triton" else {}  # the Triton interpreter is slow: one block suffices there
    t = _timm_model(name, seed, **kw)
    size = TINY[name]["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    oracle = ModelOracle(
        t,
        [x],
        lambda out: out,
        ref_dtype=torch.float32 if amp else torch.float64,
        loss_fn=lambda out: (out.float() ** 2).sum(),
        dtype=_AMP[amp],
        context=(lambda: torch.autocast("cpu", _AMP[amp])) if amp else None,
    )
    ours = _ours(name, t, **kw)
    with fastvit.backends.recording() as calls:
        results = oracle.judge(ours, backend=backend)
    ran = {op for op, _ in calls}
    assert OPS[name] <= ran, ran
    assert all(c.rope for op, c in calls if op in ("attention",)), "attention ran without its rotary table"
    for r in results:
        assert r.ok, r.message


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_pe_core_tiny_patch16_384"])
def test_set_input_size(name, seed):
    """set_input_size resamples pos_embed and moves the rope grid as timm's does: same outputs at the new size."""
    t = _timm_model(name, seed).eval()
    ours = _ours(name, t)
    size = 2 * TINY[name]["img_size"]
    t.set_input_size(img_size=(size, size))
    ours.set_input_size((size, size))
    torch.testing.assert_close(ours.pos_embed, t.pos_embed)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), t(x), atol=1e-5, rtol=1e-5)


def test_dynamic_size_intermediates_and_checkpointing(seed):
    """DINOv3 at another image size (rope table for the new grid), forward_intermediates and grad checkpointing give
    timm's values."""
    name = "vit_small_patch16_dinov3"
    t = _timm_model(name, seed).eval()
    ours = _ours(name, t)
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), t(x), atol=1e-5, rtol=1e-5)
        a, ia = ours.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, norm=True)
        b, ib = t.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, norm=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for (sa, pa), (sb, pb) in zip(ia, ib):
        assert sa.shape == sb.shape == (2, 64, 3, 2) and pa.shape == pb.shape == (2, 5, 64)
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    ours.train().set_grad_checkpointing()
    ours(x).sum().backward()
    g = ours.blocks[0].attn.qkv.weight.grad.clone()
    ours.zero_grad()
    ours.set_grad_checkpointing(False)
    ours(x).sum().backward()
    torch.testing.assert_close(ours.blocks[0].attn.qkv.weight.grad, g)


@pytest.mark.parametrize("name", list(TINY))
def test_state_dict_round_trip_and_from_timm(name, seed):
    """Our state_dict loads strictly into timm's model and back (same keys, same order); from_timm builds the model
    create_model builds (same modules and settings) with timm's values."""
    t = _timm_model(name, seed).eval()
    ours = _ours(name, t)
    sd = ours.state_dict()
    assert list(sd) == list(t.state_dict())
    t2 = timm.create_model(name, pretrained=False, num_classes=5, **TINY[name])
    t2.load_state_dict(sd, strict=True)
    conv = from_timm(t)
    assert isinstance(conv, Eva) and repr(conv) == repr(ours) and not conv.training
    assert all(p.device.type == "cpu" for p in conv.state_dict().values())
    assert all(b.device.type == "cpu" for b in conv.buffers())
    size = TINY[name]["img_size"]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), t(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(_EVA_CONFIGS))
def test_create_model_matches_timm_config(name):
    """Every create_model entry: the name is timm's, and (on the meta device) every state_dict entry has timm's
    shape, num_classes and input size are timm's defaults, and from_timm reads back the same configuration."""
    assert name in timm.list_models()
    with torch.device("meta"):
        ours = fastvit.create_model(name)
        ref = timm.create_model(name, pretrained=False)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]
    assert ours.num_classes == ref.num_classes and ours.patch_embed.img_size == tuple(ref.patch_embed.img_size)
    assert ours.pretrained_cfg.get("architecture") == name
    assert repr(from_timm(ref)) == repr(ours)
    assert name in fastvit.list_models()


def test_bad_arguments():
    kw = dict(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, use_rot_pos_emb=True)
    for bad, match in [
        (dict(use_post_norm=True), "use_post_norm"),
        (dict(rope_type="mrope"), "rope_type"),
        (dict(global_pool="gem"), "global_pool"),
        (dict(num_heads=3), "num_heads"),
        (dict(dynamic_img_pad=True), "dynamic_img_pad"),
        (dict(attn_type="linear"), "attn_type"),
        (dict(norm_layer=nn.BatchNorm1d), "norm_layer"),
        (dict(class_token=False, global_pool="token"), "class_token"),
        (dict(num_reg_tokens=-1), "num_reg_tokens"),
        (dict(rope_type="mixed", rope_rotate_half=True), "rope_rotate_half"),
    ]:
        with pytest.raises(ValueError, match=match):
            Eva(**{**kw, **bad})
    with pytest.raises(ValueError, match="act_layer"):
        GluMlp(8, 16, act_layer=nn.ReLU)
    with pytest.raises(ValueError, match="norm_layer"):
        EvaAttention(64, num_heads=2, qk_norm=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionRope(64, num_heads=4, num_kv_heads=2)
    m = Eva(**kw, num_classes=3)
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 3, 32, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="image size"):
        m(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="EvaBlockPostNorm"):
        from_timm(
            timm.models.eva.Eva(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, use_post_norm=True)
        )


def test_hooks_on_block_submodules_fire(seed):
    """A hook on a block's fc2 (read by the fused path) makes that block call its attention and MLP as modules -- as
    reported by
    eva_block_fusion_reasons --, one on the attention's qkv (with EVA-02's q / v biases) sees the projection; both
    fire once per forward and the outputs stay timm's."""
    name = "eva02_tiny_patch14_224"
    t = _timm_model(name, seed).eval()
    ours = _ours(name, t)
    seen = []
    ours.blocks[0].mlp.fc2.register_forward_hook(lambda mod, i, o: seen.append("fc2"))
    ours.blocks[1].attn.qkv.register_forward_hook(lambda mod, i, o: seen.append("qkv"))
    assert any("mlp.fc2 has a forward hook" in r for r in eva_block_fusion_reasons(ours.blocks[0]))
    assert eva_block_fusion_reasons(ours.blocks[1]) == []
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad(), fastvit.backends.recording() as calls:
        out = ours(x)
    assert seen == ["fc2", "qkv"]
    assert sum(op == "linear_residual" for op, _ in calls) == 2  # block 0 calls its attention and MLP as modules
    with torch.no_grad():
        torch.testing.assert_close(out, t(x), atol=1e-5, rtol=1e-5)


def test_import_without_timm(monkeypatch):
    """``import fastvit`` does not import timm; a rotary Eva without timm names what needs it, one without rope builds."""
    code = "import sys, fastvit, fastvit.nn.eva; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "timm.layers", None)
    with pytest.raises(ImportError, match="use_rot_pos_emb.*pip install timm"):
        Eva(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, use_rot_pos_emb=True)
    Eva(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)


@pytest.mark.parametrize(
    "name,hidden,gated", [("eva02_tiny_patch14_224", 512, True), ("eva02_base_patch14_224", 2048, True)]
)
def test_bench_model_config(name, hidden, gated):
    """fastvit-bench reads an Eva's shapes: separate q / k / v (EVA-02 B), the gated MLP's width, and counts fc1's
    two halves in the FLOPs."""
    from fastvit.bench.providers import model_config, vit_flops

    with torch.device("meta"):
        cfg = model_config(fastvit.create_model(name))
    assert (cfg["mlp_hidden"], cfg["mlp_gated"], cfg["is_eva"]) == (hidden, gated, True)
    assert cfg["head_dim"] * cfg["num_heads"] == cfg["embed_dim"]
    plain = vit_flops({**cfg, "mlp_gated": False}, 224, 1)
    N = (224 // 14) ** 2 + 1
    assert vit_flops(cfg, 224, 1) - plain == cfg["depth"] * 2 * N * cfg["embed_dim"] * hidden


def test_rms_norm_qk_norm_scale_norm_from_timm(seed):
    """An Eva with timm's RmsNorm everywhere, qk-norm (attention through ops.scaled_dot_product_attention with the
    rotary table), the attention's scale norm and SwiGLU with its norm: from_timm of timm's model -- patched by
    patch_timm_ or not -- gives its output and every parameter gradient under the oracle (fp32)."""
    from fastvit.integrations import patch_timm_
    from fastvit.nn.eva import RmsNorm

    torch.manual_seed(seed)
    t = timm.models.eva.Eva(
        img_size=32,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=5,
        norm_layer=timm.layers.RmsNorm,
        qk_norm=True,
        scale_attn_inner=True,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        num_reg_tokens=2,
        init_values=0.1,
    )
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    t.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    oracle = ModelOracle(t, [x], lambda out: out, ref_dtype=torch.float64, loss_fn=lambda out: (out.float() ** 2).sum())
    for src in (t, patch_timm_(copy.deepcopy(t))):
        ours = from_timm(src)
        assert isinstance(ours.blocks[0].attn.q_norm, RmsNorm) and isinstance(ours.norm, nn.Identity)
        with fastvit.backends.recording() as calls:
            results = oracle.judge(ours, backend=None)
        assert {"rms_norm", "scaled_dot_product_attention", "linear_glu"} <= {op for op, _ in calls}
        for r in results:
            assert r.ok, r.message


def test_compile_fullgraph(seed):
    """torch.compile(fullgraph=True) traces a whole rotary Eva (timm's rope module included) without graph breaks and
    gives the eager values."""
    name = "vit_base_patch16_rope_mixed_224"
    t = _timm_model(name, seed)
    ours = _ours(name, t)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    out = torch.compile(ours, fullgraph=True, backend="eager")(x)
    out.sum().backward()
    torch.testing.assert_close(out, ours(x), atol=1e-6, rtol=1e-6)
    assert ours.rope.freqs.grad is not None


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_base_patch16_rope_mixed_224"])
def test_patch_dropout_with_rope_matches_timm(name, seed):
    """Training with patch dropout: each sample keeps other patches, so its rotary rows are gathered by its kept
    indices (a table per sample; mixed: per block and head) -- outputs and every gradient equal timm's with the same
    draws; from_timm converts such a model."""
    t = _timm_model(name, seed, patch_drop_rate=0.5)
    ours = _ours(name, t, patch_drop_rate=0.5)
    size = TINY[name]["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with fastvit.backends.recording() as calls:
        steps = [seeded_step(m, seed, lambda m, _: m(x), lambda out: (out**2).sum()) for m in (ours, t)]
    per_sample = [c for op, c in calls if op == "attention" and c.rope_per_sample]
    assert len(per_sample) == TINY[name]["depth"]
    assert_same_step(*steps, atol=2e-5)
    assert from_timm(t).patch_drop.prob == 0.5


@pytest.mark.parametrize("kind", ["fastvit", "patch_timm_"])
def test_lora_on_eva_matches_lora_on_timm(kind, seed):
    """PEFT LoRA on proj, fc1 and fc2 of EVA-02 (packed GluMlp): the same output and adapter gradients as LoRA on
    timm's model (the fused block calls the wrapped layers as modules); every adapter gets a gradient. LoRA on qkv
    too: timm's EvaAttention with q / v biases reads ``qkv.weight`` (``F.linear``) and so skips the adapter, while
    fastvit calls the wrapped layer -- its output equals timm's with the adapters merged into the weights."""
    peft = pytest.importorskip("peft")
    from fastvit.integrations import patch_timm_

    name = "eva02_tiny_patch14_224"
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))

    def pair(targets):
        ref_base = _timm_model(name, seed)
        cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        base = _ours(name, ref_base) if kind == "fastvit" else patch_timm_(copy.deepcopy(ref_base))
        ours = peft.get_peft_model(base, peft.LoraConfig(**cfg))
        ref = peft.get_peft_model(ref_base, peft.LoraConfig(**cfg))
        ours.load_state_dict(ref.state_dict())  # the same random A and B in both
        return ours, ref

    ours, ref = pair(["proj", "fc1", "fc2"])
    steps = [seeded_step(m, seed, lambda m, _: m(x), lambda out: (out**2).sum()) for m in (ours, ref)]
    assert_same_step(*steps, atol=2e-5)
    adapters = [n for n in steps[1][1] if "lora_" in n]
    assert any("mlp.fc1" in n for n in adapters) and any("attn.proj" in n for n in adapters)
    for n in adapters:
        assert steps[0][1][n].abs().max() > 0, f"adapter {n} got no gradient"

    ours, ref = pair(["qkv"])
    out, grads = seeded_step(ours, seed, lambda m, _: m(x), lambda out: (out**2).sum())
    with torch.no_grad():
        unmerged = ref(x)
        merged = ref.merge_and_unload()(x)  # (merges in place)
        assert (merged - unmerged).abs().max() > 1e-3  # the adapter matters, and timm's unmerged forward skips it
    torch.testing.assert_close(out, merged, rtol=0, atol=2e-5)
    assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_" in n)
