"""patch_timm_ on timm's modern ViT layers (issue 23 item 4): gated MLPs (``SwiGLU``, ``GluMlp`` / ``SwiGLUPacked``)
on fastvit.ops.linear_glu and ``RmsNorm`` / ``RmsNormFp32`` on fastvit.ops.rms_norm -- small random timm models,
patched vs timm's own forward, output and every parameter gradient under the oracle (fp32 and CPU bf16 autocast);
the fused vision_transformer.Block with RMSNorm norms and gated MLPs; hooks; patch_report statuses."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from oracle import ModelOracle  # noqa: E402
from timm.layers import GluMlp, RmsNorm, RmsNorm2d, RmsNormFp32, SwiGLU, SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

import fastvit.backends  # noqa: E402
from fastvit.integrations.timm import patch_report, patch_timm_  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # timm zero-inits some biases / ones-inits norms: random values exercise every path
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for mod in m.modules():  # dropout-free training mode: deterministic, gradients everywhere
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m.train()


def _dinov2_glu(seed):  # vit_giant_patch14_dinov2: SwiGLUPacked (GluMlp, gate first), LayerScale
    torch.manual_seed(seed)
    return TimmViT(**TINY, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.0, init_values=1e-5)


def _glu_sigmoid(seed):  # GluMlp's defaults: sigmoid gate, gate last
    torch.manual_seed(seed)
    return TimmViT(**TINY, mlp_layer=GluMlp, mlp_ratio=2.0)


def _eva02(seed):
    torch.manual_seed(seed)
    return timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=28, num_classes=5
    )


def _aimv2(seed):  # RmsNorm everywhere (patch-embed norm too) + SwiGLU in timm's Block
    torch.manual_seed(seed)
    return timm.create_model(
        "aimv2_large_patch14_224", pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=28, num_classes=5
    )


def _xp(seed):  # vit_base_patch16_xp_224: RmsNorm, ParallelScalingBlock, qk-norm
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_base_patch16_xp_224", pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=5
    )


def _rms_fp32_vit(seed):  # RmsNormFp32 norms, no affine, in timm's Block with timm's Mlp
    torch.manual_seed(seed)
    return TimmViT(**TINY, norm_layer=partial(RmsNormFp32, affine=False))


MODELS = {
    "dinov2_swiglu_packed": (_dinov2_glu, 32, {"linear_glu", "layer_norm"}),
    "glu_mlp_sigmoid": (_glu_sigmoid, 32, {"linear_glu", "layer_norm"}),
    "eva02_tiny": (_eva02, 28, {"linear_glu", "layer_norm"}),
    "aimv2": (_aimv2, 28, {"linear_glu", "rms_norm"}),
    "vit_xp": (_xp, 32, {"rms_norm"}),
    "rms_norm_fp32": (_rms_fp32_vit, 32, {"rms_norm", "linear_gelu"}),
}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_modern_model_matches_timm(name, amp, seed):
    build, size, want_ops = MODELS[name]
    m = _randomize(build(seed), seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    oracle = ModelOracle(
        m,
        [x],
        lambda out: out,
        ref_dtype=torch.float64 if not amp else torch.float32,
        loss_fn=lambda out: (out.float() ** 2).sum(),
        dtype=torch.bfloat16 if amp else None,
        context=(lambda: torch.autocast("cpu", torch.bfloat16)) if amp else None,
    )
    patched = patch_timm_(copy.deepcopy(m))
    with fastvit.backends.recording() as calls:
        results = oracle.judge(patched, backend=None)
    assert want_ops <= {op for op, _ in calls}, {op for op, _ in calls}
    for r in results:
        assert r.ok, r.message


def test_report_statuses(seed):
    rows = {r.name: r for r in patch_report(patch_timm_(_aimv2(seed)))}
    for n in ("blocks.0", "blocks.0.norm1", "blocks.0.norm2", "blocks.0.mlp", "blocks.1.mlp", "norm"):
        assert rows[n].status == "patched", rows[n]
    assert rows["blocks.0.mlp"].class_name == "SwiGLU" and rows["norm"].class_name == "RmsNorm"
    assert rows["patch_embed.norm"].status == "patched"
    assert rows["patch_embed"].status == "fallback" and "patch-embed norm (RmsNorm)" in rows["patch_embed"].reason

    rows = {r.name: r for r in patch_report(patch_timm_(_dinov2_glu(seed)))}
    assert (rows["blocks.0.mlp"].class_name, rows["blocks.0.mlp"].status) == ("GluMlp", "patched")
    assert rows["blocks.0"].status == "patched"

    rows = {r.name: r for r in patch_report(patch_timm_(_xp(seed)))}
    assert rows["blocks.0"].status == "not covered" and "ParallelScalingBlock" in rows["blocks.0"].reason
    assert rows["norm_pre"].status == "patched" and rows["norm_pre"].class_name == "RmsNorm"

    m = nn.Sequential(
        SwiGLU(16, 32, act_layer=nn.ReLU),
        GluMlp(16, 32, act_layer=nn.ReLU),
        RmsNorm((4, 16)),
        RmsNorm2d(16),
        nn.Sequential(nn.Linear(4, 4)),
    )
    rows = {r.name: r for r in patch_report(patch_timm_(m))}
    assert rows["0"].status == "fallback" and "activation ReLU not covered" in rows["0"].reason
    assert rows["1"].status == "fallback" and "activation ReLU not covered" in rows["1"].reason
    assert rows["2"].status == "fallback" and "normalizes over 2 dims" in rows["2"].reason
    assert rows["3"].status == "not covered" and "channels-first norm (RmsNorm2d)" in rows["3"].reason
    x = torch.randn(2, 4, 16)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(m[i](x), ref[i](x))


def test_block_with_hooked_rms_norm_and_swiglu(seed):
    """A forward hook on a Block's RmsNorm fires (the fused Block calls its norms as modules); one on the SwiGLU's
    fc1_g makes the MLP modular (reported) and fires too; the outputs stay timm's."""
    m = _randomize(_aimv2(seed), seed).eval()
    ref = copy.deepcopy(m)
    patch_timm_(m)
    seen = []
    m.blocks[0].norm2.register_forward_hook(lambda mod, i, o: seen.append("norm2"))
    m.blocks[1].mlp.fc1_g.register_forward_hook(lambda mod, i, o: seen.append("fc1_g"))
    rows = {r.name: r for r in patch_report(m)}
    assert rows["blocks.0.norm2"].status == "patched" and rows["blocks.0"].status == "patched"
    assert rows["blocks.1.mlp"].status == "modular" and "fc1_g has a forward hook" in rows["blocks.1.mlp"].reason
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad(), fastvit.backends.recording() as calls:
        out = m(x)
    assert seen == ["norm2", "fc1_g"]
    assert sum(op == "rms_norm" for op, _ in calls) == 6  # patch-embed norm, 2 x (norm1, norm2), final norm
    assert sum(op == "linear_glu" for op, _ in calls) == 1  # block 1's MLP is modular
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


