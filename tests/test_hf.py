"""fastvit.integrations.from_hf against Hugging Face transformers' ViT / ViT-MAE (tiny random-init configs).

No model hub: every HF model is built from a small config with random weights, then perturbed so that biases,
LayerNorm parameters, tokens and position tables are all non-trivial (a dropped or mis-wired parameter shows up).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import transformers
from transformers import ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

from fastvit.integrations.hf import convert_hf_state_dict, from_hf, hf_config_kwargs
from fastvit.nn.mae import MaskedAutoencoderViT
from fastvit.nn.vit import VisionTransformer

ATOL, RTOL = 2e-5, 1e-5
B = 3
N = (32 // 8) ** 2

VIT = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=192,
    image_size=32,
    patch_size=8,
)
MAE = dict(
    VIT,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
)  # decoder MLP ratio 2, encoder 4: both must be carried


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    base = MAE if cls is ViTMAEForPreTraining else VIT
    config = (ViTMAEConfig if cls is ViTMAEForPreTraining else ViTConfig)(**{**base, **overrides})
    return perturb(cls(config), seed)


def pixels(seed=1, channels=3):
    return torch.randn(B, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def noise_for(seed=2):
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------- ViT
def test_vit_model_last_hidden_state():
    hf = build(ViTModel)
    ours = from_hf(hf)
    assert isinstance(ours, VisionTransformer) and ours.num_classes == 0 and not ours.training
    x = pixels()
    with torch.no_grad():
        ref = hf(pixel_values=x)
        feats = ours.forward_features(x)
        pooled = ours(x)
    assert feats.shape == (B, 1 + N, 48)
    close(feats, ref.last_hidden_state)
    close(pooled, ref.last_hidden_state[:, 0])  # num_classes=0: forward gives the (unpooled-by-HF) cls token
    assert not torch.allclose(pooled, ref.pooler_output, atol=1e-2)  # the pooler is deliberately not carried
    assert not any("pooler" in k for k in ours.state_dict())


def test_vit_classification_logits():
    hf = build(ViTForImageClassification, seed=3, num_labels=5)
    ours = from_hf(hf)
    assert ours.num_classes == 5
    x = pixels(seed=4)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = ours(x)
    assert out.shape == (B, 5)
    close(out, ref)


def test_vit_weights_packed_into_qkv():
    hf = build(ViTModel, seed=5)
    ours = from_hf(hf)
    sd = hf.state_dict()
    for i in range(2):
        attn = ours.blocks[i].attn
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(attn.qkv.weight[j * 48 : (j + 1) * 48], sd[f"layers.{i}.attention.{name}.weight"])
            assert torch.equal(attn.qkv.bias[j * 48 : (j + 1) * 48], sd[f"layers.{i}.attention.{name}.bias"])
    assert torch.equal(ours.pos_embed, sd["embeddings.position_embeddings"])


@pytest.mark.parametrize("cls", [ViTModel, ViTMAEForPreTraining])
def test_layer_norm_eps_carried_and_matters(cls):
    hf = build(cls, seed=6, layer_norm_eps=0.5)
    ours = from_hf(hf)
    eps = {m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {0.5}
    x, noise = pixels(seed=7), noise_for(seed=8)
    with torch.no_grad():
        if cls is ViTModel:
            ref, out = hf(pixel_values=x).last_hidden_state, ours.forward_features(x)
        else:
            ref, out = hf(pixel_values=x, noise=noise).logits, ours(x, 0.75, noise)[1]
        close(out, ref)
        for m in ours.modules():  # timm's / MAE's 1e-6 instead: visibly different
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
        wrong = ours.forward_features(x) if cls is ViTModel else ours(x, 0.75, noise)[1]
    assert (wrong - ref).abs().max() > 1e-3


def test_default_hf_eps_is_1e_12():
    ours = from_hf(build(ViTModel, seed=9))
    assert {m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)} == {1e-12}


def test_qkv_bias_false():
    hf = build(ViTForImageClassification, seed=10, qkv_bias=False, num_labels=4)
    ours = from_hf(hf)
    assert ours.blocks[0].attn.qkv.bias is None
    x = pixels(seed=11)
    with torch.no_grad():
        close(ours(x), hf(pixel_values=x).logits)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "quick_gelu"])
def test_gelu_variants(act):
    hf = build(ViTModel, seed=12, hidden_act=act)
    ours = from_hf(hf)
    x = pixels(seed=13)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        close(ours.forward_features(x), ref)
        exact = from_hf(build(ViTModel, seed=12))  # same weights, erf GELU: must not match the variant
        assert (exact.forward_features(x) - ref).abs().max() > 1e-5


def test_non_square_patch_vit():
    hf = build(ViTModel, seed=14, patch_size=(8, 4))
    ours = from_hf(hf)
    x = pixels(seed=15)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        out = ours.forward_features(x)
    assert out.shape == (B, 1 + 4 * 8, 48)
    close(out, ref)


# --------------------------------------------------------------------------------------- MAE
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_logits_mask(norm_pix_loss):
    hf = build(ViTMAEForPreTraining, seed=16, norm_pix_loss=norm_pix_loss)
    ours = from_hf(hf)
    assert isinstance(ours, MaskedAutoencoderViT) and ours.norm_pix_loss == norm_pix_loss
    x, noise = pixels(seed=17), noise_for(seed=18)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        loss, pred, mask = ours(x, hf.config.mask_ratio, noise)
        latent, mask2, ids_restore = ours.forward_encoder(x, hf.config.mask_ratio, noise)
        ref_latent = hf.vit(pixel_values=x, noise=noise).last_hidden_state
    assert torch.equal(mask, ref.mask) and torch.equal(ids_restore, ref.ids_restore)
    assert mask.sum().item() == B * (N - N // 4)
    close(latent, ref_latent)
    close(pred, ref.logits)
    close(loss, ref.loss)


def test_mae_other_mask_ratio_and_gradients():
    hf = build(ViTMAEForPreTraining, seed=19, mask_ratio=0.5)
    ours = from_hf(hf)
    x, noise = pixels(seed=20), noise_for(seed=21)
    ref = hf(pixel_values=x, noise=noise)
    loss, pred, mask = ours(x, hf.config.mask_ratio, noise)
    assert torch.equal(mask, ref.mask) and mask.sum().item() == B * N // 2
    close(pred, ref.logits)
    close(loss, ref.loss)
    ref.loss.backward()
    loss.backward()
    # spot-check gradients through the renamed / packed parameters
    hf_sd = dict(hf.named_parameters())
    pairs = {
        "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
        "cls_token": "vit.embeddings.cls_token",
        "mask_token": "decoder.mask_token",
        "blocks.1.mlp.fc2.weight": "vit.layers.1.mlp.fc2.weight",
        "decoder_blocks.0.norm1.weight": "decoder.decoder_layers.0.layernorm_before.weight",
        "decoder_pred.bias": "decoder.decoder_pred.bias",
    }
    ours_p = dict(ours.named_parameters())
    for o, h in pairs.items():
        torch.testing.assert_close(ours_p[o].grad, hf_sd[h].grad, atol=1e-5, rtol=1e-4)
    q_grad = hf_sd["vit.layers.0.attention.q_proj.weight"].grad
    torch.testing.assert_close(ours.blocks[0].attn.qkv.weight.grad[:48], q_grad, atol=1e-5, rtol=1e-4)


def test_mae_tables_copied_from_hf():
    hf = build(ViTMAEForPreTraining, seed=22)
    ours = from_hf(hf)
    assert torch.equal(ours.pos_embed, hf.vit.embeddings.position_embeddings)
    assert torch.equal(ours.decoder_pos_embed, hf.decoder.decoder_pos_embed)
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad


# --------------------------------------------------------------------------------------- key names
def to_v4_names(sd: dict) -> dict:
    """Rename a transformers 5.x ViT / ViT-MAE state_dict to the 4.x module names."""
    rules = [
        (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
        (r"attention\.q_proj\.", "attention.attention.query."),
        (r"attention\.k_proj\.", "attention.attention.key."),
        (r"attention\.v_proj\.", "attention.attention.value."),
        (r"attention\.o_proj\.", "attention.output.dense."),
        (r"mlp\.fc1\.", "intermediate.dense."),
        (r"mlp\.fc2\.", "output.dense."),
    ]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


@pytest.mark.parametrize(
    "cls, arch",
    [
        (ViTModel, "ViTModel"),
        (ViTForImageClassification, "ViTForImageClassification"),
        (ViTMAEForPreTraining, "ViTMAEForPreTraining"),
    ],
)
def test_transformers_4x_names_map_to_the_same_weights(cls, arch):
    hf = build(cls, seed=23)
    v5 = hf.state_dict()
    v4 = to_v4_names(v5)
    assert any("attention.attention.query" in k for k in v4) and not any("q_proj" in k for k in v4)
    if arch == "ViTMAEForPreTraining":
        assert "decoder.decoder_layers.0.attention.attention.query.weight" in v4
        assert "vit.encoder.layer.0.intermediate.dense.weight" in v4
    a, b = convert_hf_state_dict(v5, arch), convert_hf_state_dict(v4, arch)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ours = from_hf(hf)
    assert set(a) == set(ours.state_dict())


def test_unrecognised_keys_raise():
    sd = dict(build(ViTModel, seed=24).state_dict())
    sd["layers.0.attention.extra_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra_proj"):
        convert_hf_state_dict(sd, "ViTModel")
    sd = dict(build(ViTModel, seed=24).state_dict())
    del sd["layers.1.attention.k_proj.weight"]
    with pytest.raises(ValueError, match="q / k / v"):
        convert_hf_state_dict(sd, "ViTModel")


# --------------------------------------------------------------------------------------- unsupported
@pytest.mark.parametrize("act", ["relu", "gelu_10", "silu"])
def test_unsupported_hidden_act_raises(act):
    hf = build(ViTModel, seed=25, hidden_act=act)
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(hf)
    hf = build(ViTMAEForPreTraining, seed=25, hidden_act=act)
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(hf)


@pytest.mark.parametrize(
    "arch, overrides, field",
    [
        ("ViTMAEForPreTraining", dict(patch_size=(8, 4)), "patch_size"),
        ("ViTMAEForPreTraining", dict(image_size=(32, 16)), "image_size"),
        ("ViTModel", dict(image_size=30), "image_size"),
        ("ViTModel", dict(head_dim=8), "head_dim"),
        ("ViTModel", dict(hidden_size=50), "hidden_size"),
        ("ViTMAEForPreTraining", dict(decoder_hidden_size=33), "decoder_hidden_size"),
    ],
)
def test_unsupported_config_raises(arch, overrides, field):
    cfg_cls = ViTMAEConfig if arch == "ViTMAEForPreTraining" else ViTConfig
    base = MAE if arch == "ViTMAEForPreTraining" else VIT
    config = cfg_cls(**base)
    for k, v in overrides.items():
        setattr(config, k, v)
    with pytest.raises(ValueError, match=field):
        hf_config_kwargs(config, arch)


def test_unsupported_model_class_raises():
    config = ViTMAEConfig(**MAE)
    with pytest.raises(TypeError, match="ViTMAEModel"):
        from_hf(transformers.ViTMAEModel(config))


def test_train_mode_dtype_carried():
    hf = build(ViTModel, seed=26).train()
    assert from_hf(hf).training
    ours = from_hf(hf.double().eval())
    assert ours.pos_embed.dtype == torch.float64 and not ours.training


def test_docstrings():
    import fastvit.integrations.hf as mod

    for fn in (from_hf, convert_hf_state_dict, hf_config_kwargs):
        assert fn.__doc__ and "Raises" in fn.__doc__
    assert "pooler" in from_hf.__doc__ and "2111.06377" in mod.__doc__
