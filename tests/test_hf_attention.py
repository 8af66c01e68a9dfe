"""``attn_implementation="fastvit"`` (issue 15): Hugging Face vision models with their attention on fastvit.

Whole models as people run them -- ViTModel, Dinov2Model, SiglipVisionModel, CLIPVisionModel, ViTMAEForPreTraining,
tiny random configs -- against the same weights on ``"sdpa"``, under the oracle (``ref``: the SDPA model in float64),
output and every parameter gradient, fp32 and bf16 under CPU autocast, on automatic dispatch and on the Triton
backend (interpreter); the profiler shows fastvit's op; masks, causal attention, dropout and grouped-query heads take
the documented paths; registration is idempotent, happens on ``import fastvit`` after ``import transformers``, and
``import fastvit`` alone never imports transformers.

Issue 24: key-padding and block-diagonal masks and ``cu_seq_lens_*`` keywords run one packed fastvit call (against
SDPA, padding rows and q / k / v gradients included; the mask analysed once per mask); ``attention_report`` says what
runs where; ``set_attn_implementation`` reaches ViT-MAE's decoder; SAM and a model whose attention ignores the
interface are refused at the call that asks for ``"fastvit"``; ``"fastvit_flash"`` needs no FlashAttention package.
Whole padded / multi-image models: tests/test_hf_packed.py.
"""

from __future__ import annotations

import copy
import os
import re
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


def test_padding_mask_runs_packed_and_matches_sdpa(monkeypatch, fresh_warnings, generator):
    """A key-padding ``attention_mask`` runs fastvit's packed op on every layer (issue 24; it fell back before)."""
    calls = _count_fastvit_calls(monkeypatch)
    model = _build("vit").eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    mask = torch.ones(2, _NUM_PATCHES + 1, dtype=torch.long)
    mask[0, -5:] = 0
    expected = model(pixel_values=x, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("fastvit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        got = model(pixel_values=x, attention_mask=mask).last_hidden_state
    assert len(calls) == 2 and all(c.get("cu_seqlens") is not None for c in calls)
    assert calls[0]["cu_seqlens"].tolist() == [0, _NUM_PATCHES + 1 - 5, 2 * (_NUM_PATCHES + 1) - 5]
    torch.testing.assert_close(got, expected)  # padding rows included: they hold what SDPA gives them
    # a mask that masks nothing: transformers' mask function drops it, fastvit's dense op runs
    ones = torch.ones_like(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        got = model(pixel_values=x, attention_mask=ones).last_hidden_state
    assert len(calls) == 4 and calls[-1].get("cu_seqlens") is None
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
        ("arbitrary_bool", "neither empty, key-padding nor block-diagonal"),
        ("per_head", "differs between heads"),
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
    elif kind == "per_head":  # key padding for head 0 only
        mask = torch.ones(2, 2, N, N, dtype=torch.bool)
        mask[1, 0, :, -2:] = False
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


def test_siglip2_naflex_padded_batches_run_packed_and_full_images_dense(monkeypatch, fresh_warnings, generator):
    """SigLIP-2 (NaFlex) passes ``pixel_attention_mask``: a batch with padded patches runs fastvit's packed op (issue
    24; it fell back before), a batch without padding its dense op (transformers' mask function turns an all-ones mask
    into ``None``). tests/test_hf_packed.py checks gradients, bf16 and the Triton kernels."""
    calls = _count_fastvit_calls(monkeypatch)
    cfg = transformers.Siglip2VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, num_patches=16
    )
    model = transformers.Siglip2VisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    pv = torch.randn(2, 16, 3 * 8 * 8, generator=generator)
    for padded in (True, False):
        del calls[:]
        mask = torch.ones(2, 16, dtype=torch.long)
        shapes = torch.tensor([[4, 4], [4, 4]])
        if padded:
            mask[1, 12:] = 0
            shapes[1] = torch.tensor([3, 4])
        kw = dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes)
        model.set_attn_implementation("sdpa")
        expected = model(**kw)
        model.set_attn_implementation("fastvit")
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastvitAttentionFallbackWarning)
            got = model(**kw)
        assert [c.get("cu_seqlens") is not None for c in calls] == [padded, padded]
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
        torch.testing.assert_close(got.pooler_output, expected.pooler_output)