def test_rms_norm_dtypes():
    """The patched norms give timm's output dtypes and values within bf16 rounding: the input's dtype (RmsNorm,
    RmsNormFp32, no affine) with a bf16 input and fp32 weights, in and out of CPU autocast; a weight of another dtype
    than the input outside autocast."""
    norms = patch_timm_(nn.ModuleList([RmsNorm(8), RmsNormFp32(8), RmsNorm(8, affine=False)]))
    ref = nn.ModuleList([RmsNorm(8), RmsNormFp32(8), RmsNorm(8, affine=False)])
    with torch.no_grad():
        for a, b in zip(norms[:2], ref[:2]):
            b.weight.normal_()
            a.weight.copy_(b.weight)
    x = torch.randn(3, 8)
    for ctx in (torch.autocast("cpu", torch.bfloat16), torch.no_grad()):
        with ctx:
            for a, b in zip(norms, ref):
                for inp in (x, x.bfloat16()):
                    assert a(inp).dtype == b(inp).dtype == inp.dtype
                    torch.testing.assert_close(a(inp).float(), b(inp).float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(norms[:2], ref[:2]):
        a.weight.data, b.weight.data = a.weight.data.bfloat16(), b.weight.data.bfloat16()
        assert a(x).dtype == b(x).dtype == torch.float32
        torch.testing.assert_close(a(x), b(x))
