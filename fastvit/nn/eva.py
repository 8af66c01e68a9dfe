"""timm's Eva family on :mod:`fastvit.ops`: EVA-02, DINOv3, Perception Encoder (PE core) and the RoPE ViTs.

Sources: timm ``models/eva.py`` (``Eva``, ``EvaBlock``, ``EvaAttention``), ``layers/attention.py``
(``AttentionRope``), ``layers/mlp.py`` (``GluMlp``, ``SwiGLU``), ``layers/attention_pool.py``
(``AttentionPoolLatent``), ``layers/norm.py`` (``RmsNorm``); the papers: EVA-02 (Fang et al., 2023,
arXiv:2303.11331), DINOv3 (Siméoni et al., 2025, arXiv:2508.10104), Perception Encoder (Bolya et al., 2025,
arXiv:2504.13181), RoPE-ViT (Heo et al., 2024, arXiv:2403.13298), rotary embeddings (Su et al., 2021,
arXiv:2104.09864), SwiGLU (Shazeer, 2020, arXiv:2002.05202), registers (Darcet et al., 2024, arXiv:2309.16588).

Every module here has timm's constructor arguments (for the configurations those families use) and timm's
``state_dict`` keys, so ``load_state_dict(timm_model.state_dict(), strict=True)`` works. The forwards run on
fastvit's ops: the patch embedding with its prefix tokens and position add as one :func:`fastvit.ops.patch_embed`,
rotary attention as :func:`fastvit.ops.attention` on the fused ``qkv`` projection with the q / k rotation inside the
op (prefix tokens left unrotated), the gated MLPs' fc1 + gating as :func:`fastvit.ops.linear_glu`, each branch's
output projection + LayerScale + residual as :func:`fastvit.ops.linear_residual`, LayerNorm / RMSNorm as
:func:`fastvit.ops.layer_norm` / :func:`fastvit.ops.rms_norm`.

The rotary tables come from timm's own modules (``RotaryEmbeddingCat``, ``RotaryEmbeddingMixed``,
``RotaryEmbeddingDinoV3``, through ``timm.layers.create_rope_embed``): they are small, computed once per forward
(the mixed one is learnable), and timm keeps them right across its versions; so a model with
``use_rot_pos_emb=True`` needs timm installed (``import fastvit`` does not import it).

The fusion guard of :mod:`fastvit.nn.layers` applies: a fused forward reads a submodule's parameters only while
nothing is attached to it (hooks, adapters, parametrizations, DTensors); otherwise it calls it as a module.

Vocabulary: B batch, N tokens (R prefix tokens + Np patches), H heads, D head dim, C = H·D embed dim, P patch size.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from fastvit import ops
from fastvit.families._checks import amp_dtype
from fastvit.nn.layers import (
    DropPath,
    Mlp,
    PatchDropout,
    PatchEmbed,
    _any_attached,
    _dropout_active,
    _global_hooks,
    _residual,
    _skippable,
    _weight_bias,
    _wrapper_param,
    apply_norm,
    embed_patches,
    fusion_reasons,
    needs_module_calls,
    register_fusable,
)
from fastvit.nn.pos_embed import resample_abs_pos_embed
from fastvit.nn.vit import feature_take_indices

__all__ = [
    "AttentionPoolLatent",
    "AttentionRope",
    "Eva",
    "EvaAttention",
    "EvaBlock",
    "GluMlp",
    "RmsNorm",
    "SwiGLU",
    "eva_block_forward",
    "eva_block_fusion_reasons",
    "glu_activation",
    "glu_mlp_hidden",
    "rope_attention_core",
]

_POOLS = ("", "avg", "avgmax", "max", "token", "map")
_ROPE_TYPES = ("cat", "mixed", "dinov3")


# ----------------------------------------------------------------------------------------------- norms
class RmsNorm(nn.Module):
    """RMSNorm over the last dim (Zhang & Sennrich, 2019, arXiv:1910.07467) on :func:`fastvit.ops.rms_norm`, with
    timm's ``RmsNorm`` constructor and parameter (``weight`` (C,), or none with ``affine=False``).

    fp32 statistics and one rounding (timm's ``RmsNormFp32``; timm's ``RmsNorm``, which rounds in between on half
    inputs, agrees within the test oracle). Output dtype: the input's; under autocast the op's (see
    :func:`fastvit.ops.rms_norm`). A weight of another dtype outside autocast is computed in the promoted dtype.

    Shapes: (..., C) -> (..., C).

    Raises:
        ValueError: ``channels`` not a positive int.
    """

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.num_features = channels
        self.normalized_shape = (channels,)
        self.eps = float(eps)
        self.elementwise_affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        """Set ``weight`` to ones."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C) through :func:`fastvit.ops.rms_norm` (dtype: see the class docstring)."""
        w, dtype = self._parameters["weight"], x.dtype
        autocast = amp_dtype(x) is not None
        if w is not None and w.dtype != x.dtype and not autocast:
            acc = torch.promote_types(x.dtype, w.dtype)
            x, w = x.to(acc), w.to(acc)
        y = ops.rms_norm(x, w, self.eps)
        return y if autocast else y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.elementwise_affine}"


def _make_norm(norm_layer: Optional[Callable], dim: int, dd: dict) -> nn.Module:
    """``norm_layer(dim)`` (default ``nn.LayerNorm(eps=1e-6)``, timm's ``LayerNorm``) on ``dd``'s device / dtype.

    Raises:
        ValueError: ``norm_layer`` builds something other than an ``nn.LayerNorm`` (or subclass) or :class:`RmsNorm`.
    """
    m = (norm_layer or partial(nn.LayerNorm, eps=1e-6))(dim)
    if not isinstance(m, (nn.LayerNorm, RmsNorm)):
        raise ValueError(
            f"norm_layer must build an nn.LayerNorm (or subclass, e.g. timm's LayerNorm) or fastvit.nn.eva.RmsNorm, "
            f"got {type(m).__name__}"
        )
    kw = {k: v for k, v in dd.items() if v is not None}
    return m.to(**kw) if kw else m


# ----------------------------------------------------------------------------------------------- gated MLPs
# timm's activation classes (timm.layers.activations) by name -> linear_glu's activation.
_TIMM_ACTS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "Swish": "silu", "Sigmoid": "sigmoid"}
# The activation modules whose function the gated forwards compute without calling them (fusion guard).
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
    """:func:`fastvit.ops.linear_glu`'s ``activation`` name for the activation module ``act`` (``nn.SiLU``,
    ``nn.Sigmoid``, ``nn.GELU`` exact or tanh, timm's ``Swish`` / ``Sigmoid`` / ``GELU`` / ``GELUTanh``), or ``None``
    when it is none of those (exact classes: a subclass may compute something else)."""
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


_GLU_ACT_NAMES = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
}


def _make_glu_act(act_layer: Any) -> nn.Module:
    """Build a gated MLP's activation: ``nn.SiLU``, ``nn.Sigmoid``, ``nn.GELU`` (exact or tanh), a class / partial
    building one, or one of the names ``'silu'`` / ``'swish'`` / ``'sigmoid'`` / ``'gelu'`` / ``'gelu_tanh'``.

    Raises:
        ValueError: anything else (the message names ``act_layer``).
    """
    if isinstance(act_layer, str):
        if act_layer.lower() not in _GLU_ACT_NAMES:
            raise ValueError(f"act_layer must be one of {sorted(_GLU_ACT_NAMES)}, got {act_layer!r}")
        return _GLU_ACT_NAMES[act_layer.lower()]()
    act = act_layer if isinstance(act_layer, nn.Module) else act_layer() if callable(act_layer) else None
    if act is None or glu_activation(act) is None:
        raise ValueError(
            f"act_layer of a gated MLP must be nn.SiLU, nn.Sigmoid or nn.GELU (exact or tanh), got {act_layer!r}"
        )
    return act


