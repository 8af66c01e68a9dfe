"""Forwards for timm's gated MLPs on :func:`fastvit.ops.linear_glu` (issue 23): ``SwiGLU`` (separate ``fc1_g`` /
``fc1_x``) and ``GluMlp`` (one packed ``fc1``; ``SwiGLUPacked`` is ``GluMlp(act_layer=nn.SiLU, gate_last=False)``).

Each forward computes fc1 and the gating in one fused op, reading the fc1 weights as the modules store them (no
copy: the packed weight's halves are row views), then runs the rest as timm does -- ``drop1``, ``norm``
(:func:`fastvit.nn.layers.apply_norm`: a plain LayerNorm through :func:`fastvit.ops.layer_norm`, anything else
called as a module), ``fc2``, ``drop2`` -- so active dropout, a norm layer and anything attached to ``fc2`` behave
exactly as in timm.

Following the fusion guard of :mod:`fastvit.nn.layers`: while something observes the fc1 layers or the activation
(a hook, an adapter or parametrization that changes the class, a DTensor parameter, a global module hook), the
fc1 layers and the activation are called as modules and only the gating product is computed by these functions
(timm's own arithmetic).

Configurations not covered (the ``*_reasons`` functions say why; the patched forward then runs timm's):

* an activation other than SiLU / Swish, GELU (exact or tanh) or Sigmoid (e.g. QuickGELU, ReLU, hard-swish);
* ``GluMlp(use_conv=True)`` (1x1 convolutions on NCHW maps, chunked along channels).

``gate_last`` is covered both ways (``GluMlp``'s default ``True``: the gate is the second half of fc1's output,
``F.glu``'s order; ``False``: the first, ``SwiGLUPacked``).

:func:`fastvit.integrations.timm.patch_timm_` installs :func:`swiglu_forward` / :func:`glu_mlp_forward` as the
patched ``forward`` of ``SwiGLU`` / ``GluMlp`` (they take the module as their first argument). Its fused ``Block``
and ``EvaBlock`` paths check the ``*_reasons`` themselves, then call :func:`fastvit.nn.eva.glu_mlp_hidden` before
their fused fc2 + residual; :func:`swiglu_hidden` / :func:`glu_mlp_hidden` are that function with the check.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from fastvit.nn.eva import glu_activation
from fastvit.nn.eva import glu_mlp_hidden as _glu_hidden

__all__ = [
    "glu_activation",
    "glu_mlp_forward",
    "glu_mlp_hidden",
    "glu_mlp_reasons",
    "swiglu_forward",
    "swiglu_hidden",
    "swiglu_reasons",
]


def _act_reason(act: nn.Module) -> List[str]:
    if glu_activation(act) is None:
        return [f"activation {type(act).__name__} not covered (SiLU / Swish, GELU, GELU-tanh, Sigmoid)"]
    return []


def swiglu_reasons(m: nn.Module) -> List[str]:
    """Why :func:`swiglu_forward` would run timm's forward for the timm ``SwiGLU`` ``m`` (empty: it fuses)."""
    return _act_reason(m.act)


def glu_mlp_reasons(m: nn.Module) -> List[str]:
    """Why :func:`glu_mlp_forward` would run timm's forward for the timm ``GluMlp`` ``m`` (empty: it fuses)."""
    out = []
    if getattr(m, "chunk_dim", -1) != -1 or isinstance(getattr(m.fc1, "base_layer", m.fc1), nn.Conv2d):
        out.append("convolutional GluMlp (use_conv=True) not covered")
    return out + _act_reason(m.act)


def swiglu_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(drop1(act(fc1_g(x)) * fc1_x(x)))`` for a timm ``SwiGLU`` (everything before ``fc2``): fc1 + gate
    through :func:`fastvit.ops.linear_glu` with the two weights as stored (split layout); see
    :func:`fastvit.nn.eva.glu_mlp_hidden`, which fastvit's own ``SwiGLU`` runs too.

    Shapes: (..., in_features) -> (..., hidden_features).

    Raises:
        ValueError: the activation is not covered (see :func:`swiglu_reasons`).
    """
    reasons = swiglu_reasons(m)
    if reasons:
        raise ValueError("; ".join(reasons))
    return _glu_hidden(m, x)


def glu_mlp_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(drop1(gate(fc1(x))))`` for a timm ``GluMlp`` (everything before ``fc2``): ``fc1``'s packed
    (2·hidden, in) weight passed as is, the gate half picked by ``m.gate_last``; see
    :func:`fastvit.nn.eva.glu_mlp_hidden`, which fastvit's own ``GluMlp`` runs too.

    Shapes: (..., in_features) -> (..., hidden_features // 2).

    Raises:
        ValueError: a configuration not covered (see :func:`glu_mlp_reasons`).
    """
    reasons = glu_mlp_reasons(m)
    if reasons:
        raise ValueError("; ".join(reasons))
    return _glu_hidden(m, x)


def swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A patched ``SwiGLU.forward``: :func:`swiglu_hidden`, then ``drop2(fc2(.))``; timm's forward (the class's
    own, or ``self._fastvit_orig_cls``'s once patched) for a configuration :func:`swiglu_reasons` rejects."""
    if swiglu_reasons(self):
        return _orig_forward(self, x)
    return self.drop2(self.fc2(swiglu_hidden(self, x)))


def glu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A patched ``GluMlp.forward`` (also ``SwiGLUPacked``): :func:`glu_mlp_hidden`, then ``drop2(fc2(.))``;
    timm's forward for a configuration :func:`glu_mlp_reasons` rejects."""
    if glu_mlp_reasons(self):
        return _orig_forward(self, x)
    return self.drop2(self.fc2(glu_mlp_hidden(self, x)))


def _orig_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cls = getattr(m, "_fastvit_orig_cls", type(m))
    return cls.forward(m, x)
