"""Distributed training of patched timm models and fastvit models on the CPU (gloo): the module tree stays usable.

fastvit's fused forwards read a submodule's parameters only while nothing is attached to it; FSDP2 applied below
the block, tensor parallelism (DTensor parameters) or a hook makes them call the submodule as a module instead.
These tests check that every way of wrapping a model gives the numbers of an independent single-process reference:
a plain, unpatched timm model with the same weights on the whole batch.

One ``torch.multiprocessing.spawn`` of two processes (module-scoped fixture, to pay the start-up once) runs all
scenarios and saves what each rank sees; the tests compare. A fixed batch of 8 is split 4 + 4 over the ranks for
data parallelism (DDP, FSDP2), and given whole to both ranks for tensor parallelism. Scenarios:

* ``ddp_patch_before`` / ``ddp_patch_after``: ``patch_timm_`` then ``DistributedDataParallel``, and
  ``patch_timm_(ddp_model)`` after wrapping;
* ``ddp_then_compile`` / ``compile_then_ddp``: the patched model, ``torch.compile(DDP(model))`` and
  ``DDP(torch.compile(model))`` (``backend="aot_eager"``: Dynamo and AOTAutograd, no C++ build);
* ``fsdp_block_{timm,fastvit}``: FSDP2 ``fully_shard`` per block, then the root (patched timm; ``fastvit.from_timm``);
* ``fsdp_sub_{timm,fastvit}``: FSDP2 below the block: ``patch_embed``, each ``blk.attn`` and ``blk.mlp``, then each
  block, then the root;
* ``bf16_{plain,patched,fastvit}``: per-block FSDP2 under ``MixedPrecisionPolicy(bf16 params, fp32 reduce)``;
* ``dcp``: ``torch.distributed.checkpoint`` save of a sharded patched model, load into another with other weights;
* ``tp_mlp_{timm,fastvit}``: tensor parallelism on every block's MLP (fc1 colwise, fc2 rowwise) on a 1-D mesh;
* ``tp_attn_{timm,fastvit}``: the same, plus the attention (qkv colwise, proj rowwise) with head-aligned qkv rows
  (:func:`_qkv_head_groups`) and ``num_heads`` per rank;
* ``dtensor_index``: DTensor ``ids_keep`` / ``ids_restore`` to :mod:`fastvit.ops` raise ``TypeError``;
* ``patch_after_fsdp``: ``patch_timm_`` on a model ``fully_shard`` already wrapped raises ``RuntimeError``.

Each forward also counts the :mod:`fastvit.ops` calls, so a test can tell the fused path (``linear_residual`` per
branch) from the modular one, and cannot pass because everything silently fell back to timm. Dropout and drop path
are zero, so everything is deterministic; fp32 tolerances are summation-order noise. Data-parallel tests also check
that one rank's local gradient differs from the whole-batch one, so a missing all-reduce could not pass.
"""

from __future__ import annotations

import contextlib
import os

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from oracle import BLOCK_OPS
from torch.distributed.tensor import Shard

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.slow

WORLD = 2
BATCH = 8
NUM_CLASSES = 5
DEPTH = 2
ROWS = [slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD) for r in range(WORLD)]
ALL = slice(None)
RTOL, ATOL = 1e-4, 1e-5  # fp32
BF16_REL = 2e-2  # bf16 patched vs bf16 unpatched, relative to each tensor's largest entry

SCENARIOS = (
    "ddp_patch_before",
    "ddp_patch_after",
    "ddp_then_compile",
    "compile_then_ddp",
    "fsdp_block_timm",
    "fsdp_block_fastvit",
    "fsdp_sub_timm",
    "fsdp_sub_fastvit",
    "bf16_plain",
    "bf16_patched",
    "bf16_fastvit",
    "dcp",
    "tp_mlp_timm",
    "tp_mlp_fastvit",
    "tp_attn_timm",
    "tp_attn_fastvit",
    "dtensor_index",
    "patch_after_fsdp",
)
COUNTED_OPS = BLOCK_OPS


