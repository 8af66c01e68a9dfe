"""The self-test (fastvit.selftest) and the gate it gives automatic dispatch (fastvit.backends), on the CPU.

Fake kernels are registered on the ``triton`` backend (made available and automatic, as tests/test_backends.py's
``registry`` fixture does); the suite runs with ``FASTVIT_SELFTEST=0`` (tests/conftest.py), so every test here that
needs the gate turns it on and points the cache at its own directory. The end-to-end test runs the real Triton
kernels in the interpreter in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastvit
from fastvit import backends, info, selftest
from fastvit.backends import Capabilities, KernelLaunchError, get_backend, register_kernel, select
from fastvit.declare import DECLARATIONS
from fastvit.families.layer_norm import layer_norm_eager

ALL = ("cuda", "triton", "eager")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    yield
    selftest.GATE.forget()


@pytest.fixture
def registry(monkeypatch):
    """Every backend's kernel table restored after the test; 'triton' usable and automatic, with no kernels."""
    saved = {name: dict(get_backend(name).kernels) for name in ALL}
    triton = get_backend("triton")
    monkeypatch.setattr(triton, "availability", lambda: [])
    monkeypatch.setattr(triton, "automatic", lambda: True)
    triton.kernels.clear()
    yield
    for name in ALL:
        get_backend(name).kernels.clear()
        get_backend(name).kernels.update(saved[name])


@pytest.fixture
def gate(monkeypatch, tmp_path):
    """The gate on, with an empty cache of its own; returns the cache directory."""
    monkeypatch.setenv("FASTVIT_SELFTEST", "1")
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    selftest.GATE.forget()
    backends.clear_cache()
    return tmp_path / "selftest"


def _counting(fn):
    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    kernel.calls = calls
    return kernel


def _right_layer_norm():
    return _counting(layer_norm_eager)


def _wrong_layer_norm():
    def wrong(
        x, weight, bias, eps=1e-6, *, residual=None
    ):  # a 5 % gain error: far above any rounding (1 % is within a bf16 ulp)
        out = layer_norm_eager(x, weight, bias, eps, residual=residual)
        return (out[0] * 1.05, out[1]) if residual is not None else out * 1.05

    return _counting(wrong)


def _ln_inputs(C=24):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, C, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)


def _eager_ln(x, w, b):
    return fastvit.ops.layer_norm(x, w, b, backend="eager")


# =============================================================================================== run()
def test_run_catches_a_planted_wrong_kernel(registry):
    register_kernel("triton", "layer_norm", _wrong_layer_norm())
    report = selftest.run(backends=["triton"], ops=["layer_norm"], device="cpu")
    assert isinstance(report, selftest.SelfTestReport)
    assert report.passed is False
    assert report.results and all(not r.passed for r in report.results)
    first = report.results[0]
    assert (first.op, first.backend) == ("layer_norm", "triton")
    assert "max|out - ref|" in first.detail and first.case
    assert "FAILED" in report.table() and "layer_norm" in report.table()


def test_run_passes_a_right_kernel_and_checks_every_dtype_forward_and_backward(registry):
    kernel = _right_layer_norm()
    register_kernel("triton", "layer_norm", kernel)
    report = selftest.run(backends="triton", ops="layer_norm", device="cpu", quick=False)
    assert report.passed, report.table()
    assert {r.dtype for r in report.results} == {"float32", "bfloat16", "float16"}
    assert {r.case.rsplit(" ", 1)[0] for r in report.results} == {s.label for s in DECLARATIONS["layer_norm"].selftest}
    assert len(kernel.calls) == len(report.results)
    assert json.loads(json.dumps(report.as_dict()))["passed"] is True


@pytest.mark.parametrize(
    "fault,match",
    [
        ("unwritten", "nan/inf"),
        ("grad", "grad "),
        ("raises", "raised RuntimeError: boom"),
        ("dtype", "dtype torch.float32 != expected"),
    ],
)
def test_run_catches_unwritten_outputs_wrong_gradients_exceptions_and_dtypes(registry, fault, match):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 2

    def kernel(x, weight, bias, eps=1e-6, *, residual=None):
        out = layer_norm_eager(x, weight, bias, eps, residual=residual)
        y = out[0] if residual is not None else out
        if fault == "unwritten":  # the last feature never written (torch.empty is NaN-poisoned while kernels run)
            written = y
            y = torch.empty_like(written)
            y[..., :-1] = written[..., :-1]
        elif fault == "grad":
            y = layer_norm_eager(
                WrongGrad.apply(x) if residual is None else x,
                weight,
                bias,
                eps,
                residual=WrongGrad.apply(residual) if residual is not None else None,
            )
            y = y[0] if residual is not None else y
        elif fault == "raises":
            raise RuntimeError("boom")
        elif fault == "dtype":
            y = y.float()
        return (y, out[1]) if residual is not None else y

    register_kernel("triton", "layer_norm", kernel)
    report = selftest.run(backends=["triton"], ops=["layer_norm"], device="cpu")
    assert not report.passed
    details = [r.detail for r in report.failures()]
    assert any(match in d for d in details), details


