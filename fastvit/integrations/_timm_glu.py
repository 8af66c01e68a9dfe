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
patched ``forward`` of ``SwiGLU`` / ``GluMlp`` (they take the module as their first argument), and its fused ViT
``Block`` path calls :func:`swiglu_hidden` / :func:`glu_mlp_hidden` before its fused fc2 + residual.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from fastvit import ops
from fastvit.nn.layers import _skippable, _weight_bias, apply_norm, needs_module_calls, register_fusable

__all__ = [
    "glu_activation",
    "glu_mlp_forward",
    "glu_mlp_hidden",
    "glu_mlp_reasons",
    "swiglu_forward",
    "swiglu_hidden",
    "swiglu_reasons",
]

# timm's activation classes (timm.layers.activations) by name -> linear_glu's activation.
_TIMM_ACTS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "Swish": "silu", "Sigmoid": "sigmoid"}

# The activation modules whose function these forwards compute without calling them (fusion guard).
register_fusable(nn.SiLU, nn.Sigmoid, nn.GELU)


_TIMM_ACTS_REGISTERED = False


def _register_timm_acts() -> None:
    """Register timm's activation classes for the fusion guard, once -- when timm is in use (a timm activation
    module is seen, or ``patch_timm_`` runs), never at import: importing timm costs seconds."""
    global _TIMM_ACTS_REGISTERED
    if _TIMM_ACTS_REGISTERED:
        return
    _TIMM_ACTS_REGISTERED = True
    try:
        import timm.layers.activations as ta
    except ImportError:  # timm not installed: only torch's classes are known
        return
    register_fusable(*(getattr(ta, n) for n in _TIMM_ACTS if hasattr(ta, n)))


def glu_activation(act: nn.Module) -> Optional[str]:
    """``linear_glu``'s ``activation`` name for the activation module ``act`` (``nn.SiLU``, ``nn.Sigmoid``,
    ``nn.GELU`` exact or tanh, timm's ``Swish`` / ``Sigmoid`` / ``GELU`` / ``GELUTanh``), or ``None`` when it is
    none of those (exact classes: a subclass may compute something else)."""
    t = type(act)
    if t is nn.SiLU:
        return "silu"
    if t is nn.Sigmoid:
        return "sigmoid"
    if t is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if t.__module__.startswith("timm.") and t.__name__ in _TIMM_ACTS:
        _register_timm_acts()
        return _TIMM_ACTS[t.__name__]
    return None


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


def _rest(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``drop1``, ``norm`` after the gating, as timm's forwards do (inactive dropout skipped unseen)."""
    mods = m._modules  # submodules read from the dict (nn.Module.__getattr__ is slow on the host)
    if not _skippable(mods["drop1"]):
        h = mods["drop1"](h)
    return apply_norm(mods["norm"], h)


def swiglu_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(drop1(act(fc1_g(x)) * fc1_x(x)))`` for a timm ``SwiGLU`` (everything before ``fc2``), fc1 + gate
    through :func:`fastvit.ops.linear_glu` with the two weights as stored (split layout).

    Shapes: (..., in_features) -> (..., hidden_features).

    Raises:
        ValueError: the activation is not covered (see :func:`swiglu_reasons`).
    """
    mods = m._modules
    fc1_g, fc1_x, act = mods["fc1_g"], mods["fc1_x"], mods["act"]
    name = glu_activation(act)
    if name is None:
        raise ValueError(_act_reason(act)[0])
    if needs_module_calls(fc1_g, fc1_x, act):
        h = act(fc1_g(x)) * fc1_x(x)  # module calls: hooks / adapters on fc1_g, fc1_x or act see them
    else:
        (weight, bias), (weight_value, bias_value) = _weight_bias(fc1_g), _weight_bias(fc1_x)
        h = ops.linear_glu(x, weight, bias, weight_value, bias_value, activation=name)
    return _rest(m, h)


def glu_mlp_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(drop1(gate(fc1(x))))`` for a timm ``GluMlp`` (everything before ``fc2``): ``fc1``'s packed
    (2·hidden, in) weight passed as is, the gate half picked by ``m.gate_last``.

    Shapes: (..., in_features) -> (..., hidden_features // 2).

    Raises:
        ValueError: a configuration not covered (see :func:`glu_mlp_reasons`).
    """
    reasons = glu_mlp_reasons(m)
    if reasons:
        raise ValueError("; ".join(reasons))
    mods = m._modules
    fc1, act = mods["fc1"], mods["act"]
    if needs_module_calls(fc1, act):
        x1, x2 = fc1(x).chunk(2, dim=-1)
        h = x1 * act(x2) if m.gate_last else act(x1) * x2
    else:
        weight, bias = _weight_bias(fc1)
        h = ops.linear_glu(x, weight, bias, activation=glu_activation(act), gate_last=bool(m.gate_last))
    return _rest(m, h)


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