# ------------------------------------------------------------------------------------------------ models, data
def _timm_vit(seed: int = 0) -> torch.nn.Module:
    """A tiny plain timm ViT (cls token, LayerScale) with non-trivial norms, LayerScale and biases."""
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
        num_classes=NUM_CLASSES,
        init_values=1e-2,
    )
    with torch.no_grad():  # timm inits LayerNorm to (1, 0) and biases to 0: perturb so their gradients matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    """``kind``: 'plain' (unpatched timm), 'timm' (timm after ``fastvit.patch_timm_``), 'fastvit' (``from_timm``)."""
    import fastvit

    m = _timm_vit(seed)
    if kind == "timm":
        fastvit.patch_timm_(m)
    elif kind == "fastvit":
        m = fastvit.from_timm(m)
    else:
        assert kind == "plain", kind
    return m


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {"x": torch.randn(BATCH, 3, 16, 16, generator=g), "y": torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)}


def _reference(rows: slice = ALL) -> dict[str, object]:
    """One process, the plain timm model: logits, mean loss and every gradient on ``rows`` of the batch."""
    model = _model("plain")
    data = _data()
    logits = model(data["x"][rows])
    loss = F.cross_entropy(logits, data["y"][rows])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}


@contextlib.contextmanager
def _count_ops():
    """Count calls of the :mod:`fastvit.ops` functions a ViT uses (op name -> calls) inside the ``with``."""
    import fastvit.ops

    calls = dict.fromkeys(COUNTED_OPS, 0)
    saved = {name: getattr(fastvit.ops, name) for name in COUNTED_OPS}

    def spy(name, orig):
        def f(*a, **k):
            calls[name] += 1
            return orig(*a, **k)

        return f

    for name, orig in saved.items():
        setattr(fastvit.ops, name, spy(name, orig))
    try:
        yield calls
    finally:
        for name, orig in saved.items():
            setattr(fastvit.ops, name, orig)


# ------------------------------------------------------------------------------------------------ workers
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _train_step(
    model: torch.nn.Module, params_of: torch.nn.Module, rows: slice, data_parallel: bool, count: bool = True
) -> dict:
    """One forward (counting fastvit.ops calls unless ``count`` is False) and backward on ``rows``; full gradients
    of ``params_of``."""
    data = _data()
    with _count_ops() if count else contextlib.nullcontext({}) as calls:
        logits = model(data["x"][rows])
    loss = F.cross_entropy(logits.float(), data["y"][rows])
    loss.backward()
    out = {
        "logits_dtype": logits.dtype,
        "local_loss": loss.detach().clone(),
        "grads": {n: _full(p.grad) for n, p in params_of.named_parameters()},
        "calls": dict(calls),
        "report": _report(params_of),
    }
    if data_parallel:  # each rank saw its half: gather the logits, average the losses
        out["logits"] = _gather_rows(logits.detach().float())
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        out["loss"] = mean_loss / WORLD
    else:
        out["logits"], out["loss"] = logits.detach().float(), loss.detach()
    return out


def _report(model: torch.nn.Module) -> list:
    from fastvit.integrations.timm import patch_report

    return [tuple(r) for r in patch_report(model)]  # (name, class, status, reason); meaningful for timm models


def _shard(model: torch.nn.Module, below_block: bool = False, mp_policy=None) -> None:
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    if below_block:
        fully_shard(model.patch_embed, **kw)
    for blk in model.blocks:
        if below_block:
            fully_shard(blk.attn, **kw)
            fully_shard(blk.mlp, **kw)
        fully_shard(blk, **kw)
    fully_shard(model, **kw)


