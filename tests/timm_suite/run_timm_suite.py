"""Run timm's own model tests (``tests/test_models.py`` of the installed timm release) with every model patched by
:func:`fastvit.patch_timm_`, and report each test that passes on plain timm but not patched.

timm's tests are not part of its wheel; they are in its source distribution on PyPI, which this script downloads
once per timm version (``pip download timm==<version> --no-binary :all: --no-deps``) into
``$FASTVIT_TIMM_TESTS`` (default ``~/.cache/fastvit/timm-tests/<version>``). The patched run loads
``fastvit_patch_plugin`` (next to this file), which wraps ``timm.create_model``; every test that fails there is run
again on plain timm, and counts against fastvit only if it passes there.

Usage (from the repository root, in the test environment)::

    python tests/timm_suite/run_timm_suite.py                      # the CI selection (what tests/test_timm_suite.py runs)
    python tests/timm_suite/run_timm_suite.py -k "vit_ or deit_ or naflexvit or eva" -n 2   # more ViT families (long)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

HERE = Path(__file__).resolve().parent

#: The CI selection: timm's tiny test ViTs and vit_tiny through every generic model test (forward, backward, fx,
#: TorchScript, default cfgs, intermediates, pruning), plus the NaFlexVit tests that run the packed NaFlex path.
#: Pretrained downloads, the relpos / encoder-classifier families (not patched) and the slowest pruning cases are out.
CI_SELECTION = (
    "(test_vit or vit_tiny_patch16_224 or test_naflexvit_forward_intermediates or test_naflexvit_key_only "
    "or test_naflexvit_patch_interpolation) and not load_pretrained and not relpos and not model_inference "
    "and not classifier and not (prune_intermediate_layers_contract and (vit_tiny or test_vit2))"
)

#: Tests known to differ under patch_timm_, with the reason; each must still fail patched (so a fix is noticed).
KNOWN_DIFFERENCES = {
    "test_naflexvit_forward_intermediates_dict_input": (
        "padding rows: patched forward_features runs the NaFlex blocks on packed tokens and returns norm(0) in rows "
        "where patch_valid is False; timm's masked forward_intermediates returns the values its masked attention "
        "leaves there (no pooling reads them); valid rows agree"
    ),
}


class SuiteResult(NamedTuple):
    status: Dict[str, str]  # test id -> 'passed' / 'failed' / 'skipped'
    patched_modules: int  # modules the plugin saw patched (0 on the plain run)


def timm_tests_dir() -> Path:
    """The folder holding timm's ``test_models.py`` for the installed timm version (downloaded on first use).

    Raises:
        RuntimeError: the source distribution could not be downloaded or has no ``tests/test_models.py``.
    """
    import timm

    version = timm.__version__
    root = Path(os.environ.get("FASTVIT_TIMM_TESTS", Path.home() / ".cache" / "fastvit" / "timm-tests" / version))
    if (root / "test_models.py").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps", "--no-binary", ":all:"]
        proc = subprocess.run(cmd + ["-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if proc.returncode or not sdists:
            raise RuntimeError(f"could not download timm {version}'s source distribution: {proc.stderr[-2000:]}")
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (root / parts[2]).write_bytes(tar.extractfile(member).read())
    if not (root / "test_models.py").exists():
        raise RuntimeError(f"timm {version}'s source distribution has no tests/test_models.py")
    return root


def run_suite(select: Optional[str], patched: bool, jobs: int = 1, ids: Optional[List[str]] = None) -> SuiteResult:
    """Run timm's ``test_models.py`` (``-k select``, or exactly the test ``ids``) in a subprocess, every created
    model patched when ``patched``; returns each test's status from the JUnit report."""
    tests = timm_tests_dir()
    with tempfile.TemporaryDirectory() as tmp:
        xml, count = Path(tmp) / "report.xml", Path(tmp) / "count"
        env = dict(os.environ, FASTVIT_PATCH_TIMM="1" if patched else "0", FASTVIT_PATCH_COUNT_FILE=str(count))
        env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fastvit_patch_plugin"]
        cmd += ["-o", "addopts=", "-W", "ignore", f"--junitxml={xml}", "--rootdir", str(tests)]
        if jobs > 1:
            cmd += ["-n", str(jobs)]
        cmd += [f"test_models.py::{i}" for i in ids] if ids else ["test_models.py", "-k", select]
        proc = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True)
        if not xml.exists():
            raise RuntimeError(f"timm's test run produced no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        status = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            tags = {child.tag for child in case}
            status[case.get("name")] = (
                "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
            )
        n = sum(int(line) for line in count.read_text().split()) if count.exists() else 0
    return SuiteResult(status, n)


def compare(select: str = CI_SELECTION, jobs: int = 1) -> dict:
    """The patched run, and plain-timm reruns of what failed there.

    Returns:
        ``{"patched": SuiteResult, "plain_reruns": {id: status}, "regressions": [ids that pass plain but not
        patched and are not known], "known": [known differences seen], "known_fixed": [known ones that passed]}``.
    """
    patched = run_suite(select, patched=True, jobs=jobs)
    failed = sorted(i for i, s in patched.status.items() if s == "failed")
    plain = run_suite(None, patched=False, jobs=jobs, ids=failed).status if failed else {}
    regressions = [i for i in failed if plain.get(i) == "passed" and i not in KNOWN_DIFFERENCES]
    known = [i for i in failed if i in KNOWN_DIFFERENCES]
    known_fixed = [i for i in KNOWN_DIFFERENCES if patched.status.get(i) == "passed"]
    return dict(patched=patched, plain_reruns=plain, regressions=regressions, known=known, known_fixed=known_fixed)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default=CI_SELECTION, help="pytest -k selection of timm's test_models.py")
    parser.add_argument("-n", type=int, default=1, help="pytest-xdist workers")
    args = parser.parse_args(argv)
    out = compare(args.k, args.n)
    counts: Dict[str, int] = {}
    for s in out["patched"].status.values():
        counts[s] = counts.get(s, 0) + 1
    print(f"patched: {counts} ({out['patched'].patched_modules} modules patched)")
    for i, s in out["plain_reruns"].items():
        tag = "KNOWN" if i in KNOWN_DIFFERENCES else "REGRESSION" if s == "passed" else "fails on timm too"
        print(f"  {i}: plain timm {s} -> {tag}")
    return 1 if out["regressions"] or out["known_fixed"] else 0


if __name__ == "__main__":
    sys.exit(main())
