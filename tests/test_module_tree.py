"""The module tree stays meaningful on fastvit: PEFT LoRA, hooks, parametrizations, timm's AttentionExtract,
torch.fx and TorchScript see what they see on timm (CPU, fp32, eager backend).

Every test compares a fastvit model -- timm's own model patched by ``patch_timm_``, or ``fastvit.from_timm`` of it --
with the unpatched timm model on the same weights, with the same adapter / hook / parametrization attached to both.
Before this was built, a fused block read ``attn.proj.weight`` & co. directly: LoRA on ``proj`` / ``fc1`` / ``fc2``
was ignored (wrong outputs, no adapter gradients), hooks did not fire, a pre-hook that changes an input was skipped.
The distributed cases (FSDP2 below the block, tensor parallelism, DDP, DCP) are in ``test_distributed_tree.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")

import fastvit  # noqa: E402
from fastvit.integrations.timm import patch_report  # noqa: E402

ATOL = 1e-5
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, init_values=0.1)


def _timm_model(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.models.vision_transformer.VisionTransformer(**{**TINY, **kw}).eval()
    with torch.no_grad():  # non-trivial LayerNorm, LayerScale and biases
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _fastvit_of(ref: nn.Module, kind: str) -> nn.Module:
    if kind == "patch_timm_":
        return fastvit.patch_timm_(copy.deepcopy(ref))
    return fastvit.from_timm(ref)


KINDS = ["patch_timm_", "from_timm"]


def _images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _grads(model: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), _grads(model)


def _assert_same(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> dict:
    out, grads = _fwd_bwd(model, x)
    ref_out, ref_grads = _fwd_bwd(ref, x)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    return grads


# ----------------------------------------------------------------------------------------------- PEFT LoRA
@pytest.mark.parametrize("kind", KINDS + ["lora_then_patch_timm_"])
def test_lora_matches_lora_on_timm(kind):
    """LoRA on qkv, proj (attention and patch embedding), fc1, fc2: the same outputs and the same adapter gradients
    as LoRA on the unpatched timm model; every adapter gets a gradient. PEFT may wrap before or after patching."""
    from peft import LoraConfig, get_peft_model

    ref_base = _timm_model()
    cfg = dict(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    x = _images()
    with torch.no_grad():
        base_out = ref_base(x)
    if kind == "lora_then_patch_timm_":
        ours = fastvit.patch_timm_(get_peft_model(copy.deepcopy(ref_base), LoraConfig(**cfg)))
    else:
        ours = get_peft_model(_fastvit_of(ref_base, kind), LoraConfig(**cfg))
    ref = get_peft_model(ref_base, LoraConfig(**cfg))
    ours.load_state_dict(ref.state_dict())  # the same random A and B in both
    adapters = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert any("patch_embed.proj" in n for n in adapters) and any("mlp.fc2" in n for n in adapters)

    grads = _assert_same(ours, ref, x)
    with torch.no_grad():
        assert (ref(x) - base_out).abs().max() > 1e-2  # LoRA changes the output, so ignoring it would fail above
    for n in adapters:
        assert n in grads and grads[n].abs().max() > 0, f"adapter {n} got no gradient"


def test_lora_report_says_modular():
    """patch_report on a LoRA-wrapped patched model names what runs as modules and why."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fastvit.patch_timm_(_timm_model()), LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    rows = {r.name.removeprefix("base_model.model."): r for r in patch_report(model)}
    assert rows["blocks.0"].status == "modular" and "mlp.fc2" in rows["blocks.0"].reason
    assert rows["blocks.0.mlp"].status == "modular" and "fc1" in rows["blocks.0.mlp"].reason
    assert rows["blocks.0.attn"].status == "patched"


