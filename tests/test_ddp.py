"""Distributed training on the CPU (gloo): DDP and FSDP2 give the single-process gradients.

One ``torch.multiprocessing.spawn`` of two processes (module-scoped fixture, to pay the start-up once) runs three
scenarios on a fixed batch of 8 split 4 + 4 over the ranks, and saves what each rank sees:

* ``ddp_vit``: a tiny :class:`fastvit.nn.VisionTransformer` under ``DistributedDataParallel``, one backward, one
  SGD step;
* ``ddp_mae``: a tiny :class:`fastvit.nn.mae.MaskedAutoencoderViT` under DDP with fixed masking noise;
* ``fsdp_vit``: the ViT under FSDP2 (``torch.distributed.fsdp.fully_shard``, per block and at the root).

The tests compare with one process on the whole batch: DDP's and FSDP's all-reduce / reduce-scatter average the
per-rank gradients, and with equal halves and mean losses that average is the whole-batch gradient. Dropout and
drop-path are zero and the masks fixed, so everything is deterministic; tolerances are fp32 summation-order
noise. Each test also checks that a single rank's *local* gradient differs from the whole-batch one, so a
missing all-reduce could not pass.
"""

from __future__ import annotations

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytestmark = pytest.mark.slow

WORLD = 2
BATCH = 8
LR = 0.1
SCENARIOS = ("ddp_vit", "ddp_mae", "fsdp_vit")


# ------------------------------------------------------------------------------------------------ models, data
def _vit() -> torch.nn.Module:
    from fastvit.nn import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=8,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        global_pool="avg",
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
    )


def _mae() -> torch.nn.Module:
    from fastvit.nn.mae import MaskedAutoencoderViT

    torch.manual_seed(0)
    return MaskedAutoencoderViT(
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        mlp_ratio=2.0,
    )


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "x": torch.randn(BATCH, 1, 8, 8, generator=g),
        "y": torch.randint(0, 10, (BATCH,), generator=g),
        "noise": torch.rand(BATCH, 16, generator=g),
    }


def _loss(kind: str, model: torch.nn.Module, data: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
    """The mean loss of ``model`` on ``data[rows]``."""
    if kind.endswith("mae"):
        loss, _, _ = model(data["x"][rows], mask_ratio=0.75, noise=data["noise"][rows])
        return loss
    return F.cross_entropy(model(data["x"][rows]), data["y"][rows])


def _reference(kind: str, rows: slice = slice(None)) -> dict[str, object]:
    """One process: loss, gradients and parameters after one SGD step, on ``rows`` of the batch."""
    torch.set_num_threads(1)
    model = _mae() if kind.endswith("mae") else _vit()
    loss = _loss(kind, model, _data(), rows)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "params": params}


# ------------------------------------------------------------------------------------------------ workers
def _run_scenario(kind: str, rank: int, out_dir: str) -> dict[str, object]:
    data = _data()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    if kind.startswith("ddp"):
        model = _mae() if kind.endswith("mae") else _vit()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        loss = _loss(kind, wrapped, data, rows)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.optim.SGD(model.parameters(), lr=LR).step()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        model = _vit()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        if not all(isinstance(p, DTensor) for p in model.parameters()):
            raise AssertionError("fully_shard left parameters that are not DTensors")
        loss = _loss(kind, model, data, rows)
        loss.backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.optim.SGD(model.parameters(), lr=LR).step()
        params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    return {"local_loss": loss.detach(), "loss": mean_loss, "grads": grads, "params": params}


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> str:
    """Spawn the two gloo workers once; return the folder holding ``<scenario>_rank<r>.pt``."""
    return gloo.spawn(_run_scenario, SCENARIOS, str(tmp_path_factory.mktemp("ddp")), WORLD)


def _load(out_dir: str, kind: str) -> list[dict]:
    return gloo.load(out_dir, kind, WORLD)


def _assert_tree_close(actual: dict, expected: dict, what: str, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), f"{what}: different parameter sets"
    for name, exp in expected.items():
        scale = exp.abs().max().item()
        torch.testing.assert_close(
            actual[name], exp, rtol=rel, atol=rel * max(scale, 1e-12), msg=lambda m, name=name: f"{what} {name}: {m}"
        )


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", SCENARIOS)
def test_distributed_matches_single_process(distributed_results, kind):
    """Averaged gradients, loss and the parameters after one SGD step equal the one-process whole-batch run."""
    ranks = _load(distributed_results, kind)
    ref = _reference(kind)

    assert len(ref["grads"]) > 5 and all(g.abs().sum() > 0 for g in ref["grads"].values())
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-5, atol=1e-7)
        _assert_tree_close(res["grads"], ref["grads"], f"{kind} rank {r} grad")
        _assert_tree_close(res["params"], ref["params"], f"{kind} rank {r} param after SGD step")
    # the ranks hold bit-identical parameters after the step (DDP / FSDP keep replicas in sync)
    for name, p0 in ranks[0]["params"].items():
        assert torch.equal(p0, ranks[1]["params"][name]), f"{kind}: {name} differs between ranks after the step"

    # Guard: the ranks saw different data (their local losses differ), and one rank's local gradient is far from
    # the whole-batch one -- so the agreement above needed the cross-rank averaging.
    assert not torch.allclose(ranks[0]["local_loss"], ranks[1]["local_loss"], rtol=1e-3)
    local = _reference(kind, slice(0, BATCH // WORLD))
    diff = max((local["grads"][n] - g).abs().max().item() / g.abs().max().item() for n, g in ref["grads"].items())
    assert diff > 1e-2, f"{kind}: a half-batch gradient equals the whole-batch one; the test could not fail"
