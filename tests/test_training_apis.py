"""timm's training APIs on fastvit's own models, against timm's own model on the same weights (fp32, CPU).

Covers issue 11, section 2: ``set_grad_checkpointing``, ``group_matcher`` / ``no_weight_decay`` as
``timm.optim.create_optimizer_v2(..., layer_decay=...)`` uses them, ``pretrained_cfg`` / ``default_cfg`` as
``timm.data.resolve_data_config`` reads them, ``forward_intermediates`` / ``prune_intermediate_layers`` /
``get_intermediate_layers``. The reference is always timm's ``VisionTransformer`` (or, for MAE, timm's grouping
of the same encoder parameter names), never fastvit's own code.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.data import resolve_data_config  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import fastvit  # noqa: E402
from fastvit.integrations.timm import timm_pretrained_cfg  # noqa: E402
from fastvit.nn import MaskedAutoencoderViT  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)
ATOL = 1e-5  # fp32 eager vs timm: float reassociation only (as tests/test_timm.py)

CONFIGS = {
    "defaults": {},
    "reg2_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "avg_fc_norm": dict(global_pool="avg"),
    "prenorm_nocls": dict(pre_norm=True, class_token=False, global_pool="avg"),
    "layerscale_qknorm": dict(init_values=1e-5, qk_norm=True),
    "dynamic": dict(dynamic_img_size=True),
}


def _timm(cfg: dict, seed: int) -> TimmViT:
    torch.manual_seed(seed)
    m = TimmViT(**{**TINY, **cfg}).eval()
    with torch.no_grad():  # non-trivial LayerNorm / LayerScale / bias / token values
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _pair(cfg: dict, seed: int):
    t = _timm(cfg, seed)
    return t, fastvit.from_timm(t)


def _grads(model: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- checkpointing
def _count_block_calls(blocks) -> list:
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _saved_tensor_count(fn) -> int:
    n = [0]

    def pack(t):
        n[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return n[0]


def test_vit_grad_checkpointing_same_grads_and_recomputes(seed):
    """Gradients with checkpointing equal those without (train mode, with dropout and drop-path drawing random
    masks: the recomputation must replay them), and equal timm's; each block runs twice per step with it (once
    without), and autograd saves fewer tensors."""
    cfg = dict(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, init_values=1e-2)
    t, f = _pair(cfg, seed)
    t.train(), f.train()
    x = torch.randn(2, 3, 32, 32)
    calls = _count_block_calls(f.blocks)

    def step(model, ckpt):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(seed + 1)
        model(x).square().sum().backward()
        return _grads(model)

    g_plain = step(f, False)
    assert calls == [1] * len(f.blocks)
    g_ckpt = step(f, True)
    assert calls == [3] * len(f.blocks), "checkpointed blocks must run again in the backward"
    assert f.grad_checkpointing is True
    assert set(g_ckpt) == set(g_plain) and len(g_ckpt) == len(list(f.parameters()))
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-7, rtol=1e-6, msg=n)

    # against timm (dropout off: fastvit's fused attention dropout draws its masks differently from SDPA's)
    t.eval(), f.eval()
    g_ckpt, g_timm = step(f, True), step(t, False)
    assert set(g_ckpt) == set(g_timm)
    for n in g_timm:
        torch.testing.assert_close(g_ckpt[n], g_timm[n], atol=ATOL, rtol=1e-4, msg=n)

    f.set_grad_checkpointing(False)
    plain = _saved_tensor_count(lambda: f(x))
    f.set_grad_checkpointing(True)
    ckpt = _saved_tensor_count(lambda: f(x))
    assert ckpt < plain / 2, (ckpt, plain)


def test_vit_grad_checkpointing_forward_intermediates(seed):
    """``forward_intermediates`` checkpoints too (as timm's), with the same values and gradients as timm's."""
    t, f = _pair({}, seed)
    for m in (t, f):
        m.train()
        m.set_grad_checkpointing(True)
    calls = _count_block_calls(f.blocks)
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for name, m in (("timm", t), ("fastvit", f)):
        feats, inter = m.forward_intermediates(x, indices=[0, 2])
        (feats.sum() + sum(y.square().sum() for y in inter)).backward()
        outs[name] = (feats, inter, _grads(m))
    assert calls == [2] * len(f.blocks)
    torch.testing.assert_close(outs["fastvit"][:2], outs["timm"][:2], atol=ATOL, rtol=0)
    for n, g in outs["timm"][2].items():
        torch.testing.assert_close(outs["fastvit"][2][n], g, atol=ATOL, rtol=1e-4, msg=n)


def _mae(seed: int, **kw) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    cfg = dict(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=2,
    )
    return MaskedAutoencoderViT(**{**cfg, **kw})


def test_mae_grad_checkpointing_same_grads_and_recomputes(seed):
    m = _mae(seed)
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    calls = _count_block_calls(list(m.blocks) + list(m.decoder_blocks))

    def step(ckpt):
        m.zero_grad(set_to_none=True)
        m.set_grad_checkpointing(ckpt)
        loss, pred, _ = m(x, noise=noise)
        loss.backward()
        return loss.detach(), pred.detach(), _grads(m)

    loss0, pred0, g0 = step(False)
    assert calls == [1] * 4
    loss1, pred1, g1 = step(True)
    assert calls == [3] * 4, "encoder and decoder blocks must be recomputed in the backward"
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    torch.testing.assert_close(pred1, pred0, atol=0, rtol=0)
    assert set(g1) == set(g0) and "decoder_blocks.1.mlp.fc2.weight" in g0 and "blocks.0.attn.qkv.weight" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-7, rtol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- optimizer groups
def _groups(model: nn.Module, **kw) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, **kw)
    return [
        (sorted(names[id(p)] for p in g["params"]), g.get("lr_scale", 1.0), g["weight_decay"], g["lr"])
        for g in opt.param_groups
    ]


@pytest.mark.parametrize(
    "name", ["defaults", "reg2_no_embed_class", "avg_fc_norm", "prenorm_nocls", "layerscale_qknorm"]
)
def test_vit_optimizer_groups_match_timm(name, seed):
    """``create_optimizer_v2`` with and without ``layer_decay`` builds timm's groups for the fastvit model."""
    t, f = _pair(CONFIGS[name], seed)
    assert f.group_matcher() == t.group_matcher() and f.group_matcher(coarse=True) == t.group_matcher(coarse=True)
    assert f.no_weight_decay() == t.no_weight_decay()
    assert group_parameters(f, f.group_matcher(), reverse=True) == group_parameters(t, t.group_matcher(), reverse=True)
    for kw in (dict(layer_decay=0.75), dict(layer_decay=0.65, layer_decay_min_scale=0.1), {}):
        gf, gt = _groups(f, **kw), _groups(t, **kw)
        assert gf == gt, kw
        assert len(gf) > (2 * TINY["depth"] if kw else 1)  # layer decay really split the groups


def test_mae_optimizer_groups(seed):
    """MAE's encoder is grouped exactly as timm groups the same parameter names in a timm ViT; the decoder is the
    last group (full learning rate); tokens and 1-D parameters get no weight decay; frozen tables are in no group."""
    depth = 2
    m = _mae(seed, depth=depth)
    t = TimmViT(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=0, global_pool="")
    lm = group_parameters(m, m.group_matcher(), reverse=True)
    lt = group_parameters(t, t.group_matcher(), reverse=True)
    encoder = [n for n, _ in m.named_parameters() if not n.startswith("decoder_") and n != "mask_token"]
    assert sorted(lt) == sorted(encoder)  # the same parameter names as a timm ViT encoder
    assert {n: lm[n] for n in encoder} == lt
    decoder = [n for n in lm if n not in lt]
    assert decoder and {lm[n] for n in decoder} == {depth + 1}

    groups = _groups(m, layer_decay=0.5)
    scale = {n: s for names, s, _, _ in groups for n in names}
    assert "pos_embed" not in scale and "decoder_pos_embed" not in scale  # requires_grad=False
    assert scale["decoder_pred.weight"] == scale["mask_token"] == 1.0
    assert scale["blocks.1.mlp.fc1.weight"] == scale["norm.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.25
    assert scale["cls_token"] == scale["patch_embed.proj.weight"] == 0.125

    (nd_names, _, nd_wd, _), (d_names, _, d_wd, _) = _groups(m)
    params = dict(m.named_parameters())
    expect_nd = sorted(
        n for n, p in params.items() if p.requires_grad and (p.ndim <= 1 or n in ("cls_token", "mask_token"))
    )
    assert (nd_names, nd_wd) == (expect_nd, 0.0)
    assert d_wd == 0.05 and set(d_names) == {n for n, p in params.items() if p.requires_grad} - set(expect_nd)


# ----------------------------------------------------------------------------------------------- pretrained_cfg
@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "vit_base_patch16_clip_224.openai", "vit_small_patch16_384"])
def test_from_timm_carries_pretrained_cfg(arch):
    torch.manual_seed(0)
    over = dict(depth=1, embed_dim=48, num_heads=3)
    t = timm.create_model(arch, pretrained=False, **over)
    f = fastvit.from_timm(t)
    assert f.pretrained_cfg == t.pretrained_cfg and f.default_cfg is f.pretrained_cfg
    assert resolve_data_config(model=f) == resolve_data_config(model=t)
    assert resolve_data_config({}, model=f, use_test_size=True) == resolve_data_config({}, model=t, use_test_size=True)
    f.pretrained_cfg["mean"] = (0.0, 0.0, 0.0)  # a copy: timm's model is not changed through it
    assert t.pretrained_cfg["mean"] != (0.0, 0.0, 0.0)


