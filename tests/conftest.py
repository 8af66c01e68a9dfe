"""Shared pytest setup for fastvit's tests.

* Runs Triton kernels in the interpreter (``TRITON_INTERPRET=1``) when there is no CUDA device.
* ``seed`` / ``generator`` fixtures: a fresh, reproducible seed per test (derived from the test id, so two
  tests never share inputs and a failure replays with the same numbers; ``FASTVIT_TEST_SEED=<int>`` shifts all
  seeds to draw a different sample).
* ``device`` fixture: ``cuda`` when available, else ``cpu``.
* ``FASTVIT_SELFTEST=0`` (the dispatch gate trusts kernels unchecked; tests/test_selftest.py opts in) and
  ``FASTVIT_CACHE_DIR`` in a temporary directory, unless the caller's environment sets them.
* ``@pytest.mark.gpu`` tests are skipped, with the reason, when no CUDA device is present.
"""

from __future__ import annotations

import os
import sys
import zlib

# --- Order matters here --------------------------------------------------------------------------------
# Triton decides between compiling a kernel for a GPU and interpreting it on the CPU from TRITON_INTERPRET,
# read when a function is decorated with @triton.jit -- i.e. when a module of fastvit.kernels is imported.
# A kernel decorated before the variable is set stays a GPU kernel and fails on this machine, so the variable
# must be in the environment before anything imports triton (every kernel module imports triton first, so
# "triton not yet imported" guarantees "no kernel decorated yet"). We need torch first to ask whether CUDA is
# present; importing torch does not import triton (torch imports it lazily, for inductor and triton_op),
# which the check below verifies: should a future torch or a pytest plugin import triton eagerly, we still
# catch the case that matters -- a kernel module already loaded -- and fail loudly instead of silently.
import torch  # noqa: E402

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        loaded = sorted(m for m in sys.modules if m.startswith("fastvit.kernels."))
        if loaded:
            raise RuntimeError(
                f"{loaded} were imported before tests/conftest.py could set TRITON_INTERPRET=1, so their kernels "
                "were not built for the interpreter; export TRITON_INTERPRET=1 before running pytest"
            )
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The self-test gate of automatic dispatch (fastvit.selftest) would check each kernel backend on its first automatic
# use -- seconds per op on a GPU, and on the fake kernels tests/test_backends.py registers it would exclude them. The
# suite tests the kernels itself, so it trusts them unchecked (FASTVIT_SELFTEST=0); tests/test_selftest.py opts back
# in per test. Any verdict a test does write goes to a throwaway directory, never the user's ~/.cache (subprocesses
# inherit both settings).
os.environ.setdefault("FASTVIT_SELFTEST", "0")
if "FASTVIT_CACHE_DIR" not in os.environ:
    import tempfile  # noqa: E402

    os.environ["FASTVIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastvit-test-cache-")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Without a GPU the tests run on a small, shared CPU: intra-op threads on test-sized tensors only add
# synchronisation (measured on the 2-core dev box: tests/test_ops.py 31 s wall / 22 s CPU with torch's default
# threads, 16 s / 9 s with one). FASTVIT_TEST_THREADS=<n> overrides; with a GPU, torch's default stands.
if not HAS_CUDA or "FASTVIT_TEST_THREADS" in os.environ:
    torch.set_num_threads(max(1, int(os.environ.get("FASTVIT_TEST_THREADS", "1"))))


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the marker is known whatever config file pytest picks up.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with a reason when there is none)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A per-test seed: stable for one test id, different between tests; also seeds torch's global RNG."""
    base = int(os.environ.get("FASTVIT_TEST_SEED", "0"))
    value = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31 - 1)
    request.node.stash[_SEED_KEY] = value
    torch.manual_seed(value)
    return value


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`seed`: draw on the CPU, then move (same numbers on any device)."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SEED_KEY in item.stash:
        report.sections.append(("fastvit seed", f"seed={item.stash[_SEED_KEY]} (FASTVIT_TEST_SEED shifts it)"))


@pytest.fixture
def poisoned_empty():
    """``torch.empty`` returns NaN-filled memory for the duration of the test, so a kernel that leaves an output
    element unwritten fails the oracle (which rejects NaN). Kernel test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("poisoned_empty")``."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture(autouse=True)
def _fresh_dispatch_cache():
    """Tests monkeypatch what backend availability depends on (``torch.cuda.is_available``, device properties), which
    fastvit's dispatch cache cannot see: start and end every test with an empty cache."""
    from fastvit.backends import clear_cache

    clear_cache()
    yield
    clear_cache()