# ----------------------------------------------------------------------------------------------- hooks
def _record_all(model: nn.Module, log: list) -> list:
    return [
        m.register_forward_hook(lambda mod, args, out, name=name: log.append((name, out.detach().clone())))
        for name, m in model.named_modules()
        if name
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_hooks_fire_where_timm_fires(kind):
    """A forward hook on every submodule: the same modules fire, in the same order, with the same outputs."""
    ref = _timm_model()
    ours = _fastvit_of(ref, kind)
    x = _images()
    got, want = [], []
    handles = _record_all(ours, got) + _record_all(ref, want)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)
    for h in handles:
        h.remove()
    assert [n for n, _ in got] == [n for n, _ in want]
    assert len(got) > 40  # every block's submodules, not only the blocks
    for (n, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind", KINDS + ["hook_then_patch_timm_"])
@pytest.mark.parametrize("where", ["blocks.1.attn.proj", "blocks.0.mlp.fc1", "blocks.1.mlp.fc2", "patch_embed.proj"])
def test_pre_hook_that_changes_an_input_is_honoured(kind, where):
    """A forward pre-hook that rescales a Linear's input inside a fused block changes the output as on timm
    (registered after patching, or before)."""
    ref = _timm_model()
    x = _images()
    with torch.no_grad():
        before = ref(x)
    ours = copy.deepcopy(ref) if kind == "hook_then_patch_timm_" else _fastvit_of(ref, kind)
    for model in (ref, ours):
        model.get_submodule(where).register_forward_pre_hook(lambda mod, args: (args[0] * 1.5,))
    if kind == "hook_then_patch_timm_":
        fastvit.patch_timm_(ours)
    _assert_same(ours, ref, x)
    with torch.no_grad():
        assert (ref(x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_global_hook_and_backward_hook(kind):
    """A global forward hook sees the same modules as on timm; a full backward hook on fc2 gets timm's grad_output."""
    ref = _timm_model()
    ours = _fastvit_of(ref, kind)
    names = {id(m): n for model in (ref, ours) for n, m in model.named_modules()}
    seen: list = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append(names.get(id(mod)))
    )
    try:
        x = _images()
        with torch.no_grad():
            ours(x)
            n_ours = list(seen)
            seen.clear()
            ref(x)
        assert n_ours == seen and len(seen) > 40
        if kind == "patch_timm_":
            rows = {r.name: r for r in patch_report(ours)}
            assert rows["blocks.0"].status == "modular" and "global module hook" in rows["blocks.0"].reason
    finally:
        handle.remove()
    grads = {}
    for tag, model in (("ours", ours), ("ref", ref)):
        model.blocks[0].mlp.fc2.register_full_backward_hook(
            lambda mod, gin, gout, tag=tag: grads.__setitem__(tag, gout[0].clone())
        )
    _assert_same(ours, ref, _images())
    torch.testing.assert_close(grads["ours"], grads["ref"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_block_guard_covers_what_the_fused_block_reads(kind):
    """block_fusable turns False for a hook on each submodule the fused block reads instead of calling
    (BLOCK_FUSED_READS), and stays True for one on qkv, which the fused path calls as a module."""
    from fastvit.nn.layers import BLOCK_FUSED_READS, block_fusable

    model = _fastvit_of(_timm_model(), kind)
    blk = model.blocks[0]
    assert block_fusable(blk)
    for path in BLOCK_FUSED_READS + (("attn", "qkv"),):
        handle = blk.get_submodule(".".join(path)).register_forward_hook(lambda *a: None)
        assert block_fusable(blk) == (path == ("attn", "qkv")), path
        handle.remove()


def test_hooks_report_names_the_module():
    model = fastvit.patch_timm_(_timm_model())
    model.blocks[1].attn.proj.register_forward_hook(lambda *a: None)
    rows = {r.name: r for r in patch_report(model)}
    assert rows["blocks.1"].status == "modular" and "attn.proj has a forward hook" in rows["blocks.1"].reason
    assert rows["blocks.0"].status == "patched"


# ----------------------------------------------------------------------------------------------- parametrizations
class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.25


@pytest.mark.parametrize("kind", KINDS)
def test_parametrizations(kind):
    """A parametrization on fc2 and attn.proj, weight_norm on fc1: timm's outputs and gradients."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    ref = _timm_model()
    ours = _fastvit_of(ref, kind)
    for model in (ref, ours):
        for blk in model.blocks:
            parametrize.register_parametrization(blk.mlp.fc2, "weight", _Scale())
            parametrize.register_parametrization(blk.attn.proj, "weight", _Scale())
            weight_norm(blk.mlp.fc1)
    _assert_same(ours, ref, _images())


# ----------------------------------------------------------------------------------------------- timm tooling
@pytest.mark.parametrize("method", ["fx", "hook"])
def test_timm_attention_extract(method):
    """timm.utils.AttentionExtract on a patched model with fused_attn=False gives timm's attention maps."""
    from timm.utils import AttentionExtract

    ref = _timm_model()
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    ours = fastvit.patch_timm_(copy.deepcopy(ref))
    assert {r.status for r in patch_report(ours) if r.class_name == "Attention"} == {"fallback"}
    x = _images()
    got = AttentionExtract(ours, method=method)(x)
    want = AttentionExtract(ref, method=method)(x)
    assert list(got) == list(want) and len(want) == TINY["depth"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fx_trace_runs_fastvit_ops(kind):
    """torch.fx.symbolic_trace records fastvit.ops calls as leaves: the GraphModule computes exactly what the eager
    forward computes (outputs and gradients), and the fused ops are in the graph."""
    ours = _fastvit_of(_timm_model(), kind)
    # timm's forward takes an optional attn_mask / is_causal; left symbolic, a trace records timm's masked path
    concrete = {"attn_mask": None, "is_causal": False} if kind == "patch_timm_" else None
    gm = torch.fx.symbolic_trace(ours, concrete_args=concrete)
    targets = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
    assert {"attention", "linear_gelu", "linear_residual", "layer_norm", "patch_embed"} <= targets
    x = _images()
    out, grads = _fwd_bwd(ours, x)
    gout, ggrads = _fwd_bwd(gm, x)
    assert torch.equal(out, gout)
    assert grads.keys() == ggrads.keys()
    for n in grads:
        assert torch.equal(grads[n], ggrads[n]), n


def test_torchscript_config_leaves_the_model_on_timm():
    """Under timm's scriptable config patch_timm_ patches nothing, warns, says why in patch_report, and the model
    scripts."""
    from timm.layers import set_layer_config

    with set_layer_config(scriptable=True):
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
        with pytest.warns(UserWarning, match="scriptable"):
            fastvit.patch_timm_(model)
    model.eval()
    rows = patch_report(model)
    assert rows and all(r.status == "unpatched" and "scriptable" in r.reason for r in rows)
    scripted = torch.jit.script(model)
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_feature_info_and_features_only_match_timm():
    """fastvit's VisionTransformer carries timm's feature_info, and timm's feature wrapper over it gives timm's
    features."""
    from timm.models._features import FeatureGetterNet

    ref = _timm_model()
    ours = fastvit.from_timm(ref)
    assert ours.feature_info == ref.feature_info
    x = _images()
    with torch.no_grad():
        got = FeatureGetterNet(ours, out_indices=(0, 1))(x)
        want = FeatureGetterNet(copy.deepcopy(ref), out_indices=(0, 1))(x)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