def _run_ddp(scenario: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastvit

    if scenario == "ddp_patch_before":
        model = _model("timm")
        wrapped = DDP(model)
    elif scenario == "ddp_then_compile":
        model = _model("timm")
        wrapped = torch.compile(DDP(model), backend="aot_eager")
    elif scenario == "compile_then_ddp":
        model = _model("timm")
        wrapped = DDP(torch.compile(model, backend="aot_eager"))
    else:
        model = _model("plain")
        wrapped = fastvit.patch_timm_(DDP(model))
        assert type(model.blocks[0]).__name__ == "FastvitBlock", type(model.blocks[0])
    if "compile" not in scenario:
        return _train_step(wrapped, model, ROWS[rank], data_parallel=True)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a graph cached by the other compile scenario would serve this model unseen
    counters.clear()
    out = _train_step(wrapped, model, ROWS[rank], data_parallel=True, count=False)
    out["dynamo"] = {"graphs": counters["stats"]["unique_graphs"], "aot_ok": counters["aot_autograd"]["ok"]}
    return out


def _run_fsdp(scenario: str, rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    kind = scenario.rsplit("_", 1)[1]
    model = _model(kind)
    _shard(model, below_block=scenario.startswith("fsdp_sub"))
    if not all(isinstance(p, DTensor) for p in model.parameters()):
        raise AssertionError("fully_shard left parameters that are not DTensors")
    report_sharded = _report(model)  # read while the parameters are sharded (between forwards)
    out = _train_step(model, model, ROWS[rank], data_parallel=True)
    out["report_sharded"] = report_sharded
    return out


def _run_bf16(scenario: str, rank: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = _model(scenario.split("_", 1)[1].replace("patched", "timm"))
    _shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    return _train_step(model, model, ROWS[rank], data_parallel=True)


def _run_dcp(rank: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    x = _data()["x"]
    ckpt = os.path.join(out_dir, "dcp_checkpoint")
    saved = _model("timm", seed=0)
    _shard(saved)
    with torch.no_grad():
        out_saved = saved(x)
    dcp.save(get_model_state_dict(saved), checkpoint_id=ckpt)
    dist.barrier()

    loaded = _model("timm", seed=1)  # other weights
    _shard(loaded)
    with torch.no_grad():
        out_before = loaded(x)
    state = get_model_state_dict(loaded)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(loaded, state)
    with torch.no_grad():
        out_after = loaded(x)
    full = {k: _full(v) for k, v in get_model_state_dict(loaded).items()}
    return {"saved": out_saved, "before": out_before, "after": out_after, "state": full, "ckpt": ckpt}


def _qkv_head_groups(dim: int, world: int) -> torch.Tensor:
    """A row order for timm's fused qkv that makes a colwise (row) shard hold whole heads.

    timm's qkv weight rows are (3, H, D): q | k | v. An even split of those rows over ``world`` ranks would give
    rank 0 all of q and half of k -- not head-aligned. Regrouped as (world, 3, H/world · D), rank r's contiguous
    shard holds q, k and v of heads r·H/world .. (r+1)·H/world - 1, in the order each rank's attention expects
    with ``num_heads = H / world``; their output columns are the rows of ``proj`` that rank's rowwise shard holds.
    """
    return torch.arange(3 * dim).view(3, world, dim // world).transpose(0, 1).reshape(-1)


def _run_tp(scenario: str, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model(scenario.rsplit("_", 1)[1])
    order = None
    for blk in model.blocks:
        if scenario.startswith("tp_attn"):
            attn = blk.attn
            order = _qkv_head_groups(attn.qkv.in_features, WORLD)
            with torch.no_grad():
                attn.qkv.weight.copy_(attn.qkv.weight[order])
                attn.qkv.bias.copy_(attn.qkv.bias[order])
            attn.num_heads //= WORLD  # heads per rank (timm's own forward would also need attn_dim //= WORLD)
            parallelize_module(attn, mesh, {"qkv": ColwiseParallel(), "proj": RowwiseParallel()})
        parallelize_module(blk.mlp, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    blk = model.blocks[0]
    sharded = {"fc1": blk.mlp.fc1, "fc2": blk.mlp.fc2, "qkv": blk.attn.qkv, "proj": blk.attn.proj}
    layout = {
        n: (tuple(m.weight.placements), tuple(m.weight.to_local().shape))
        for n, m in sharded.items()
        if isinstance(m.weight, DTensor)
    }
    assert layout["fc1"][0] == (Shard(0),), layout
    out = _train_step(model, model, ALL, data_parallel=False)  # the whole batch on both ranks
    if order is not None:  # back to timm's q | k | v row order, to compare with the reference
        inverse = torch.argsort(order)
        for n, g in out["grads"].items():
            if n.endswith(("attn.qkv.weight", "attn.qkv.bias")):
                out["grads"][n] = g[inverse]
    out["layout"] = layout
    return out


def _run_dtensor_index(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    import fastvit.ops as ops

    mesh = init_device_mesh("cpu", (WORLD,))
    errors = {}
    B, E, N = 2, 8, 4  # 8x8 images, patch 4: N = 4 patches
    images, weight, bias = torch.randn(B, 3, 8, 8), torch.randn(E, 3, 4, 4), torch.randn(E)
    ids_keep = torch.stack([torch.randperm(N)[:2] for _ in range(B)])
    ids_restore = torch.stack([torch.randperm(N) for _ in range(B)])
    # the same calls with plain tensors work (so the TypeError below is about the DTensor)
    ops.patch_embed(images, weight, bias, ids_keep=ids_keep)
    ops.mae_unshuffle(torch.randn(B, 3, E), torch.randn(1, 1, E), ids_restore)
    keep_dt = DTensor.from_local(ids_keep, mesh, [Replicate()], run_check=False)
    restore_dt = DTensor.from_local(ids_restore, mesh, [Replicate()], run_check=False)
    for name, call in (
        ("ids_keep", lambda: ops.patch_embed(images, weight, bias, ids_keep=keep_dt)),
        ("ids_restore", lambda: ops.mae_unshuffle(torch.randn(B, 3, E), torch.randn(1, 1, E), restore_dt)),
    ):
        try:
            call()
            errors[name] = None
        except Exception as e:  # noqa: BLE001  (the test checks the type and message)
            errors[name] = (type(e).__name__, str(e))
    return {"errors": errors}


def _run_patch_after_fsdp(rank: int) -> dict:
    import fastvit

    model = _model("plain")
    _shard(model)
    try:
        fastvit.patch_timm_(model)
        return {"error": None}
    except Exception as e:  # noqa: BLE001  (the test checks the type and message)
        classes = (type(model.patch_embed).__name__, type(model.blocks[0]).__name__, type(model.norm).__name__)
        return {"error": (type(e).__name__, str(e)), "classes": classes}


def _run_scenario(scenario: str, rank: int, out_dir: str) -> dict:
    if "ddp" in scenario:
        return _run_ddp(scenario, rank)
    if scenario.startswith("fsdp"):
        return _run_fsdp(scenario, rank)
    if scenario.startswith("bf16"):
        return _run_bf16(scenario, rank)
    if scenario == "dcp":
        return _run_dcp(rank, out_dir)
    if scenario.startswith("tp"):
        return _run_tp(scenario, rank)
    if scenario == "dtensor_index":
        return _run_dtensor_index(rank)
    if scenario == "patch_after_fsdp":
        return _run_patch_after_fsdp(rank)
    raise ValueError(scenario)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> str:
    """Spawn the two gloo workers once; return the folder holding ``<scenario>_rank<r>.pt``."""
    return gloo.spawn(_run_scenario, SCENARIOS, str(tmp_path_factory.mktemp("distributed_tree")), WORLD)


@pytest.fixture(scope="module")
def ref() -> dict:
    return _reference()


@pytest.fixture(scope="module")
def ref_local() -> dict:
    """Rank 0's half of the batch alone: what a rank would hold without the gradient all-reduce."""
    return _reference(ROWS[0])


def _load(out_dir: str, scenario: str) -> list[dict]:
    return gloo.load(out_dir, scenario, WORLD)


def _assert_tree_close(actual: dict, expected: dict, what: str, rel: float | None = None) -> None:
    """Every tensor close: fp32 (rtol 1e-4, atol 1e-5), or with ``rel`` both relative to the tensor's largest entry."""
    assert actual.keys() == expected.keys(), f"{what}: different parameter sets"
    for name, exp in expected.items():
        if rel is None:
            rtol, atol = RTOL, ATOL
        else:
            rtol, atol = rel, rel * max(exp.abs().max().item(), 1e-12)
        torch.testing.assert_close(
            actual[name], exp, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


def _assert_matches_reference(ranks: list[dict], ref: dict, what: str, rel: float | None = None) -> None:
    assert len(ref["grads"]) > 20 and all(g.abs().sum() > 0 for g in ref["grads"].values())
    for r, res in enumerate(ranks):
        tol = dict(rtol=RTOL, atol=ATOL) if rel is None else dict(rtol=rel, atol=rel * ref["logits"].abs().max().item())
        torch.testing.assert_close(
            res["logits"], ref["logits"], **tol, msg=lambda m, r=r: f"{what} rank {r} logits: {m}"
        )
        torch.testing.assert_close(res["loss"], ref["loss"], **tol, msg=lambda m, r=r: f"{what} rank {r} loss: {m}")
        _assert_tree_close(res["grads"], ref["grads"], f"{what} rank {r} grad", rel)


def _assert_all_reduce_needed(ranks: list[dict], ref: dict, ref_local: dict) -> None:
    """The ranks saw different data, and one rank's local gradient is far from the whole-batch one."""
    assert not torch.allclose(ranks[0]["local_loss"], ranks[1]["local_loss"], rtol=1e-3)
    diff = max((ref_local["grads"][n] - g).abs().max().item() / g.abs().max().item() for n, g in ref["grads"].items())
    assert diff > 1e-2, "a half-batch gradient equals the whole-batch one; the test could not fail"


def _statuses(report: list, prefix: str = "blocks.") -> dict:
    """``{name: status}`` of the report rows for the blocks and their attention / MLP (``name`` like 'blocks.0')."""
    return {name: status for name, _cls, status, _reason in report if name.startswith(prefix)}


#: fastvit.ops calls of one forward of the tiny model when the blocks fuse (2 blocks: two linear_residual each)
FUSED_CALLS = dict(
    patch_embed=1,
    attention=DEPTH,
    scaled_dot_product_attention=0,
    layer_norm=2 * DEPTH + 1,
    linear_gelu=DEPTH,
    linear_residual=2 * DEPTH,
)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("scenario", ["ddp_patch_before", "ddp_patch_after"])
def test_ddp_patched(results, ref, ref_local, scenario):
    """DDP with patch_timm_ before or after wrapping: averaged gradients equal the one-process whole batch, and the
    blocks ran fused (DDP attaches nothing to the submodules)."""
    ranks = _load(results, scenario)
    _assert_matches_reference(ranks, ref, scenario)
    _assert_all_reduce_needed(ranks, ref, ref_local)
    for res in ranks:
        assert res["calls"] == FUSED_CALLS
        assert set(s for _, _, s, _ in res["report"]) == {"patched"}


@pytest.mark.parametrize("scenario", ["ddp_then_compile", "compile_then_ddp"])
def test_ddp_compiled(results, ref, ref_local, scenario):
    """torch.compile (aot_eager) of the patched model, outside or inside DDP: the whole-batch gradients."""
    ranks = _load(results, scenario)
    _assert_matches_reference(ranks, ref, scenario)
    _assert_all_reduce_needed(ranks, ref, ref_local)
    for res in ranks:
        assert res["dynamo"]["graphs"] >= 1 and res["dynamo"]["aot_ok"] >= 1, res["dynamo"]  # it did compile


@pytest.mark.parametrize("kind", ["timm", "fastvit"])
def test_fsdp_per_block(results, ref, ref_local, kind):
    """FSDP2 per block, then the root: the blocks' parameters are unsharded plain tensors inside their forward, so
    the blocks fuse; gradients equal the whole-batch reference."""
    ranks = _load(results, f"fsdp_block_{kind}")
    _assert_matches_reference(ranks, ref, f"fsdp_block_{kind}")
    _assert_all_reduce_needed(ranks, ref, ref_local)
    for res in ranks:
        assert res["calls"] == FUSED_CALLS


@pytest.mark.parametrize("kind", ["timm", "fastvit"])
def test_fsdp_below_block(results, ref, ref_local, kind):
    """FSDP2 on patch_embed, each attn and mlp, then each block, then the root: the blocks call attn / mlp as
    modules (FSDP2's hooks unshard them) and the patch embedding, attn and mlp forwards still fuse inside; gradients
    equal the whole-batch reference."""
    ranks = _load(results, f"fsdp_sub_{kind}")
    _assert_matches_reference(ranks, ref, f"fsdp_sub_{kind}")
    _assert_all_reduce_needed(ranks, ref, ref_local)
    for res in ranks:
        # no fused residual branch (that would read attn.proj / mlp.fc2 of another FSDP unit); fc1 + GELU and
        # attention still run on fastvit.ops inside the mlp / attn forwards
        assert res["calls"] == {**FUSED_CALLS, "linear_residual": 0}
    if kind == "timm":
        for res in ranks:
            st = _statuses(res["report"])
            for i in range(DEPTH):
                # the block calls attn and mlp as modules because FSDP2 wrapped them (their classes are FSDP2's)
                assert st[f"blocks.{i}"] == "modular", res["report"]
                why = dict((n, r) for n, _c, _s, r in res["report"])[f"blocks.{i}"]
                assert "FSDPFastvitAttention" in why and "FSDPFastvitMlp" in why, why
                assert st[f"blocks.{i}.attn"] == "patched", res["report"]


def test_patch_report_under_fsdp2_says_what_runs(results):
    """patch_report of a sharded model should describe the forward that runs (the op counts): per-block FSDP2 fuses
    everything; below the block only the blocks are modular (attn / mlp are FSDP2 units), the rest fuses."""
    per_block, below = _load(results, "fsdp_block_timm")[0], _load(results, "fsdp_sub_timm")[0]
    assert per_block["calls"] == FUSED_CALLS and below["calls"] == {**FUSED_CALLS, "linear_residual": 0}
    problems = []
    for what, res, modular in (("per block", per_block, set()), ("below the block", below, {"blocks.0", "blocks.1"})):
        for name, _cls, status, reason in res["report_sharded"]:
            expected = "modular" if name in modular else "patched"
            if status != expected:
                problems.append(f"{what}: {name} is {status!r}, expected {expected!r} ({reason})")
    assert not problems, "\n".join(problems)


def test_fsdp_bf16_mixed_precision(results, ref):
    """Per-block FSDP2 with bf16 parameters and fp32 gradient reduction: the patched timm model and fastvit's model
    give the unpatched timm model's logits and gradients under the same policy and sharding (bf16 tolerance), and
    all three are near the fp32 reference."""
    plain = _load(results, "bf16_plain")
    for scenario in ("bf16_patched", "bf16_fastvit"):
        ranks = _load(results, scenario)
        for r, (res, exp) in enumerate(zip(ranks, plain)):
            assert res["logits_dtype"] == exp["logits_dtype"] == torch.bfloat16
            what = f"{scenario} vs bf16_plain rank {r}"
            scale = exp["logits"].abs().max().item()
            torch.testing.assert_close(res["logits"], exp["logits"], rtol=BF16_REL, atol=BF16_REL * scale, msg=what)
            torch.testing.assert_close(res["loss"], exp["loss"], rtol=BF16_REL, atol=0.0, msg=what)
            _assert_tree_close(res["grads"], exp["grads"], what + " grad", rel=BF16_REL)
            assert all(g.dtype == torch.float32 for g in res["grads"].values())  # sharded fp32 master grads
        assert ranks[0]["calls"]["linear_residual"] == 2 * DEPTH  # fused under mixed precision too
    for scenario in ("bf16_plain", "bf16_patched", "bf16_fastvit"):
        _assert_matches_reference(_load(results, scenario), ref, f"{scenario} vs fp32", rel=5e-2)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_roundtrip(results):
    """DCP save of a sharded patched model, load into one sharded from other weights: the same outputs, the same
    full state; the checkpoint also loads into a plain, unsharded timm model in one process."""
    import torch.distributed.checkpoint as dcp

    ranks = _load(results, "dcp")
    for r, res in enumerate(ranks):
        assert not torch.allclose(res["before"], res["saved"], atol=1e-3), "the second model started equal"
        torch.testing.assert_close(res["after"], res["saved"], rtol=0, atol=0, msg=f"rank {r}")
    ref_state = _model("plain", seed=0).state_dict()
    _assert_tree_close(ranks[0]["state"], ref_state, "loaded state", rel=0.0)

    plain = _model("plain", seed=1)
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=ranks[0]["ckpt"], no_dist=True)  # one process, no process group
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(plain(_data()["x"]), ranks[0]["saved"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["timm", "fastvit"])
def test_tensor_parallel_mlp(results, ref, kind):
    """fc1 ColwiseParallel, fc2 RowwiseParallel in every block, the same whole batch on both ranks: logits, loss and
    the full gradients equal the single-process model; the MLPs call fc1 / fc2 as modules (no fused fc1 + GELU,
    no fused residual branch), attention and the norms still run on fastvit.ops."""
    ranks = _load(results, f"tp_mlp_{kind}")
    _assert_matches_reference(ranks, ref, f"tp_mlp_{kind}")
    hidden = ref["grads"]["blocks.0.mlp.fc1.weight"].shape[0]
    for res in ranks:
        assert res["layout"] == {
            "fc1": ((Shard(0),), (hidden // WORLD, 32)),
            "fc2": ((Shard(1),), (32, hidden // WORLD)),
        }
        assert res["calls"] == {**FUSED_CALLS, "linear_gelu": 0, "linear_residual": 0}
        if kind == "timm":
            st = _statuses(res["report"])
            for i in range(DEPTH):
                assert st[f"blocks.{i}"] == "modular" and st[f"blocks.{i}.mlp"] == "modular", res["report"]
                assert st[f"blocks.{i}.attn"] == "patched", res["report"]


@pytest.mark.parametrize("kind", ["timm", "fastvit"])
def test_tensor_parallel_attention_and_mlp(results, ref, kind):
    """Attention too: qkv ColwiseParallel with its rows regrouped per rank's heads, ``num_heads`` halved, proj
    RowwiseParallel; each rank runs fastvit's attention on its own heads. Logits, loss and the full gradients
    (qkv's back in timm's row order) equal the single-process model."""
    ranks = _load(results, f"tp_attn_{kind}")
    _assert_matches_reference(ranks, ref, f"tp_attn_{kind}")
    for res in ranks:
        assert res["layout"]["qkv"] == ((Shard(0),), (3 * 32 // WORLD, 32))
        assert res["layout"]["proj"] == ((Shard(1),), (32, 32 // WORLD))
        assert res["calls"] == {**FUSED_CALLS, "linear_gelu": 0, "linear_residual": 0}


def test_dtensor_index_inputs_raise(results):
    """A DTensor ids_keep / ids_restore raises TypeError naming the argument (its values are not all local)."""
    for res in _load(results, "dtensor_index"):
        for name in ("ids_keep", "ids_restore"):
            err = res["errors"][name]
            assert err is not None, f"{name}: a DTensor was accepted"
            assert err[0] == "TypeError" and name in err[1] and "DTensor" in err[1], err


def test_patch_after_fully_shard_raises(results):
    """patch_timm_ on a model whose blocks fully_shard already wrapped raises RuntimeError naming fully_shard."""
    for res in _load(results, "patch_after_fsdp"):
        assert res["error"] is not None, "patch_timm_ accepted a model fully_shard had wrapped"
        assert res["error"][0] == "RuntimeError" and "fully_shard" in res["error"][1], res["error"]
        assert res["classes"] == ("PatchEmbed", "FSDPBlock", "LayerNorm")  # nothing was patched before it raised
