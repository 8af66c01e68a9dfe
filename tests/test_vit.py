"""fastvit.nn's ViT modules against real timm (fp32, tiny configurations, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.layers import Attention as TAttention  # noqa: E402
from timm.layers import Mlp as TMlp  # noqa: E402
from timm.layers import PatchEmbed as TPatchEmbed  # noqa: E402
from timm.layers import resample_abs_pos_embed as timm_resample  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter  # noqa: E402

import fastvit.ops  # noqa: E402
from fastvit.nn import (  # noqa: E402
    Attention,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    VisionTransformer,
    create_model,
    get_2d_sincos_pos_embed,
    list_models,
    resample_abs_pos_embed,
)
from fastvit.nn.vit import checkpoint_filter_fn  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
ATOL = 1e-5

CONFIGS = {
    "defaults": {},
    "reg4_no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "layerscale_qknorm": dict(init_values=1e-5, qk_norm=True),
    "avg_fc_norm": dict(global_pool="avg", fc_norm=True),
    "prenorm_nocls_avg": dict(pre_norm=True, class_token=False, global_pool="avg"),
    "dynamic": dict(dynamic_img_size=True),
    "gelu_tanh_noqkvbias": dict(act_layer="gelu_tanh", qkv_bias=False),
    "quick_gelu_mlp3": dict(act_layer="quick_gelu", mlp_ratio=3.0),
    "nopool_nohead": dict(global_pool="", num_classes=0),
    "rect_img": dict(img_size=(32, 24), reg_tokens=2),
}


def _pair(cfg: dict, seed: int):
    """(timm model, fastvit model with timm's weights), both in eval mode."""
    torch.manual_seed(seed)
    kw = {**TINY, **cfg}
    t = TimmViT(**kw).eval()
    # timm's init is slightly different from ours; perturb every tensor so LayerNorm/LayerScale/bias are non-trivial
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.05 * torch.randn_like(p))
    f = VisionTransformer(**kw).eval()
    f.load_state_dict(t.state_dict(), strict=True)
    return t, f