def test_run_skips_an_unavailable_backend_and_unsupported_cases(registry, monkeypatch):
    register_kernel(
        "triton",
        "layer_norm",
        _right_layer_norm(),
        backends.Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32})),
        lambda call: ["too wide"] if call.get("features", 0) > 40 else [],
    )
    report = selftest.run(backends=["triton"], ops=["layer_norm"], device="cpu", quick=False)
    assert report.passed and report.results
    assert {r.dtype for r in report.results} == {"float32"}
    assert report.skipped and all("too wide" in r.detail for r in report.skipped)
    monkeypatch.setattr(get_backend("triton"), "availability", lambda: ["not here"])
    report = selftest.run(backends=["triton"], ops=["layer_norm", "attention"], device="cpu")
    assert report.passed and not report.results
    assert [r.op for r in report.skipped] == ["layer_norm", "attention"]
    assert all("not here" in r.detail for r in report.skipped)


def test_run_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        selftest.run(backends=["tpu"])
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        selftest.run(ops="conv")


def test_every_op_has_awkward_shapes():
    assert set(DECLARATIONS) == set(backends.OPS)
    assert all(DECLARATIONS[op].selftest for op in backends.OPS)
    for op in backends.OPS:
        full = selftest.cases(op, "triton", "cpu", quick=False)
        quick = selftest.cases(op, "triton", "cpu", quick=True)
        assert 0 < len(quick) < len(full)
        assert {c.dtype for c in quick} == {c.dtype for c in full}
        labels = " ".join(c.label for c in full)
        assert "B3" in labels and any(n in labels for n in ("N1 ", "N2 ", "Nq1 "))
        assert any(n in labels for n in ("N61", "N60", "Nq61"))
        assert any(n in labels for n in ("N197", "N196", "Nk197"))


# =============================================================================================== the gate
def test_gate_excludes_a_failing_kernel_with_one_warning(registry, gate, capsys):
    wrong = _wrong_layer_norm()
    register_kernel("triton", "layer_norm", wrong)
    x, w, b = _ln_inputs()
    with pytest.warns(RuntimeWarning, match=r"triton kernel of layer_norm failed its self-test on cpu \(B3 ") as rec:
        y = fastvit.ops.layer_norm(x, w, b)
    assert len([r for r in rec if "self-test" in str(r.message)]) == 1
    assert torch.equal(y, _eager_ln(x, w, b))  # eager served the call
    assert "fastvit: checking the triton kernels of layer_norm on cpu" in capsys.readouterr().err
    n = len(wrong.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fastvit.ops.layer_norm(x, w, b), _eager_ln(x, w, b))
        assert torch.equal(fastvit.ops.layer_norm(x[:, :1], w, b), _eager_ln(x[:, :1], w, b))  # another call shape
    assert len(wrong.calls) == n  # neither re-checked nor used
    assert any(k[:2] == ("triton", "layer_norm") and "self-test failed" in v for k, v in backends.excluded().items())
    # on disk, for the next process
    (path,) = gate.glob("*.json")
    entry = json.loads(path.read_text())["verdicts"]["triton/layer_norm/cpu"]
    assert entry["passed"] is False and "B3" in entry["detail"]
    # python -m fastvit.info shows it
    status = info.collect()["backends"]["triton"]["selftest"]["layer_norm"]
    assert status["status"] == "excluded" and "self-test failed" in status["detail"]


