"""fastvit: fused Triton and CUDA C++ kernels for Vision Transformers, behind drop-in ViT and MAE modules.

Public surface:
    fastvit.ops                     functional ops (patch_embed, attention, layer_norm, linear_gelu, ...)
    fastvit.use_backend(name)       force a backend ("eager", "triton", "cuda") in a ``with`` block
    fastvit.available_backends()    which backends run here, and why the others do not
    fastvit.nn                      PatchEmbed, Attention, Mlp, Block, VisionTransformer, MaskedAutoencoderViT
    fastvit.create_model(name)      timm / MAE configurations
    fastvit.from_timm / patch_timm_ / from_hf   weights in from timm and Hugging Face transformers
    attn_implementation="fastvit"   Hugging Face models' attention on fastvit: registered here when transformers was
                                    imported first, else by fastvit.integrations.register_attention()
    fastvit.selftest                python -m fastvit.selftest: check a kernel backend on this device before trusting it
"""

from fastvit import (
    nn,
    ops,
    selftest,  # noqa: F401  (installs the self-test gate of automatic dispatch; runs nothing)
)
from fastvit.backends import BackendNotSupportedError, available_backends, current_backend, use_backend
from fastvit.integrations import from_hf, from_timm, patch_timm_
from fastvit.nn import *  # noqa: F401,F403  (PatchEmbed, ..., VisionTransformer, MaskedAutoencoderViT, create_model)

__version__ = "0.1.0"

# attn_implementation="fastvit" for Hugging Face models. Only when the user already imported transformers: importing
# it here would cost seconds on every `import fastvit`. Never fatal -- a broken or too-old transformers must not break
# fastvit; the warning says why, and register_attention() raises the real error when called.
import sys as _sys

if "transformers" in _sys.modules:
    try:
        from fastvit.integrations.hf_attention import register_attention as _register_attention

        _register_attention()
    except Exception as _e:  # noqa: BLE001
        import warnings as _warnings

        _warnings.warn(f'could not register attn_implementation="fastvit" with transformers: {_e!r}', stacklevel=2)
del _sys

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
