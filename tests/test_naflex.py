"""timm's NaFlexVit on fastvit (patch_timm_): NaFlex batches run their blocks on packed attention (no padding).

Batches are built as timm's NaFlex data pipeline builds them (``timm.data.naflex_transforms.Patchify`` per image,
``timm.data.naflex_dataset.NaFlexCollator`` to pad and stack), with two or three resolutions in one batch. The
reference is unpatched timm: ``pt`` in fp32 and ``ref`` on an fp64 copy; the patched model must pass the oracle of
fastvit.testing on the logits, the valid tokens of ``forward_features`` and every gradient (fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")
from oracle import assert_close_oracle, assert_same_step, seeded_step, spy_ops  # noqa: E402
from timm.data.naflex_dataset import NaFlexCollator  # noqa: E402
from timm.data.naflex_transforms import Patchify  # noqa: E402
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg  # noqa: E402

import fastvit.ops  # noqa: E402
from fastvit.integrations import patch_report, patch_timm_  # noqa: E402
from fastvit.integrations.timm import format_patch_report  # noqa: E402

TINY = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4)
NUM_CLASSES = 5

CONFIGS = {
    # naflexvit_base_patch16_gap's recipe: registers, LayerScale, avg pooling with fc_norm
    "gap_reg4": dict(global_pool="avg", reg_tokens=4, fc_norm=True, init_values=0.1),
    # naflexvit_base_patch16_map's recipe: attention pooling (timm's AttentionPoolLatent, masked) after packed blocks
    "map_reg1": dict(global_pool="map", reg_tokens=1, init_values=0.1),
    "token_cls_qknorm": dict(global_pool="token", class_token=True, qk_norm=True),
    "max_factorized_keyonly": dict(global_pool="max", pos_embed="factorized", use_key_only_attn_mask=True),
    "avgmax_ar_preserving_prenorm": dict(global_pool="avgmax", pos_embed_ar_preserving=True, pre_norm=True),
    # rotary position embeddings (EvaBlocks; timm builds a table per image, _generate_rope_naflex): axial with cls
    # and a SwiGLU MLP, mixed (learnable per-head frequencies, one table per block) with a gated attention, DINOv3's
    # (rotate_half, 4 registers) with qk-norm and the scale norm
    "rope_axial_cls_swiglu": dict(global_pool="token", class_token=True, rope_type="axial", swiglu_mlp=True),
    "rope_mixed_reg1_gated": dict(global_pool="avg", reg_tokens=1, rope_type="mixed", init_values=0.1, attn_gated=True),
    "rope_dinov3_reg4_norms": dict(
        global_pool="avg",
        reg_tokens=4,
        rope_type="dinov3",
        rope_rotate_half=True,
        fc_norm=True,
        qk_norm=True,
        scale_attn_inner_norm=True,
    ),
}

SIZES3 = [(32, 48), (64, 64), (96, 32)]  # 6, 16 and 12 patches
SIZES2 = [(64, 32), (32, 32), (64, 32), (32, 32)]  # two resolutions, repeated


def _naflex(cfg: dict, seed: int) -> NaFlexVit:
    torch.manual_seed(seed)
    m = NaFlexVit(NaFlexVitCfg(**{**TINY, **cfg}), num_classes=NUM_CLASSES).eval()
    with torch.no_grad():  # make norms, tokens, LayerScale and biases non-trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _batch(sizes, generator, max_seq_len=None) -> dict:
    """A NaFlex batch the way timm's loader makes one: Patchify each image, then NaFlexCollator pads and stacks."""
    patchify = Patchify(16)
    samples = [(patchify(torch.randn(3, h, w, generator=generator)), 0) for h, w in sizes]
    longest = max((h // 16) * (w // 16) for h, w in sizes)
    batch, _ = NaFlexCollator(max_seq_len=max_seq_len or longest + 3)(samples)  # padding on every row
    return {k: batch[k] for k in ("patches", "patch_coord", "patch_valid")}


def _double(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _run(model, batch, weight, with_grad=True):
    """Logits, the features on valid tokens (prefix included), and the gradients of (logits * weight).sum() with
    respect to every parameter and to the patches."""
    patches = batch["patches"].clone().requires_grad_(with_grad)
    inputs = {**batch, "patches": patches}
    feats = model.forward_features(patches, inputs["patch_coord"], inputs["patch_valid"])["patches"]
    logits = model(inputs)
    B = patches.shape[0]
    valid = torch.cat([torch.ones(B, model.num_prefix_tokens, dtype=torch.bool), batch["patch_valid"]], 1)
    if not with_grad:
        return logits.detach(), feats[valid].detach(), {}
    params = dict(model.named_parameters())
    gs = torch.autograd.grad(
        (logits * weight.to(logits.dtype)).sum(), list(params.values()) + [patches], allow_unused=True
    )
    grads = dict(zip(list(params) + ["patches"], gs))
    return logits.detach(), feats[valid].detach(), grads


@pytest.mark.parametrize("sizes", [SIZES3, SIZES2], ids=["3res", "2res"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_naflex_matches_timm(name, sizes, seed, generator):
    timm_model = _naflex(CONFIGS[name], seed)
    ref_model = copy.deepcopy(timm_model).double()
    fast = patch_timm_(copy.deepcopy(timm_model))
    assert type(fast).__name__ == "FastvitNaFlexVit"
    batch = _batch(sizes, generator)
    weight = torch.randn(len(sizes), NUM_CLASSES, generator=generator)

    out, out_f, out_g = _run(fast, batch, weight)
    pt, pt_f, pt_g = _run(timm_model, batch, weight)
    ref, ref_f, ref_g = _run(ref_model, _double(batch), weight)
    assert_close_oracle(out, ref, pt, torch.float32, "logits")
    assert_close_oracle(out_f, ref_f, pt_f, torch.float32, "features on valid tokens")
    assert set(out_g) == set(ref_g)
    for k in ref_g:
        if ref_g[k] is None:
            assert out_g[k] is None and pt_g[k] is None, k
            continue
        assert_close_oracle(out_g[k], ref_g[k], pt_g[k], torch.float32, f"grad {k}")


def test_naflex_blocks_run_on_packed_fastvit_attention(monkeypatch, seed, generator):
    fast = patch_timm_(_naflex(CONFIGS["gap_reg4"], seed))
    batch = _batch(SIZES3, generator)
    calls = spy_ops(monkeypatch)
    counted = fastvit.ops.attention
    seen = []

    def record(qkv, num_heads, **kw):
        seen.append((tuple(qkv.shape), kw.get("cu_seqlens"), kw.get("max_seqlen")))
        return counted(qkv, num_heads, **kw)

    monkeypatch.setattr(fastvit.ops, "attention", record)
    masked_sdpa = []  # F.scaled_dot_product_attention calls with a mask: timm's NaFlex attention
    orig_sdpa = F.scaled_dot_product_attention

    def sdpa(*a, **k):
        if k.get("attn_mask") is not None or len(a) > 3:
            masked_sdpa.append(1)
        return orig_sdpa(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        fast(batch)
    R = fast.num_prefix_tokens
    lengths = [R + (h // 16) * (w // 16) for h, w in SIZES3]
    assert calls.get("attention") == TINY["depth"] and not masked_sdpa  # no masked SDPA anywhere
    for shape, cu, max_seqlen in seen:
        assert shape == (sum(lengths), 3 * 64)  # padding tokens are gone
        assert cu.dtype == torch.int32 and cu.tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths)]
        assert max_seqlen == max(lengths)
    assert calls.get("linear_residual") == 2 * TINY["depth"] and calls.get("linear_gelu") == TINY["depth"]


def test_naflex_train_patch_dropout_drop_path_and_grad_checkpointing_match_timm(seed, generator):
    # same seed, same draws: patch dropout as timm, then one drop-path draw per sequence (timm: per padded sample)
    cfg = dict(global_pool="avg", reg_tokens=2, patch_drop_rate=0.5, drop_path_rate=0.5)
    timm_model = _naflex(cfg, seed).train()
    fast = patch_timm_(copy.deepcopy(timm_model))
    for m in (timm_model, fast):
        m.set_grad_checkpointing(True)
    _assert_same_train_step(fast, timm_model, seed, generator)


def _assert_same_train_step(fast, timm_model, seed, generator):
    """One training step of each on the same NaFlex batch with the same random draws: logits and the gradients of
    every parameter and of the patches equal."""
    batch = _batch(SIZES3, generator)
    weight = torch.randn(3, NUM_CLASSES, generator=generator)

    def forward(m, leaves):
        return m({**batch, **leaves})

    steps = [
        seeded_step(m, seed, forward, lambda out: (out * weight).sum(), {"patches": batch["patches"]})
        for m in (fast, timm_model)
    ]
    assert_same_step(*steps, atol=1e-5)


def test_naflex_other_inputs_and_calls_keep_timm_semantics(monkeypatch, seed, generator):
    timm_model = _naflex(CONFIGS["token_cls_qknorm"], seed)
    fast = patch_timm_(copy.deepcopy(timm_model))
    batch = _batch(SIZES2, generator)
    calls = spy_ops(monkeypatch)
    with torch.no_grad():
        # an explicit attn_mask: timm's own masked forward, numbers unchanged
        mask = naflexvit.create_attention_mask(batch["patch_valid"], fast.num_prefix_tokens)
        torch.testing.assert_close(fast({**batch, "attn_mask": mask}), timm_model({**batch, "attn_mask": mask}))
        assert "scaled_dot_product_attention" not in calls and "attention" not in calls
        # forward_intermediates stays on timm's path too (its blocks get the mask)
        a = fast.forward_intermediates(batch, indices=1, output_fmt="NLC")
        b = timm_model.forward_intermediates(batch, indices=1, output_fmt="NLC")
        torch.testing.assert_close(a, b)
        # a plain (B, C, H, W) image batch: no padding, the dense fastvit path
        img = torch.randn(2, 3, 48, 32, generator=generator)
        torch.testing.assert_close(fast(img), timm_model(img), rtol=0, atol=1e-5)
        assert calls.get("scaled_dot_product_attention") == TINY["depth"]  # qk_norm: dense varlen-free sdpa


@pytest.mark.parametrize(
    "cfg, why",
    [
        (
            dict(global_pool="avg", rope_type="mrope", rope_mrope_section=(2, 3, 3)),
            "(RotaryEmbeddingMRope) not covered",
        ),
        (dict(global_pool="avg", rope_type="axial"), "blocks [1]: attn: fused_attn=False"),
    ],
)
def test_naflex_uncovered_options_fall_back_with_reason(cfg, why, seed, generator):
    timm_model = _naflex(cfg, seed)
    fast = patch_timm_(copy.deepcopy(timm_model))
    if "fused_attn" in why:  # timm's explicit attention matrix in one block (set_fused_attn / AttentionExtract)
        timm_model.blocks[1].attn.fused_attn = fast.blocks[1].attn.fused_attn = False
    root = [r for r in patch_report(fast) if r.name == ""]
    assert len(root) == 1 and root[0].class_name == "NaFlexVit" and root[0].status == "fallback"
    assert why in root[0].reason
    batch = _batch(SIZES3, generator)
    with torch.no_grad():
        torch.testing.assert_close(fast(batch), timm_model(batch), rtol=0, atol=1e-5)


def test_patch_report_lists_naflexvit(seed):
    m = _naflex(CONFIGS["map_reg1"], seed)
    before = {r.name: r for r in patch_report(m)}
    assert before[""].status == "unpatched"
    patch_timm_(m)
    report = patch_report(m)
    rows = {r.name: r for r in report}
    assert rows[""].status == "patched" and rows[""].reason == ""
    assert rows["embeds"].status == "not covered" and "NaFlex embedding" in rows["embeds"].reason
    assert rows["attn_pool"].status == "not covered"
    assert all(rows[f"blocks.{i}"].status == "patched" for i in range(TINY["depth"]))
    assert format_patch_report(report).splitlines()[2].startswith("(model)")


def test_naflex_bf16_autocast_matches_timm(seed, generator):
    timm_model = _naflex(CONFIGS["gap_reg4"], seed)
    fast = patch_timm_(copy.deepcopy(timm_model))
    batch = _batch(SIZES3, generator)
    weight = torch.randn(3, NUM_CLASSES, generator=generator)
    ref, ref_f, ref_g = _run(timm_model, batch, weight)  # fp32, no autocast
    with torch.autocast("cpu", torch.bfloat16):
        out, out_f, out_g = _run(fast, batch, weight)
        pt, pt_f, pt_g = _run(timm_model, batch, weight)
    assert out.dtype == pt.dtype == torch.bfloat16
    assert_close_oracle(out, ref, pt, torch.bfloat16, "logits", check_dtype=False)
    assert_close_oracle(out_f, ref_f, pt_f, torch.bfloat16, "features on valid tokens", check_dtype=False)
    for k in ref_g:
        if ref_g[k] is not None:
            assert out_g[k].dtype == ref_g[k].dtype, k  # parameter gradients in the parameter dtype
            assert_close_oracle(out_g[k], ref_g[k], pt_g[k], torch.bfloat16, f"grad {k}", check_dtype=False)


def test_patched_timm_block_refuses_packed_tokens_it_cannot_run(seed):
    fast = patch_timm_(_naflex(CONFIGS["gap_reg4"], seed))
    x = torch.randn(10, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert fast.blocks[0](x, cu_seqlens=cu, max_seqlen=6).shape == x.shape
    assert fast.blocks[0].attn(x, cu_seqlens=cu).shape == x.shape
    with pytest.raises(ValueError, match="cannot run packed tokens.*attn_mask"):
        fast.blocks[0](x, attn_mask=torch.zeros(1, 1, 10, 10), cu_seqlens=cu)


@pytest.mark.parametrize("name", ["rope_axial_cls_swiglu", "rope_mixed_reg1_gated"])
def test_naflex_rope_runs_packed_with_a_table_per_image(name, monkeypatch, seed, generator):
    """Each image's rotary table reaches the packed attention as its sequence's table: one ops.attention per block
    with cu_seqlens and a (S, 1 or H, L, 2·D) rope, no masked SDPA; each table's rows are that image's valid patches'
    rows of timm's table, in token order."""
    fast = patch_timm_(_naflex(CONFIGS[name], seed))
    batch = _batch(SIZES3, generator)
    seen = []
    counted = fastvit.ops.attention

    def record(qkv, num_heads, **kw):
        seen.append(kw)
        return counted(qkv, num_heads, **kw)

    monkeypatch.setattr(fastvit.ops, "attention", record)
    masked = []
    orig_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: masked.append(k.get("attn_mask")) or orig_sdpa(*a, **k)
    )
    with torch.no_grad():
        fast(batch)
        x, _ = fast.embeds(batch["patches"], patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])
        tables = fast._generate_rope_naflex(x, batch["patch_coord"])
        tables = list(tables) if fast.rope_is_mixed else [tables] * TINY["depth"]
    assert len(seen) == TINY["depth"] and all(m is None for m in masked)
    heads = TINY["num_heads"] if fast.rope_is_mixed else 1
    for kw, table in zip(seen, tables):
        rope = kw["rope"]
        assert kw["cu_seqlens"] is not None and rope.shape[:2] == (len(SIZES3), heads)
        assert kw["num_prefix_tokens"] == fast.num_prefix_tokens
        for b in range(len(SIZES3)):
            n = int(batch["patch_valid"][b].sum())
            torch.testing.assert_close(rope[b, :, :n], table[b, :, batch["patch_valid"][b]], rtol=0, atol=0)


@pytest.mark.parametrize("rope_type", ["axial", "mixed"])
def test_naflex_rope_with_patch_dropout_matches_timm(rope_type, seed, generator):
    """Training with patch dropout: timm gathers the tables with the kept indices (axial once, mixed per block), so
    valid patches are no longer first in each row -- the packed path must still give each token its own row."""
    cfg = dict(global_pool="avg", reg_tokens=1, rope_type=rope_type, patch_drop_rate=0.5)
    timm_model = _naflex(cfg, seed).train()
    fast = patch_timm_(copy.deepcopy(timm_model))
    _assert_same_train_step(fast, timm_model, seed, generator)