# ------------------------------------------------------------------------------------------------ packed masks (issue 24)
def _valid_to_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, N) valid tokens -> transformers' (B, 1, N, N) key-padding mask (what sdpa_mask builds)."""
    B, N = valid.shape
    return valid[:, None, None, :].expand(B, 1, N, N)


def _blocks(lengths, N) -> torch.Tensor:
    keep = torch.zeros(N, N, dtype=torch.bool)
    start = 0
    for n in lengths:
        keep[start : start + n, start : start + n] = True
        start += n
    return keep


@pytest.mark.parametrize(
    "kind",
    ["padding_suffix", "padding_middle", "padding_float_broadcast", "blocks", "blocks_and_padding", "gqa_padding"],
)
def test_packable_masks_run_one_packed_call_and_match_sdpa(kind, monkeypatch, fresh_warnings, generator):
    calls = _count_fastvit_calls(monkeypatch)
    N, H_kv = 7, None
    valid = torch.ones(2, N, dtype=torch.bool)
    if kind == "padding_suffix":
        valid[1, -3:] = False
        mask, lengths = _valid_to_mask(valid), [7, 4]
    elif kind == "padding_middle":
        valid[0, [1, 4]] = False
        valid[1, 2] = False
        mask, lengths = _valid_to_mask(valid), [5, 6]
    elif kind == "padding_float_broadcast":  # additive (B, 1, 1, N), HF's eager style: broadcast over queries
        mask = torch.zeros(2, 1, 1, N)
        mask[1, ..., -2:] = torch.finfo(torch.float32).min
        lengths = [7, 5]
    elif kind == "blocks":  # Pixtral: several images in one sequence, one mask for the batch
        mask, lengths = _blocks([3, 4], N)[None, None], [3, 4, 3, 4]
    elif kind == "blocks_and_padding":  # two blocks, then a padding token whose row sees the first block
        keep = _blocks([2, 4], N)
        keep[6, :2] = True
        mask, lengths = keep[None, None].expand(2, 1, N, N), [2, 4, 2, 4]
    else:
        H_kv = 1
        valid[0, -1] = False
        mask, lengths = _valid_to_mask(valid), [6, 7]
    q, k, v = _qkv(generator, H=2, N=N, H_kv=H_kv)
    module = _Module(groups=2 if H_kv else 1)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastvitAttentionFallbackWarning)
        out, weights = fastvit_attention_forward(module, *leaves, mask, scaling=0.3)
    expected = _sdpa(module, *ref_leaves, mask, scaling=0.3)
    assert weights is None and len(calls) == 1
    assert torch.diff(calls[0]["cu_seqlens"]).tolist() == lengths and calls[0]["max_seqlen"] == max(lengths)
    assert out.shape == expected.shape == (2, N, 2, 16) and out.is_contiguous()
    torch.testing.assert_close(out, expected)  # padding rows too: SDPA's values, not zeros
    upstream = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    ref_grads = torch.autograd.grad((expected * upstream).sum(), ref_leaves)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"grad {name}: {m}")


def test_mask_analysis_is_cached_on_the_mask_and_redone_after_an_in_place_change(monkeypatch, generator):
    analysed = []
    real = hf_attention._analyse_mask
    monkeypatch.setattr(hf_attention, "_analyse_mask", lambda *a: analysed.append(1) or real(*a))
    q, k, v = _qkv(generator)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, -2:] = False
    mask = _valid_to_mask(valid).clone()
    for _ in range(3):  # three layers, one mask
        fastvit_attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    assert len(analysed) == 1
    mask[1, ..., 0] = False  # the same tensor, new values: its version counter moved, the cache is stale
    out, _ = fastvit_attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    assert len(analysed) == 2
    torch.testing.assert_close(out, _sdpa(_Module(), q, k, v, mask, scaling=0.3))


