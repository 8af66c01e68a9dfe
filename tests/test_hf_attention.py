"""``attn_implementation="fastvit"`` (issue 15): Hugging Face vision models with their attention on fastvit.

Whole models as people run them -- ViTModel, Dinov2Model, SiglipVisionModel, CLIPVisionModel, ViTMAEForPreTraining,
tiny random configs -- against the same weights on ``"sdpa"``, under the oracle (``ref``: the SDPA model in float64),
output and every parameter gradient, fp32 and bf16 under CPU autocast, on automatic dispatch and on the Triton
backend (interpreter); the profiler shows fastvit's op; masks, causal attention, dropout and grouped-query heads take
the documented paths; registration is idempotent, happens on ``import fastvit`` after ``import transformers``, and
``import fastvit`` alone never imports transformers.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from oracle import assert_close_oracle, max_abs_err  # noqa: E402

import fastvit  # noqa: E402
from fastvit.integrations import hf_attention  # noqa: E402
from fastvit.integrations.hf import (  # noqa: E402
    FastvitAttentionFallbackWarning,
    fastvit_attention_forward,
    register_attention,
)

register_attention()

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
_NUM_PATCHES = (32 // 8) ** 2


def _build(name: str, **overrides):
    """A tiny random HF vision model on SDPA (head dim 16, the smallest the Triton kernels take)."""
    t = transformers
    if name == "vit":
        cls, cfg = t.ViTModel, t.ViTConfig(intermediate_size=64, **_COMMON)
    elif name == "dinov2":
        cls, cfg = t.Dinov2Model, t.Dinov2Config(mlp_ratio=2, **_COMMON)
    elif name == "siglip":
        cls, cfg = t.SiglipVisionModel, t.SiglipVisionConfig(intermediate_size=64, **_COMMON)
    elif name == "clip":
        cls, cfg = t.CLIPVisionModel, t.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **_COMMON)
    elif name == "vitmae":
        cls, cfg = (
            t.ViTMAEForPreTraining,
            t.ViTMAEConfig(
                intermediate_size=64,
                decoder_hidden_size=32,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=64,
                mask_ratio=0.75,
                **_COMMON,
            ),
        )
    else:
        raise ValueError(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cls._from_config(cfg, attn_implementation="sdpa")


MODELS = ("vit", "dinov2", "siglip", "clip", "vitmae")


def _inputs(name: str, generator: torch.Generator) -> dict:
    kw = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    if name == "vitmae":  # fixed noise: every run masks the same patches
        kw["noise"] = torch.rand(2, _NUM_PATCHES, generator=generator)
    return kw


def _run(model, impl: str, inputs: dict, upstream: torch.Tensor | None, *, backend=None, autocast=False):
    """(compared tensor, {param name: grad}) of one forward + backward of ``model`` on ``impl``."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    args = {k: v.to(dtype) if k == "pixel_values" else v for k, v in inputs.items()}
    with fastvit.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**args)
        if hasattr(out, "loss") and out.loss is not None:  # ViT-MAE: the loss over the masked patches
            y, loss = out.logits, out.loss
        else:
            y = out.last_hidden_state
            loss = (y.float() * upstream.to(y.device)).sum()
    loss.float().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def _compare(name: str, generator, *, backend=None, autocast=False) -> dict:
    """fastvit vs sdpa vs the float64 SDPA model, under the oracle; returns the max errors for the report."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = _build(name).eval()
    ref_model = copy.deepcopy(model).double()
    inputs = _inputs(name, generator)
    shape = (2, _NUM_PATCHES + (0 if name == "siglip" else 1), 32)
    upstream = torch.randn(shape, generator=generator)
    ref, ref_g = _run(ref_model, "sdpa", inputs, upstream.double())
    pt, pt_g = _run(model, "sdpa", inputs, upstream, autocast=autocast)
    out, out_g = _run(model, "fastvit", inputs, upstream, backend=backend, autocast=autocast)
    dtype = torch.bfloat16 if autocast else torch.float32
    assert set(out_g) == set(pt_g) == set(ref_g) and out_g
    # under autocast the model's output (after an fp32 LayerNorm) and the parameter gradients are fp32: the tolerance
    # follows the compute dtype, not the storage dtype
    assert_close_oracle(out, ref, pt, dtype, f"{name} output", check_dtype=not autocast)
    for n in out_g:
        assert_close_oracle(out_g[n], ref_g[n], pt_g[n], dtype, f"{name} grad {n}", check_dtype=not autocast)
    return {
        "out_vs_sdpa": max_abs_err(out, pt),
        "grad_vs_sdpa": max(max_abs_err(out_g[n], pt_g[n]) for n in out_g),
    }


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", MODELS)
def test_fp32_auto_dispatch_matches_sdpa(name, generator):
    _compare(name, generator)


@pytest.mark.parametrize("name", MODELS)
def test_fp32_triton_matches_sdpa(name, generator):
    _compare(name, generator, backend="triton")


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_matches_sdpa(name, backend, generator):
    # q / k / v reach fastvit in bf16 (autocast's Linear outputs); the params, their grads and the final LayerNorm's
    # output stay fp32
    _compare(name, generator, backend=backend, autocast=True)


def test_profiler_shows_fastvit_op_on_triton(generator):
    model = _build("vit").eval()
    model.set_attn_implementation("fastvit")
    x = torch.randn(1, 3, 32, 32, generator=generator)
    with fastvit.use_backend("triton"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        model(pixel_values=x)
    names = {e.key for e in p.key_averages()}
    assert "fastvit::sdpa_fwd" in names, sorted(n for n in names if "fastvit" in n or "attention" in n)
    assert not any("scaled_dot_product_attention" in n and n.startswith("aten::") for n in names)


def test_strided_qkv_reach_the_op_uncopied(monkeypatch, generator):
    """HF's ``proj(x).view(B, N, H, D).transpose(1, 2)`` views go to fastvit as they are."""
    seen = []
    real = fastvit.ops.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.is_contiguous(), k.is_contiguous(), v.is_contiguous(), q.stride(-1), kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(fastvit.ops, "scaled_dot_product_attention", spy)
    model = _build("vit").eval()
    model.set_attn_implementation("fastvit")
    model(pixel_values=torch.randn(2, 3, 32, 32, generator=generator))
    assert len(seen) == 2  # one call per layer
    for q_c, k_c, v_c, last, kw in seen:
        assert (q_c, k_c, v_c, last) == (False, False, False, 1)
        assert kw["scale"] == pytest.approx(16**-0.5) and kw["dropout_p"] == 0.0


