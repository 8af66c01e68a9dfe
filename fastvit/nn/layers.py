"""Drop-in ViT building blocks whose forward passes run on :mod:`fastvit.ops`.

Each module has timm's constructor arguments and timm's parameter names (``timm.layers.PatchEmbed``,
``timm.layers.Attention``, ``timm.layers.Mlp``, ``timm.models.vision_transformer.Block``, ``timm.layers.LayerScale``,
``timm.layers.DropPath``, ``timm.layers.PatchDropout``), so a timm ``state_dict`` loads with ``strict=True``. The
math is the ViT block of Dosovitskiy et al. (2021, arXiv:2010.11929), pre-norm as in timm / DeiT, with LayerScale
(Touvron et al., 2021, arXiv:2103.17239) and stochastic depth (Huang et al., 2016, arXiv:1603.09382).

The forward logic lives in module-level functions that only read attributes timm's modules have too
(``qkv``, ``q_norm``, ``proj``, ``fc1``, ``act``, ``norm1``, ``ls1``, ``drop_path1`` ...). That lets
:func:`fastvit.integrations.patch_timm_` run timm's own modules on the same code path.

Vocabulary: B batch, N tokens, H heads, D head dim, C = H·D embed dim, P patch size.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fastvit import ops
from fastvit.nn.pos_embed import _size2
from fastvit.reference import embed_tokens

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchDropout",
    "PatchEmbed",
    "resolve_act",
]

#: timm's ViT LayerNorm: ``nn.LayerNorm`` with eps 1e-6 (timm.layers.LayerNorm has the same parameters).
DEFAULT_NORM_LAYER = partial(nn.LayerNorm, eps=1e-6)


# ----------------------------------------------------------------------------------------------- helpers
def resolve_act(act_layer: object) -> str:
    """Map an activation spec to one of ``'gelu'``, ``'gelu_tanh'``, ``'quick_gelu'``.

    Accepts ``None`` (GELU), those three strings, ``nn.GELU`` (class, ``partial`` with ``approximate=``, or
    instance) and timm's ``GELU`` / ``GELUTanh`` / ``QuickGELU`` classes or instances (recognised by name, so
    timm is not imported).

    Raises:
        ValueError: anything else (the message names ``act_layer``).
    """
    if act_layer is None:
        return "gelu"
    if isinstance(act_layer, str):
        name = act_layer.lower().replace("-", "_")
        table = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
        if name in table:
            return table[name]
        raise ValueError(f"act_layer must be one of 'gelu', 'gelu_tanh', 'quick_gelu', got {act_layer!r}")
    inst = act_layer
    if not isinstance(act_layer, nn.Module):
        if isinstance(act_layer, type) and not issubclass(act_layer, nn.Module):
            raise ValueError(f"act_layer must be 'gelu', 'gelu_tanh', 'quick_gelu' or a GELU module, got {act_layer!r}")
        if not callable(act_layer):
            raise ValueError(f"act_layer must be 'gelu', 'gelu_tanh', 'quick_gelu' or a GELU module, got {act_layer!r}")
        try:
            inst = act_layer()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"act_layer {act_layer!r} could not be instantiated without arguments: {e}") from None
    return _act_mode(inst, "act_layer")


def _act_mode(act: nn.Module, what: str = "act") -> str:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = type(act).__name__
    if name == "GELU":
        return "gelu"
    if name in ("GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    if name == "QuickGELU":
        return "quick_gelu"
    raise ValueError(f"{what} must be GELU, GELU(tanh) or QuickGELU, got {type(act).__name__}")


def _make_act(mode: str) -> nn.Module:
    if mode == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if mode == "gelu_tanh" else "none")


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x) (Hendrycks & Gimpel, 2016, sec. 2; CLIP's activation). Shape and dtype preserved."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _make_norm(norm_layer: Optional[Callable], dim: int, what: str) -> nn.LayerNorm:
    m = (norm_layer or DEFAULT_NORM_LAYER)(dim)
    if not isinstance(m, nn.LayerNorm):
        raise ValueError(
            f"{what} must build an nn.LayerNorm (or a subclass such as timm's LayerNorm), got {type(m).__name__}"
        )
    return m


# ----------------------------------------------------------------------------------------------- fusion guard
# A fused forward reads its submodules' parameters instead of calling them. That is only right while nothing is
# attached to those submodules: a hook (feature extractors, profilers, FSDP2's unshard, tensor parallelism's DTensor
# conversion), a parametrization or an adapter (both change the module's class), a DTensor or other wrapper-subclass
# parameter (tensor parallelism, FSDP2 while sharded), or a global module hook. The checks below read a few
# attributes of each submodule a fused path would read; when any of those is found, the caller runs a path that
# calls the submodule as a module instead. (torch.fx tracing needs no such care: every fastvit.ops function is a
# torch.fx leaf, so a trace records the same ops the eager forward runs.)

#: Module classes a fused forward knows how to read. Exact classes: a subclass may override ``forward``.
_FUSABLE_CLASSES: set = {nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Identity, nn.Dropout, nn.GELU}
_LAYER_NORM_CLASSES: set = {nn.LayerNorm}
_DROPOUT_CLASSES: set = {nn.Dropout}
_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)
_mod = torch.nn.modules.module
_GLOBAL_HOOKS = (
    _mod._global_forward_hooks,
    _mod._global_forward_pre_hooks,
    _mod._global_backward_hooks,
    _mod._global_backward_pre_hooks,
)


def register_fusable(*classes: type, kind: Optional[str] = None) -> None:
    """Declare module classes whose parameters a fused forward may read instead of calling the module.

    Args:
        classes: exact classes (subclasses are not implied: a subclass may override ``forward``).
        kind: ``'layer_norm'``: the classes compute ``F.layer_norm`` over the last dim with their ``weight``,
            ``bias``, ``eps`` (e.g. timm's ``LayerNorm``), so a fused path may run them as
            :func:`fastvit.ops.layer_norm`; ``'dropout'``: dropout / drop-path modules with a ``p`` or
            ``drop_prob`` that return their input unchanged when inactive; ``None``: neither.

    Raises:
        ValueError: an unknown ``kind``.
    """
    extra = {None: None, "layer_norm": _LAYER_NORM_CLASSES, "dropout": _DROPOUT_CLASSES}
    if kind not in extra:
        raise ValueError(f"kind must be None, 'layer_norm' or 'dropout', got {kind!r}")
    _FUSABLE_CLASSES.update(classes)
    if extra[kind] is not None:
        extra[kind].update(classes)


def _global_hooks() -> bool:
    return bool(_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2] or _GLOBAL_HOOKS[3])


def _wrapper_param(m: nn.Module, ignore: frozenset = frozenset()) -> bool:
    """``m`` has a DTensor (or other wrapper-subclass) parameter whose id is not in ``ignore``."""
    for p in m._parameters.values():
        if type(p) in _PLAIN_TENSOR_TYPES or p is None:
            continue
        if is_traceable_wrapper_subclass(p) and id(p) not in ignore:
            return True
    return False


def fsdp_sharded_params(model: nn.Module) -> frozenset:
    """Ids of the parameters FSDP2's ``fully_shard`` manages in ``model``: DTensors between forwards, plain
    unsharded tensors while the module runs (so a report about the forward must not count them as DTensors)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return frozenset()
    return frozenset(id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters())


def _any_attached(mods) -> bool:
    """One of ``mods`` is not a plain module of a known class (see the fusion-guard comment). On the hot path of
    every fused forward: kept to attribute reads in one loop."""
    for m in mods:
        if type(m) not in _FUSABLE_CLASSES:
            return True
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        for p in m._parameters.values():
            if type(p) not in _PLAIN_TENSOR_TYPES and p is not None and is_traceable_wrapper_subclass(p):
                return True
    return False


def _attached(m: nn.Module) -> bool:
    """``m`` itself is not a plain module of a known class (see the fusion-guard comment)."""
    return _any_attached((m,))


def fusion_reasons(m: nn.Module, names: Optional[list] = None, ignore_params: frozenset = frozenset()) -> list:
    """Why a fused forward of ``m`` that reads the submodules ``names`` (dotted paths relative to ``m``; ``None``:
    every descendant) would call them as modules now: one string per cause, naming the submodule and what is
    attached to it (empty: it fuses). DTensor parameters whose ids are in ``ignore_params`` are not counted (FSDP2's
    sharded parameters, see :func:`fsdp_sharded_params`). For reports, not the hot path."""
    out = []
    if _global_hooks():
        out.append("a global module hook is registered (torch.nn.modules.module.register_module_*_hook)")
    pairs = [(n, c) for n, c in m.named_modules() if c is not m] if names is None else []
    for n in names or ():
        try:
            pairs.append((n, m.get_submodule(n)))
        except AttributeError:
            pass
    for name, c in pairs:
        why = []
        if type(c) not in _FUSABLE_CLASSES:
            why.append(f"is a {type(c).__name__} (adapter, parametrization, sharding wrapper or another class)")
        if c._forward_hooks or c._forward_pre_hooks:
            why.append("has a forward hook")
        if c._backward_hooks or c._backward_pre_hooks:
            why.append("has a backward hook")
        if _wrapper_param(c, ignore_params):
            why.append("has a DTensor / tensor-subclass parameter")
        if why:
            out.append(f"{name} {' and '.join(why)}")
    return out


def needs_module_calls(*mods: nn.Module) -> bool:
    """Whether a fused path that reads ``mods``' parameters must call them as modules instead: one of them has a
    hook, an unknown class (adapter, parametrization, sharding wrapper) or a DTensor parameter, or a global module
    hook is registered."""
    return _global_hooks() or _any_attached(mods)


def embed_patches(pe: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``pe(x, **kwargs)`` for a :class:`PatchEmbed` ``pe`` (the fused embedding: projection, position add, prefix
    tokens, kept patches in one op) -- or, while something observes ``pe``'s calls (a hook on it, a global module
    hook), ``pe(x)`` as timm calls it, so the hook sees timm's (B, Np, E) patch tokens, and the rest unfused."""
    if pe._forward_hooks or pe._forward_pre_hooks or _global_hooks():
        return embed_tokens(pe(x), **kwargs)
    return pe(x, **kwargs)


def _skippable(m: nn.Module) -> bool:
    """``m`` would return its input unchanged (an ``nn.Identity``, or a dropout / drop-path that is inactive now)
    and nobody would see the call: no hooks on it, none global. Then a fused path skips the call."""
    return (type(m) is nn.Identity or (type(m) in _DROPOUT_CLASSES and not _dropout_active(m))) and not (
        m._forward_hooks or m._forward_pre_hooks or _global_hooks()
    )


def apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``norm`` to ``x``: a plain ``nn.LayerNorm`` over the last dim (or timm's) through
    :func:`fastvit.ops.layer_norm`, a plain ``nn.Identity`` skipped; anything else, or a norm with hooks, a
    parametrization or a DTensor parameter, is called as a module (``norm(x)``).

    Args:
        norm: the norm module (e.g. ``nn.LayerNorm``, ``nn.Identity``).
        x: (..., C) float.

    Returns:
        Tensor of ``x``'s shape (and, on the fused path, dtype).
    """
    if type(norm) in _LAYER_NORM_CLASSES and len(norm.normalized_shape) == 1:
        if not (_attached(norm) or _global_hooks()):
            weight, bias = _weight_bias(norm)
            return ops.layer_norm(x, weight, bias, norm.eps)
    elif _skippable(norm):
        return x
    return norm(x)


def _weight_bias(m: nn.Module) -> tuple:
    """``(m.weight, m.bias)`` of a fusable ``nn.Linear`` / LayerNorm, read from ``m._parameters``: a dict lookup,
    where each ``nn.Module.__getattr__`` costs about 0.7 µs on the host -- the fused forwards read attributes this
    way (and submodules from ``_modules``) because a ViT step reads hundreds of them. The result is the same: a
    parameter lives in ``_parameters`` (FSDP2 swaps its unsharded tensors in there too); a class that keeps them
    elsewhere is read by attribute."""
    p = m._parameters
    if "weight" in p and "bias" in p:
        return p["weight"], p["bias"]
    return m.weight, m.bias


def _dropout_active(m: nn.Module) -> bool:
    """True when a Dropout / DropPath module would change its input now."""
    if isinstance(m, nn.Identity) or not m.training:
        return False
    p = getattr(m, "p", None)
    if p is None:
        p = getattr(m, "drop_prob", 0.0)
    return float(p) > 0.0


# ----------------------------------------------------------------------------------------------- modules
class LayerScale(nn.Module):
    """Per-channel learnable scale ``x · gamma`` (Touvron et al., 2021, "Going deeper with image transformers").

    Args:
        dim: C, the size of ``gamma``.
        init_values: initial value of every ``gamma`` entry.
        inplace: multiply in place (as timm's ``LayerScale(inplace=True)``).

    Shapes: (..., C) -> (..., C), dtype preserved. Parameter: ``gamma`` (C,), as timm's.
    """

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill ``gamma`` with ``init_values``."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob`` while training
    (Huang et al., 2016, arXiv:1603.09382; timm's ``DropPath``).

    Args:
        drop_prob: probability of dropping a sample's branch, in [0, 1).
        scale_by_keep: divide kept samples by ``1 - drop_prob`` so the expectation is unchanged.

    Shapes: (B, ...) -> (B, ...), dtype preserved; the identity in eval mode or with ``drop_prob == 0``.

    Raises:
        ValueError: ``drop_prob`` outside [0, 1).
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= float(drop_prob) < 1.0:
            raise ValueError(f"drop_prob must lie in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchDropout(nn.Module):
    """Randomly keep ``max(1, int(Np · (1 - prob)))`` patch tokens per sample while training; prefix tokens are
    always kept (Liu et al., 2022, arXiv:2208.07220; Li et al., 2023, "FLIP", arXiv:2212.00794; timm's
    ``PatchDropout``).

    Args:
        prob: fraction of patch tokens to drop, in [0, 1).
        num_prefix_tokens: leading tokens (cls / registers) that are never dropped.
        ordered: keep the surviving patches in their original order.
        return_indices: also return the kept patches' indices, int64 (B, N_keep) into the Np patches (``None`` when
            nothing is dropped), as timm's ``PatchDropoutWithIndices`` -- for a rotary table that must follow them.

    Shapes: (B, R + Np, C) -> (B, R + N_keep, C); the identity in eval mode or with ``prob == 0``.

    Raises:
        ValueError: ``prob`` outside [0, 1).
    """

    def __init__(
        self, prob: float = 0.5, num_prefix_tokens: int = 1, ordered: bool = False, return_indices: bool = False
    ) -> None:
        super().__init__()
        if not 0.0 <= float(prob) < 1.0:
            raise ValueError(f"prob must lie in [0, 1), got {prob}")
        self.prob = float(prob)
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered
        self.return_indices = return_indices

    def forward(self, x: torch.Tensor):
        """(B, R + Np, C) -> (B, R + N_keep, C), and with ``return_indices`` the kept indices (or ``None``)."""
        if not self.training or self.prob == 0.0:
            return (x, None) if self.return_indices else x
        R = self.num_prefix_tokens
        prefix, patches = x[:, :R], x[:, R:]
        B, L = patches.shape[:2]
        n_keep = max(1, int(L * (1.0 - self.prob)))
        keep = torch.argsort(torch.randn(B, L, device=x.device), dim=-1)[:, :n_keep]
        if self.ordered:
            keep = keep.sort(dim=-1).values
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        out = torch.cat([prefix, patches], dim=1) if R else patches
        return (out, keep) if self.return_indices else out


class PatchEmbed(nn.Module):
    """Image to patch tokens: a stride-P convolution, flattened to (B, Np, E) -- timm's ``PatchEmbed`` with
    ``flatten=True`` (Dosovitskiy et al., 2021, sec. 3.1) -- computed by :func:`fastvit.ops.patch_embed`.

    ``forward`` optionally fuses the position embedding, the prefix tokens and MAE's kept-patch selection into
    the same op (see :func:`fastvit.ops.patch_embed`); the ViT and MAE models use that.

    Args:
        img_size: expected image size (int or (Hi, Wi)); ``None`` accepts any size divisible by ``patch_size``.
        patch_size: P (int or (Ph, Pw)).
        in_chans: image channels.
        embed_dim: E.
        norm_layer: must be ``None`` (timm's optional post-embedding norm is not supported).
        flatten: must be ``True``.
        output_fmt: ``None`` or ``'NLC'`` (timm's ``'NHWC'`` / ``'NCHW'`` are not supported).
        bias: projection bias.
        strict_img_size: require inputs of exactly ``img_size``.
        dynamic_img_pad: must be ``False``.

    Parameters: ``proj.weight`` (E, C, Ph, Pw) and ``proj.bias`` (E,), as timm's.

    Raises:
        ValueError: unsupported options at construction; at forward, wrong channel count, a size not divisible by
            the patch size, or (with ``strict_img_size``) a size other than ``img_size``.
    """

    def __init__(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable] = None,
        flatten: bool = True,
        output_fmt: Optional[str] = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if norm_layer is not None:
            raise ValueError("PatchEmbed(norm_layer=...) is not supported by fastvit; pass norm_layer=None")
        if not flatten or output_fmt not in (None, "NLC"):
            raise ValueError(
                f"PatchEmbed supports only flattened (B, Np, E) output; got flatten={flatten}, output_fmt={output_fmt!r}"
            )
        if dynamic_img_pad:
            raise ValueError("PatchEmbed(dynamic_img_pad=True) is not supported by fastvit")
        self.patch_size = _size2(patch_size, "patch_size")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten = True
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False
        self.set_input_size(img_size)
        self.proj = nn.Conv2d(
            in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias, device=device, dtype=dtype
        )
        self.norm = nn.Identity()

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]]) -> None:
        """Set ``img_size`` and recompute ``grid_size`` and ``num_patches``.

        Raises:
            ValueError: ``img_size`` not divisible by ``patch_size``.
        """
        if img_size is None:
            self.img_size = self.grid_size = self.num_patches = None
            return
        size = _size2(img_size, "img_size")
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {size} must be divisible by patch_size {self.patch_size}")
        self.img_size = size
        self.grid_size = (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        """The patch size: max(P) as an int, or (Ph, Pw)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid (Hi // Ph, Wi // Pw) for an image of ``img_size``."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        """Validate an image batch (see the class docstring for the rules).

        Raises:
            TypeError: ``x`` not a tensor. ValueError: wrong rank, channels or size.
        """
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: no shapes to check
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D image batch (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(
                f"x has {C} channels but in_chans={self.in_chans}; expected shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        Ph, Pw = self.patch_size
        if H % Ph or W % Pw:
            raise ValueError(
                f"x's image size {H}x{W} is not divisible by patch_size {self.patch_size} (x shape {tuple(x.shape)})"
            )
        if self.strict_img_size and self.img_size is not None and (H, W) != self.img_size:
            raise ValueError(
                f"x has image size {H}x{W} but the model's img_size is {self.img_size}; expected shape "
                f"(B, {C}, {self.img_size[0]}, {self.img_size[1]}) (use dynamic_img_size=True or set_input_size)"
            )

    def forward(
        self,
        x: torch.Tensor,
        *,
        pos_embed: Optional[torch.Tensor] = None,
        cls_token: Optional[torch.Tensor] = None,
        reg_tokens: Optional[torch.Tensor] = None,
        ids_keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Embed ``x`` (B, C, Hi, Wi) into (B, R + N_keep, E) tokens; with no keyword arguments (B, Np, E) as timm.

        Keyword arguments go straight to :func:`fastvit.ops.patch_embed`. When ``proj`` carries a hook, an adapter,
        a parametrization or a DTensor weight, ``proj`` is called as a module and the rest is
        the same math in PyTorch.
        """
        self.check_input(x)
        return self.embed(x, pos_embed=pos_embed, cls_token=cls_token, reg_tokens=reg_tokens, ids_keep=ids_keep)

    def embed(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """:meth:`forward` without the input check (any size divisible by the patch size, as for packed images)."""
        proj, norm = self.proj, self.norm
        if needs_module_calls(proj) or not _skippable(norm):
            return embed_tokens(norm(proj(x).flatten(2).transpose(1, 2)), **kwargs)
        return ops.patch_embed(x, proj.weight, proj.bias, **kwargs)


def attention_core(
    m: nn.Module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
) -> torch.Tensor:
    """Self-attention up to (not including) the output projection, for a module with timm's attribute names.

    With ``cu_seqlens`` the tokens of S sequences of different lengths are packed along dim 0 with no padding
    (NaViT, Dehghani et al., 2023, arXiv:2307.06304, sec. 2.1 "Patch n' Pack"; timm NaFlexVit / SigLIP-2 NaFlex
    batches once unpadded): each sequence attends only to itself. ``qkv`` and the q/k norms are per token, so only
    the attention op sees ``cu_seqlens``.

    Args:
        m: an :class:`Attention` or a ``timm.layers.Attention`` (reads ``qkv``, ``q_norm``, ``k_norm``,
            ``num_heads``, ``attn_drop``, ``norm``).
        x: (B, N, C_in); with ``cu_seqlens``: (T, C_in), T packed tokens.
        cu_seqlens: int32 (S + 1,) on ``x``'s device: 0, the running sum of the S lengths, T (see
            :func:`fastvit.ops.attention`); ``None`` for a dense batch.
        max_seqlen: the longest of the S sequences (``None``: computed from ``cu_seqlens``, one host sync).

    Returns:
        (B, N, H·D) -- with ``cu_seqlens``: (T, H·D) -- heads concatenated, in the computation dtype.

    Raises:
        ValueError: malformed ``cu_seqlens`` / ``max_seqlen`` or ``x`` of the wrong rank (from :mod:`fastvit.ops`).
    """
    mods = m._modules  # submodules read from the dict: see _weight_bias
    qkv = mods["qkv"](x)  # always a module call: adapters (LoRA) and hooks on qkv see it
    p = mods["attn_drop"].p if m.training else 0.0
    q_norm, k_norm = mods["q_norm"], mods["k_norm"]
    if _skippable(q_norm) and _skippable(k_norm):
        out = ops.attention(qkv, m.num_heads, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=p)
    elif cu_seqlens is not None:
        T = qkv.shape[0]
        q, k, v = qkv.reshape(T, 3, m.num_heads, -1).unbind(1)  # each (T, H, D), last dim contiguous
        q, k = apply_norm(q_norm, q), apply_norm(k_norm, k)
        out = ops.scaled_dot_product_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=p)
        out = out.reshape(T, -1)
    else:
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_norm(q_norm, q), apply_norm(k_norm, k)
        out = ops.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, N, -1)
    norm = mods.get("norm")  # timm's scale_norm; absent on older timm
    return out if norm is None else apply_norm(norm, out)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (Vaswani et al., 2017; timm's ``Attention``),
    computed by :func:`fastvit.ops.attention` (or, with ``qk_norm``, :func:`fastvit.ops.layer_norm` on q and k per
    head, then :func:`fastvit.ops.scaled_dot_product_attention`; Dehghani et al., 2023, arXiv:2302.05442).

    Args:
        dim: C_in, the token width.
        num_heads: H.
        attn_head_dim: D; default ``dim // num_heads``.
        dim_out: output width; default ``dim``.
        qkv_bias / proj_bias: biases of ``qkv`` / ``proj``.
        qk_norm: LayerNorm on q and k over D.
        scale_norm, gated: must be False (timm options fastvit does not implement).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after ``proj``.
        norm_layer: builds the q/k norms; default ``nn.LayerNorm(eps=1e-6)``.

    Shapes: (B, N, C_in) -> (B, N, dim_out), dtype preserved; packed (T, C_in) -> (T, dim_out) with ``cu_seqlens``
    (see :func:`attention_core`). Parameters: ``qkv``, ``q_norm``, ``k_norm``, ``proj``.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads`` (without ``attn_head_dim``), unsupported options.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if scale_norm or gated:
            raise ValueError("Attention(scale_norm=True / gated=True) is not supported by fastvit")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            attn_head_dim = dim // num_heads
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        if qk_norm:
            self.q_norm = _make_norm(norm_layer, attn_head_dim, "norm_layer")
            self.k_norm = _make_norm(norm_layer, attn_head_dim, "norm_layer")
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if device is not None or dtype is not None:
            self.q_norm.to(**{k: v for k, v in dd.items() if v is not None})
            self.k_norm.to(**{k: v for k, v in dd.items() if v is not None})

    def forward_core(
        self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
    ) -> torch.Tensor:
        """(B, N, C_in) -> (B, N, H·D), or packed (T, C_in) -> (T, H·D) with ``cu_seqlens``: attention output
        before ``proj`` (see :func:`attention_core`)."""
        return attention_core(self, x, cu_seqlens, max_seqlen)

    def forward(
        self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
    ) -> torch.Tensor:
        """(B, N, C_in) -> (B, N, dim_out); packed (T, C_in) -> (T, dim_out) with ``cu_seqlens`` (int32 (S + 1,)
        sequence offsets, see :func:`attention_core`)."""
        return self.proj_drop(self.proj(attention_core(self, x, cu_seqlens, max_seqlen)))


def mlp_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``drop1(act(fc1(x)))`` for a module with timm's ``Mlp`` attribute names, fc1+GELU via
    :func:`fastvit.ops.linear_gelu` (QuickGELU: ``fc1`` then ``h · sigmoid(1.702 h)``).

    Shapes: (..., C_in) -> (..., hidden).
    """
    mods = m._modules  # see _weight_bias
    fc1, act = mods["fc1"], mods["act"]
    mode = _act_mode(act)
    if mode == "quick_gelu" or needs_module_calls(fc1, act):
        h = act(fc1(x))  # module calls: an adapter / hook / DTensor on fc1 or act sees them
    else:
        weight, bias = _weight_bias(fc1)
        h = ops.linear_gelu(x, weight, bias, approximate="tanh" if mode == "gelu_tanh" else "none")
    drop1 = mods["drop1"]
    if not _skippable(drop1):  # skip the module call when it would return h unseen (eval mode, p = 0, no hooks)
        h = drop1(h)
    return apply_norm(mods["norm"], h)


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(drop(act(fc1(x))))`` of a transformer block (timm's ``Mlp``), fc1 + GELU fused by
    :func:`fastvit.ops.linear_gelu`.

    Args:
        in_features: C_in.
        hidden_features: default ``in_features``.
        out_features: default ``in_features``.
        act_layer: GELU (default), GELU-tanh or QuickGELU, as accepted by :func:`resolve_act`.
        norm_layer: optional LayerNorm on the hidden activation (timm's ``scale_mlp_norm``).
        bias: bool or (fc1, fc2) pair.
        drop: float or (after act, after fc2) pair of dropout rates.
        use_conv: must be False.

    Shapes: (..., C_in) -> (..., out_features). Parameters: ``fc1``, ``fc2`` (and ``norm``), as timm's.

    Raises:
        ValueError: unsupported ``act_layer`` or ``use_conv=True``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: object = nn.GELU,
        norm_layer: Optional[Callable] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        use_conv: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if use_conv:
            raise ValueError("Mlp(use_conv=True) is not supported by fastvit")
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        b1, b2 = (bias, bias) if isinstance(bias, bool) else tuple(bias)
        d1, d2 = (drop, drop) if isinstance(drop, (int, float)) else tuple(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=b1, **dd)
        self.act = _make_act(resolve_act(act_layer))
        self.drop1 = nn.Dropout(d1)
        self.norm = _make_norm(norm_layer, hidden_features, "norm_layer") if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=b2, **dd)
        self.drop2 = nn.Dropout(d2)

    def forward_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., hidden): everything before ``fc2``."""
        return mlp_hidden(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(mlp_hidden(self, x)))


def _drop_path_packed(dp: nn.Module, y: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Stochastic depth on packed tokens (T, C): one keep/drop draw per *sequence* (what ``DropPath`` draws per
    sample of a dense batch), broadcast to that sequence's rows. Reads ``drop_prob`` and ``scale_by_keep`` (fastvit's
    and timm's ``DropPath``)."""
    keep = 1.0 - float(dp.drop_prob)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    mask = y.new_empty(lengths.shape[0]).bernoulli_(keep)
    if getattr(dp, "scale_by_keep", True):
        mask.div_(keep)
    return y * mask.repeat_interleave(lengths, output_size=y.shape[0]).unsqueeze(-1)


def _branch(
    x: torch.Tensor,
    h: torch.Tensor,
    linear: nn.Linear,
    drop: nn.Module,
    ls: nn.Module,
    dp: nn.Module,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x + drop_path(ls(drop(linear(h)))), fused into :func:`fastvit.ops.linear_residual` when nothing random runs
    (the caller has checked that nothing is attached to these modules); with ``cu_seqlens`` (packed tokens)
    drop-path draws per sequence, not per row."""
    if not _dropout_active(drop) and not _dropout_active(dp):
        gamma = None if type(ls) is nn.Identity else ls._parameters["gamma"]  # see _weight_bias
        weight, bias = _weight_bias(linear)
        return ops.linear_residual(h, weight, bias, x, gamma=gamma)
    return _residual(x, ls(drop(linear(h))), dp, cu_seqlens)


def _residual(x: torch.Tensor, y: torch.Tensor, dp: nn.Module, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + dp(y)``; on packed tokens an active drop path draws once per sequence."""
    if cu_seqlens is not None and _dropout_active(dp):
        return x + _drop_path_packed(dp, y, cu_seqlens)
    return x + dp(y)


#: What :func:`block_forward`'s fused path reads instead of calling (attention's qkv and the MLP's fc1 it still calls
#: through :func:`attention_core` / :func:`mlp_hidden`, which decide for themselves; the norms go through
#: :func:`apply_norm`, which does too).
BLOCK_FUSED_READS = (
    ("attn",),
    ("attn", "proj"),
    ("attn", "proj_drop"),
    ("ls1",),
    ("drop_path1",),
    ("mlp",),
    ("mlp", "fc2"),
    ("mlp", "drop2"),
    ("ls2",),
    ("drop_path2",),
)


def block_fusable(m: nn.Module) -> bool:
    """Whether :func:`block_forward` may run ``m`` fused: nothing attached to the submodules it reads instead of
    calling (:data:`BLOCK_FUSED_READS`) and no global module hooks. A few attribute reads."""
    if _global_hooks():
        return False
    mods = m._modules
    attn, mlp = mods["attn"], mods["mlp"]
    am, mm = attn._modules, mlp._modules
    return not _any_attached(
        (attn, am["proj"], am["proj_drop"], mods["ls1"], mods["drop_path1"])
        + (mlp, mm["fc2"], mm["drop2"], mods["ls2"], mods["drop_path2"])
    )


def block_fusion_reasons(m: nn.Module, ignore_params: frozenset = frozenset()) -> list:
    """Why :func:`block_fusable` is False for ``m`` (empty when it is True): one string per cause, naming the
    submodule and what is attached to it (``ignore_params``: see :func:`fusion_reasons`)."""
    return fusion_reasons(m, [".".join(path) for path in BLOCK_FUSED_READS], ignore_params)


def block_forward(
    m: nn.Module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
) -> torch.Tensor:
    """Pre-norm transformer block for a module with timm's ``Block`` attribute names (``norm1``, ``attn``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``).

    One code path for dense and packed tokens: LayerNorm, the MLP, LayerScale and the residual adds are per token;
    only attention (:func:`attention_core`) and stochastic depth (one draw per sequence) read ``cu_seqlens``.

    Args:
        m: a :class:`Block` or a ``timm.models.vision_transformer.Block``.
        x: (B, N, C); with ``cu_seqlens``: (T, C), S sequences packed without padding (NaViT, Dehghani et al., 2023).
        cu_seqlens: int32 (S + 1,) sequence offsets into ``x``'s rows (see :func:`fastvit.ops.attention`).
        max_seqlen: the longest sequence (``None``: computed from ``cu_seqlens``).

    Returns:
        Tensor of ``x``'s shape: (B, N, C) or (T, C).

    Raises:
        ValueError: malformed ``cu_seqlens`` / ``max_seqlen`` (from :func:`fastvit.ops.attention`).
    """
    if not block_fusable(m):
        return block_forward_modular(m, x, cu_seqlens, max_seqlen)
    return block_forward_fused(m, x, cu_seqlens, max_seqlen)


def block_forward_fused(
    m: nn.Module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
) -> torch.Tensor:
    """:func:`block_forward`'s fused path, for a caller that has checked :func:`block_fusable`: the projections,
    LayerScale and residual adds as :func:`fastvit.ops.linear_residual`, fc1 + GELU as
    :func:`fastvit.ops.linear_gelu` (see :func:`mlp_hidden`), attention through :func:`attention_core`."""
    mods = m._modules  # see _weight_bias
    attn, mlp = mods["attn"], mods["mlp"]
    am, mm = attn._modules, mlp._modules
    h = attention_core(attn, apply_norm(mods["norm1"], x), cu_seqlens, max_seqlen)
    x = _branch(x, h, am["proj"], am["proj_drop"], mods["ls1"], mods["drop_path1"], cu_seqlens)
    h = mlp_hidden(mlp, apply_norm(mods["norm2"], x))
    return _branch(x, h, mm["fc2"], mm["drop2"], mods["ls2"], mods["drop_path2"], cu_seqlens)


def block_forward_modular(
    m: nn.Module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
) -> torch.Tensor:
    """:func:`block_forward` calling ``attn``, ``ls1``, ``drop_path1``, ``mlp``, ``ls2``, ``drop_path2`` as modules
    (timm's ``Block.forward``), for a block whose submodules carry hooks, adapters or sharding; the norms go through
    :func:`apply_norm` and the submodules' own forwards fuse what they can. With ``cu_seqlens`` the attention gets
    the packed keywords and an active drop path draws per sequence."""
    kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    x = _residual(x, m.ls1(m.attn(apply_norm(m.norm1, x), **kw)), m.drop_path1, cu_seqlens)
    return _residual(x, m.ls2(m.mlp(apply_norm(m.norm2, x))), m.drop_path2, cu_seqlens)


class Block(nn.Module):
    """Pre-norm transformer block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with optional LayerScale and
    stochastic depth (timm's ``vision_transformer.Block``; Dosovitskiy et al., 2021, eq. 2-3).

    The projection, LayerScale and residual add of each branch run as one :func:`fastvit.ops.linear_residual`
    whenever ``proj_drop`` / ``drop_path`` do nothing (eval mode or rate 0); otherwise the same math unfused.

    Args:
        dim: C. num_heads: H. mlp_ratio: hidden width = int(C · mlp_ratio).
        qkv_bias, qk_norm, proj_bias, proj_drop, attn_drop: as :class:`Attention` / :class:`Mlp`.
        scale_attn_norm, scale_mlp_norm: must be False.
        init_values: LayerScale init (LayerScale off when None or 0, as timm).
        drop_path: stochastic depth rate.
        act_layer: see :func:`resolve_act`.
        norm_layer: builds ``norm1``, ``norm2`` (and q/k norms); default ``nn.LayerNorm(eps=1e-6)``.
        mlp_layer, attn_layer: must be fastvit's :class:`Mlp` / :class:`Attention` (or None).
        depth: block index (accepted for timm compatibility, unused).

    Shapes: (B, N, C) -> (B, N, C), dtype preserved; packed (T, C) -> (T, C) with ``cu_seqlens`` (S sequences
    without padding, see :func:`block_forward`).

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``; unsupported options.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: object = nn.GELU,
        norm_layer: Optional[Callable] = None,
        mlp_layer: Optional[type] = None,
        attn_layer: Optional[type] = None,
        depth: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if scale_attn_norm or scale_mlp_norm:
            raise ValueError("Block(scale_attn_norm / scale_mlp_norm) is not supported by fastvit")
        if mlp_layer not in (None, Mlp) or attn_layer not in (None, Attention, "", "attn"):
            raise ValueError("Block supports only fastvit's Mlp and Attention as mlp_layer / attn_layer")
        dd = {"device": device, "dtype": dtype}
        self.norm1 = _make_norm(norm_layer, dim, "norm_layer")
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _make_norm(norm_layer, dim, "norm_layer")
        self.mlp = Mlp(
            dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias, drop=proj_drop, **dd
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if device is not None or dtype is not None:
            for n in (self.norm1, self.norm2):
                n.to(**{k: v for k, v in dd.items() if v is not None})

    def forward(
        self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); packed (T, C) -> (T, C) with ``cu_seqlens`` / ``max_seqlen`` (see
        :func:`block_forward`)."""
        return block_forward(self, x, cu_seqlens, max_seqlen)


register_fusable(Attention, Mlp, LayerScale, QuickGELU)
register_fusable(DropPath, kind="dropout")