def test_flash_style_keywords_run_one_packed_call(monkeypatch, generator):
    """``cu_seq_lens_q`` / ``max_length_q`` (what transformers passes to ``"fastvit_flash"``): one packed call over the
    (1, H, T, D) row, equal to SDPA on each sequence; inconsistent offsets raise."""
    calls = _count_fastvit_calls(monkeypatch)
    q, k, v = _qkv(generator, B=1, N=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, _ = fastvit_attention_forward(
        _Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5
    )
    assert len(calls) == 1 and calls[0]["max_seqlen"] == 5
    parts = [_sdpa(_Module(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling=0.3) for a, b in ((0, 4), (4, 9))]
    torch.testing.assert_close(out, torch.cat(parts, dim=1))
    with pytest.raises(ValueError, match="cu_seq_lens_k differs"):
        fastvit_attention_forward(
            _Module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 5, 9], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="causal"):
        fastvit_attention_forward(_Module(is_causal=True), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


# ------------------------------------------------------------------------------------------------ honesty (issue 24)
def _siglip_with_head():
    cfg = transformers.SiglipVisionConfig(intermediate_size=64, vision_use_head=True, **_COMMON)
    return transformers.SiglipVisionModel._from_config(cfg, attn_implementation="sdpa").eval()


def test_attention_report_says_what_runs_where(fresh_warnings, generator):
    from fastvit.integrations.hf import attention_report, format_attention_report

    model = _siglip_with_head()
    layers = [f"encoder.layers.{i}.self_attn" for i in range(2)]
    report = attention_report(model)
    assert [r.name for r in report] == layers + ["head.attention"]
    assert [r.status for r in report] == ["other", "other", "not covered"]
    assert report[0].reason == "its config asks for attn_implementation='sdpa'" and report[0].last_call == ""
    assert report[2].class_name == "MultiheadAttention" and "PyTorch's own attention" in report[2].reason
    with pytest.warns(hf_attention.FastvitAttentionNotCoveredWarning, match=r"head\.attention \(MultiheadAttention\)"):
        model.set_attn_implementation("fastvit")
    assert [(r.status, r.last_call) for r in attention_report(model)][:2] == [("fastvit", "")] * 2
    x = torch.randn(2, 3, 32, 32, generator=generator)
    model(pixel_values=x)
    assert [(r.status, r.last_call) for r in attention_report(model)][:2] == [("fastvit", "dense")] * 2

    vit = _build("vit").eval()
    vit.set_attn_implementation("fastvit")
    mask = torch.ones(2, _NUM_PATCHES + 1, dtype=torch.long)
    mask[1, -3:] = 0
    vit(pixel_values=x, attention_mask=mask)
    assert {(r.status, r.last_call) for r in attention_report(vit)} == {("fastvit", "packed (key-padding mask)")}
    odd = torch.rand(2, 1, _NUM_PATCHES + 1, _NUM_PATCHES + 1, generator=generator) > 0.5  # passed to layers as is
    odd[..., 0] = True
    with pytest.warns(FastvitAttentionFallbackWarning):
        vit(pixel_values=x, attention_mask=odd)
    report = attention_report(vit)
    assert {r.status for r in report} == {"fallback"} and "neither empty, key-padding nor block-diagonal" in report[
        0
    ].reason
    table = format_attention_report(report)
    assert table.splitlines()[0].split() == ["module", "class", "status", "last", "call", "reason"]
    assert table.splitlines()[-1] == "2 attention modules, 2 fallback"
    with pytest.raises(TypeError, match="nn.Module"):
        attention_report("vit")


@pytest.mark.parametrize("name", ["siglip", "aimv2"])
def test_building_with_fastvit_warns_about_uncovered_attention(name, fresh_warnings, generator):
    """SigLIP's MAP head (nn.MultiheadAttention) and AIMv2's pooling head (a direct SDPA call) keep their own attention:
    building with "fastvit" says so, and the report lists them as 'not covered' next to fastvit's layers."""
    from fastvit.integrations.hf import attention_report

    if name == "siglip":
        cls, cfg = transformers.SiglipVisionModel, transformers.SiglipVisionConfig(intermediate_size=64, **_COMMON)
        head = "head.attention (MultiheadAttention)"
    else:
        cls, cfg = transformers.Aimv2VisionModel, transformers.Aimv2VisionConfig(intermediate_size=64, **_COMMON)
        cfg.use_head = True
        head = "head (Aimv2AttentionPoolingHead)"
    with pytest.warns(hf_attention.FastvitAttentionNotCoveredWarning, match=rf"1 attention module.*{re.escape(head)}"):
        model = cls._from_config(cfg, attn_implementation="fastvit").eval()
    model(pixel_values=torch.randn(1, 3, 32, 32, generator=generator))
    assert [(r.status, r.last_call) for r in attention_report(model)] == [("fastvit", "dense")] * 2 + [
        ("not covered", "")
    ]


def test_vitmae_set_attn_implementation_reaches_the_decoder(monkeypatch, generator):
    """ViT-MAE's decoder holds a deepcopy of the config, which transformers' set_attn_implementation does not visit;
    switching to "fastvit" (and back) reaches it now: 2 encoder + 1 decoder layers on fastvit, SDPA's numbers."""
    from fastvit.integrations.hf import attention_report

    calls = _count_fastvit_calls(monkeypatch)
    model = _build("vitmae").eval()
    inputs = _inputs("vitmae", generator)
    expected = model(**inputs).logits
    model.set_attn_implementation("fastvit")
    decoder_cfg = model.decoder.decoder_layers[0].attention.config
    assert decoder_cfg is not model.config and decoder_cfg._attn_implementation == "fastvit"
    got = model(**inputs).logits
    assert len(calls) == 3
    assert [r.status for r in attention_report(model)] == ["fastvit"] * 3
    torch.testing.assert_close(got, expected)
    model.set_attn_implementation("sdpa")
    assert decoder_cfg._attn_implementation == "sdpa"
    model(**inputs)
    assert len(calls) == 3  # back on SDPA everywhere


def _sam_vision_config():
    return transformers.SamVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        output_channels=16,
        mlp_dim=64,
        global_attn_indexes=[1],
        window_size=2,
    )


def test_sam_refuses_fastvit_at_the_call(generator):
    match = r'SamVisionModel cannot run attn_implementation="fastvit": .*SAM_VISION_ATTENTION_CLASSES'
    with pytest.raises(ValueError, match=match):
        transformers.SamVisionModel._from_config(_sam_vision_config(), attn_implementation="fastvit")
    model = transformers.SamVisionModel._from_config(_sam_vision_config(), attn_implementation="sdpa").eval()
    x = torch.randn(1, 3, 32, 32, generator=generator)
    before = model(pixel_values=x).last_hidden_state
    with pytest.raises(ValueError, match=match):
        model.set_attn_implementation("fastvit")
    assert model.config._attn_implementation == "sdpa"  # left as it was
    torch.testing.assert_close(model(pixel_values=x).last_hidden_state, before, rtol=0, atol=0)
    cfg = transformers.SamConfig(vision_config=_sam_vision_config().to_dict())
    with pytest.raises(ValueError, match='SamModel cannot run attn_implementation="fastvit"'):
        transformers.SamModel._from_config(cfg, attn_implementation="fastvit")


class _OwnAttentionConfig(transformers.PretrainedConfig):
    model_type = "fastvit_test_own_attention"


class _OwnAttention(torch.nn.Module):
    """Attention computed in place (no attention interface), as some HF models do."""

    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


class _OwnAttentionModel(transformers.PreTrainedModel):
    config_class = _OwnAttentionConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = _OwnAttention()
        self.post_init()

    def forward(self, x):
        return self.attn(x)


def test_a_model_whose_attention_ignores_the_interface_is_refused():
    with pytest.raises(ValueError, match=r"_OwnAttentionModel cannot run .*_OwnAttention computes attention itself"):
        _OwnAttentionModel._from_config(_OwnAttentionConfig(), attn_implementation="fastvit")
    model = _OwnAttentionModel._from_config(_OwnAttentionConfig(), attn_implementation="eager")
    with pytest.raises(ValueError, match="computes attention itself"):
        model.set_attn_implementation("fastvit")
    assert model.config._attn_implementation == "eager"


def test_fastvit_flash_is_accepted_without_a_flash_attention_package(monkeypatch, generator):
    """transformers would look for a FlashAttention package or Hub kernel for a name with "flash" in it; the wrapper
    takes "fastvit_flash" as the registered function it is. A model with no packed sequences runs the dense op."""
    calls = _count_fastvit_calls(monkeypatch)
    model = _build("vit").eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    expected = model(pixel_values=x).last_hidden_state
    model.set_attn_implementation("fastvit_flash")
    assert model.config._attn_implementation == "fastvit_flash"
    torch.testing.assert_close(model(pixel_values=x).last_hidden_state, expected)
    assert len(calls) == 2


def test_model_hooks_are_installed_once():
    from transformers import PreTrainedModel

    register_attention()
    register_attention()
    for name in ("set_attn_implementation", "_check_and_adjust_attn_implementation", "post_init"):
        method = PreTrainedModel.__dict__[name]
        assert getattr(method, "__fastvit_wrapped__", False), name
        assert not getattr(method.__wrapped__, "__fastvit_wrapped__", False), name
