"""timm's own model tests, every created model patched by ``fastvit.patch_timm_``, pass wherever plain timm passes.

Runs ``tests/timm_suite/run_timm_suite.py``'s CI selection (timm's tiny test ViTs and ``vit_tiny_patch16_224`` through forward,
backward, fx, fx + TorchScript, TorchScript, default cfgs, intermediates and pruning; the NaFlexVit tests of the
packed NaFlex path), in a subprocess, against timm's ``tests/test_models.py`` of the installed timm release. A test
that fails patched is rerun on plain timm; it counts only if it passes there. The one known difference (NaFlex
padding rows) is listed in ``run_timm_suite.KNOWN_DIFFERENCES`` with its reason and must still fail, so a fix is noticed.
The wider run over more ViT families is a command in ``tests/timm_suite/run_timm_suite.py``'s docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
sys.path.insert(0, str(Path(__file__).resolve().parent / "timm_suite"))
import run_timm_suite as timm_suite  # noqa: E402

pytestmark = pytest.mark.slow


def test_timm_model_tests_pass_patched():
    out = timm_suite.compare(jobs=2)
    status = out["patched"].status
    passed = [i for i, s in status.items() if s == "passed"]
    assert len(passed) >= 40, f"too few of timm's tests ran: {status}"
    # the plugin really patched the models (attention, MLP, block, norm and patch-embed modules)
    assert out["patched"].patched_modules > 100
    assert any(i.startswith("test_model_forward_fx[") for i in passed)
    assert any(i.startswith("test_model_forward_torchscript[") for i in passed)
    assert not out["regressions"], f"pass on plain timm, fail patched: {out['regressions']}"
    assert not out["known_fixed"], f"known differences that now pass; drop them from KNOWN_DIFFERENCES: {out}"