# ------------------------------------------------------------------------------------------- masks and fallbacks
@pytest.fixture
def fresh_warnings():
    hf_attention.reset_fallback_warnings()
    yield
    hf_attention.reset_fallback_warnings()


def _count_fastvit_calls(monkeypatch) -> list:
    calls = []
    real = fastvit.ops.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(fastvit.ops, "scaled_dot_product_attention", spy)
    return calls


def test_padding_mask_falls_back_to_sdpa_once_with_reason(monkeypatch, fresh_warnings, generator):
    calls = _count_fastvit_calls(monkeypatch)
    model = _build("vit").eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    mask = torch.ones(2, _NUM_PATCHES + 1, dtype=torch.long)
    mask[0, -5:] = 0
    expected = model(pixel_values=x, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("fastvit")
    with pytest.warns(FastvitAttentionFallbackWarning, match="key-padding attention mask.*takes no mask"):
        got = model(pixel_values=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert calls == []
    with warnings.catch_warnings():  # once per reason: the second call is quiet
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        model(pixel_values=x, attention_mask=mask)
    # a mask that masks nothing: transformers' mask function drops it, fastvit runs, and the result is SDPA's
    ones = torch.ones_like(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        got = model(pixel_values=x, attention_mask=ones).last_hidden_state
    assert len(calls) == 2
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, model(pixel_values=x).last_hidden_state)


def _qkv(generator, B=2, H=2, N=7, D=16, H_kv=None):
    q = torch.randn(B, N, H, D, generator=generator).transpose(1, 2)
    k = torch.randn(B, N, H_kv or H, D, generator=generator).transpose(1, 2)
    v = torch.randn(B, N, H_kv or H, D, generator=generator).transpose(1, 2)
    return q, k, v


class _Module(torch.nn.Module):
    def __init__(self, is_causal=False, groups=1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


@pytest.mark.parametrize(
    "kind, match",
    [
        ("causal_bool", "causal attention mask"),
        ("arbitrary_bool", "neither empty nor key-padding"),
        ("padding_float", "key-padding attention mask"),
        ("bias_float", "additive attention bias"),
        ("is_causal", r"is_causal=True"),
        ("position_bias", "position_bias"),
    ],
)
def test_masks_fall_back_with_reason_and_match_sdpa(kind, match, monkeypatch, fresh_warnings, generator):
    calls = _count_fastvit_calls(monkeypatch)
    q, k, v = _qkv(generator)
    N = q.shape[2]
    module, mask, kw = _Module(), None, {}
    if kind == "causal_bool":
        mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    elif kind == "arbitrary_bool":
        mask = torch.rand(2, 1, N, N, generator=generator) > 0.3
        mask[..., 0] = True
    elif kind == "padding_float":
        mask = torch.zeros(2, 1, 1, N)
        mask[1, ..., -2:] = torch.finfo(torch.float32).min
    elif kind == "bias_float":
        mask = torch.randn(2, 1, N, N, generator=generator)
    elif kind == "is_causal":
        module = _Module(is_causal=True)
    elif kind == "position_bias":
        kw["position_bias"] = torch.randn(1, 2, N, N, generator=generator)
    with pytest.warns(FastvitAttentionFallbackWarning, match=match):
        out, weights = fastvit_attention_forward(module, q, k, v, mask, scaling=0.3, **kw)
    assert weights is None and calls == []
    torch.testing.assert_close(out, _sdpa(module, q, k, v, mask, scaling=0.3, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("mask_kind", ["none", "all_true", "all_zero_float"])
def test_empty_masks_take_the_fastvit_path(mask_kind, monkeypatch, fresh_warnings, generator):
    calls = _count_fastvit_calls(monkeypatch)
    q, k, v = _qkv(generator)
    N = q.shape[2]
    mask = {
        "none": None,
        "all_true": torch.ones(2, 1, N, N, dtype=torch.bool),
        "all_zero_float": torch.zeros(2, 1, N, N),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        out, weights = fastvit_attention_forward(_Module(), q, k, v, mask[mask_kind], scaling=0.3)
    assert len(calls) == 1 and weights is None
    assert out.shape == (2, N, 2, 16) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(_Module(), q, k, v, None, scaling=0.3))


def test_grouped_query_heads_are_repeated(monkeypatch, generator):
    calls = _count_fastvit_calls(monkeypatch)
    q, k, v = _qkv(generator, H=4, H_kv=2)
    out, _ = fastvit_attention_forward(_Module(groups=2), q, k, v, None, scaling=0.25)
    assert len(calls) == 1
    torch.testing.assert_close(out, _sdpa(_Module(groups=2), q, k, v, None, scaling=0.25))
    with pytest.raises(ValueError, match="grouped-query attention"):
        fastvit_attention_forward(_Module(), *_qkv(generator, H=3, H_kv=2), None)


def test_unsupported_kwargs_raise(generator):
    q, k, v = _qkv(generator)
    with pytest.raises(ValueError, match="softcap"):
        fastvit_attention_forward(_Module(), q, k, v, None, softcap=30.0)


# ------------------------------------------------------------------------------------------- dropout
def test_dropout_in_training_is_applied_as_sdpa_does(monkeypatch, fresh_warnings, generator):
    calls = _count_fastvit_calls(monkeypatch)
    model = _build("vit", attention_probs_dropout_prob=0.5).train()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    torch.manual_seed(1234)
    expected = model(pixel_values=x).last_hidden_state  # sdpa, same seed
    model.set_attn_implementation("fastvit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        torch.manual_seed(1234)
        got = model(pixel_values=x).last_hidden_state
        torch.manual_seed(4321)
        other = model(pixel_values=x).last_hidden_state
    assert [c["dropout_p"] for c in calls] == [0.5, 0.5, 0.5, 0.5]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # automatic dispatch: eager, SDPA with dropout_p
    assert max_abs_err(got, other) > 1e-2  # dropout is really applied
    no_drop = model.eval()(pixel_values=x).last_hidden_state
    assert max_abs_err(got, no_drop) > 1e-2
    assert calls[-1]["dropout_p"] == 0.0  # eval: HF passes no dropout
    # a forced kernel backend without dropout says so instead of ignoring it
    model.train()
    with fastvit.use_backend("triton"), pytest.raises(fastvit.BackendNotSupportedError, match="dropout"):
        model(pixel_values=x)


# ------------------------------------------------------------------------------------------- registration
def test_register_attention_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    register_attention()
    register_attention()
    assert AttentionInterface._global_mapping["fastvit"] is fastvit_attention_forward
    assert AttentionMaskInterface._global_mapping["fastvit"] is sdpa_mask
    assert fastvit.integrations.register_attention is register_attention


def _python(code: str, tmp_path) -> str:
    # cwd outside the repository: `python -c` puts the cwd on sys.path, where kernels/ would shadow HF's `kernels`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_import_fastvit_after_transformers_registers(tmp_path):
    out = _python(
        "import warnings; warnings.simplefilter('error')\n"
        "import transformers, fastvit\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "print('fastvit' in AttentionInterface._global_mapping, 'fastvit' in AttentionMaskInterface._global_mapping)",
        tmp_path,
    )
    assert out.split() == ["True", "True"]


def test_import_fastvit_does_not_import_transformers(tmp_path):
    out = _python("import sys, fastvit; print('transformers' in sys.modules)", tmp_path)
    assert out.split() == ["False"]


def test_siglip2_naflex_padding_falls_back_and_full_images_run_on_fastvit(monkeypatch, fresh_warnings, generator):
    """SigLIP-2 (NaFlex) passes ``pixel_attention_mask``: padded patches fall back, a batch without padding runs on
    fastvit (transformers' mask function turns an all-ones mask into ``None``)."""
    calls = _count_fastvit_calls(monkeypatch)
    cfg = transformers.Siglip2VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, num_patches=16
    )
    model = transformers.Siglip2VisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    pv = torch.randn(2, 16, 3 * 8 * 8, generator=generator)
    for padded in (True, False):
        mask = torch.ones(2, 16, dtype=torch.long)
        shapes = torch.tensor([[4, 4], [4, 4]])
        if padded:
            mask[1, 12:] = 0
            shapes[1] = torch.tensor([3, 4])
        kw = dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
        model.set_attn_implementation("sdpa")
        expected = model(**kw).last_hidden_state
        model.set_attn_implementation("fastvit")
        if padded:
            with pytest.warns(FastvitAttentionFallbackWarning, match="key-padding"):
                got = model(**kw).last_hidden_state
            assert calls == []
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:
            got = model(**kw).last_hidden_state
            assert len(calls) == 2
            torch.testing.assert_close(got, expected)
