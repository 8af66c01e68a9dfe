"""``python -m fastvit.kernels.check``: every Triton kernel compiles for sm_80 and sm_90 without a GPU.

Runs the check in a subprocess with TRITON_INTERPRET removed from the environment (kernels decorated under the
interpreter cannot be compiled). Takes a few minutes on two cores, hence ``slow`` -- but it stays in CI: it is
the only check that the kernels build for real GPUs, fit their shared memory and do not spill heavily.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_compile_check_sm80_sm90(tmp_path):
    from fastvit.kernels.check import ALL_KERNELS, SHARED_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "check.json"
    res = subprocess.run(
        [sys.executable, "-m", "fastvit.kernels.check", "--arch", "80", "90", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, f"compile check failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    for arch in (80, 90):
        got = {r["kernel"] for r in rows if r["arch"] == arch and r["ok"]}
        assert got == set(ALL_KERNELS), f"sm_{arch}: kernels missing from the table: {set(ALL_KERNELS) - got}"
        for r in rows:
            if r["arch"] == arch:
                assert r["shared"] <= SHARED_LIMIT[arch]
                assert r["registers"] is not None and r["registers"] <= 255
    # every autotune config of every attention kernel appears once per arch
    from fastvit.kernels import attention as A

    for kernel, configs in (
        ("attn_fwd", A.FWD_CONFIGS),
        ("attn_bwd_dkdv", A.BWD_DKDV_CONFIGS),
        ("attn_bwd_dq", A.BWD_DQ_CONFIGS),
    ):
        labels = {r["config"] for r in rows if r["kernel"] == kernel and r["arch"] == 90}
        for c in configs:
            assert f"BM{c.kwargs['BLOCK_M']}/BN{c.kwargs['BLOCK_N']}/w{c.num_warps}/s{c.num_stages}" in labels
    # every attention compile has its SASS main loop read (tensor-core or exp2 loop) and an occupancy
    from fastvit.kernels.check import LOOP_KERNELS

    attn = [r for r in rows if r["kernel"] in LOOP_KERNELS]
    assert attn and all(r["loop"]["total"] > 0 and r["ctas_per_sm"] >= 1 for r in attn)
    assert all(r["loop"]["mma"] > 0 for r in attn if r["dtype"] != "fp32" and r["arch"] == 90)
    # the table is printed
    assert "attn_fwd" in res.stdout and "ln_bwd" in res.stdout


def test_check_reexecs_without_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 the check hands itself to a subprocess without it (cheap: --help only)."""
    from fastvit.kernels import check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert check._needs_subprocess()
    env = dict(os.environ)
    res = subprocess.run(
        [sys.executable, "-m", "fastvit.kernels.check", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "--arch" in res.stdout
