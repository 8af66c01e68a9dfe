"""fastvit: fused Triton and CUDA C++ kernels for Vision Transformers, behind drop-in ViT and MAE modules.

Public surface:
    fastvit.ops                     functional ops (patch_embed, attention, layer_norm, linear_gelu, ...)
    fastvit.use_backend(name)       force a backend ("eager", "triton", "cuda") in a ``with`` block
    fastvit.available_backends()    which backends run here, and why the others do not
    fastvit.nn                      PatchEmbed, Attention, Mlp, Block, VisionTransformer, MaskedAutoencoderViT
    fastvit.create_model(name)      timm / MAE configurations
    fastvit.from_timm / patch_timm_ / from_hf   weights in from timm and Hugging Face transformers
    fastvit.selftest                python -m fastvit.selftest: check a kernel backend on this device before trusting it
"""

from fastvit import nn, ops
from fastvit.backends import BackendNotSupportedError, available_backends, current_backend, use_backend
from fastvit.integrations import from_hf, from_timm, patch_timm_
from fastvit.nn import *  # noqa: F401,F403  (PatchEmbed, ..., VisionTransformer, MaskedAutoencoderViT, create_model)
from fastvit import selftest  # noqa: E402  (installs the self-test gate of automatic dispatch; runs nothing)

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "__version__",
    "available_backends",
    "current_backend",
    "from_hf",
    "from_timm",
    "nn",
    "ops",
    "patch_timm_",
    "use_backend",
    *nn.__all__,
]