def test_gate_trusts_a_passing_kernel_once_per_key(registry, gate, monkeypatch, capsys):
    right = _right_layer_norm()
    register_kernel("triton", "layer_norm", right)
    x, w, b = _ln_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select("layer_norm", {"device": torch.device("cpu"), "dtype": torch.float32})[0] == "triton"
    checked = len(right.calls)
    assert checked == len(selftest.cases("layer_norm", "triton", "cpu", quick=False))
    assert "checking the triton kernels of layer_norm" in capsys.readouterr().err
    fastvit.ops.layer_norm(x, w, b)
    assert len(right.calls) == checked + 1
    # a new process (nothing in memory) reads the verdict from disk: no second check, no notice
    backends.clear_cache()
    fastvit.ops.layer_norm(x, w, b)
    assert len(right.calls) == checked + 2
    assert "checking" not in capsys.readouterr().err
    assert info.collect()["backends"]["triton"]["selftest"]["layer_norm"]["status"] == "verified"
    # anything in the key changing (here the fastvit version) runs the check again, under a new file
    monkeypatch.setattr(selftest, "_VERSION", "99.0")
    monkeypatch.setattr(selftest, "_ENV", {})
    backends.clear_cache()
    fastvit.ops.layer_norm(x, w, b)
    assert len(right.calls) == 2 * checked + 3
    assert len(list(gate.glob("*.json"))) == 2


