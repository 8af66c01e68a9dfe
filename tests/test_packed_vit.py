"""Packed variable-resolution ViT (NaViT's Patch n' Pack) in fastvit.nn: VisionTransformer.forward_packed and its
parts, the packed Block path and the fastvit.nn.packed helpers.

The independent reference is the same model run image by image at each image's own size on the dense path
(``dynamic_img_size=True``): ``pt`` in fp32, ``ref`` on an fp64 copy; the packed run must pass the oracle of
fastvit.testing for the logits and for every gradient (parameters and images).
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import assert_close_oracle, spy_ops

import fastvit.ops
from fastvit.nn import Block, DropPath, VisionTransformer
from fastvit.nn.packed import PackedTokens, cu_seqlens_from_lengths, pad_input, pool_packed, unpad_input

TINY = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5, dynamic_img_size=True)

CONFIGS = {
    "token": {},
    "avg_reg2_nocls": dict(global_pool="avg", class_token=False, reg_tokens=2),
    "reg1_noembedcls_qknorm_ls": dict(reg_tokens=1, no_embed_class=True, qk_norm=True, init_values=0.1),
    "prenorm_avg_fcnorm": dict(pre_norm=True, global_pool="avg"),
}

# (H, W) per image: three resolutions, one repeated (shares a patch_embed call), non-square, one tiny (2 patches)
SIZES = [(32, 48), (64, 64), (32, 48), (96, 32), (16, 32)]


def _model(cfg: dict, seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(**{**TINY, **cfg}).eval()
    with torch.no_grad():  # make norms, tokens and biases non-trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _images(sizes, generator, dtype=torch.float32):
    return [torch.randn(3, h, w, generator=generator).to(dtype).requires_grad_() for h, w in sizes]


def _dense(model, images):
    return torch.cat([model(img[None]) for img in images])


def _grads(model, images, out, weight):
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    gs = torch.autograd.grad((out * weight.to(out.dtype)).sum(), params + list(images), allow_unused=True)
    return dict(zip(names + [f"images[{i}]" for i in range(len(images))], gs))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_packed_matches_per_image_dense(name, seed, generator):
    model = _model(CONFIGS[name], seed)
    ref_model = copy.deepcopy(model).double()
    images = _images(SIZES, generator)
    ref_images = [img.detach().double().requires_grad_() for img in images]
    weight = torch.randn(len(SIZES), 5, generator=generator)

    out = model.forward_packed(images)
    pt = _dense(model, images)
    ref = _dense(ref_model, ref_images)
    assert out.shape == (len(SIZES), 5) and out.dtype == torch.float32
    assert_close_oracle(out, ref, pt, torch.float32, "logits")

    g_out = _grads(model, images, out, weight)
    g_pt = _grads(model, images, pt, weight)
    g_ref = _grads(ref_model, ref_images, ref, weight)
    for k in g_ref:
        if g_ref[k] is None:  # e.g. cls_token under avg pooling without a class token
            assert g_out[k] is None and g_pt[k] is None, k
            continue
        assert_close_oracle(g_out[k], g_ref[k], g_pt[k], torch.float32, f"grad {k}")


def test_forward_packed_bf16_autocast(seed, generator):
    model = _model(CONFIGS["reg1_noembedcls_qknorm_ls"], seed)
    images = [img.detach() for img in _images(SIZES, generator)]
    with torch.no_grad():
        ref = _dense(model, images)  # fp32, no autocast
        with torch.autocast("cpu", torch.bfloat16):
            out = model.forward_packed(images)
            pt = _dense(model, images)
    assert out.dtype == torch.bfloat16
    assert_close_oracle(out, ref, pt, torch.bfloat16, "logits", check_dtype=False)


def test_forward_features_packed_tokens_match_per_image(seed, generator):
    model = _model(dict(reg_tokens=2), seed)
    images = _images(SIZES, generator)
    with torch.no_grad():
        packed = model.forward_features_packed(images)
        ref_model = copy.deepcopy(model).double()
        R = model.num_prefix_tokens
        assert isinstance(packed, PackedTokens) and packed.num_prefix_tokens == R
        assert packed.num_seqs == len(SIZES)
        assert packed.grid_sizes == tuple((h // 16, w // 16) for h, w in SIZES)
        lengths = [R + (h // 16) * (w // 16) for h, w in SIZES]
        assert packed.lengths() == lengths and packed.max_seqlen == max(lengths)
        assert packed.cu_seqlens.dtype == torch.int32 and packed.tokens.shape == (sum(lengths), 64)
        for img, got in zip(images, packed.split()):
            pt = model.forward_features(img[None])[0]
            ref = ref_model.forward_features(img.detach().double()[None])[0]
            assert_close_oracle(got, ref, pt, torch.float32, "tokens")
        # global_pool='' keeps every token: the head runs per token, (T, num_classes)
        model.reset_classifier(5, global_pool="")
        assert model.forward_head_packed(packed).shape == (sum(lengths), 5)


def test_attention_runs_packed_on_fastvit_op(monkeypatch, seed, generator):
    model = _model({}, seed)
    images = _images(SIZES, generator)
    calls = spy_ops(monkeypatch)  # counts every op a block uses
    counted = fastvit.ops.attention
    seen = []

    def record(qkv, num_heads, **kw):
        seen.append((tuple(qkv.shape), kw.get("cu_seqlens")))
        return counted(qkv, num_heads, **kw)

    monkeypatch.setattr(fastvit.ops, "attention", record)
    with torch.no_grad():
        model.forward_packed(images)
    T = sum(1 + (h // 16) * (w // 16) for h, w in SIZES)
    assert len(seen) == TINY["depth"]  # one packed call per block, not one per image
    for shape, cu in seen:
        assert shape == (T, 3 * 64) and cu is not None and cu.tolist()[-1] == T
    assert calls.get("attention") == TINY["depth"]
    assert calls.get("patch_embed") == len(set(SIZES))  # one fused embedding per distinct size
    assert calls.get("linear_residual") == 2 * TINY["depth"]


def test_qk_norm_packed_uses_varlen_sdpa(monkeypatch, seed, generator):
    model = _model(dict(qk_norm=True), seed)
    calls = spy_ops(monkeypatch)
    with torch.no_grad():
        model.forward_packed(_images(SIZES[:3], generator))
    assert calls.get("scaled_dot_product_attention") == TINY["depth"] and "attention" not in calls


def test_grad_checkpointing_packed_same_outputs_and_grads(seed, generator):
    model = _model(dict(global_pool="avg"), seed)
    images = _images(SIZES[:3], generator)
    weight = torch.randn(3, 5, generator=generator)
    out = model.forward_packed(images)
    g = _grads(model, images, out, weight)
    model.set_grad_checkpointing(True)
    out_ckpt = model.forward_packed(images)
    g_ckpt = _grads(model, images, out_ckpt, weight)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for k in g:
        torch.testing.assert_close(g_ckpt[k], g[k], rtol=0, atol=0)


def test_training_patch_dropout_per_image(seed, generator):
    model = _model(dict(patch_drop_rate=0.5, reg_tokens=1), seed).train()
    packed = model.embed_packed(_images(SIZES, generator))
    R = model.num_prefix_tokens
    assert packed.lengths() == [R + max(1, int((h // 16) * (w // 16) * 0.5)) for h, w in SIZES]
    out = model.forward_packed(_images(SIZES, generator))
    assert out.shape == (len(SIZES), 5) and torch.isfinite(out).all()


def test_drop_path_packed_draws_per_sequence(seed):
    blk = Block(16, 2, drop_path=0.5).train()
    blk.drop_path2 = torch.nn.Identity()
    cu = cu_seqlens_from_lengths([3, 5, 1, 7, 4, 6, 2, 8])
    from fastvit.nn.layers import _drop_path_packed

    y = torch.ones(int(cu[-1]), 4)
    out = _drop_path_packed(DropPath(0.5), y, cu)
    for part in torch.split(out, (cu[1:] - cu[:-1]).tolist()):
        assert torch.unique(part).numel() == 1 and float(part[0, 0]) in (0.0, 2.0)
    # the block runs packed in training with drop-path active
    x = torch.randn(int(cu[-1]), 16)
    assert blk(x, cu, 8).shape == x.shape


def test_block_packed_equals_dense_per_sequence(seed, generator):
    blk = Block(64, 4, qk_norm=True, init_values=0.5).eval()
    lengths = [1, 17, 5, 50]
    seqs = [torch.randn(n, 64, generator=generator) for n in lengths]
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        out = blk(torch.cat(seqs), cu, max(lengths))
        ref = torch.cat([blk(s[None])[0] for s in seqs])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "images, exc, match",
    [
        ([torch.randn(3, 32, 40)], ValueError, r"images\[0\] has size 32x40, not a positive multiple of patch_size"),
        ([torch.randn(3, 32, 32), torch.randn(3, 33, 32)], ValueError, r"images\[1\] has size 33x32"),
        ([torch.randn(3, 32, 32), torch.randn(1, 32, 32)], ValueError, r"images\[1\] must have shape \(3, H, W\)"),
        ([torch.randn(1, 3, 32, 32)], ValueError, r"images\[0\] must have shape \(3, H, W\)"),
        ([torch.randn(3, 32, 32), torch.randn(3, 32, 32).double()], ValueError, r"images\[1\] is torch.float64"),
        ([torch.zeros(3, 32, 32, dtype=torch.long)], TypeError, r"images\[0\] must be a floating-point"),
        ([], ValueError, "at least one"),
        (torch.randn(2, 3, 32, 32), TypeError, "list or tuple.*call forward"),
    ],
)
def test_forward_packed_bad_images(images, exc, match, seed):
    model = _model({}, seed)
    with pytest.raises(exc, match=match):
        model.forward_packed(images)


def test_unpad_pad_roundtrip_and_pool(generator):
    x = torch.randn(3, 6, 4, generator=generator)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    tokens, idx, cu, max_seqlen = unpad_input(x, valid)
    assert cu.tolist() == [0, 3, 9, 12] and max_seqlen == 6 and cu.dtype == torch.int32
    torch.testing.assert_close(tokens, x[valid])
    back = pad_input(tokens, idx, 3, 6)
    torch.testing.assert_close(back, x * valid[..., None])
    avg = pool_packed(tokens, cu, "avg", num_prefix_tokens=1)
    ref = torch.stack([x[b][valid[b]][1:].mean(0) for b in range(3)])
    torch.testing.assert_close(avg, ref)
    torch.testing.assert_close(pool_packed(tokens, cu, "token"), torch.stack([x[b][valid[b]][0] for b in range(3)]))
    with pytest.raises(ValueError, match="pool_type"):
        pool_packed(tokens, cu, "max")
    with pytest.raises(ValueError, match="valid must have shape"):
        unpad_input(x, valid[:, :5])
    with pytest.raises(ValueError, match="at least one"):
        cu_seqlens_from_lengths([])
