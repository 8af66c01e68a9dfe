"""Weights and modules in from other libraries: timm (:func:`from_timm`, :func:`patch_timm_`)."""

from fastvit.integrations.timm import from_timm, patch_timm_

__all__ = ["from_timm", "patch_timm_"]
