"""``torch.compile(fullgraph=True)`` over fastvit's models and dispatch, on the CPU.

The dispatch (:func:`fastvit.backends.select`, the ``use_backend`` context, the capability checks) is Python that
runs inside every model call, so Dynamo must trace it without a graph break and must re-trace when the chosen
backend changes. Here the ``eager`` backend is compiled with ``backend="aot_eager"`` (Dynamo + AOTAutograd, forward
and backward graphs, no code generation) and compared with the uncompiled model under the oracle. The kernel
backends are compiled with inductor in the GPU tests (tests/test_triton_models.py, tests/test_cuda_ops.py) and on
fake tensors in tests/test_cuda_extension.py.
"""

import pytest
import torch
from oracle import FixedMaskMAE, compare_model_with_eager

import fastvit
from fastvit import ops


def _tiny_vit(generator):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    return fastvit.VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=5,
        init_values=1e-1,
        reg_tokens=1,
        qk_norm=True,
    ).eval()


def test_vision_transformer_compiles_fullgraph_and_matches_eager(generator):
    model = _tiny_vit(generator)
    images = torch.randn(3, 3, 16, 16, generator=generator)
    weights = torch.linspace(-1, 1, 15).view(3, 5)
    compare_model_with_eager(
        model,
        [images],
        lambda y: (y * weights).sum(),
        lambda y: y,
        backend="eager",
        ref_dtype=torch.float64,
        compile_backend="aot_eager",
    )


def test_masked_autoencoder_compiles_fullgraph_and_matches_eager(generator):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = fastvit.MaskedAutoencoderViT(
        img_size=16,
        patch_size=4,
        in_chans=3,
        embed_dim=48,
        depth=2,
        num_heads=3,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=True,
    )
    images = torch.randn(3, 3, 16, 16, generator=generator)
    noise = torch.rand(3, 16, generator=generator)

    compare_model_with_eager(
        FixedMaskMAE(model),
        [images, noise],
        lambda out: out[0],
        lambda out: out[1],
        backend="eager",
        ref_dtype=torch.float64,
        compile_backend="aot_eager",
    )


def test_changing_the_backend_retraces_a_compiled_function():
    """A graph traced under one backend choice must not be replayed under another (Dynamo guards on it)."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda qkv: ops.attention(qkv, 2), fullgraph=True, backend=count)
    qkv = torch.randn(2, 5, 3 * 2 * 16)
    with fastvit.use_backend("eager"):
        first = compiled(qkv)
        compiled(qkv)
    assert len(graphs) == 1
    with fastvit.use_backend(None):  # automatic selection: a different dispatch state, hence a new trace
        second = compiled(qkv)
    assert len(graphs) == 2
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_index_checks_stay_in_the_compiled_graph():
    """Eagerly a bad ``ids_keep`` is a ValueError; compiled, the check is an in-graph assert, not skipped."""
    images = torch.randn(2, 3, 8, 8)
    weight, bias = torch.randn(16, 3, 4, 4), torch.randn(16)
    compiled = torch.compile(
        lambda ids: ops.patch_embed(images, weight, bias, ids_keep=ids, backend="eager"),
        fullgraph=True,
        backend="aot_eager",
    )
    good = torch.tensor([[0, 3], [2, 1]])
    torch.testing.assert_close(compiled(good), ops.patch_embed(images, weight, bias, ids_keep=good, backend="eager"))
    with pytest.raises(RuntimeError, match=r"ids_keep values must lie in \[0, 4\)"):
        compiled(torch.tensor([[0, 4], [2, 1]]))
    with pytest.raises(RuntimeError, match="ids_keep must not repeat an index"):
        compiled(torch.tensor([[0, 0], [2, 1]]))
