"""Backend registry and dispatch (fastvit.backends): names, explicit vs automatic choice, precedence,
``use_backend`` scoping, capabilities, ``available_backends`` and ``python -m fastvit.info``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastvit
from fastvit.backends import OPS, PRIORITY, BackendNotSupportedError, Capabilities, get_backend, register_kernel, select

ALL = ("cuda", "triton", "eager")
CPU32 = {"device": torch.device("cpu"), "dtype": torch.float32}
NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available() and not get_backend("cuda").unavailable_reasons(),
    reason="checks what happens when the cuda backend cannot run; it runs on this machine",
)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """No FASTVIT_BACKEND from the caller's shell, no forced backend left over (checked before and after)."""
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    assert fastvit.current_backend() is None
    yield
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)  # the test's own setting (monkeypatch restores the shell's)
    assert fastvit.current_backend() is None, "a test left a use_backend context forced"


@pytest.fixture
def registry(monkeypatch):
    """Restore every backend's kernel table after the test; make 'triton' usable and automatic while it runs
    (its real kernels are replaced by the test's fakes, so nothing here depends on Triton itself)."""
    saved = {name: dict(get_backend(name).kernels) for name in ALL}
    triton = get_backend("triton")
    monkeypatch.setattr(triton, "availability", lambda: [])
    monkeypatch.setattr(triton, "automatic", lambda: True)
    triton.kernels.clear()
    yield
    for name in ALL:
        get_backend(name).kernels.clear()
        get_backend(name).kernels.update(saved[name])


def _ln_inputs(generator, C=24):
    return (
        torch.randn(2, 3, C, generator=generator),
        torch.randn(C, generator=generator),
        torch.randn(C, generator=generator),
    )


