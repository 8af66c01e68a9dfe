"""``fastvit-bench attention --rope``: the rotary table, the providers' rotation against the float64 reference, and
the command line (in process: the imports are the slow part of a CLI run)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastvit import reference
from fastvit.bench.providers import (
    AttentionProvider,
    AttentionSpec,
    FastvitAttention,
    SdpaAttention,
    attention_providers,
    run_attention_case,
)

BENCH = {"warmup_ms": 1, "rep_ms": 5}


def _spec(**kw) -> AttentionSpec:
    return AttentionSpec(2, 21, 2, 16, torch.float32, torch.device("cpu"), **kw)


def test_rope_table_is_roformer_in_timm_layout():
    spec = _spec(rope=True, num_prefix_tokens=1)
    table = spec.rope_table()
    D = spec.D
    assert table.shape == (spec.N - 1, 2 * D) and table.dtype == torch.float32
    for p, i in ((0, 0), (3, 1), (19, 7), (11, 4)):  # token p (after the prefix), pair i
        angle = p * 10000.0 ** (-2 * i / D)
        for col in (2 * i, 2 * i + 1):  # both columns of the pair (timm's interleaved layout)
            assert table[p, col].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, D + col].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert _spec().rope_table() is None and _spec().rope_kwargs() == {}
    assert _spec(rope=True).config()["rope"] is True and "rope" not in _spec().config()


def test_sdpa_provider_rotates_as_timm():
    """The SDPA providers' unfused rotation is timm's EvaAttention step, checked against timm's own function."""
    timm_rope = pytest.importorskip("timm.layers.pos_embed_sincos")
    spec = _spec(rope=True, num_prefix_tokens=2)
    table, npt = spec.rope_table(), 2
    qkv = torch.randn(spec.B, spec.N, 3 * spec.C, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.reshape(spec.B, spec.N, 3, spec.H, spec.D).permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.cat([q[:, :, :npt], timm_rope.apply_rot_embed_cat(q[:, :, npt:], table)], 2)
    k = torch.cat([k[:, :, :npt], timm_rope.apply_rot_embed_cat(k[:, :, npt:], table)], 2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(spec.B, spec.N, -1)
    got = SdpaAttention("math").build(spec)(qkv)
    torch.testing.assert_close(got, want)


class _NoRotation(AttentionProvider):
    """A provider that ignores the rope table: the accuracy check must reject it."""

    name = "no-rotation"

    def build(self, spec):
        return lambda qkv: reference.attention(qkv, spec.H, plain=True)


def test_rope_case_checks_every_provider_against_the_rotated_reference():
    spec = _spec(rope=True, num_prefix_tokens=1)
    providers = [FastvitAttention("eager"), SdpaAttention("math"), _NoRotation()]
    records = {r.provider: r for r in run_attention_case(spec, "fwd_bwd", providers, None, bench=BENCH)}
    for name in ("fastvit-eager", "sdpa-math"):
        r = records[name].as_dict()
        assert r["status"] == "ok", r
        assert r["rope"] is True and r["num_prefix_tokens"] == 1
        assert r["max_abs_diff"] <= r["tolerance"] and r["max_abs_diff_grad"] <= r["tolerance_grad"]
    assert records["no-rotation"].as_dict()["status"] == "FAILED"


def test_rope_skips_providers_without_rotary_attention():
    spec = _spec(rope=True, num_prefix_tokens=1)
    reasons = {p.name: p.reasons(spec, "fwd") for p in attention_providers()}
    for name in ("flash-attn", "xformers"):
        assert len(reasons[name]) == 1 and reasons[name][0].startswith("rope: ")
    assert not any(r.startswith("rope") for r in FastvitAttention("eager").reasons(spec, "fwd"))


def test_attention_cli_rope(tmp_path, capsys):
    from fastvit.bench.cli import main

    out = tmp_path / "rope.json"
    argv = ["attention", "--device", "cpu", "--rope", "--num-prefix-tokens", "2", "--seq-lens", "19"]
    argv += ["--head-dims", "16", "--heads", "2", "--batch", "2", "--providers", "fastvit-eager,sdpa-math"]
    argv += ["--no-roofline", "--threads", "1", "--warmup-ms", "1", "--rep-ms", "5", "--no-progress"]
    assert main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rope"] is True
    rows = {r["provider"]: r for r in doc["results"]}
    assert set(rows) == {"fastvit-eager", "sdpa-math"}
    for r in rows.values():
        assert r["status"] == "ok" and r["rope"] is True and r["num_prefix_tokens"] == 2
    assert "rope after 2 prefix tokens" in capsys.readouterr().out


def test_attention_cli_rejects_a_negative_prefix(capsys):
    from fastvit.bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["attention", "--rope", "--num-prefix-tokens", "-1"])
    assert exc.value.code not in (0, None)
    assert "argument --num-prefix-tokens" in capsys.readouterr().err