def _img_size(cfg: dict):
    s = cfg.get("img_size", TINY["img_size"])
    return (s, s) if isinstance(s, int) else s


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_shapes_and_outputs_match_timm(name, seed):
    cfg = CONFIGS[name]
    kw = {**TINY, **cfg}
    ref = TimmViT(**kw)
    ours = VisionTransformer(**kw)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]
    assert ours.num_prefix_tokens == ref.num_prefix_tokens
    assert ours.num_features == ref.num_features

    t, f = _pair(cfg, seed)
    x = torch.randn(3, 3, *_img_size(cfg))
    with torch.no_grad():
        ft, ff = t.forward_features(x), f.forward_features(x)
        torch.testing.assert_close(ff, ft, atol=ATOL, rtol=0)
        torch.testing.assert_close(f(x), t(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            f.forward_head(ff, pre_logits=True), t.forward_head(ft, pre_logits=True), atol=ATOL, rtol=0
        )


def test_fc_norm_default_rule():
    avg = VisionTransformer(**TINY, global_pool="avg")
    tok = VisionTransformer(**TINY)
    assert isinstance(avg.norm, nn.Identity) and isinstance(avg.fc_norm, nn.LayerNorm)
    assert isinstance(tok.norm, nn.LayerNorm) and isinstance(tok.fc_norm, nn.Identity)
    assert avg.fc_norm.eps == 1e-6 and VisionTransformer(**TINY, norm_eps=1e-5).norm.eps == 1e-5


def test_dynamic_img_size_other_resolution_matches_timm(seed):
    t, f = _pair(dict(dynamic_img_size=True, reg_tokens=1), seed)
    for size in [(48, 24), (16, 40)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = f.forward_features(x)
            torch.testing.assert_close(out, t.forward_features(x), atol=ATOL, rtol=0)
        assert out.shape == (2, 2 + (size[0] // 8) * (size[1] // 8), 48)
    # no_embed_class + dynamic
    t, f = _pair(dict(dynamic_img_size=True, no_embed_class=True), seed + 1)
    x = torch.randn(1, 3, 56, 40)
    with torch.no_grad():
        torch.testing.assert_close(f(x), t(x), atol=ATOL, rtol=0)


def test_set_input_size_matches_timm(seed):
    t, f = _pair({}, seed)
    t.set_input_size(img_size=(48, 40))
    f.set_input_size((48, 40))
    assert f.pos_embed.shape == t.pos_embed.shape == (1, 1 + 6 * 5, 48)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(f(x), t(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="img_size"):
        f(torch.randn(2, 3, 32, 32))


def test_checkpoint_filter_fn_loads_other_grid(seed):
    torch.manual_seed(seed)
    src = TimmViT(**TINY).eval()  # 4x4 grid
    sd = src.state_dict()
    dst_t = TimmViT(**{**TINY, "img_size": 48}).eval()  # 6x6 grid
    dst_f = VisionTransformer(**{**TINY, "img_size": 48}).eval()
    with pytest.raises(RuntimeError):
        dst_f.load_state_dict(sd)
    dst_t.load_state_dict(timm_filter(sd, dst_t))
    filtered = checkpoint_filter_fn({"module." + k: v for k, v in sd.items()}, dst_f)
    dst_f.load_state_dict(filtered)
    torch.testing.assert_close(dst_f.pos_embed, dst_t.pos_embed, atol=0, rtol=0)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(dst_f(x), dst_t(x), atol=ATOL, rtol=0)
    mae_style = checkpoint_filter_fn(sd, dst_f, antialias=False)["pos_embed"]
    # MAE's interpolate_pos_embed (no antialias): PyTorch's antialiased bicubic uses a different kernel (a=-0.5,
    # as PIL) from the plain one (a=-0.75), so the two differ even when upsampling
    torch.testing.assert_close(mae_style, _mae_interpolate(sd["pos_embed"], 1, 6), atol=1e-6, rtol=0)
    assert (mae_style - filtered["pos_embed"]).abs().max() > 1e-4


def _mae_interpolate(pos: torch.Tensor, num_extra: int, new: int) -> torch.Tensor:
    # facebookresearch/mae util/pos_embed.py interpolate_pos_embed, transcribed
    extra, tokens = pos[:, :num_extra], pos[:, num_extra:]
    C = pos.shape[-1]
    orig = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, orig, orig, C).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, tokens), dim=1)


def test_resample_abs_pos_embed_matches_timm_and_mae(generator):
    pos = torch.randn(1, 2 + 10 * 10, 16, generator=generator)
    for new, old in [((6, 6), None), ((14, 7), (10, 10)), ((3, 5), None)]:
        ours = resample_abs_pos_embed(pos, new, old_size=old, num_prefix_tokens=2)
        ref = timm_resample(pos, list(new), old_size=old, num_prefix_tokens=2)
        assert ours.shape == (1, 2 + new[0] * new[1], 16)
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
        assert torch.equal(ours[:, :2], pos[:, :2])
    # antialias=False is MAE / HF's; it differs from timm's when shrinking the grid
    no_aa = resample_abs_pos_embed(pos, (6, 6), num_prefix_tokens=2, antialias=False)
    torch.testing.assert_close(no_aa, _mae_interpolate(pos, 2, 6), atol=1e-6, rtol=0)
    assert (no_aa - resample_abs_pos_embed(pos, (6, 6), num_prefix_tokens=2)).abs().max() > 1e-3
    # same grid: unchanged; half precision stays half
    assert resample_abs_pos_embed(pos, (10, 10), num_prefix_tokens=2) is pos
    assert resample_abs_pos_embed(pos.half(), (4, 4), num_prefix_tokens=2).dtype == torch.float16
    with pytest.raises(ValueError, match="old_size"):
        resample_abs_pos_embed(pos, (4, 4), old_size=(9, 9), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="pos_embed"):
        resample_abs_pos_embed(pos[0], (4, 4))


def _mae_sincos(embed_dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
    # independent transcription of facebookresearch/mae util/pos_embed.py (numpy, float64)
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("embed_dim,grid,cls", [(16, 4, False), (48, 7, True), (768, 14, True), (32, 1, True)])
def test_get_2d_sincos_pos_embed_matches_mae(embed_dim, grid, cls):
    ours = get_2d_sincos_pos_embed(embed_dim, grid, cls_token=cls)
    ref = torch.from_numpy(_mae_sincos(embed_dim, grid, cls)).float()
    assert ours.dtype == torch.float32 and ours.shape == (grid * grid + cls, embed_dim)
    assert torch.equal(ours, ref)
    if cls:
        assert torch.all(ours[0] == 0)
    if grid > 1:  # first half of the channels encodes the column, second half the row
        q = embed_dim // 2
        at = lambda r, c: ours[int(cls) + r * grid + c]  # noqa: E731
        assert torch.equal(at(1, 0)[:q], at(0, 0)[:q]) and not torch.equal(at(1, 0)[q:], at(0, 0)[q:])
        assert torch.equal(at(0, 1)[q:], at(0, 0)[q:]) and not torch.equal(at(0, 1)[:q], at(0, 0)[:q])


def test_get_2d_sincos_pos_embed_rectangular_and_errors():
    rect = get_2d_sincos_pos_embed(16, (2, 3))
    assert rect.shape == (6, 16)
    torch.testing.assert_close(rect[4, :4], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(4) / 4.0)))
    with pytest.raises(ValueError, match="embed_dim"):
        get_2d_sincos_pos_embed(18, 4)
    with pytest.raises(ValueError, match="grid_size"):
        get_2d_sincos_pos_embed(16, 0)


# ----------------------------------------------------------------------------------------------- factory
def test_list_models_and_factory_errors():
    names = list_models()
    for n in [
        "vit_tiny_patch16_224",
        "vit_base_patch16_384",
        "vit_large_patch14_224",
        "vit_huge_patch14_224",
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
    ]:
        assert n in names
    with pytest.raises(ValueError, match="vit_base_patch16_224") as e:
        create_model("vit_gigantic_patch3")
    assert "mae_vit_base_patch16" in str(e.value)
    with pytest.raises(ValueError, match="from_timm|load_state_dict"):
        create_model("vit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("vit_")])
def test_create_model_matches_timm_config(name):
    with torch.device("meta"):
        ours = create_model(name)
        ref = timm.create_model(name, pretrained=False)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.patch_embed.img_size == ref.patch_embed.img_size


def test_create_model_vit_base_param_count_and_overrides():
    with torch.device("meta"):
        ours = create_model("vit_base_patch16_224")
        ref = timm.create_model("vit_base_patch16_224", pretrained=False)
        small = create_model("vit_small_patch16_224", num_classes=10, img_size=96)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 86_567_656
    assert small.head.out_features == 10 and small.pos_embed.shape == (1, 1 + 36, 384)


@pytest.mark.parametrize(
    "name,dim,depth,heads,patch",
    [
        ("mae_vit_base_patch16", 768, 12, 12, 16),
        ("mae_vit_large_patch16", 1024, 24, 16, 16),
        ("mae_vit_huge_patch14", 1280, 32, 16, 14),
    ],
)
def test_create_model_mae_configs(name, dim, depth, heads, patch):
    from fastvit.nn.mae import MaskedAutoencoderViT

    with torch.device("meta"):
        m = create_model(name)
    assert isinstance(m, MaskedAutoencoderViT)
    sd = m.state_dict()
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, patch, patch)
    assert sd["decoder_embed.weight"].shape == (512, dim)
    assert sum(k.startswith("blocks.") and k.endswith("norm1.weight") for k in sd) == depth
    assert sum(k.startswith("decoder_blocks.") and k.endswith("norm1.weight") for k in sd) == 8
    assert sd["decoder_blocks.0.mlp.fc1.weight"].shape == (2048, 512)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    assert m.blocks[0].attn.num_heads == heads and m.decoder_blocks[0].attn.num_heads == 16
    assert m.blocks[0].norm1.eps == 1e-6


# ----------------------------------------------------------------------------------------------- errors
def test_forward_input_errors():
    m = VisionTransformer(**TINY).eval()
    with pytest.raises(ValueError, match="in_chans"):
        m(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        m(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"img_size.*\(B, 3, 32, 32\)"):
        m(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m([[1.0]])
    dyn = VisionTransformer(**TINY, dynamic_img_size=True)
    with pytest.raises(ValueError, match="patch_size"):
        dyn(torch.randn(1, 3, 36, 32))


@pytest.mark.parametrize(
    "kwargs,match,exc",
    [
        (dict(embed_dim=50), "embed_dim.*num_heads", ValueError),
        (dict(global_pool="max"), "global_pool", ValueError),
        (dict(global_pool="token", class_token=False), "global_pool", ValueError),
        (dict(act_layer="relu"), "act_layer", ValueError),
        (dict(act_layer=nn.ReLU), "act_layer", ValueError),
        (dict(img_size=30), "img_size", ValueError),
        (dict(num_heads=0), "num_heads", ValueError),
        (dict(reg_tokens=-1), "reg_tokens", ValueError),
        (dict(pos_embed="sincos"), "pos_embed", ValueError),
    ],
)
def test_constructor_errors(kwargs, match, exc):
    with pytest.raises(exc, match=match):
        VisionTransformer(**{**TINY, **kwargs})


def test_layer_errors():
    with pytest.raises(ValueError, match="dim.*num_heads"):
        Attention(50, num_heads=3)
    with pytest.raises(ValueError, match="act_layer"):
        Mlp(8, act_layer="swish")
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)
    with pytest.raises(ValueError, match="norm_layer"):
        Block(48, 3, norm_layer=nn.BatchNorm1d)


# ----------------------------------------------------------------------------------------------- layers
def test_standalone_layers_match_timm(seed):
    torch.manual_seed(seed)
    pe_t = TPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=48)
    pe_f = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=48)
    pe_f.load_state_dict(pe_t.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = pe_f(x)
    assert out.shape == (2, 16, 48)
    torch.testing.assert_close(out, pe_t(x), atol=ATOL, rtol=0)

    a_t = TAttention(48, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    a_f = Attention(48, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    assert list(a_f.state_dict()) == list(a_t.state_dict())
    with torch.no_grad():
        for p in a_t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a_f.load_state_dict(a_t.state_dict())
    tok = torch.randn(2, 17, 48)
    torch.testing.assert_close(a_f(tok), a_t(tok), atol=ATOL, rtol=0)

    m_t = TMlp(48, 96, act_layer=nn.GELU)
    m_f = Mlp(48, 96)
    m_f.load_state_dict(m_t.state_dict())
    torch.testing.assert_close(m_f(tok), m_t(tok), atol=ATOL, rtol=0)

    ls = LayerScale(48, init_values=0.5)
    assert torch.equal(ls(tok), tok * 0.5) and list(ls.state_dict()) == ["gamma"]


def test_modules_run_on_fastvit_ops(monkeypatch, seed):
    calls: dict[str, int] = {}
    for name in [
        "patch_embed",
        "attention",
        "scaled_dot_product_attention",
        "layer_norm",
        "linear_gelu",
        "linear_residual",
    ]:
        orig = getattr(fastvit.ops, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(*a, **k)

        monkeypatch.setattr(fastvit.ops, name, spy)
    t, f = _pair(dict(pre_norm=True), seed)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(f(x), t(x), atol=ATOL, rtol=0)
    depth = TINY["depth"]
    assert calls == {
        "patch_embed": 1,  # projection + cls + pos in one op
        "attention": depth,
        "layer_norm": 2 * depth + 2,  # norm1, norm2 per block, norm_pre, norm
        "linear_gelu": depth,
        "linear_residual": 2 * depth,
    }
    calls.clear()
    _, fq = _pair(dict(qk_norm=True), seed)
    with torch.no_grad():
        fq(x)
    assert calls["scaled_dot_product_attention"] == depth and "attention" not in calls
    assert calls["layer_norm"] == 4 * depth + 1


# ----------------------------------------------------------------------------------------------- training
def test_train_mode_with_drop_rates_backward(seed):
    kw = dict(
        **TINY,
        drop_rate=0.1,
        pos_drop_rate=0.1,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
        drop_path_rate=0.2,
        patch_drop_rate=0.25,
        init_values=0.1,
    )
    m = VisionTransformer(**kw).train()
    assert isinstance(m.blocks[0].drop_path1, nn.Identity) and m.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    x = torch.randn(4, 3, 32, 32)
    out1 = m(x)
    out2 = m(x)
    assert out1.shape == (4, 7)
    assert not torch.allclose(out1, out2)  # dropout is active
    out1.square().sum().backward()
    grads = {k: p.grad for k, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.1.ls2.gamma"].abs().sum() > 0 and grads["pos_embed"].abs().sum() > 0
    m.eval()
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)


def test_train_mode_gradients_match_timm(seed):
    t, f = _pair(dict(init_values=0.1, qk_norm=True, reg_tokens=1), seed)
    t.train()
    f.train()
    x = torch.randn(3, 3, 32, 32)
    go = torch.randn(3, 7)
    out_t, out_f = t(x), f(x)
    torch.testing.assert_close(out_f, out_t, atol=ATOL, rtol=0)
    out_t.backward(go)
    out_f.backward(go)
    gt = dict(t.named_parameters())
    for k, p in f.named_parameters():
        torch.testing.assert_close(p.grad, gt[k].grad, atol=ATOL, rtol=1e-4, msg=lambda s, k=k: f"{k}: {s}")


def test_reset_classifier_and_head(seed):
    t, f = _pair({}, seed)
    t.reset_classifier(3, global_pool="avg")
    f.reset_classifier(3, global_pool="avg")
    f.head.load_state_dict(t.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(f(x), t(x), atol=ATOL, rtol=0)
    f.reset_classifier(0)
    assert isinstance(f.head, nn.Identity) and f(x).shape == (2, 48)
    with pytest.raises(ValueError, match="global_pool"):
        f.reset_classifier(3, global_pool="map")


def test_init_is_timm_like():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3)
    assert 0.015 < m.pos_embed.std().item() < 0.025
    assert m.cls_token.abs().max().item() < 1e-4
    assert 0.015 < m.blocks[0].mlp.fc1.weight.std().item() < 0.025
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.blocks[0].norm1.weight == 1)


def test_public_surface_exported_and_documented():
    import fastvit.nn as fnn
    import fastvit.nn.layers as layers
    import fastvit.nn.pos_embed as pos
    import fastvit.nn.vit as vit
    from fastvit.nn.mae import MaskedAutoencoderViT

    assert fnn.MaskedAutoencoderViT is MaskedAutoencoderViT
    for mod in (fnn, layers, pos, vit):
        for name in mod.__all__:
            obj = getattr(mod, name)
            assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{mod.__name__}.{name} lacks a docstring"