def test_vit_without_cfg_resolves_like_timm():
    """A directly constructed model has no registry cfg; timm's resolver then gives the same defaults for both."""
    f = fastvit.nn.VisionTransformer(**TINY)
    t = TimmViT(**TINY)
    assert f.pretrained_cfg == {} and f.default_cfg == {}
    assert resolve_data_config(model=f) == resolve_data_config(model=t)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_huge_patch14_224"])
def test_timm_pretrained_cfg_is_timms(name):
    assert timm_pretrained_cfg(name) == timm.models.get_pretrained_cfg(name).to_dict()
    assert timm_pretrained_cfg("mae_vit_base_patch16") is None


def test_create_model_sets_timms_pretrained_cfg():
    torch.manual_seed(0)
    f = fastvit.create_model("vit_tiny_patch16_224", depth=1)
    t = timm.create_model("vit_tiny_patch16_224", depth=1)
    assert f.pretrained_cfg == t.pretrained_cfg
    assert resolve_data_config(model=f) == resolve_data_config(model=t)


def test_fastvit_imports_and_builds_without_timm():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import fastvit\n"
        "m = fastvit.create_model('vit_tiny_patch16_224', depth=1, img_size=32)\n"
        "assert isinstance(m.pretrained_cfg, dict) and m.default_cfg is m.pretrained_cfg\n"
        "from fastvit.integrations.timm import timm_pretrained_cfg\n"
        "assert timm_pretrained_cfg('vit_tiny_patch16_224') is None\n"
        "m.set_grad_checkpointing(); m.forward_intermediates(__import__('torch').randn(1, 3, 32, 32), indices=1)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- intermediates
