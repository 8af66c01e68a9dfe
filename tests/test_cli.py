"""fastvit-bench: the cost models against hand computations, the harness, and the CLI end to end on the CPU.

The CLI runs in subprocesses (``python -m fastvit.bench``) with tiny shapes, one torch thread and short timing
budgets; each subcommand runs once per module (fixtures) and several tests inspect its JSON / PNG.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvit.bench import harness
from fastvit.bench.providers import vit_flops
from fastvit.testing import oracle_compare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV_KEYS = {
    "fastvit",
    "torch",
    "torch_cuda",
    "triton",
    "device_name",
    "device_type",
    "driver",
    "git_commit",
    "cuda_runtime",
    "timestamp",
    "backends",
}
FAST = ["--threads", "1", "--warmup-ms", "1", "--rep-ms", "5", "--no-progress"]


def _start(tmp: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("FASTVIT_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "fastvit.bench", *args],
        cwd=tmp,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def _report(run: tuple, name: str) -> tuple:
    """A CLI run (proc, out dir) that exited 0 and wrote the JSON report ``name`` with the environment block:
    returns (proc, out dir, report)."""
    proc, d = run
    _ok(proc)
    doc = json.loads((d / name).read_text())
    assert ENV_KEYS <= set(doc["environment"])
    return proc, d, doc


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def _finite_positive(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


# ----------------------------------------------------------------------------------------------- cost models
def test_attention_flops_by_hand():
    # B=2, N=197, H=12, D=64: 4·2·12·197²·64 = 96 · 38809 · 64 = 238,442,496
    assert harness.flops("attention", B=2, N=197, H=12, D=64) == 238_442_496
    assert harness.flops("attention", "bwd", B=2, N=197, H=12, D=64) == 596_106_240  # 2.5x
    assert harness.flops("attention", "fwd_bwd", B=2, N=197, H=12, D=64) == 834_548_736  # 3.5x
    # bytes: read q, k, v and write o = 4 · B·N·C elements, C = 768, bf16
    assert harness.bytes_moved("attention", B=2, N=197, H=12, D=64, elem=2) == 4 * 2 * 197 * 768 * 2


def test_linear_layernorm_flops_by_hand():
    # qkv Linear of ViT-B on 2x197 tokens: 2 · 394 · 2304 · 768
    assert harness.flops("linear", M=394, N=2304, K=768) == 1_394_343_936
    assert harness.flops("linear", "fwd_bwd", M=394, N=2304, K=768) == 3 * 1_394_343_936
    # x (4, 8) fp32, W (3, 8), b (3,), y (4, 3): (32 + 24 + 3 + 12) · 4 bytes
    assert harness.bytes_moved("linear", M=4, N=3, K=8, elem=4) == 71 * 4
    # LayerNorm of 10 rows x 16, fp16, no residual: read x + write y + weight + bias
    assert harness.bytes_moved("layer_norm", M=10, C=16, elem=2) == (2 * 160 + 2 * 16) * 2
    with pytest.raises(ValueError, match="mode"):
        harness.flops("attention", "sideways", B=1, N=1, H=1, D=1)
    with pytest.raises(ValueError, match="unknown op"):
        harness.flops("conv3d", B=1)


def test_vit_flops_by_hand():
    # One block, C=8, H=2 (D=4), F=32, P=4, 8x8 images -> 4 patches + cls = 5 tokens, 10 classes, batch 3.
    cfg = {
        "patch_size": 4,
        "embed_dim": 8,
        "mlp_hidden": 32,
        "depth": 1,
        "in_chans": 3,
        "num_prefix_tokens": 1,
        "num_heads": 2,
        "head_dim": 4,
        "num_classes": 10,
        "is_mae": False,
    }
    patch = 2 * 4 * 8 * 3 * 16  # 3072
    qkv = 2 * 5 * 8 * 24  # 1920
    attn = 4 * 5 * 5 * 8  # 800
    proj = 2 * 5 * 8 * 8  # 640
    mlp = 2 * 2 * 5 * 8 * 32  # 5120
    head = 2 * 8 * 10  # 160
    per_image = patch + qkv + attn + proj + mlp + head
    assert vit_flops(cfg, 8, 3, "fwd") == 3 * per_image
    assert vit_flops(cfg, 8, 3, "fwd_bwd") == 9 * per_image


def test_rates_and_roofline_fraction():
    roof = harness.Roofline(
        copy_gbps=1000.0, gemm_tflops=100.0, gemm_dtype="bfloat16", copy_bytes=1, gemm_size=1, copy_ms=1.0, gemm_ms=1.0
    )
    r = harness.rates(2.0, 10**11, 10**9, roof)  # 1 ms of compute, 1 ms of traffic at the ceilings; took 2 ms
    assert r["tflops"] == pytest.approx(50.0)
    assert r["gbps"] == pytest.approx(500.0)
    assert r["roofline_ms"] == pytest.approx(1.0)
    assert r["roofline_fraction"] == pytest.approx(0.5)


def test_do_bench_cpu_and_accuracy():
    x = torch.randn(64, 64)
    t = harness.do_bench(lambda a: a @ a, device="cpu", inputs=[x, x.clone()], warmup_ms=1, rep_ms=5)
    assert t.timer == "perf_counter" and t.reps >= 3 and t.input_sets == 2
    assert 0 < t.min_ms <= t.q20_ms <= t.median_ms <= t.q80_ms <= t.max_ms
    assert harness.measure_peak_memory(lambda: x @ x, "cpu") is None
    # The benchmark judges accuracy with the test suite's oracle (fastvit.testing), not a rule of its own.
    ref = torch.randn(5, 7, dtype=torch.float64)
    good = oracle_compare(ref.float(), ref, ref.float(), torch.float32)
    assert good.ok and good.err < 1e-6
    bad = oracle_compare(ref.float() + 0.1, ref, ref.float(), torch.float32)
    assert not bad.ok and bad.err == pytest.approx(0.1, rel=1e-3)
    assert not oracle_compare(torch.full((5, 7), float("nan")), ref, None, torch.float32).ok


# ----------------------------------------------------------------------------------------------- CLI runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The three subcommands, started together (most of each run is interpreter start-up and imports)."""
    d = tmp_path_factory.mktemp("bench")
    procs = {
        "attention": _start(
            d,
            "attention",
            "--device",
            "cpu",
            "--seq-lens",
            "17",
            "33",
            "--head-dims",
            "16",
            "--heads",
            "2",
            "--batch",
            "2",
            "--mode",
            "fwd_bwd",
            "--json",
            "attn.json",
            "--plot",
            "attn.png",
            *FAST,
        ),
        "model": _start(
            d,
            "model",
            "vit_tiny_patch16_224",
            "--device",
            "cpu",
            "--img-size",
            "32",
            "--batch",
            "2",
            "--providers",
            "fastvit-eager,fastvit-cuda,timm-compile",
            "--json",
            "model.json",
            "--plot",
            "model.png",
            *FAST,
        ),
        "scaling": _start(
            d,
            "scaling",
            "vit_tiny_patch16_224",
            "--device",
            "cpu",
            "--img-sizes",
            "32",
            "48",
            "--batch",
            "1",
            "--json",
            "scaling.json",
            "--plot",
            "scaling.png",
            *FAST,
        ),
        "overhead": _start(
            d,
            "overhead",
            "--reps",
            "2",
            "--number",
            "2",
            "--model-number",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--json",
            "overhead.json",
        ),
        "varlen": _start(
            d,
            "varlen",
            "--device",
            "cpu",
            "--images",
            "3",
            "--min-side",
            "32",
            "--max-side",
            "64",
            "--json",
            "varlen.json",
            *FAST,
        ),
    }
    return {name: (_finish(p), d) for name, p in procs.items()}