def glu_mlp_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Everything of a gated MLP before ``fc2``: ``norm(drop1(gate(fc1(x))))`` for :class:`GluMlp` (one packed
    ``fc1``, gate half picked by ``gate_last``) or ``norm(drop1(act(fc1_g(x)) * fc1_x(x)))`` for :class:`SwiGLU`
    (split ``fc1_g`` / ``fc1_x``) -- fastvit's or timm's, whose attribute names these are -- fc1 + gating as one
    :func:`fastvit.ops.linear_glu` reading the weights as stored (the packed weight's halves are row views, no
    copy); while something is attached to the fc1 layers or the activation, or the activation is none
    :func:`glu_activation` knows, they are called as modules (timm's arithmetic).

    Shapes: (..., in_features) -> (..., hidden), in the computation dtype.
    """
    mods = m._modules  # submodules read from the dict: see fastvit.nn.layers._weight_bias
    act = mods["act"]
    fc1 = mods.get("fc1")
    if fc1 is None:  # SwiGLU: split gate / value projections
        fc1_g, fc1_x = mods["fc1_g"], mods["fc1_x"]
        name = glu_activation(act)
        if name is None or needs_module_calls(fc1_g, fc1_x, act):
            h = act(fc1_g(x)) * fc1_x(x)
        else:
            (w, b), (wv, bv) = _weight_bias(fc1_g), _weight_bias(fc1_x)
            h = ops.linear_glu(x, w, b, wv, bv, activation=name)
    else:
        name = glu_activation(act)
        if name is None or needs_module_calls(fc1, act):
            x1, x2 = fc1(x).chunk(2, dim=-1)
            h = x1 * act(x2) if m.gate_last else act(x1) * x2
        else:
            w, b = _weight_bias(fc1)
            h = ops.linear_glu(x, w, b, activation=name, gate_last=bool(m.gate_last))
    drop1 = mods["drop1"]
    if not _skippable(drop1):
        h = drop1(h)
    return apply_norm(mods["norm"], h)


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class GluMlp(nn.Module):
    """Gated MLP with one packed fc1 (Dauphin et al., 2017; Shazeer, 2020): ``fc2(act(a) * b)`` with ``a, b`` the
    halves of ``fc1(x)`` (``gate_last=True``: ``a * act(b)``, ``F.glu``'s order) -- timm's ``GluMlp``, which
    ``EvaBlock(swiglu_mlp=True)`` builds as ``GluMlp(act_layer=nn.SiLU, gate_last=False)`` (EVA-02 Ti / S).

    Args:
        in_features: C_in. hidden_features: fc1's output width (2 · the gated width), even; default ``in_features``.
        out_features: default ``in_features``.
        act_layer: ``nn.Sigmoid`` (default, timm's), ``nn.SiLU``, ``nn.GELU`` (see :func:`_make_glu_act`).
        norm_layer: optional norm on the gated activation (hidden / 2 wide).
        bias: bool or (fc1, fc2) pair. drop: float or (after the gate, after fc2) pair.
        use_conv: must be False. gate_last: which half is the gate (see above).

    Shapes: (..., C_in) -> (..., out_features). Parameters: ``fc1`` (hidden, C_in), ``fc2``, ``norm``, as timm's.

    Raises:
        ValueError: odd ``hidden_features``, ``use_conv=True``, an activation :func:`fastvit.ops.linear_glu` lacks.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Any = nn.Sigmoid,
        norm_layer: Optional[Callable] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        use_conv: bool = False,
        gate_last: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if use_conv:
            raise ValueError("GluMlp(use_conv=True) is not supported by fastvit")
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if hidden_features % 2:
            raise ValueError(f"hidden_features must be even (two halves: gate and value), got {hidden_features}")
        b1, b2 = _pair(bias)
        d1, d2 = _pair(drop)
        self.chunk_dim = -1
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=b1, **dd)
        self.act = _make_glu_act(act_layer)
        self.drop1 = nn.Dropout(d1)
        self.norm = _make_norm(norm_layer, hidden_features // 2, dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features // 2, out_features, bias=b2, **dd)
        self.drop2 = nn.Dropout(d2)

    def forward_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., hidden / 2): everything before ``fc2`` (see :func:`glu_mlp_hidden`)."""
        return glu_mlp_hidden(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., out_features): :meth:`forward_hidden`, then ``drop2(fc2(.))``."""
        return self.drop2(self.fc2(glu_mlp_hidden(self, x)))


class SwiGLU(nn.Module):
    """SwiGLU MLP with split gate / value projections (Shazeer, 2020): ``fc2(norm(act(fc1_g(x)) * fc1_x(x)))`` --
    timm's ``SwiGLU``, which ``EvaBlock(swiglu_mlp=True, scale_mlp=True)`` builds (EVA-02 B / L, with a LayerNorm on
    the hidden activation).

    Args:
        in_features: C_in. hidden_features: the gated width; default ``in_features``. out_features: default
            ``in_features``. act_layer: ``nn.SiLU`` (default) or another activation of :func:`_make_glu_act`.
        norm_layer: optional norm on the hidden activation. bias, drop: as :class:`GluMlp`.
        align_to: round ``hidden_features`` up to a multiple of this (0: no rounding), as timm.

    Shapes: (..., C_in) -> (..., out_features). Parameters: ``fc1_g``, ``fc1_x``, ``norm``, ``fc2``, as timm's.

    Raises:
        ValueError: an activation :func:`fastvit.ops.linear_glu` lacks.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Any = nn.SiLU,
        norm_layer: Optional[Callable] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        align_to: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if align_to:
            hidden_features = hidden_features + (-hidden_features % align_to)
        b1, b2 = _pair(bias)
        d1, d2 = _pair(drop)
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=b1, **dd)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=b1, **dd)
        self.act = _make_glu_act(act_layer)
        self.drop1 = nn.Dropout(d1)
        self.norm = _make_norm(norm_layer, hidden_features, dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=b2, **dd)
        self.drop2 = nn.Dropout(d2)

    def forward_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., hidden): everything before ``fc2`` (see :func:`glu_mlp_hidden`)."""
        return glu_mlp_hidden(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., out_features): :meth:`forward_hidden`, then ``drop2(fc2(.))``."""
        return self.drop2(self.fc2(glu_mlp_hidden(self, x)))


# ----------------------------------------------------------------------------------------------- rotary attention
def _fused_qkv(m: nn.Module, qkv: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The fused projection (B, N, 3·H·D) as timm computes it: ``qkv(x)``, or with EvaAttention's q / v biases (k's
    is a zero buffer) ``F.linear`` on ``qkv``'s weight and the concatenated bias -- ``qkv(x) + bias`` when
    ``qkv_bias_separate`` or while something is attached to ``qkv`` (so a hook / adapter sees the call)."""
    params = m._parameters
    q_bias = params.get("q_bias")
    if q_bias is None:
        return qkv(x)  # a module call: adapters (LoRA) and hooks on qkv see it
    bias = torch.cat((q_bias, m._buffers["k_bias"], params["v_bias"]))
    if m.qkv_bias_separate or needs_module_calls(qkv):
        out = qkv(x)
        return out + bias.to(out.dtype)
    return F.linear(x, _weight_bias(qkv)[0], bias)


def rope_attention_core(
    m: nn.Module,
    x: torch.Tensor,
    rope: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Rotary self-attention up to (not including) ``proj``, for a module with timm's ``EvaAttention`` /
    ``AttentionRope`` attribute names: (B, N, C) -> (B, N, H·D), or packed (T, C) -> (T, H·D) with ``cu_seqlens``.

    A fused ``qkv`` without qk-norm runs as one :func:`fastvit.ops.attention` on the projection, which rotates q and
    k by ``rope`` as it loads them (the first ``num_prefix_tokens`` tokens unrotated; ``rotate_half`` picks timm's
    pairing). With qk-norm or separate q / k / v projections: :func:`fastvit.ops.scaled_dot_product_attention` with
    the same rotary arguments (grouped-query k / v heads repeated after the rotation, as timm). Then the scale norm
    (``norm``) and the sigmoid ``gate``, as timm applies them.

    Args:
        m: :class:`EvaAttention` / :class:`AttentionRope` (or timm's).
        x: (B, N, C) float; with ``cu_seqlens``: (T, C), S sequences packed without padding (NaViT, Dehghani et al.,
            2023), each attending only to itself.
        rope: timm's rotary table, fp32 (N - R, 2·D) shared or (H, N - R, 2·D) per head (RoPE-Mixed), or one per
            sample / packed sequence (B or S, 1 or H, N_rot, 2·D; timm's NaFlexVit), or ``None`` (see
            :func:`fastvit.ops.attention`).
        cu_seqlens: int32 (S + 1,) sequence offsets into ``x``'s rows, or ``None`` for a dense batch.
        max_seqlen: the longest sequence (``None``: computed from ``cu_seqlens``).

    Returns:
        (B, N, H·D) -- packed: (T, H·D) -- in the computation dtype.

    Raises:
        ValueError: a ``rope`` of the wrong shape, malformed ``cu_seqlens`` (from :mod:`fastvit.ops`).
    """
    lead = x.shape[:-1]  # (B, N), or (T,) packed
    H = m.num_heads
    mods = m._modules  # submodules read from the dict: see fastvit.nn.layers._weight_bias
    p = mods["attn_drop"].p if m.training else 0.0
    kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    if rope is not None:
        kw.update(rope=rope, num_prefix_tokens=m.num_prefix_tokens, rotate_half=bool(getattr(m, "rotate_half", False)))
    q_norm, k_norm = mods["q_norm"], mods["k_norm"]
    qkv_mod = mods.get("qkv")
    if qkv_mod is not None:
        qkv = _fused_qkv(m, qkv_mod, x)
        if _skippable(q_norm) and _skippable(k_norm):
            out = ops.attention(qkv, H, dropout_p=p, **kw)
            return _scale_norm_and_gate(mods, x, out)
        q, k, v = qkv.reshape(*lead, 3, H, -1).unbind(-3)  # each (..., H, D)
        kv_heads = H
    else:
        kv_heads = getattr(m, "num_kv_heads", H)
        q = mods["q_proj"](x).reshape(*lead, H, -1)
        k = mods["k_proj"](x).reshape(*lead, kv_heads, -1)
        v = mods["v_proj"](x).reshape(*lead, kv_heads, -1)
    q, k = apply_norm(q_norm, q), apply_norm(k_norm, k)
    if kv_heads != H:  # each k / v head serves H / kv_heads query heads, timm's order
        k = k.repeat_interleave(H // kv_heads, dim=-2)
        v = v.repeat_interleave(H // kv_heads, dim=-2)
    if cu_seqlens is None:  # (B, N, H, D) -> SDPA's (B, H, N, D); packed ops take (T, H, D) as they are
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = ops.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw).transpose(1, 2)
    else:
        out = ops.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw)
    return _scale_norm_and_gate(mods, x, out.reshape(*lead, -1))


def _scale_norm_and_gate(mods: dict, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """timm's scale norm on the attention output, then its sigmoid gate (computed from the block input ``x``)."""
    out = apply_norm(mods["norm"], out)
    gate = mods.get("gate")
    return out if gate is None else out * gate(x).sigmoid()


def _check_heads(dim: int, num_heads: int, attn_head_dim: Optional[int]) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if attn_head_dim is None:
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) (or pass attn_head_dim)")
        return dim // num_heads
    return attn_head_dim


class _RopeAttentionBase(nn.Module):
    def forward_core(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, H·D), or packed (T, C) -> (T, H·D) with ``cu_seqlens``: everything before ``proj``
        (see :func:`rope_attention_core`)."""
        return rope_attention_core(self, x, rope, cu_seqlens, max_seqlen)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, dim_out) with timm's rotary table ``rope``; packed (T, C) -> (T, dim_out) with
        ``cu_seqlens`` (int32 (S + 1,) sequence offsets; see :func:`rope_attention_core`).

        Raises:
            ValueError: ``attn_mask`` or ``is_causal`` given (fastvit's attention has no masks).
        """
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__}: attn_mask / is_causal are not supported by fastvit")
        return self.proj_drop(self.proj(rope_attention_core(self, x, rope, cu_seqlens, max_seqlen)))


class EvaAttention(_RopeAttentionBase):
    """EVA's rotary self-attention (timm's ``EvaAttention``): fused ``qkv`` without bias plus learnable q / v biases
    (k's bias is a fixed zero buffer, as BEiT), or separate ``q_proj`` / ``k_proj`` (no bias) / ``v_proj``
    (``qkv_fused=False``, EVA-02 B / L); optional qk-norm, scale norm and sigmoid gate.

    Args (timm's names and defaults):
        dim: C. num_heads: H. qkv_bias: q / v biases. qkv_fused: one (3·H·D, C) projection.
        qkv_bias_separate: add the bias after the projection instead of inside it (same math).
        num_prefix_tokens: R, the leading tokens the rotation skips. attn_drop, proj_drop: dropout rates.
        attn_head_dim: D (default C / H). norm_layer: builds the q / k / scale norms (required with ``qk_norm`` or
        ``scale_norm``). qk_norm: norm q and k per head. scale_norm: norm the attention output (timm's default True;
        ``EvaBlock`` passes its ``scale_attn_inner``). rotate_half: timm's half rotation layout (DINOv3) instead of
        interleaved pairs. gated: sigmoid gate on the output.

    Shapes: (B, N, C) -> (B, N, C), with ``rope`` timm's table (see :func:`rope_attention_core`).

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``; ``qk_norm`` / ``scale_norm`` without ``norm_layer``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        qkv_bias_separate: bool = False,
        num_prefix_tokens: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_head_dim: Optional[int] = None,
        norm_layer: Optional[Callable] = None,
        qk_norm: bool = False,
        scale_norm: bool = True,
        rotate_half: bool = False,
        gated: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if (scale_norm or qk_norm) and norm_layer is None:
            raise ValueError("EvaAttention: norm_layer must be given with qk_norm=True or scale_norm=True")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = _check_heads(dim, num_heads, attn_head_dim)
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.fused_attn = True
        self.qkv_bias_separate = qkv_bias_separate
        self.rotate_half = rotate_half
        if qkv_fused:
            self.qkv = nn.Linear(dim, attn_dim * 3, bias=False, **dd)
            self.q_proj = self.k_proj = self.v_proj = None
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
                self.register_buffer("k_bias", torch.zeros(attn_dim, **dd), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
            else:
                self.q_bias = self.k_bias = self.v_bias = None
        else:
            self.q_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, attn_dim, bias=False, **dd)
            self.v_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.qkv = None
            self.q_bias = self.k_bias = self.v_bias = None
        self.q_norm = _make_norm(norm_layer, self.head_dim, dd) if qk_norm else nn.Identity()
        self.k_norm = _make_norm(norm_layer, self.head_dim, dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _make_norm(norm_layer, attn_dim, dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)


class AttentionRope(_RopeAttentionBase):
    """Rotary self-attention with an ordinary (biased) fused ``qkv`` (timm's ``AttentionRope``: RoPE-ViT, Perception
    Encoder), or separate q / k / v projections with optional grouped-query k / v heads (``num_kv_heads``).

    Args (timm's names and defaults): dim, num_heads, dim_out (default ``dim``), qkv_bias, qkv_fused,
        num_prefix_tokens, attn_drop, proj_drop, attn_head_dim, norm_layer, qk_norm, scale_norm (default False),
        proj_bias, rotate_half, gated, num_kv_heads (``None``: H; needs ``qkv_fused=False`` otherwise).

    Shapes: (B, N, C) -> (B, N, dim_out), with ``rope`` timm's table (see :func:`rope_attention_core`).

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``; ``num_heads`` not divisible by ``num_kv_heads``, or
            grouped-query heads with a fused ``qkv``; qk / scale norm without ``norm_layer``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        dim_out: Optional[int] = None,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        num_prefix_tokens: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_head_dim: Optional[int] = None,
        norm_layer: Optional[Callable] = None,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        rotate_half: bool = False,
        gated: bool = False,
        num_kv_heads: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if (scale_norm or qk_norm) and norm_layer is None:
            raise ValueError("AttentionRope: norm_layer must be given with qk_norm=True or scale_norm=True")
        dd = {"device": device, "dtype": dtype}
        head_dim = _check_heads(dim, num_heads, attn_head_dim)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if qkv_fused and num_kv_heads != num_heads:
            raise ValueError("num_kv_heads != num_heads (grouped-query attention) needs qkv_fused=False")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.attn_dim = head_dim * num_heads
        self.kv_dim = head_dim * num_kv_heads
        self.scale = head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.fused_attn = True
        self.rotate_half = rotate_half
        if qkv_fused:
            self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, self.kv_dim, bias=qkv_bias, **dd)
            self.v_proj = nn.Linear(dim, self.kv_dim, bias=qkv_bias, **dd)
        self.q_norm = _make_norm(norm_layer, head_dim, dd) if qk_norm else nn.Identity()
        self.k_norm = _make_norm(norm_layer, head_dim, dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _make_norm(norm_layer, self.attn_dim, dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)


# ----------------------------------------------------------------------------------------------- block
#: What :func:`eva_block_forward`'s fused path reads instead of calling (the attention's projections, the MLP's fc1
#: and the norms decide for themselves).
EVA_BLOCK_FUSED_READS = (
    ("attn",),
    ("attn", "proj"),
    ("attn", "proj_drop"),
    ("drop_path1",),
    ("mlp",),
    ("mlp", "fc2"),
    ("mlp", "drop2"),
    ("drop_path2",),
)


def _eva_block_fusable(m: nn.Module) -> bool:
    if _global_hooks() or _wrapper_param(m):  # gamma_1 / gamma_2 live on the block itself
        return False
    mods = m._modules
    attn, mlp = mods["attn"], mods["mlp"]
    am, mm = attn._modules, mlp._modules
    return not _any_attached(
        (attn, am["proj"], am["proj_drop"], mods["drop_path1"], mlp, mm["fc2"], mm["drop2"], mods["drop_path2"])
    )


def eva_block_fusion_reasons(m: nn.Module, ignore_params: frozenset = frozenset()) -> List[str]:
    """Why :func:`eva_block_forward` calls ``m``'s attention / MLP / drop paths as modules now (empty: it fuses):
    one string per cause, naming the submodule and what is attached (see :func:`fastvit.nn.layers.fusion_reasons`)."""
    out = fusion_reasons(m, [".".join(p) for p in EVA_BLOCK_FUSED_READS], ignore_params)
    if _wrapper_param(m, ignore_params):
        out.append("gamma_1 / gamma_2 is a DTensor / tensor-subclass parameter")
    return out


def _eva_branch(
    x: torch.Tensor,
    h: torch.Tensor,
    linear: nn.Module,
    drop: nn.Module,
    gamma,
    dp: nn.Module,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x + dp(gamma · drop(linear(h)))``: one :func:`fastvit.ops.linear_residual` while the dropouts do nothing;
    on packed tokens (``cu_seqlens``) an active drop path draws once per sequence."""
    if not _dropout_active(drop) and not _dropout_active(dp):
        weight, bias = _weight_bias(linear)
        return ops.linear_residual(h, weight, bias, x, gamma=gamma)
    y = drop(linear(h))
    return _residual(x, y if gamma is None else gamma * y, dp, cu_seqlens)


def eva_block_forward(
    m: nn.Module,
    x: torch.Tensor,
    rope: Optional[torch.Tensor] = None,
    mlp_hidden: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Pre-norm Eva block ``x + dp1(gamma_1 · attn(norm1(x), rope))``, ``x + dp2(gamma_2 · mlp(norm2(x)))`` (timm's
    ``EvaBlock.forward``) for a module with its attribute names: fastvit's :class:`EvaBlock` or timm's (patched by
    :func:`fastvit.integrations.patch_timm_`).

    Fused: the attention up to ``proj`` (its class's ``forward_core``, else :func:`rope_attention_core`) and the MLP
    up to ``fc2`` (``mlp_hidden``, else its class's ``forward_hidden``), then ``proj`` / ``fc2`` + LayerScale +
    residual as :func:`fastvit.ops.linear_residual`; norms through :func:`fastvit.nn.layers.apply_norm`. While
    something is attached to the attention, the MLP, their output projections, the drop paths or the gammas, the
    attention and MLP are called as modules (timm's forward).

    Args:
        m: an :class:`EvaBlock` (or timm's).
        x: (B, N, C) float.
        rope: timm's rotary table for this block (see :func:`rope_attention_core`) or ``None``.
        mlp_hidden: ``fn(mlp, x)`` computing the MLP before ``fc2``, for an MLP class without ``forward_hidden``
            (timm's: :func:`glu_mlp_hidden` or :func:`fastvit.nn.layers.mlp_hidden`).
        cu_seqlens: int32 (S + 1,) offsets of S sequences packed along dim 0 of a (T, C) ``x`` (NaViT); only the
            attention (each sequence attends to itself) and an active drop path (one draw per sequence) read it.
        max_seqlen: the longest sequence (``None``: computed from ``cu_seqlens``).

    Returns:
        (B, N, C) in the computation dtype.
    """
    mods = m._modules
    params = m._parameters
    g1, g2 = params.get("gamma_1"), params.get("gamma_2")
    attn, mlp = mods["attn"], mods["mlp"]
    if not _eva_block_fusable(m):
        kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        y = attn(apply_norm(mods["norm1"], x), rope=rope, **kw)
        x = _residual(x, y if g1 is None else g1 * y, mods["drop_path1"], cu_seqlens)
        y = mlp(apply_norm(mods["norm2"], x))
        return _residual(x, y if g2 is None else g2 * y, mods["drop_path2"], cu_seqlens)
    am, mm = attn._modules, mlp._modules
    core = getattr(type(attn), "forward_core", None)  # a class attribute: no nn.Module.__getattr__
    a = apply_norm(mods["norm1"], x)
    if core is None:
        core = rope_attention_core
    h = core(attn, a, rope) if cu_seqlens is None else core(attn, a, rope, cu_seqlens, max_seqlen)
    x = _eva_branch(x, h, am["proj"], am["proj_drop"], g1, mods["drop_path1"], cu_seqlens)
    hidden = mlp_hidden or type(mlp).forward_hidden
    h = hidden(mlp, apply_norm(mods["norm2"], x))
    return _eva_branch(x, h, mm["fc2"], mm["drop2"], g2, mods["drop_path2"], cu_seqlens)


class EvaBlock(nn.Module):
    """Pre-norm Eva transformer block with rotary attention, optional gated MLP and LayerScale (timm's ``EvaBlock``).

    Layers come in by injection as in timm's other blocks: ``attn_layer`` (default by ``attn_type``:
    :class:`EvaAttention` for ``'eva'``, :class:`AttentionRope` for ``'rope'``), ``mlp_layer`` (default by timm's
    flags: :class:`SwiGLU` with ``swiglu_mlp`` and (``scale_mlp`` or ``swiglu_align_to``), :class:`GluMlp` (SiLU, gate
    first, 2x width) with ``swiglu_mlp`` alone, else fastvit's :class:`~fastvit.nn.layers.Mlp`), ``norm_layer``.
    An injected MLP is built as ``mlp_layer(in_features=C, hidden_features=int(C · mlp_ratio), norm_layer=...,
    drop=proj_drop)`` and must have ``forward_hidden``, ``fc2`` and ``drop2``; an injected attention takes
    :class:`EvaAttention`'s arguments and must have ``forward_core``, ``proj`` and ``proj_drop``.

    Args (timm's names and defaults): dim (C), num_heads, qkv_bias, qkv_fused, mlp_ratio, swiglu_mlp,
        swiglu_align_to, scale_mlp, scale_attn_inner, num_prefix_tokens, attn_type, rotate_half, gated_attn, qk_norm,
        num_kv_heads, proj_drop, attn_drop, drop_path, init_values (LayerScale ``gamma_1`` / ``gamma_2``; None: off),
        attn_only_layer_scale, act_layer (of the plain MLP), norm_layer (default ``nn.LayerNorm(eps=1e-6)``),
        attn_head_dim.

    Parameters: ``norm1``, ``attn``, ``gamma_1``, ``norm2``, ``mlp``, ``gamma_2``, as timm's.
    Shapes: ``forward(x, rope)``: (B, N, C) -> (B, N, C) (see :func:`eva_block_forward`).

    Raises:
        ValueError: an unknown ``attn_type``, ``num_kv_heads`` with ``attn_type='eva'``, and the errors of the
            attention / MLP constructors.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        mlp_ratio: float = 4.0,
        swiglu_mlp: bool = False,
        swiglu_align_to: int = 0,
        scale_mlp: bool = False,
        scale_attn_inner: bool = False,
        num_prefix_tokens: int = 1,
        attn_type: str = "eva",
        rotate_half: bool = False,
        gated_attn: bool = False,
        qk_norm: bool = False,
        num_kv_heads: Optional[int] = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: Optional[float] = None,
        attn_only_layer_scale: bool = False,
        act_layer: Any = nn.GELU,
        norm_layer: Optional[Callable] = None,
        attn_head_dim: Optional[int] = None,
        mlp_layer: Optional[Callable] = None,
        attn_layer: Optional[Callable] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if attn_type not in ("eva", "rope"):
            raise ValueError(f"attn_type must be 'eva' or 'rope', got {attn_type!r}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        attn_kw: Dict[str, Any] = {}
        if attn_layer is None:
            attn_layer = AttentionRope if attn_type == "rope" else EvaAttention
        if attn_layer is AttentionRope:
            attn_kw["num_kv_heads"] = num_kv_heads
        elif num_kv_heads not in (None, num_heads):
            raise ValueError("num_kv_heads (grouped-query attention) needs attn_type='rope'")
        self.norm1 = _make_norm(norm_layer, dim, dd)
        self.attn = attn_layer(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qkv_fused=qkv_fused,
            num_prefix_tokens=num_prefix_tokens,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            attn_head_dim=attn_head_dim,
            norm_layer=norm_layer,
            qk_norm=qk_norm,
            scale_norm=scale_attn_inner,
            rotate_half=rotate_half,
            gated=gated_attn,
            **attn_kw,
            **dd,
        )
        self.init_values = init_values
        self.gamma_1 = nn.Parameter(torch.empty(dim, **dd)) if init_values is not None else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _make_norm(norm_layer, dim, dd)
        hidden = int(dim * mlp_ratio)
        mlp_norm = norm_layer if scale_mlp else None
        if mlp_layer is not None:
            self.mlp = mlp_layer(in_features=dim, hidden_features=hidden, norm_layer=mlp_norm, drop=proj_drop, **dd)
        elif swiglu_mlp and (scale_mlp or swiglu_align_to):
            self.mlp = SwiGLU(dim, hidden, norm_layer=mlp_norm, drop=proj_drop, align_to=swiglu_align_to, **dd)
        elif swiglu_mlp:
            self.mlp = GluMlp(dim, hidden * 2, act_layer=nn.SiLU, gate_last=False, drop=proj_drop, **dd)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, norm_layer=mlp_norm, drop=proj_drop, **dd)
            kw = {k: v for k, v in dd.items() if v is not None}
            if mlp_norm is not None and kw:
                self.mlp.norm.to(**kw)
        use_mlp_ls = init_values is not None and not attn_only_layer_scale
        self.gamma_2 = nn.Parameter(torch.empty(dim, **dd)) if use_mlp_ls else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill ``gamma_1`` / ``gamma_2`` with ``init_values``."""
        for g in (self.gamma_1, self.gamma_2):
            if g is not None:
                nn.init.constant_(g, self.init_values)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); packed (T, C) -> (T, C) with ``cu_seqlens`` / ``max_seqlen`` (see
        :func:`eva_block_forward`).

        Raises:
            ValueError: ``attn_mask`` or ``is_causal`` given (fastvit's attention has no masks).
        """
        if attn_mask is not None or is_causal:
            raise ValueError("EvaBlock: attn_mask / is_causal are not supported by fastvit")
        return eva_block_forward(self, x, rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


# ----------------------------------------------------------------------------------------------- attention pool
class AttentionPoolLatent(nn.Module):
    """Attention pooling with a learned latent query (timm's ``AttentionPoolLatent``, the ``'map'`` pool of PE core
    and SigLIP; Lee et al., 2019, "Set Transformer", PMA): the latent attends over the tokens through
    :func:`fastvit.ops.scaled_dot_product_attention`, then ``proj`` and a residual MLP.

    Args (timm's names): in_features (C), out_features (default C; 0: no proj / norm / MLP), embed_dim (default C),
        num_heads, mlp_ratio, qkv_bias, q_proj, qk_norm, latent_len, latent_dim, pos_embed (``''`` only),
        pool_type (``'token'``, ``'avg'`` or ``''``), norm_layer, act_layer (of the MLP), drop.

    Shapes: (B, N, C) -> (B, out_features) (``pool_type=''``: (B, latent_len, out_features)).
    Parameters: ``latent``, ``q``, ``kv``, ``q_norm``, ``k_norm``, ``proj``, ``norm``, ``mlp``, as timm's.

    Raises:
        ValueError: ``pos_embed`` other than ``''``, ``embed_dim`` not divisible by ``num_heads``, an unknown
            ``pool_type``, ``q_proj=False`` with ``latent_dim != embed_dim``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        embed_dim: Optional[int] = None,
        num_heads: int = 8,
        feat_size: Optional[int] = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        q_proj: bool = True,
        qk_norm: bool = False,
        latent_len: int = 1,
        latent_dim: Optional[int] = None,
        pos_embed: str = "",
        pool_type: str = "token",
        norm_layer: Optional[Callable] = None,
        act_layer: Any = nn.GELU,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        embed_dim = embed_dim or in_features
        out_features = in_features if out_features is None else out_features
        if pos_embed:
            raise ValueError(f"AttentionPoolLatent(pos_embed={pos_embed!r}) is not supported by fastvit (use '')")
        if pool_type not in ("token", "avg", ""):
            raise ValueError(f"pool_type must be 'token', 'avg' or '', got {pool_type!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.feat_size = feat_size
        self.scale = self.head_dim**-0.5
        self.pool = pool_type
        self.fused_attn = True
        self.pos_embed = None
        self.latent_dim = latent_dim or embed_dim
        if not q_proj and self.latent_dim != embed_dim:
            raise ValueError(f"q_proj=False needs latent_dim == embed_dim, got {self.latent_dim} and {embed_dim}")
        self.latent_len = latent_len
        self.latent = nn.Parameter(torch.zeros(1, latent_len, self.latent_dim, **dd))
        self.q = nn.Linear(self.latent_dim, embed_dim, bias=qkv_bias, **dd) if q_proj else nn.Identity()
        self.kv = nn.Linear(embed_dim, embed_dim * 2, bias=qkv_bias, **dd)
        qk_norm_layer = norm_layer or nn.LayerNorm
        self.q_norm = _make_norm(qk_norm_layer, self.head_dim, dd) if qk_norm else nn.Identity()
        self.k_norm = _make_norm(qk_norm_layer, self.head_dim, dd) if qk_norm else nn.Identity()
        if out_features > 0:
            self.proj = nn.Linear(embed_dim, out_features, **dd)
            self.proj_drop = nn.Dropout(drop)
            self.norm = _make_norm(norm_layer, out_features, dd) if norm_layer is not None else nn.Identity()
            self.mlp = Mlp(out_features, int(out_features * mlp_ratio), act_layer=act_layer, **dd)
        else:
            self.proj = nn.Identity()
            self.proj_drop = nn.Dropout(drop)
            self.norm = nn.Identity()
            self.mlp = None
            out_features = embed_dim
        self.out_features = out_features
        self.init_weights()

    def init_weights(self) -> None:
        """timm's: ``latent`` truncated normal with std ``latent_dim ** -0.5`` (cut at 2 std)."""
        std = self.latent_dim**-0.5
        nn.init.trunc_normal_(self.latent, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, C) -> pooled (see the class docstring).

        Raises:
            ValueError: ``attn_mask`` given.
        """
        if attn_mask is not None:
            raise ValueError("AttentionPoolLatent: attn_mask is not supported by fastvit")
        B, N, _ = x.shape
        H, L = self.num_heads, self.latent_len
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, L, H, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_norm(self.q_norm, q), apply_norm(self.k_norm, k)
        out = ops.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
        out = self.proj_drop(self.proj(out))
        if self.mlp is not None:
            out = out + self.mlp(apply_norm(self.norm, out))
        if self.pool == "token":
            return out[:, 0]
        if self.pool == "avg":
            return out.mean(1)
        return out


# ----------------------------------------------------------------------------------------------- model
def _timm_rope(rope_type: str, **kwargs) -> nn.Module:
    """timm's rotary-table module for ``rope_type`` (``timm.layers.create_rope_embed``).

    Raises:
        ImportError: timm is not installed (the message says which option needs it).
    """
    try:
        from timm.layers import create_rope_embed
    except ImportError as e:
        raise ImportError(
            "fastvit.nn.Eva(use_rot_pos_emb=True) builds its rotary tables with timm's rope modules "
            "(RotaryEmbeddingCat / RotaryEmbeddingMixed / RotaryEmbeddingDinoV3): pip install timm"
        ) from e
    return create_rope_embed(rope_type=rope_type, **kwargs)


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> None:
    # timm's trunc_normal_ cuts at +-2 (absolute): for std .02 effectively a plain normal
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class Eva(nn.Module):
    """timm's ``Eva`` vision transformer (EVA-02, DINOv3, Perception Encoder, RoPE-ViT axial and mixed) with timm's
    constructor arguments, methods and ``state_dict`` keys, on :mod:`fastvit.ops`.

    Args (timm's names and defaults; see timm ``models/eva.py``):
        img_size, patch_size, in_chans, num_classes (0: no head).
        global_pool: ``'avg'`` (default), ``'token'``, ``'max'``, ``'avgmax'``, ``''`` or ``'map'``
            (:class:`AttentionPoolLatent`).
        embed_dim (C), depth, num_heads, num_kv_heads (grouped-query, ``attn_type='rope'`` with unfused qkv),
        qkv_bias, qkv_fused, qk_norm, mlp_ratio, swiglu_mlp, swiglu_align_to, scale_mlp, scale_attn_inner,
        attn_type (``'eva'``: :class:`EvaAttention`, ``'rope'``: :class:`AttentionRope`).
        drop_rate (head), pos_drop_rate, patch_drop_rate (with rope: a table per sample), proj_drop_rate,
        attn_drop_rate, drop_path_rate (linear over depth).
        norm_layer: builds every norm (default ``nn.LayerNorm(eps=1e-6)``; :class:`RmsNorm` is accepted).
        init_values (LayerScale), attn_only_layer_scale, class_token, num_reg_tokens, no_embed_class,
        use_abs_pos_emb, use_rot_pos_emb.
        rope_type (``'cat'``, ``'mixed'``, ``'dinov3'``), rope_grid_offset, rope_grid_indexing, rope_temperature,
        rope_rotate_half, rope_shift_coords / rope_jitter_coords / rope_rescale_coords (DINOv3's train-time
        augmentations): passed to timm's rope module.
        use_pre_transformer_norm, use_post_transformer_norm, use_fc_norm (timm's defaults: fc_norm with avg
        pooling, else the final norm), attn_pool_num_heads, attn_pool_mlp_ratio, dynamic_img_size,
        ref_feat_shape, head_init_scale.
        use_post_norm, dynamic_img_pad, rope_mrope_section: must keep their defaults.

    Shapes: ``forward`` (B, in_chans, Hi, Wi) -> (B, num_classes) (num_classes 0: (B, C)); ``forward_features`` ->
    (B, R + Np, C), R = ``num_prefix_tokens`` (cls + registers). The rotary table is fp32 whatever the compute dtype.

    Raises:
        ImportError: ``use_rot_pos_emb=True`` without timm installed.
        ValueError: an option fastvit does not implement (the message names it), ``global_pool='token'`` without a
            class token, ``embed_dim`` not divisible by ``num_heads``; at forward, a bad image (see
            :class:`~fastvit.nn.layers.PatchEmbed`), ``attn_mask`` / ``is_causal``.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_kv_heads: Optional[Union[int, Tuple[int, ...]]] = None,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        qk_norm: bool = False,
        mlp_ratio: float = 4.0,
        swiglu_mlp: bool = False,
        swiglu_align_to: int = 0,
        scale_mlp: bool = False,
        scale_attn_inner: bool = False,
        attn_type: str = "eva",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Optional[Callable] = None,
        init_values: Optional[float] = None,
        attn_only_layer_scale: bool = False,
        class_token: bool = True,
        num_reg_tokens: int = 0,
        no_embed_class: bool = False,
        use_abs_pos_emb: bool = True,
        use_rot_pos_emb: bool = False,
        rope_type: Optional[str] = "cat",
        rope_grid_offset: float = 0.0,
        rope_grid_indexing: str = "ij",
        rope_temperature: float = 10000.0,
        rope_rotate_half: bool = False,
        rope_shift_coords: Optional[float] = None,
        rope_jitter_coords: Optional[float] = None,
        rope_rescale_coords: Optional[float] = None,
        rope_mrope_section: Optional[Tuple[int, int, int]] = None,
        use_post_norm: bool = False,
        use_pre_transformer_norm: bool = False,
        use_post_transformer_norm: Optional[bool] = None,
        use_fc_norm: Optional[bool] = None,
        attn_pool_num_heads: Optional[int] = None,
        attn_pool_mlp_ratio: Optional[float] = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        ref_feat_shape: Optional[Union[Tuple[int, int], int]] = None,
        head_init_scale: float = 0.001,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if use_post_norm:
            raise ValueError("use_post_norm=True (timm's EvaBlockPostNorm) is not supported by fastvit")
        if dynamic_img_pad:
            raise ValueError("dynamic_img_pad=True is not supported by fastvit")
        if use_rot_pos_emb and rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {_ROPE_TYPES} (MRoPE is not supported), got {rope_type!r}")
        if rope_mrope_section is not None:
            raise ValueError("rope_mrope_section (MRoPE) is not supported by fastvit")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads!r}) must be a positive int dividing embed_dim ({embed_dim})")
        if isinstance(num_reg_tokens, bool) or not isinstance(num_reg_tokens, int) or num_reg_tokens < 0:
            raise ValueError(f"num_reg_tokens must be a non-negative int, got {num_reg_tokens!r}")
        if num_kv_heads is None or isinstance(num_kv_heads, int):
            num_kv_heads = (num_kv_heads,) * depth
        if len(num_kv_heads) != depth:
            raise ValueError(f"num_kv_heads must be an int or have one entry per block ({depth}), got {num_kv_heads}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        fc_norm_on = (global_pool == "avg") if use_fc_norm is None else bool(use_fc_norm)
        post_norm_on = (not fc_norm_on) if use_post_transformer_norm is None else bool(use_post_transformer_norm)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token) + num_reg_tokens
        self.num_reg_tokens = num_reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.pretrained_cfg: Dict[str, Any] = {}

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=not use_pre_transformer_norm,
            strict_img_size=not dynamic_img_size,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, num_reg_tokens, embed_dim, **dd)) if num_reg_tokens else None
        self.cls_embed = class_token and self.reg_token is None
        num_pos = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.empty(1, num_pos, embed_dim, **dd)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = (  # with rope, the kept indices pick each sample's rotary rows (a table per sample)
            PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens, return_indices=use_rot_pos_emb)
            if patch_drop_rate > 0
            else None
        )

        self.rope_mixed = False
        if use_rot_pos_emb:
            rope_kw: Dict[str, Any] = dict(
                dim=embed_dim,
                num_heads=num_heads,
                feat_shape=None if dynamic_img_size else self.patch_embed.grid_size,
                temperature=rope_temperature,
                grid_indexing=rope_grid_indexing,
                rotate_half=rope_rotate_half,
                shift_coords=rope_shift_coords,
                jitter_coords=rope_jitter_coords,
                rescale_coords=rope_rescale_coords,
                **dd,
            )
            if rope_type == "mixed":
                if rope_rotate_half:
                    raise ValueError("rope_type='mixed' needs rope_rotate_half=False (timm's RoPE-Mixed layout)")
                rope_kw["depth"] = depth
                self.rope_mixed = True
            elif rope_type == "cat":
                ref = (ref_feat_shape,) * 2 if isinstance(ref_feat_shape, int) else ref_feat_shape
                rope_kw.update(in_pixels=False, grid_offset=rope_grid_offset, ref_feat_shape=ref)
            else:
                rope_kw["grid_offset"] = rope_grid_offset
            self.rope = _timm_rope(rope_type, **rope_kw)
        else:
            self.rope = None

        self.norm_pre = _make_norm(norm_layer, embed_dim, dd) if use_pre_transformer_norm else nn.Identity()
        dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth
        self.blocks = nn.ModuleList(
            [
                EvaBlock(
                    dim=embed_dim,
                    num_heads=num_heads,
                    qkv_bias=qkv_bias,
                    qkv_fused=qkv_fused,
                    mlp_ratio=mlp_ratio,
                    swiglu_mlp=swiglu_mlp,
                    swiglu_align_to=swiglu_align_to,
                    scale_mlp=scale_mlp,
                    scale_attn_inner=scale_attn_inner,
                    attn_type=attn_type,
                    rotate_half=rope_rotate_half,
                    num_prefix_tokens=self.num_prefix_tokens,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    init_values=init_values,
                    qk_norm=qk_norm,
                    attn_only_layer_scale=attn_only_layer_scale,
                    num_kv_heads=num_kv_heads[i],
                    **dd,
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = _make_norm(norm_layer, embed_dim, dd) if post_norm_on else nn.Identity()
        if global_pool == "map":
            self.attn_pool = AttentionPoolLatent(
                embed_dim,
                num_heads=attn_pool_num_heads or num_heads,
                mlp_ratio=attn_pool_mlp_ratio or mlp_ratio,
                norm_layer=norm_layer,
                act_layer=nn.GELU,
                **dd,
            )
        else:
            self.attn_pool = None
        self.fc_norm = _make_norm(norm_layer, embed_dim, dd) if fc_norm_on else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_init_scale = head_init_scale
        self.init_weights()

    # ------------------------------------------------------------------------------------------- setup
    def init_weights(self) -> None:
        """timm's ``Eva`` init: truncated normal (std .02) for every Linear weight, ``pos_embed``, the cls and
        register tokens; zero Linear biases; each block's ``attn.proj`` / ``mlp.fc2`` weight divided by
        sqrt(2 · (i + 1)); the head scaled by ``head_init_scale``; LayerScale ``init_values``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for t in (self.pos_embed, self.cls_token, self.reg_token):
            if t is not None:
                _trunc_normal_(t)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (i + 1))
                blk.attn.proj.weight.div_(scale)
                blk.mlp.fc2.weight.div_(scale)
                blk.reset_parameters()
            if self.head_init_scale and isinstance(self.head, nn.Linear):
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    # ------------------------------------------------------------------------------------------- training APIs
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names excluded from weight decay, as timm's ``Eva.no_weight_decay`` (the mixed rope's
        frequencies included)."""
        nwd = {"pos_embed", "cls_token", "reg_token"}
        rope = self.rope
        if rope is not None and hasattr(rope, "no_weight_decay"):
            return nwd | {f"rope.{p}" for p in rope.no_weight_decay()}
        return nwd

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Layer groups for layer-wise LR decay, as timm's ``Eva.group_matcher``."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Run each block as one non-reentrant ``torch.utils.checkpoint`` segment (timm's ``checkpoint``)."""
        self.grad_checkpointing = bool(enable)

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head (``nn.Linear`` or ``nn.Identity``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh ``nn.Linear(embed_dim, num_classes)`` (``nn.Identity`` for 0), optionally
        changing ``global_pool`` (``'map'`` only while the attention pool exists; another pool drops it), as timm.

        Raises:
            ValueError: an unknown ``global_pool``, ``'token'`` without a class token, ``'map'`` without a pool.
        """
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' cannot add an attention pool after construction")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Change the model's fixed input size as timm's ``Eva.set_input_size``: ``pos_embed`` resampled (bicubic,
        antialias) to the new token grid, the rotary module's grid updated (``update_feat_shape``).

        Raises:
            ValueError: ``img_size`` not divisible by the patch size.
        """
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        grid = self.patch_embed.grid_size
        if self.pos_embed is not None and grid != old_grid:
            new = resample_abs_pos_embed(
                self.pos_embed.detach(),
                grid,
                old_size=old_grid,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
            self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        if self.rope is not None and hasattr(self.rope, "update_feat_shape"):
            self.rope.update_feat_shape(grid)

    # ------------------------------------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images (B, in_chans, Hi, Wi) -> tokens (B, R + Np, C) and the rotary table for their grid."""
        self.patch_embed.check_input(x)
        pe = self.patch_embed
        grid = pe.dynamic_feat_size(x.shape[-2:]) if self.dynamic_img_size else pe.grid_size
        pos = self.pos_embed
        if self.dynamic_img_size and pos is not None:
            pos = resample_abs_pos_embed(
                pos, grid, old_size=pe.grid_size, num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens
            )
        rope = None
        if self.rope is not None:
            rope = self.rope.get_embed(shape=list(grid)) if self.dynamic_img_size else self._static_rope(grid)
        x = embed_patches(pe, x, pos_embed=pos, cls_token=self.cls_token, reg_tokens=self.reg_token)
        if not _skippable(self.pos_drop):
            x = self.pos_drop(x)
        if self.patch_drop is not None:
            if not self.patch_drop.return_indices:
                x = self.patch_drop(x)
            else:
                x, keep = self.patch_drop(x)
                if keep is not None and rope is not None:
                    rope = self._kept_rope(rope, keep)
        return x, rope

    def _kept_rope(self, rope: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The rotary rows of the patches patch dropout kept, one table per sample (timm's ``apply_keep_indices_nlc``):
        (Np, 2·D) -> (B, 1, N_keep, 2·D); mixed (depth, H, Np, 2·D) -> (depth, B, H, N_keep, 2·D)."""
        if self.rope_mixed:
            return rope[:, :, keep].transpose(1, 2)  # (depth, H, B, N_keep, 2·D) -> (depth, B, H, ...)
        return rope[keep].unsqueeze(1)

    def _static_rope(self, grid: Tuple[int, int]) -> torch.Tensor:
        if getattr(self.rope, "feat_shape", None) is not None:
            return self.rope.get_embed()
        return self.rope.get_embed(shape=list(grid))

    def _run_block(self, blk: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, rope, use_reentrant=False)
        return blk(x, rope)

    def _block_ropes(self, rope: Optional[torch.Tensor], n: int) -> Sequence[Optional[torch.Tensor]]:
        if self.rope_mixed and rope is not None:
            return [rope[i] for i in range(n)]  # (depth, H, Np, 2·D): a per-head table per block
        return [rope] * n

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """(B, in_chans, Hi, Wi) -> (B, R + Np, C) token features after the final norm (timm's
        ``forward_features``).

        Raises:
            ValueError: ``attn_mask`` / ``is_causal`` given; a bad image.
        """
        if attn_mask is not None or is_causal:
            raise ValueError("Eva: attn_mask / is_causal are not supported by fastvit")
        x, rope = self._pos_embed(x)
        x = apply_norm(self.norm_pre, x)
        for blk, r in zip(self.blocks, self._block_ropes(rope, len(self.blocks))):
            x = self._run_block(blk, x, r)
        return apply_norm(self.norm, x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """Features plus the outputs of selected blocks, as timm's ``Eva.forward_intermediates``.

        Args:
            x: (B, in_chans, Hi, Wi). indices: ``None`` all blocks, an int n the last n, or a list of indices.
            return_prefix_tokens: pair each intermediate with its (B, R, C) prefix tokens.
            norm: apply the final norm to each intermediate. stop_early: skip the blocks after the last one taken.
            output_fmt: ``'NCHW'`` (B, C, Hi/P, Wi/P) or ``'NLC'`` (B, Np, C). intermediates_only: only the list.

        Returns:
            ``(norm(x) (B, N, C), intermediates)`` or the list of intermediates alone.

        Raises:
            ValueError: a bad ``output_fmt`` / ``indices``, ``attn_mask`` / ``is_causal``, a bad image.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("Eva: attn_mask / is_causal are not supported by fastvit")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x, rope = self._pos_embed(x)
        x = apply_norm(self.norm_pre, x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        out = []
        for i, (blk, r) in enumerate(zip(blocks, self._block_ropes(rope, len(blocks)))):
            x = self._run_block(blk, x, r)
            if i in take:
                out.append(apply_norm(self.norm, x) if norm else x)
        R = self.num_prefix_tokens
        prefix = [y[:, :R] for y in out]
        out = [y[:, R:] for y in out]
        if output_fmt == "NCHW":
            Gh, Gw = self.patch_embed.dynamic_feat_size((height, width))
            out = [y.reshape(B, Gh, Gw, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if return_prefix_tokens:
            out = list(zip(out, prefix))
        if intermediates_only:
            return out
        return apply_norm(self.norm, x), out

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / head), as timm's; returns the indices kept.

        Raises:
            ValueError: ``indices`` out of range.
        """
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.attn_pool = None
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """(B, N, C) -> (B, C): the attention pool, or timm's ``global_pool_nlc`` (``'token'``: the cls token;
        ``'avg'`` / ``'max'`` / ``'avgmax'`` over the patch tokens; ``''``: (B, N, C) unchanged)."""
        if self.attn_pool is not None:
            return self.attn_pool(x)
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, ``fc_norm``, dropout and (unless ``pre_logits``) the classifier: (B, N, C) -> (B, num_classes)."""
        x = self.pool(x)
        x = apply_norm(self.fc_norm, x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """(B, in_chans, Hi, Wi) -> (B, num_classes) logits (``num_classes=0``: (B, C) pooled features), as timm's
        ``Eva.forward``: :meth:`forward_features` then :meth:`forward_head`.

        Raises:
            ValueError: ``attn_mask`` / ``is_causal`` given, or a bad image.
        """
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))


register_fusable(EvaAttention, AttentionRope, GluMlp, SwiGLU, RmsNorm, nn.SiLU, nn.Sigmoid)