FI_CALLS = {
    "all": dict(),
    "last2_norm": dict(indices=2, norm=True),
    "list_prefix_nlc": dict(indices=[0, -1], return_prefix_tokens=True, output_fmt="NLC"),
    "unordered_stop_early": dict(indices=[1, 0], stop_early=True),
    "only": dict(indices=[2], intermediates_only=True, norm=True),
    "dict_prefix": dict(indices=1, output_dict=True, return_prefix_tokens=True),
    "dict_only": dict(output_dict=True, intermediates_only=True),
}


@pytest.mark.parametrize("call", list(FI_CALLS))
@pytest.mark.parametrize("name", ["defaults", "reg2_no_embed_class", "avg_fc_norm", "prenorm_nocls", "dynamic"])
def test_forward_intermediates_matches_timm(name, call, seed):
    t, f = _pair(CONFIGS[name], seed)
    kw = FI_CALLS[call]
    sizes = [(32, 32)] + ([(48, 24)] if CONFIGS[name].get("dynamic_img_size") else [])
    for hw in sizes:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            ref = t.forward_intermediates(x, **kw)
            out = f.forward_intermediates(x, **kw)
        assert type(out) is type(ref)
        if isinstance(ref, dict):
            assert out.keys() == ref.keys()
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)  # recurses into tuples / lists / dicts, checks shapes


def test_forward_intermediates_errors():
    f = fastvit.nn.VisionTransformer(**TINY)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_fmt"):
        f.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        f.forward_intermediates(x, indices=4)
    with pytest.raises(ValueError, match="out of range"):
        f.forward_intermediates(x, indices=[-4])
    with pytest.raises(ValueError, match="attn_mask"):
        f.forward_intermediates(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        f.forward_intermediates(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("reshape", [False, True])
def test_get_intermediate_layers_matches_timm(reshape, seed):
    t, f = _pair(CONFIGS["reg2_no_embed_class"], seed)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for n in (1, 2, [0, 2]):
            ref = t.get_intermediate_layers(x, n, reshape=reshape, return_prefix_tokens=True, norm=True)
            torch.testing.assert_close(
                f.get_intermediate_layers(x, n, reshape=reshape, return_prefix_tokens=True, norm=True),
                ref,
                atol=ATOL,
                rtol=0,
            )


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(indices=2, prune_norm=True), dict(indices=[0], prune_head=False), dict(indices=[-1, 1])],
    ids=["default", "last2_norm", "keep_head", "list"],
)
@pytest.mark.parametrize("name", ["defaults", "avg_fc_norm"])
def test_prune_intermediate_layers_matches_timm(name, kw, seed):
    t, f = _pair(CONFIGS[name], seed)
    assert f.prune_intermediate_layers(**kw) == t.prune_intermediate_layers(**kw)
    assert len(f.blocks) == len(t.blocks) and isinstance(f.blocks, nn.Sequential)
    assert list(f.state_dict()) == list(t.state_dict())
    assert (f.num_classes, f.global_pool) == (t.num_classes, t.global_pool)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(f(x), t(x), atol=ATOL, rtol=0)
        ref = t.forward_intermediates(x, indices=kw.get("indices", 1), norm=True)
        torch.testing.assert_close(
            f.forward_intermediates(x, indices=kw.get("indices", 1), norm=True), ref, atol=ATOL, rtol=0
        )
