"""fastvit.integrations.timm.patch_report / patch_timm_(verbose=True): what runs on fastvit.ops and what was left on
timm's forward, and why -- checked against timm models (plain ViT, a rope ViT, RMSNorm qk-norm, gated attention)
and against which fastvit ops really run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from oracle import spy_ops  # noqa: E402
from timm.layers import Attention as TAttention  # noqa: E402
from timm.layers import LayerNorm as TLayerNorm  # noqa: E402
from timm.layers import Mlp as TMlp  # noqa: E402
from timm.layers import PatchEmbed as TPatchEmbed  # noqa: E402
from timm.layers import RmsNorm  # noqa: E402
from timm.models.vision_transformer import Block as TBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

from fastvit.integrations.timm import PatchRecord, format_patch_report, patch_report, patch_timm_  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
COVERED = (TPatchEmbed, TAttention, TMlp, TBlock, nn.LayerNorm, TLayerNorm)  # exact classes patch_timm_ swaps


def _rows(report) -> dict:
    return {r.name: r for r in report}


def test_plain_vit_everything_patched(capsys, seed):
    torch.manual_seed(seed)
    m = TimmViT(**TINY).eval()
    expected = {n for n, mod in m.named_modules() if type(mod) in COVERED}  # computed before patching, from timm
    before = patch_report(m)
    assert {r.name for r in before} == expected and {r.status for r in before} == {"unpatched"}

    assert patch_timm_(m, verbose=True) is m  # backward compatible: returns the model
    printed = capsys.readouterr().out
    report = patch_report(m)
    assert all(isinstance(r, PatchRecord) and len(r) == 4 for r in report)
    assert {r.name for r in report} == expected
    assert [(r.status, r.reason) for r in report] == [("patched", "")] * len(expected)
    assert _rows(report)["blocks.1.attn"].class_name == "Attention"  # timm's class, not the Fastvit* subclass
    assert printed.strip() == format_patch_report(report)
    assert printed.strip().splitlines()[-1] == f"{len(expected)} patched"
    for name in expected:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name
    patch_timm_(m)
    assert patch_report(m) == report  # patching twice changes nothing


def test_rope_model_reports_what_is_left_on_timm(capsys, monkeypatch, seed):
    """A rope ViT (timm's Eva class): its EvaBlocks and EvaAttention modules are patched (the rotation runs inside
    fastvit.ops.attention, proj / fc2 + residual as linear_residual), the rotary module stays on timm's code with
    the reason; PatchEmbed, Mlp and LayerNorms are patched -- and the op counts say the same."""
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_medium_patch16_rope_reg1_gap_256",
        pretrained=False,
        depth=2,
        embed_dim=48,
        num_heads=3,
        img_size=32,
        patch_size=8,
        num_classes=5,
    ).eval()
    ref = copy.deepcopy(m)
    patch_timm_(m, verbose=True)
    printed = capsys.readouterr().out
    rows = _rows(patch_report(m))
    for name in ("blocks.0.attn", "blocks.1.attn"):
        assert rows[name].class_name == "EvaAttention" and rows[name].status == "patched", rows[name]
    for name in ("blocks.0", "blocks.1"):
        assert rows[name].class_name == "EvaBlock" and rows[name].status == "patched", rows[name]
    assert rows["rope"].status == "not covered" and "rotary" in rows["rope"].reason
    assert "rope" in printed and "rotary" in printed
    for name in ("patch_embed", "blocks.0.mlp", "blocks.0.norm1", "blocks.1.norm2", "fc_norm"):
        assert rows[name].status == "patched", rows[name]
    assert (
        printed.strip().splitlines()[-1] == "12 patched, 1 not covered"
    )  # PatchEmbed, 2 x (EvaBlock, norm1, attn, norm2, Mlp), fc_norm; the rotary module

    calls = spy_ops(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=0)
    assert calls["attention"] == 2 and "scaled_dot_product_attention" not in calls  # rope attention on fastvit
    assert calls["patch_embed"] == 1 and calls["linear_gelu"] == 2 and calls["layer_norm"] == 5
    assert calls["linear_residual"] == 4  # proj and fc2 of each EvaBlock, with the residual add


@pytest.mark.parametrize("variant", ["rms_qk_norm", "gated"])
def test_attention_fallback_reported_with_reason(variant, monkeypatch, seed):
    torch.manual_seed(seed)
    if variant == "rms_qk_norm":
        m = TimmViT(**TINY, qk_norm=True).eval()
        for b in m.blocks:
            b.attn.q_norm, b.attn.k_norm = RmsNorm(16), RmsNorm(16)
        want = "qk_norm is RmsNorm"
    else:
        m = TimmViT(**TINY).eval()
        for b in m.blocks:
            b.attn.gate = nn.Linear(48, 48)
        want = "gated attention"
    ref = copy.deepcopy(m)
    report = patch_report(patch_timm_(m))
    rows = _rows(report)
    for i in range(TINY["depth"]):
        a, b = rows[f"blocks.{i}.attn"], rows[f"blocks.{i}"]
        assert (a.class_name, a.status) == ("Attention", "fallback") and want in a.reason
        assert b.status == "fallback" and b.reason == f"attn: {a.reason}"
        assert rows[f"blocks.{i}.mlp"].status == "patched"
    if variant == "rms_qk_norm":
        # the RmsNorm itself now runs on fastvit.ops.rms_norm (timm's attention forward calls it as a module)
        assert (rows["blocks.0.attn.q_norm"].class_name, rows["blocks.0.attn.q_norm"].status) == ("RmsNorm", "patched")
    calls = spy_ops(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=0)
    assert "attention" not in calls and "scaled_dot_product_attention" not in calls
    assert calls["linear_gelu"] == TINY["depth"]  # the MLPs still run on fastvit


def test_patch_embed_and_mlp_fallback_reasons():
    m = nn.Sequential(
        TPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=48, norm_layer=nn.LayerNorm),
        TMlp(48, 96, act_layer=nn.SiLU),
        nn.LayerNorm((4, 48)),
    )
    rows = _rows(patch_report(patch_timm_(m)))
    assert rows["0"].status == "fallback" and "patch-embed norm (LayerNorm) not covered" in rows["0"].reason
    assert rows["0.norm"].status == "patched"
    assert rows["1"].status == "fallback" and "activation SiLU not covered" in rows["1"].reason
    assert rows["2"].status == "fallback" and "normalizes over 2 dims" in rows["2"].reason
    assert set(rows) == {"0", "0.norm", "1", "2"}  # Conv2d / Linear / activations are not listed


def test_patch_report_errors_and_empty():
    with pytest.raises(TypeError, match="nn.Module"):
        patch_report("not a model")
    with pytest.raises(TypeError, match="nn.Module"):
        patch_timm_(42)
    assert patch_report(nn.Linear(3, 3)) == []
    assert format_patch_report([]).splitlines()[-1] == "0 modules"