@pytest.fixture(scope="module")
def attention_run(runs):
    return runs["attention"]


@pytest.fixture(scope="module")
def model_run(runs):
    return runs["model"]


@pytest.fixture(scope="module")
def scaling_run(runs):
    return runs["scaling"]


@pytest.fixture(scope="module")
def overhead_run(runs):
    return runs["overhead"]


@pytest.fixture(scope="module")
def varlen_run(runs):
    return runs["varlen"]


def test_varlen_cli(varlen_run):
    proc, d = varlen_run
    _ok(proc)
    doc = json.loads((d / "varlen.json").read_text())
    assert doc["command"] == "varlen"
    info = doc["batch"]
    P, prefix = info["patch_size"], info["num_prefix_tokens"]
    sizes = info["image_sizes"]
    assert len(sizes) == 3 and all(32 <= s <= 64 and s % P == 0 for hw in sizes for s in hw)
    valid = sum((h // P) * (w // P) for h, w in sizes)
    longest = max((h // P) * (w // P) for h, w in sizes)
    assert info["valid_patches"] == valid and info["padded_patches"] == 3 * longest
    rows = {(r["mode"], r["provider"]): r for r in doc["results"]}
    assert set(rows) == {(m, p) for m in ("fwd", "fwd_bwd") for p in ("timm padded", "fastvit packed")}
    for (_mode, provider), r in rows.items():
        assert r["status"] == "ok", r
        assert _finite_positive(r["ms"]) and r["max_abs_diff"] <= 1e-4
        assert r["tokens"] == (3 * (longest + prefix) if provider == "timm padded" else valid + 3 * prefix)
    assert "fastvit packed" in proc.stdout and "of padded patches valid" in proc.stdout


def test_attention_cli(attention_run):
    proc, d, doc = _report(attention_run, "attn.json")
    assert doc["command"] == "attention"
    assert doc["environment"]["device_type"] == "cpu"
    assert doc["roofline"]["copy_gbps"] > 0 and doc["roofline"]["gemm_tflops"] > 0
    eager = [r for r in doc["results"] if r["provider"] == "fastvit-eager"]
    assert {r["N"] for r in eager} == {17, 33}
    for r in eager:
        assert r["status"] == "ok", r
        assert _finite_positive(r["ms"]) and _finite_positive(r["tflops"])
        B, H, N, D = 2, 2, r["N"], 16
        assert r["flops"] == 4 * B * H * N * N * D * 7 // 2  # fwd + 2.5x bwd
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12, rel=1e-6)
        assert r["max_abs_diff"] <= r["tolerance"] and r["max_abs_diff_grad"] <= r["tolerance_grad"]
    skipped = {s["provider"]: s["reason"] for s in doc["skipped"]}
    for name in ("fastvit-cuda", "sdpa-efficient", "sdpa-cudnn"):
        assert name in skipped and len(skipped[name]) > 10
    assert "Not timed here" in proc.stdout and "sdpa-efficient" in proc.stdout
    _png(d / "attn.png")


def test_model_cli(model_run):
    _, d, doc = _report(model_run, "model.json")
    rows = {r["provider"]: r for r in doc["results"]}
    eager = rows["fastvit-eager"]
    assert eager["status"] == "ok"
    for key in ("train_ms", "train_images_per_s", "infer_ms", "infer_images_per_s", "train_tflops"):
        assert _finite_positive(eager[key]), key
    assert eager["train_images_per_s"] == pytest.approx(2 / (eager["train_ms"] * 1e-3), rel=1e-6)
    # ViT-Ti/16 on 32x32: C=192, 12 blocks, F=768, 4 patches + cls = 5 tokens, 1000 classes.
    C, F, N, Np = 192, 768, 5, 4
    block = 2 * N * C * 3 * C + 4 * N * N * C + 2 * N * C * C + 4 * N * C * F
    fwd = 2 * (2 * Np * C * 3 * 16 * 16 + 12 * block + 2 * C * 1000)
    assert doc["model"]["fwd_flops"] == fwd and doc["model"]["train_flops"] == 3 * fwd
    assert rows["fastvit-cuda"]["status"] == "skipped" and rows["fastvit-cuda"]["reason"]
    assert rows["timm-compile"]["status"] == "skipped" and "compile" in rows["timm-compile"]["reason"]
    _png(d / "model.png")


def test_scaling_cli(scaling_run):
    _, d, doc = _report(scaling_run, "scaling.json")
    rows = doc["results"]
    assert {r["provider"] for r in rows} == {"patch_embed", "attention", "layer_norm", "mlp"}
    for r in rows:
        assert r["status"] == "ok" and _finite_positive(r["ms"]), r
        assert r["N"] == (r["img_size"] // 16) ** 2 + 1
    for r in (r for r in rows if r["provider"] == "attention"):
        assert r["flops"] == 4 * 1 * 3 * r["N"] ** 2 * 64  # ViT-Ti: H=3, D=64
    _png(d / "scaling.png")


def test_overhead_cli(overhead_run):
    """Structure and sanity of ``fastvit-bench overhead`` (not speed): both variants for every op of
    fastvit.backends.OPS (layer_norm and rms_norm also with the residual) and both model modes, positive times."""
    from fastvit.backends import OPS

    proc, _, doc = _report(overhead_run, "overhead.json")
    assert doc["command"] == "overhead"
    assert doc["clock"] == doc["model"]["clock"] == "thread"  # the CPU default: the host thread's CPU time
    rows = {r["case"]: r for r in doc["ops"]}
    assert set(rows) == set(OPS) | {"layer_norm+residual", "rms_norm+residual", "mae_unshuffle+given_ids"}
    assert rows["mae_unshuffle+given_ids"]["value_check"] is True  # its value check is no dispatch cost
    for case, r in rows.items():
        assert r["op"] == case.split("+")[0] and r["backend"] == "eager", r
        assert set(r["variants"]) == {"fastvit.ops", "direct"}, r
        for v in r["variants"].values():
            assert v["n"] == 2 and _finite_positive(v["median_us"]), r
            assert v["q25_us"] <= v["median_us"] <= v["q75_us"] and v["iqr_us"] >= 0, r
        assert math.isfinite(r["added_us"]["median"]), r
        assert r["value_check"] is (case == "mae_unshuffle+given_ids"), r
        assert case in proc.stdout
    model = doc["model"]
    assert model["config"]["depth"] == 12 and model["config"]["embed_dim"] == 64 and model["batch"] == 2
    assert {r["mode"] for r in model["rows"]} == {"inference", "train"}
    for r in model["rows"]:
        assert set(r["variants"]) == {"timm", "fastvit"}, r
        assert all(_finite_positive(v["median_ms"]) for v in r["variants"].values()), r
        assert _finite_positive(r["ratio"]["median"]), r
    assert set(model["max_abs_diff"]) == {"timm", "fastvit"}
    assert "fastvit / timm" in proc.stdout


def test_model_cli_rejects_an_image_size_the_patch_does_not_divide(capsys):
    from fastvit.bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["model", "vit_tiny_patch16_224", "--device", "cpu", "--img-size", "200"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --img-size" in err and "200" in err and "16" in err


# ----------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "args, needle",
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["model", "vit_nope"], "argument name: unknown model 'vit_nope'"),
        (["attention", "--seq-lens", "-5"], "argument --seq-lens"),
        (["attention", "--head-dims", "0"], "argument --head-dims"),
        (
            ["varlen", "--model", "vit_base_patch16_224"],
            "argument --model: 'vit_base_patch16_224' is not a timm NaFlexVit",
        ),
        (["varlen", "--device", "cpu", "--min-side", "96", "--max-side", "64"], "argument --min-side: 96 exceeds"),
    ],
)
def test_bad_arguments(capsys, args, needle):
    from fastvit.bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code not in (0, None)
    assert needle in capsys.readouterr().err