def _fake_attention(tag: float):
    calls = []

    def fn(qkv, num_heads, *, scale=None, dropout_p=0.0):
        calls.append((tuple(qkv.shape), num_heads))
        B, N, C3 = qkv.shape
        return torch.full((B, N, C3 // 3), tag, dtype=qkv.dtype)

    fn.calls = calls
    return fn


def _fake_layer_norm(tag: float):
    calls = []

    def fn(x, weight, bias, eps=1e-6, *, residual=None):
        calls.append(tuple(x.shape))
        y = torch.full_like(x, tag)
        return y if residual is None else (y, x + residual)

    fn.calls = calls
    return fn


# =============================================================================================== names
def test_priority_lists_the_three_backends_eager_last():
    assert set(PRIORITY) == set(ALL) and PRIORITY[-1] == "eager"


def test_unknown_backend_argument(generator):
    x, w, b = _ln_inputs(generator)
    with pytest.raises(ValueError, match=r"unknown backend 'trition'.*'eager'") as info:
        fastvit.ops.layer_norm(x, w, b, backend="trition")
    assert not isinstance(info.value, BackendNotSupportedError)


def test_unknown_backend_context():
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'"):
        with fastvit.use_backend("cudnn"):
            pytest.fail("the body must not run")
    assert fastvit.current_backend() is None


def test_unknown_backend_environment(monkeypatch, generator):
    monkeypatch.setenv("FASTVIT_BACKEND", "flash")
    x, w, b = _ln_inputs(generator)
    with pytest.raises(ValueError, match=r"unknown backend 'flash'"):
        fastvit.ops.layer_norm(x, w, b)


def test_environment_is_stripped_and_empty_means_automatic(monkeypatch, generator):
    x, w, b = _ln_inputs(generator)
    monkeypatch.setenv("FASTVIT_BACKEND", "  eager ")
    assert fastvit.current_backend() == "eager"
    torch.testing.assert_close(fastvit.ops.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (24,), w, b, 1e-6))
    monkeypatch.setenv("FASTVIT_BACKEND", "")
    assert fastvit.current_backend() is None


# =============================================================================================== explicit cuda here
def _assert_lists_every_backend(message: str, op: str, **call) -> None:
    assert f"fastvit.ops.{op}" in message
    lines = message.splitlines()
    for name in PRIORITY:
        line = next((ln for ln in lines if ln.strip().startswith(f"{name}:")), None)
        assert line is not None, f"backend {name} missing from:\n{message}"
        reasons = get_backend(name).not_supported_reasons(op, {**CPU32, **call})
        if reasons:
            assert all(r in line for r in reasons), (name, reasons, line)
        else:
            assert "supported" in line
    cuda_line = next(ln for ln in lines if ln.strip().startswith("cuda:"))
    assert "not built" in cuda_line or "no CUDA device" in cuda_line


@NO_CUDA
def test_explicit_cuda_argument_raises_listing_every_backend(generator):
    x, w, b = _ln_inputs(generator)
    with pytest.raises(BackendNotSupportedError) as info:
        fastvit.ops.layer_norm(x, w, b, backend="cuda")
    _assert_lists_every_backend(str(info.value), "layer_norm")
    assert isinstance(info.value, ValueError)  # documented: a ValueError subclass


@NO_CUDA
def test_explicit_cuda_context_raises(generator):
    qkv = torch.randn(2, 5, 3 * 2 * 32, generator=generator)
    with fastvit.use_backend("cuda"):
        with pytest.raises(BackendNotSupportedError) as info:
            fastvit.ops.attention(qkv, 2)
    _assert_lists_every_backend(str(info.value), "attention", head_dim=32, dropout_p=0.0)


@NO_CUDA
def test_explicit_cuda_environment_raises(monkeypatch, generator):
    monkeypatch.setenv("FASTVIT_BACKEND", "cuda")
    pred, images, mask = torch.randn(2, 16, 12), torch.randn(2, 3, 8, 8), torch.ones(2, 16)
    with pytest.raises(BackendNotSupportedError) as info:
        fastvit.ops.mae_loss(pred, images, mask, 2)
    _assert_lists_every_backend(str(info.value), "mae_loss")


@NO_CUDA
def test_automatic_choice_falls_back_to_eager_quietly(generator):
    x, w, b = _ln_inputs(generator)
    qkv = torch.randn(2, 7, 3 * 2 * 32, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fastvit.ops.layer_norm(x, w, b)
        o = fastvit.ops.attention(qkv, 2)
    assert torch.equal(y, fastvit.ops.layer_norm(x, w, b, backend="eager"))
    assert torch.equal(o, fastvit.ops.attention(qkv, 2, backend="eager"))
    for op in ("layer_norm", "attention", "patch_embed", "mae_unshuffle"):
        assert select(op, {"device": torch.device("cpu"), "dtype": torch.float32, "head_dim": 32})[0] == "eager"


# =============================================================================================== precedence
def test_precedence_argument_over_context_over_environment(monkeypatch, registry, generator):
    fake = _fake_layer_norm(7.0)
    register_kernel("triton", "layer_norm", fake)
    x, w, b = _ln_inputs(generator)
    eager = fastvit.ops.layer_norm(x, w, b, backend="eager")
    assert fake.calls == []

    def ran_triton(y):
        return bool((y == 7.0).all())

    monkeypatch.setenv("FASTVIT_BACKEND", "triton")
    assert ran_triton(fastvit.ops.layer_norm(x, w, b))  # environment alone
    with fastvit.use_backend("eager"):  # context beats environment
        assert torch.equal(fastvit.ops.layer_norm(x, w, b), eager)
        assert ran_triton(fastvit.ops.layer_norm(x, w, b, backend="triton"))  # argument beats context
    monkeypatch.setenv("FASTVIT_BACKEND", "eager")
    with fastvit.use_backend("triton"):
        assert ran_triton(fastvit.ops.layer_norm(x, w, b))
        assert torch.equal(fastvit.ops.layer_norm(x, w, b, backend="eager"), eager)
    assert torch.equal(fastvit.ops.layer_norm(x, w, b), eager)
    assert len(fake.calls) == 3


@NO_CUDA
def test_precedence_with_a_backend_that_cannot_run(monkeypatch, generator):
    x, w, b = _ln_inputs(generator)
    monkeypatch.setenv("FASTVIT_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError):
        fastvit.ops.layer_norm(x, w, b)
    fastvit.ops.layer_norm(x, w, b, backend="eager")  # the argument wins over the environment
    with fastvit.use_backend("eager"):
        fastvit.ops.layer_norm(x, w, b)
        with pytest.raises(BackendNotSupportedError):
            fastvit.ops.layer_norm(x, w, b, backend="cuda")


def test_use_backend_none_means_automatic_even_with_environment(monkeypatch):
    """use_backend(None) is documented as 'automatic', and a context beats the environment."""
    monkeypatch.setenv("FASTVIT_BACKEND", "cuda")
    with fastvit.use_backend(None):
        assert fastvit.current_backend() is None
        assert select("layer_norm", {"device": torch.device("cpu"), "dtype": torch.float32})[0] == "eager"


# =============================================================================================== use_backend scoping
def test_use_backend_restores_and_nests():
    assert fastvit.current_backend() is None
    with fastvit.use_backend("eager"):
        assert fastvit.current_backend() == "eager"
        with fastvit.use_backend("triton"):
            assert fastvit.current_backend() == "triton"
            with fastvit.use_backend(None):
                assert fastvit.current_backend() is None
            assert fastvit.current_backend() == "triton"
        assert fastvit.current_backend() == "eager"
    assert fastvit.current_backend() is None


def test_use_backend_restores_after_an_exception():
    with fastvit.use_backend("eager"):
        with pytest.raises(KeyError):
            with fastvit.use_backend("cuda"):
                assert fastvit.current_backend() == "cuda"
                raise KeyError("boom")
        assert fastvit.current_backend() == "eager"
        with pytest.raises(ValueError):
            with fastvit.use_backend("nope"):
                pass
        assert fastvit.current_backend() == "eager"


def test_use_backend_is_thread_local():
    inside = threading.Barrier(2, timeout=30)
    seen: dict[str, object] = {}

    def worker():
        seen["worker_start"] = fastvit.current_backend()
        with fastvit.use_backend("cuda"):
            inside.wait()  # main thread is inside use_backend("eager") now
            seen["worker_inside"] = fastvit.current_backend()
            inside.wait()  # let main check while we are still inside
        seen["worker_end"] = fastvit.current_backend()

    with fastvit.use_backend("eager"):
        t = threading.Thread(target=worker)
        t.start()
        inside.wait()
        inside.wait()
        seen["main_inside"] = fastvit.current_backend()
        t.join(timeout=30)
    assert not t.is_alive()
    assert seen == {"worker_start": None, "worker_inside": "cuda", "worker_end": None, "main_inside": "eager"}


# =============================================================================================== available_backends
def test_available_backends_reports_eager():
    av = fastvit.available_backends()
    assert list(av) == list(PRIORITY)
    assert av["eager"] == []
    for name, reasons in av.items():
        assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons), name


@NO_CUDA
def test_available_backends_explains_cuda():
    reasons = fastvit.available_backends()["cuda"]
    assert reasons and any("not built" in r or "no CUDA device" in r for r in reasons)


# =============================================================================================== capabilities


@pytest.mark.parametrize(
    "caps,call,reason",
    [
        (Capabilities(head_dims=frozenset({64, 128})), {**CPU32, "head_dim": 80}, r"head_dim 80 not in \[64, 128\]"),
        (Capabilities(head_dims=frozenset(range(16, 129))), {**CPU32, "head_dim": 8}, r"head_dim 8 not in 16\.\.128$"),
        (
            Capabilities(head_dims=frozenset(range(8, 129, 8))),
            {**CPU32, "head_dim": 72 + 1},
            r"head_dim 73 not in 8\.\.128 in steps of 8$",
        ),
        (Capabilities(dtypes=frozenset({torch.float16})), CPU32, r"dtype torch\.float32 not in \['torch\.float16'\]"),
        (Capabilities(devices=frozenset({"cuda"})), CPU32, r"device 'cpu' not in \['cuda'\]"),
        (Capabilities(dropout=False), {**CPU32, "dropout_p": 0.1}, r"dropout_p > 0 is not supported"),
    ],
    ids=["head_dims", "head_dim_range", "head_dim_steps", "dtypes", "devices", "dropout"],
)
def test_capabilities_reasons(caps, call, reason):
    reasons = caps.reasons(call)
    assert len(reasons) == 1
    assert re.search(reason, reasons[0]), reasons
    # the same call within the capabilities has no reasons
    ok = {
        **call,
        "head_dim": 64,
        "dtype": next(iter(caps.dtypes)),
        "device": torch.device(next(iter(caps.devices))),
        "dropout_p": 0.0,
    }
    if ok["device"].type == "cpu":
        assert caps.reasons(ok) == []


def test_registered_kernel_is_chosen_or_rejected_by_head_dim(registry, generator):
    fake = _fake_attention(3.0)
    register_kernel("triton", "attention", fake, Capabilities(devices=frozenset({"cpu"}), head_dims=frozenset({64})))
    qkv64 = torch.randn(2, 5, 3 * 2 * 64, generator=generator)
    qkv32 = torch.randn(2, 5, 3 * 2 * 32, generator=generator)

    # explicit: D = 64 runs the fake, D = 32 is refused with the declared reason
    assert bool((fastvit.ops.attention(qkv64, 2, backend="triton") == 3.0).all())
    with pytest.raises(BackendNotSupportedError, match=r"triton: head_dim 32 not in \[64\]"):
        fastvit.ops.attention(qkv32, 2, backend="triton")
    assert fake.calls == [((2, 5, 384), 2)]

    # automatic: triton (before eager in PRIORITY) takes D = 64, D = 32 falls back to eager without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool((fastvit.ops.attention(qkv64, 2) == 3.0).all())
        o32 = fastvit.ops.attention(qkv32, 2)
    assert torch.equal(o32, fastvit.ops.attention(qkv32, 2, backend="eager"))
    assert len(fake.calls) == 2
    # the op's head dim is what dispatch sees: qkv width 3·H·D with H = 4 gives D = 32, not 64
    with pytest.raises(BackendNotSupportedError, match="head_dim 32"):
        fastvit.ops.attention(qkv64, 4, backend="triton")


def test_registered_kernel_rejected_by_dtype_and_extra_check(registry, generator):
    fake = _fake_layer_norm(5.0)
    refuse = [False]
    register_kernel(
        "triton",
        "layer_norm",
        fake,
        Capabilities(dtypes=frozenset({torch.float32})),
        extra_check=lambda call: ["odd widths unsupported"] if refuse[0] else [],
    )
    x, w, b = _ln_inputs(generator)
    assert bool((fastvit.ops.layer_norm(x, w, b) == 5.0).all())  # automatic picks it
    y16 = fastvit.ops.layer_norm(x.half(), w.half(), b.half())  # fp16: not declared, eager
    assert torch.equal(y16, fastvit.ops.layer_norm(x.half(), w.half(), b.half(), backend="eager"))
    with pytest.raises(BackendNotSupportedError, match=r"dtype torch\.float16 not in"):
        fastvit.ops.layer_norm(x.half(), w.half(), b.half(), backend="triton")
    refuse[0] = True
    with pytest.raises(BackendNotSupportedError, match="odd widths unsupported"):
        fastvit.ops.layer_norm(x, w, b, backend="triton")
    assert not (fastvit.ops.layer_norm(x, w, b) == 5.0).all()  # automatic: eager again
    assert len(fake.calls) == 1


def test_backend_without_a_kernel_for_the_op(registry, generator):
    images, weight = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(16, 3, 4, 4, generator=generator)
    with pytest.raises(BackendNotSupportedError, match=r"triton: no triton kernel for op 'patch_embed'"):
        fastvit.ops.patch_embed(images, weight, None, backend="triton")
    assert fastvit.ops.patch_embed(images, weight, None).shape == (2, 4, 16)  # automatic: eager


def test_register_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown op 'conv3d'"):
        register_kernel("triton", "conv3d", lambda *a: None)
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        register_kernel("tpu", "attention", lambda *a: None)
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        get_backend("tpu")


# =============================================================================================== fastvit.info
def test_info_json_subprocess(tmp_path):
    # cwd = tmp_path: `python -m` puts the working directory on sys.path, and the repo root's kernels/ must not
    # shadow anything (docs/ARCHITECTURE.md, "Layers of an op").
    proc = subprocess.run(
        [sys.executable, "-m", "fastvit.info", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert list(info["backends"]) == list(PRIORITY)
    assert set(info["backends"]) == set(ALL)
    here = fastvit.available_backends()
    from fastvit.runtime import cuda as _cuda

    # A test run in this process may have JIT-built the extension (tests/test_cuda_extension.py), which the fresh
    # subprocess does not load: compare the cuda backend only when this process has not loaded one either.
    jit_loaded_here = _cuda._EXT is not None and _cuda._EXT.__name__ != "fastvit._C"
    for name, b in info["backends"].items():
        assert b["available"] is (not b["reasons"])
        if not (name == "cuda" and jit_loaded_here):
            assert b["reasons"] == here[name], name
        assert set(b["ops"]) == set(OPS)
    assert info["backends"]["eager"]["available"] is True
    assert all(r == [] for r in info["backends"]["eager"]["ops"].values())
    assert info["torch"] == torch.__version__ and info["fastvit"] == fastvit.__version__
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"]["available"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the import of a machine without a CUDA device")
def test_cpu_only_import_skips_the_triton_op_registration(tmp_path):
    """Without a GPU (and without TRITON_INTERPRET=1) the triton backend cannot run, so ``import fastvit`` must not pay
    for registering its ops (``triton_op`` imports torch._inductor, about 1.4 s) -- and must still say why."""
    script = (
        "import sys, json, torch; base = 'torch._inductor' in sys.modules; import fastvit; "
        "print(json.dumps({'base': base, 'inductor': 'torch._inductor' in sys.modules, "
        "'registered': hasattr(torch.ops.fastvit, 'attention_fwd'), "
        "'reasons': fastvit.available_backends()['triton']}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["registered"] is False
    assert out["inductor"] is out["base"]  # fastvit itself imported no inductor
    assert any("no CUDA device" in r or "not installed" in r for r in out["reasons"]), out["reasons"]


def test_recording_lists_every_dispatched_call_in_order():
    """fastvit.backends.recording() sees each op call as dispatch sees it (the benchmark reads a model's calls so):
    the op's name and the Call its check step built, in call order; nothing is recorded outside the block."""
    import fastvit
    from fastvit import backends, ops

    x, w = torch.randn(2, 5, 8), torch.randn(8)
    with backends.recording() as calls:
        ops.layer_norm(x, w, None)
        ops.attention(torch.randn(2, 5, 24), 2)
    ops.layer_norm(x, w, None)
    assert [op for op, _ in calls] == ["layer_norm", "attention"]
    assert calls[0][1] == fastvit.ops.describe_call("layer_norm", x, w, None)
    assert calls[1][1].head_dim == 4 and calls[1][1].num_tokens == 5
    with backends.recording(), pytest.raises(RuntimeError, match="already active"):
        with backends.recording():
            pass
