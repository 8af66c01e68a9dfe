"""Weights and modules in from other libraries: timm (:func:`from_timm`, :func:`patch_timm_`, :func:`patch_report`) and Hugging Face
transformers (:func:`from_hf`; :func:`register_attention` for ``attn_implementation="fastvit"``). timm / transformers
are imported only when these functions run."""

from fastvit.integrations.hf import from_hf, register_attention
from fastvit.integrations.timm import from_timm, patch_report, patch_timm_

__all__ = ["from_hf", "from_timm", "patch_report", "patch_timm_", "register_attention"]
