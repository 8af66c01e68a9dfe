"""fastvit's public functional ops: one checked signature each, dispatched to a backend.

Every op validates its inputs -- shapes, dtypes, devices, with a :class:`ValueError` or :class:`TypeError` that names
the argument and what was expected -- then hands them to the backend picked by :func:`fastvit.backends.select`
(``backend=`` argument, :func:`fastvit.use_backend`, ``FASTVIT_BACKEND``, or automatic). Kernels therefore never see
malformed input.

Each op is declared once, in its family module (:mod:`fastvit.families`, :mod:`fastvit.declare`), together with its
check step; this module re-exports the checked functions.

Vocabulary: B batch, N tokens (prefix tokens included), H heads, D head dim, C = H·D embed dim, P patch size,
E embed dim of the patch projection.
"""

from __future__ import annotations

import torch

from fastvit import families  # noqa: F401  (declares every op and registers it with every backend)
from fastvit.backends import Call
from fastvit.declare import DECLARATIONS
from fastvit.families.attention import attention, scaled_dot_product_attention  # noqa: F401  (re-exported)
from fastvit.families.layer_norm import layer_norm, rms_norm  # noqa: F401  (re-exported)
from fastvit.families.linear import linear_gelu, linear_glu, linear_residual  # noqa: F401  (re-exported)
from fastvit.families.mae import mae_loss, mae_unshuffle, random_masking  # noqa: F401  (re-exported)
from fastvit.families.patch_embed import patch_embed  # noqa: F401  (re-exported)

__all__ = sorted([*DECLARATIONS, "describe_call", "random_masking"])


def describe_call(op: str, *args, **kwargs) -> Call:
    """The typed call description dispatch decides on for ``fastvit.ops.<op>(*args, **kwargs)``, after the op's own
    autocast rule and argument checks, without running it (what the benchmark and :func:`fastvit.backends.select` take).

    Example: ``select("attention", describe_call("attention", qkv, 12))`` names the backend ``attention(qkv, 12)``
    would run on.

    Raises:
        ValueError: ``op`` is no dispatched op (or ``backend`` was passed: the call description does not include it);
            otherwise whatever the op itself raises for these arguments.
    """
    if "backend" in kwargs:
        raise ValueError("describe_call takes the op's arguments without backend=; pass it to select()")
    try:
        decl = DECLARATIONS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(DECLARATIONS)}") from None
    return decl.prepare(*args, **kwargs)[0]


# Every declared op is re-exported here; a declared op missing from the imports above is a bug in this module.
_missing = [name for name in DECLARATIONS if globals().get(name) is not DECLARATIONS[name].function]
if _missing:
    raise ImportError(f"fastvit.ops does not re-export the declared op(s) {_missing}")

# Every tensor op is a torch.fx leaf: a symbolic trace (torch.fx.symbolic_trace, torchvision's feature extraction,
# timm's fx tests) records one call_function node per op and the GraphModule runs the same op as the eager forward,
# instead of tracing into the argument checks, which take real tensors.
for _name in DECLARATIONS:
    torch.fx.wrap(_name)
del _name, _missing
