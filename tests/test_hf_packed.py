"""``attn_implementation="fastvit"`` on padded and multi-image batches (issue 24): fastvit's packed attention.

Whole Hugging Face vision models, tiny random configs, against the same weights on ``"sdpa"`` under the oracle
(``ref``: the SDPA model in float64): SigLIP-2 NaFlex (``pixel_attention_mask``), Idefics3's vision tower (a partial
``patch_attention_mask``, padding inside the token order), Pixtral with two images (a block-diagonal mask, and
``"fastvit_flash"``'s ``cu_seq_lens``), the Qwen2-VL / Qwen2.5-VL / Qwen3-VL towers on ``"fastvit_flash"`` (one
packed call per layer instead of one per image / window). Each case: the output on valid tokens, the output on padding
rows (transformers' SDPA gives them values, and so does fastvit), and every parameter gradient, with a loss over all
rows; fp32 and bf16 under CPU autocast, on automatic dispatch and on the Triton kernels (interpreter). The fastvit op is
counted: one packed call per layer, no fallback, and the mask is analysed once per forward.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from oracle import assert_close_oracle  # noqa: E402

import fastvit  # noqa: E402
from fastvit.integrations import hf_attention  # noqa: E402
from fastvit.integrations.hf import FastvitAttentionFallbackWarning, register_attention  # noqa: E402

register_attention()

_T = transformers
_LAYERS = 2
_SMALL = dict(hidden_size=32, num_hidden_layers=_LAYERS, num_attention_heads=2, intermediate_size=64)  # head dim 16


def _siglip2(padded: bool, g: torch.Generator):
    cfg = _T.Siglip2VisionConfig(patch_size=8, num_patches=16, vision_use_head=False, **_SMALL)
    mask = torch.ones(2, 16, dtype=torch.long)
    shapes = torch.tensor([[4, 4], [4, 4]])
    if padded:
        mask[1, 10:] = 0
        shapes[1] = torch.tensor([2, 5])
    inputs = dict(
        pixel_values=torch.randn(2, 16, 3 * 8 * 8, generator=g), pixel_attention_mask=mask, spatial_shapes=shapes
    )
    return _T.Siglip2VisionModel, cfg, inputs, mask.bool()


def _idefics3(padded: bool, g: torch.Generator):
    cfg = _T.Idefics3VisionConfig(patch_size=8, image_size=32, **_SMALL)
    pam = torch.ones(2, 4, 4, dtype=torch.bool)
    if padded:  # a 3 x 2 image in a 4 x 4 grid: padding in the middle of the token order, not only at the end
        pam[1, 3, :] = False
        pam[1, :, 2:] = False
    inputs = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g), patch_attention_mask=pam)
    cls = _T.models.idefics3.modeling_idefics3.Idefics3VisionTransformer
    return cls, cfg, inputs, pam.reshape(2, 16)


def _pixtral(padded: bool, g: torch.Generator):
    cfg = _T.PixtralVisionConfig(patch_size=8, image_size=32, head_dim=16, **_SMALL)
    sizes = torch.tensor([[32, 32], [24, 16]] if padded else [[32, 32]])
    inputs = dict(pixel_values=torch.randn(sizes.shape[0], 3, 32, 32, generator=g), image_sizes=sizes)
    return _T.PixtralVisionModel, cfg, inputs, None


_GRID = torch.tensor([[1, 4, 4], [1, 2, 4]])  # two images: 16 + 8 patches of 2 x 2 (one 2 x 2 merge each 4)


def _qwen(version: str):
    def build(padded: bool, g: torch.Generator):
        common = dict(depth=_LAYERS, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2)
        common.update(temporal_patch_size=2, in_channels=3)
        if version == "2":
            mod = _T.models.qwen2_vl
            cfg = mod.configuration_qwen2_vl.Qwen2VLVisionConfig(embed_dim=32, mlp_ratio=2, **common)
            cls = mod.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel
        elif version == "2.5":  # layer 0 on windows of 4 x 4 patches, layer 1 on whole images
            mod = _T.models.qwen2_5_vl
            cfg = mod.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig(
                intermediate_size=64, out_hidden_size=32, window_size=4, fullatt_block_indexes=[1], **common
            )
            cls = mod.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel
        else:
            mod = _T.models.qwen3_vl
            cfg = mod.configuration_qwen3_vl.Qwen3VLVisionConfig(
                intermediate_size=64,
                out_hidden_size=32,
                num_position_embeddings=16,
                deepstack_visual_indexes=[],
                **common,
            )
            cls = mod.modeling_qwen3_vl.Qwen3VLVisionModel
        T = int(_GRID.prod(-1).sum())
        return cls, cfg, dict(hidden_states=torch.randn(T, 3 * 2 * 2 * 2, generator=g), grid_thw=_GRID), None

    return build


#: name -> (builder, attn_implementation, what the packed calls are for: the _record()ed path)
CASES = {
    "siglip2": (_siglip2, "fastvit", "packed (key-padding mask)"),
    "idefics3": (_idefics3, "fastvit", "packed (key-padding mask)"),
    "pixtral": (_pixtral, "fastvit", "packed (block-diagonal mask)"),
    "pixtral_flash": (_pixtral, "fastvit_flash", "packed (cu_seq_lens)"),
    "qwen2_vl": (_qwen("2"), "fastvit_flash", "packed (cu_seq_lens)"),
    "qwen2_5_vl": (_qwen("2.5"), "fastvit_flash", "packed (cu_seq_lens)"),
    "qwen3_vl": (_qwen("3"), "fastvit_flash", "packed (cu_seq_lens)"),
}


def _spy(monkeypatch) -> list:
    """Every fastvit attention call: ``'packed'`` (with cu_seqlens) or ``'dense'``."""
    calls = []
    real = fastvit.ops.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append("packed" if kw.get("cu_seqlens") is not None else "dense")
        return real(*a, **kw)

    monkeypatch.setattr(fastvit.ops, "scaled_dot_product_attention", spy)
    return calls


def _run(model, impl, inputs, upstream, *, backend=None, autocast=False):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    args = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with fastvit.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(**args).last_hidden_state
        loss = (y.float() * upstream.to(y.device)).sum()  # every row, padding included
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def _compare(name, padded, generator, monkeypatch, *, backend=None, autocast=False):
    build, impl, packed_kind = CASES[name]
    cls, cfg, inputs, valid = build(padded, generator)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = cls._from_config(cfg, attn_implementation="sdpa").eval()
    ref_model = copy.deepcopy(model).double()
    shape = model(**inputs).last_hidden_state.shape
    upstream = torch.randn(shape, generator=generator)
    ref, ref_g = _run(ref_model, "sdpa", inputs, upstream.double())
    pt, pt_g = _run(model, "sdpa", inputs, upstream, autocast=autocast)
    calls = _spy(monkeypatch)
    analysed = []
    real_analyse = hf_attention._analyse_mask
    monkeypatch.setattr(hf_attention, "_analyse_mask", lambda *a: analysed.append(1) or real_analyse(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)  # no layer falls back
        out, out_g = _run(model, impl, inputs, upstream, backend=backend, autocast=autocast)
    # every layer ran fastvit's op once: packed for padded / multi-image batches and for cu_seq_lens, else dense
    expected_kind = "packed" if padded or impl == "fastvit_flash" else "dense"
    assert calls == [expected_kind] * _LAYERS, calls
    paths = {m.__dict__.get(hf_attention._PATH_ATTR) for m in model.modules()} - {None}
    assert paths == {packed_kind if expected_kind == "packed" else "dense"}, paths
    # a mask handed to the layers is analysed once per forward (cached on the mask tensor), not once per layer
    assert len(analysed) == (1 if impl == "fastvit" and (padded or name == "pixtral") else 0), analysed
    dtype = torch.bfloat16 if autocast else torch.float32
    check = not autocast
    assert set(out_g) == set(pt_g) == set(ref_g) and out_g
    if valid is not None:  # valid tokens and padding rows separately (both match SDPA)
        assert_close_oracle(out[valid], ref[valid], pt[valid], dtype, f"{name} valid tokens", check_dtype=check)
        if not bool(valid.all()):
            pad = ~valid
            assert_close_oracle(out[pad], ref[pad], pt[pad], dtype, f"{name} padding rows", check_dtype=check)
    assert_close_oracle(out, ref, pt, dtype, f"{name} output", check_dtype=check)
    for n in out_g:
        assert_close_oracle(out_g[n], ref_g[n], pt_g[n], dtype, f"{name} grad {n}", check_dtype=check)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", ["siglip2", "idefics3", "pixtral", "pixtral_flash"])
def test_fp32_matches_sdpa(name, padded, generator, monkeypatch):
    _compare(name, padded, generator, monkeypatch)


@pytest.mark.parametrize("name", ["siglip2", "idefics3", "pixtral", "pixtral_flash"])
def test_bf16_autocast_matches_sdpa(name, generator, monkeypatch):
    _compare(name, True, generator, monkeypatch, autocast=True)


@pytest.mark.parametrize("name", ["siglip2", "pixtral", "qwen2_5_vl"])
def test_triton_packed_kernels_match_sdpa(name, generator, monkeypatch):
    _compare(name, True, generator, monkeypatch, backend="triton")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_towers_one_packed_call_per_layer(name, autocast, generator, monkeypatch):
    _compare(name, True, generator, monkeypatch, autocast=autocast)
