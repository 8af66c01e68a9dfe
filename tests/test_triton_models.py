"""Whole models on the ``triton`` backend against ``eager``: a tiny VisionTransformer and MaskedAutoencoderViT,
forward and every parameter gradient, under the oracle of docs/ARCHITECTURE.md (``ref``: the model in float64 on eager; ``pt``:
the model in float32 on eager; ``out``: float32 on triton). On a machine without a GPU the kernels run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

import pytest
import torch
from oracle import FixedMaskMAE, compare_model_with_eager

import fastvit
from fastvit.backends import get_backend

pytestmark = pytest.mark.skipif(
    bool(get_backend("triton").unavailable_reasons()),
    reason=f"triton backend unavailable: {get_backend('triton').unavailable_reasons()}",
)


def _compare(model, args, loss_fn, first, compiled=False):
    compare_model_with_eager(
        model.to(args[0].device),
        args,
        loss_fn,
        first,
        backend="triton",
        ref_dtype=torch.float64,
        compile_backend="inductor" if compiled else None,
    )


# compiled=True: the model under torch.compile(fullgraph=True), whose graph holds the Triton kernels themselves
# (triton_op + wrap_triton). GPU only: in the interpreter a triton_op's launches run eagerly while AOTAutograd
# traces, so they cannot be captured in a graph.
COMPILED = pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["eager_mode", "compiled"]
)


@COMPILED
def test_vision_transformer_on_triton_matches_eager(generator, device, compiled):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = fastvit.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5, init_values=1e-1, reg_tokens=1
    ).eval()
    images = torch.randn(3, 3, 16, 16, generator=generator).to(device)
    _compare(
        model, [images], lambda y: (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(y)).sum(), lambda y: y, compiled
    )


@COMPILED
def test_masked_autoencoder_on_triton_matches_eager(generator, device, compiled):
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
    images = torch.randn(3, 3, 16, 16, generator=generator).to(device)
    noise = torch.rand(3, 16, generator=generator).to(device)

    _compare(FixedMaskMAE(model), [images, noise], lambda out: out[0], lambda out: out[1], compiled)


class _Packed(torch.nn.Module):
    """``forward_packed`` of two images of different sizes as a module of tensors (what the oracle runs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, a, b):
        return self.model.forward_packed([a, b])


def test_packed_vision_transformer_on_triton_matches_eager(generator):
    """Images of two sizes packed into one sequence: the blocks' attention runs on the Triton varlen kernels
    (cu_seqlens), forward and every parameter gradient against eager (per-sequence SDPA) and float64."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = fastvit.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5, reg_tokens=1, global_pool="avg"
    ).eval()
    images = [torch.randn(3, 16, 12, generator=generator), torch.randn(3, 8, 20, generator=generator)]
    _compare(_Packed(model), images, lambda y: (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), lambda y: y)
