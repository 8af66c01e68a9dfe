"""Run test scenarios in two (or more) CPU processes on a gloo process group, once per test module.

Used by ``test_ddp.py`` and ``test_distributed_tree.py``: each spawns its workers once (a module-scoped fixture),
every rank runs every scenario in order and saves what it saw to ``<out_dir>/<scenario>_rank<r>.pt``; the tests
then load and compare. A scenario that raises is saved as ``{"error_trace": traceback}`` (both ranks fail alike, so
no collective hangs) and :func:`load` turns it into a test failure.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from typing import Callable, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, world: int, out_dir: str, scenarios: Sequence[str], run: Callable) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        for scenario in scenarios:
            try:
                result = run(scenario, rank, out_dir)
            except Exception:  # saved for the test to report
                result = {"error_trace": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(run: Callable, scenarios: Sequence[str], out_dir: str, world: int = 2, timeout_s: float = 240) -> str:
    """Run ``run(scenario, rank, out_dir)`` for every scenario on ``world`` gloo ranks (``run`` must be a module-level
    function, so the spawned processes can import it); fail the test after ``timeout_s``. Returns ``out_dir``."""
    ctx = mp.spawn(_worker, args=(_free_port(), world, out_dir, tuple(scenarios), run), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process gloo workers did not finish within {timeout_s:.0f} s")
    return out_dir


def load(out_dir: str, scenario: str, world: int = 2) -> list:
    """Every rank's saved result of ``scenario``; a scenario that raised fails the test with its traceback."""
    out = [torch.load(os.path.join(out_dir, f"{scenario}_rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(out):
        if isinstance(res, dict) and "error_trace" in res:
            pytest.fail(f"{scenario} failed on rank {r}:\n{res['error_trace']}")
    return out