def test_cache_key_covers_what_can_change_the_answer():
    env = selftest.environment("cpu")
    for field in ("device", "triton_interpret", "cuda_runtime", "torch", "triton", "fastvit", "source", "extension"):
        assert field in env
    assert env["fastvit"] == fastvit.__version__
    key = selftest.cache_key(env)
    assert selftest.cache_key({**env, "torch": "0.0"}) != key
    assert selftest.cache_key({**env, "driver": "1"}) != key


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path / "c"))
    assert selftest.cache_dir() == str(tmp_path / "c" / "selftest")
    monkeypatch.delenv("FASTVIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert selftest.cache_dir() == str(tmp_path / "x" / "fastvit" / "selftest")


def test_a_verdict_about_another_kernel_is_not_trusted(registry, gate):
    register_kernel("triton", "layer_norm", _right_layer_norm())
    assert select("layer_norm", {"device": torch.device("cpu"), "dtype": torch.float32})[0] == "triton"
    wrong = _wrong_layer_norm()
    register_kernel("triton", "layer_norm", wrong)  # same backend, op and environment: a different kernel
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
        assert select("layer_norm", {"device": torch.device("cpu"), "dtype": torch.float32})[0] == "eager"
    assert wrong.calls


def test_selftest_0_trusts_without_checking(registry, gate, monkeypatch, capsys):
    monkeypatch.setenv("FASTVIT_SELFTEST", "0")
    wrong = _wrong_layer_norm()
    register_kernel("triton", "layer_norm", wrong)
    x, w, b = _ln_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fastvit.ops.layer_norm(x, w, b)
        fastvit.ops.layer_norm(x, w, b, backend="triton")  # nor a warning for the explicit choice
    assert torch.equal(y, _eager_ln(x, w, b) * 1.05)
    assert len(wrong.calls) == 2 and not list(gate.glob("*.json"))
    assert "checking" not in capsys.readouterr().err


def test_explicit_choice_skips_the_gate_but_warns_once_when_unverified(registry, gate):
    wrong = _wrong_layer_norm()
    register_kernel("triton", "layer_norm", wrong)
    x, w, b = _ln_inputs()
    with pytest.warns(
        RuntimeWarning,
        match=r"backend 'triton' was chosen explicitly for layer_norm on cpu, where its "
        r"kernel is unverified",
    ) as rec:
        y = fastvit.ops.layer_norm(x, w, b, backend="triton")
        with fastvit.use_backend("triton"):
            fastvit.ops.layer_norm(x[:, :1], w, b)  # another decision, same (backend, op, device): no second warning
    assert len([r for r in rec if "explicitly" in str(r.message)]) == 1
    assert torch.equal(y, _eager_ln(x, w, b) * 1.05)  # the user asked: the kernel ran, unchecked
    assert len(wrong.calls) == 2  # no self-test ran
    assert not list(gate.glob("*.json"))


def test_explicit_choice_of_a_verified_kernel_is_quiet(registry, gate):
    register_kernel("triton", "layer_norm", _right_layer_norm())
    assert select("layer_norm", {"device": torch.device("cpu"), "dtype": torch.float32})[0] == "triton"  # verifies
    x, w, b = _ln_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastvit.ops.layer_norm(x, w, b, backend="triton")


@pytest.mark.parametrize("context", ["autocast", "inference_mode", "no_grad"])
def test_the_check_is_isolated_from_the_callers_mode(registry, gate, context):
    """A first automatic use inside autocast / inference mode / no_grad checks the kernel as it is, not the mode."""
    from fastvit.families.linear import linear_gelu_eager

    register_kernel("triton", "linear_gelu", _counting(linear_gelu_eager))
    mode = {
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "inference_mode": torch.inference_mode,
        "no_grad": torch.no_grad,
    }[context]
    x, w = torch.randn(2, 5, 16), torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mode():
            fastvit.ops.linear_gelu(x, w, None)
            assert torch.is_autocast_enabled("cpu") is (context == "autocast")
    assert backends._VERDICTS[("triton", "linear_gelu", "cpu")][0] is True
    assert torch.get_float32_matmul_precision() == "highest"


def test_the_gate_ignores_eager_and_the_meta_device(registry, gate):
    wrong = _wrong_layer_norm()
    register_kernel("triton", "layer_norm", wrong, backends.Capabilities(devices=frozenset({"meta"})))
    x = torch.empty(2, 3, 8, device="meta")
    assert select("layer_norm", backends.Call(x.device, x.dtype, features=8))[0] == "triton"
    assert not wrong.calls
    name, fn = select("layer_norm", {"device": torch.device("cpu"), "dtype": torch.float32})
    assert name == "eager" and fn is get_backend("eager").kernels["layer_norm"].fn  # unwrapped: no host cost


# =============================================================================================== launch fallback
def _raising(message="out of resources: shared memory, Required: 262144, Hardware limit: 232448"):
    def kernel(x, weight, bias, eps=1e-6, *, residual=None):
        kernel.calls.append(1)
        raise RuntimeError(message)

    kernel.calls = []
    return kernel


def test_a_launch_that_raises_falls_back_to_the_next_backend(registry, monkeypatch):
    monkeypatch.setenv("FASTVIT_SELFTEST", "0")  # the launch guard alone (the gate would exclude it before launch)
    kernel = _raising()
    register_kernel("triton", "layer_norm", kernel)
    x, w, b = _ln_inputs()
    with pytest.warns(
        RuntimeWarning,
        match=r"the triton kernel of layer_norm raised at launch \(RuntimeError: out of "
        r"resources.*falling back to the eager backend",
    ) as rec:
        y = fastvit.ops.layer_norm(x, w, b)
        y2 = fastvit.ops.layer_norm(x, w, b)
    assert len([r for r in rec if "raised at launch" in str(r.message)]) == 1
    assert torch.equal(y, _eager_ln(x, w, b)) and torch.equal(y2, y)
    assert len(kernel.calls) == 1  # the decision was replaced: the second call went straight to eager
    assert select("layer_norm", backends.Call(x.device, x.dtype, features=24))[0] == "eager"
    (why,) = [v for k, v in backends.excluded().items() if k[:2] == ("triton", "layer_norm")]
    assert "kernel launch raised" in why and "out of resources" in why
    # another call shape still tries the kernel (the failure may be specific to one size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastvit.ops.layer_norm(x[..., :16], w[:16], b[:16])
    assert len(kernel.calls) == 2
    assert "out of resources" in info.collect()["backends"]["triton"]["selftest"]["layer_norm"]["detail"]


def test_a_launch_that_raises_under_an_explicit_choice_names_the_backend(registry, monkeypatch):
    monkeypatch.setenv("FASTVIT_SELFTEST", "0")
    register_kernel("triton", "layer_norm", _raising("missing symbol fastvit_ln_fwd"))
    x, w, b = _ln_inputs()
    with pytest.raises(
        KernelLaunchError,
        match=r"fastvit.ops.layer_norm: the 'triton' backend, chosen explicitly, "
        r"failed: RuntimeError: missing symbol fastvit_ln_fwd",
    ) as exc:
        fastvit.ops.layer_norm(x, w, b, backend="triton")
    assert isinstance(exc.value.__cause__, RuntimeError)
    with fastvit.use_backend("triton"), pytest.raises(KernelLaunchError, match="'triton'"):
        fastvit.ops.layer_norm(x, w, b)


def test_out_of_memory_is_not_a_launch_failure(registry, monkeypatch):
    monkeypatch.setenv("FASTVIT_SELFTEST", "0")

    def oom(x, weight, bias, eps=1e-6, *, residual=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    register_kernel("triton", "layer_norm", oom)
    x, w, b = _ln_inputs()
    with pytest.raises(torch.OutOfMemoryError):
        fastvit.ops.layer_norm(x, w, b)


# =============================================================================================== torch.compile
def test_compile_never_runs_the_selftest_and_uses_only_cached_verdicts(registry, gate):
    right = _right_layer_norm()
    register_kernel("triton", "layer_norm", right)
    x, w, b = _ln_inputs()
    chosen = []

    def fn(x):
        chosen.append(select("layer_norm", backends.Call(x.device, x.dtype, features=x.shape[-1]))[0])
        return fastvit.ops.layer_norm(x, w, b)

    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="self-test does not run while torch.compile traces"):
        y = torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert torch.equal(y, _eager_ln(x, w, b))
    assert chosen == ["eager"] and not right.calls and not list(gate.glob("*.json"))
    # verified outside the compiler (the model once uncompiled), the next trace uses the kernel
    assert select("layer_norm", backends.Call(x.device, x.dtype, features=24))[0] == "triton"
    torch._dynamo.reset()
    chosen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert chosen == ["triton"]
    torch._dynamo.reset()


# =============================================================================================== command line
def test_command_line_in_the_interpreter_end_to_end(tmp_path):
    """``python -m fastvit.selftest --backend triton`` with the real Triton kernels in the interpreter (CI's check)."""
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTVIT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "fastvit.selftest", "--backend", "triton", "--json", str(out), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["device"] == "cpu"
    assert {r["op"] for r in report["results"]} == set(backends.OPS)
    assert {r["dtype"] for r in report["results"]} == {"float32", "bfloat16", "float16"}
    assert all(r["backend"] == "triton" and r["passed"] for r in report["results"])
    assert report["environment"]["triton_interpret"] is True
    assert "PASSED" in proc.stdout and "mae_loss" in proc.stdout


def test_command_line_exit_status_and_errors(tmp_path, registry):
    env = {**os.environ, "FASTVIT_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fastvit.selftest", "--ops", "conv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and "unknown op 'conv'" in proc.stderr
    # in process: a planted fault makes main() return 1
    register_kernel("triton", "layer_norm", _wrong_layer_norm())
    assert (
        selftest.main(
            ["--backend", "triton", "--ops", "layer_norm", "--no-progress", "--json", str(tmp_path / "r.json")]
        )
        == 1
    )
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_info_subprocess_shows_a_failed_verdict(tmp_path, monkeypatch):
    """A verdict on disk for the real triton kernel (written here) is what a fresh ``python -m fastvit.info`` shows."""
    if get_backend("triton").unavailable_reasons():
        pytest.skip("triton cannot run in this process")
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_SELFTEST", "1")
    env = dict(os.environ)
    # Written by a fresh process too: this one may hold a JIT-built fastvit._C (tests/test_cuda_extension.py), whose
    # build hash is part of the cache key, and a fresh process does not load that build.
    record = (
        "from fastvit import selftest; "
        "bad = selftest.CaseResult('layer_norm', 'triton', 'B3 N61 C72 +residual float32', False, 'planted failure'); "
        "selftest.GATE.record('triton', 'layer_norm', 'cpu', [bad])"
    )
    subprocess.run([sys.executable, "-c", record], cwd=tmp_path, check=True, timeout=300, env=env)
    proc = subprocess.run(
        [sys.executable, "-m", "fastvit.info"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("layer_norm"))
    assert "EXCLUDED from automatic dispatch: self-test failed at B3 N61 C72 +residual float32" in line


def test_run_checks_packed_attention_and_catches_attention_across_sequences(registry):
    """The packed (cu_seqlens) cases: a kernel that attends across the packed sequences (one sequence of all T
    tokens) fails them and passes the dense ones; one that respects the offsets passes all."""
    from fastvit.families.attention import attention_eager

    def across(qkv, num_heads, *, scale=None, dropout_p=0.0, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is None:
            return attention_eager(qkv, num_heads, scale=scale)
        return attention_eager(qkv[None], num_heads, scale=scale)[0]

    caps = Capabilities(devices=None, dtypes=frozenset({torch.float32}), varlen=True)
    register_kernel("triton", "attention", across, caps)
    report = selftest.run(backends="triton", ops="attention", device="cpu", quick=False)
    packed = [r for r in report.results if r.case.startswith("packed")]
    dense = [r for r in report.results if not r.case.startswith("packed")]
    assert packed and dense
    assert all(r.passed for r in dense), report.table()
    assert not any(r.passed for r in packed if "(61, 0, 1, 17)" in r.case or "(197, 50)" in r.case), report.table()
    register_kernel("triton", "attention", _counting(attention_eager), caps)
    assert selftest.run(backends="triton", ops="attention", device="cpu", quick=False).passed
