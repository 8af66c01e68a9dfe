"""Op declarations: everything fastvit knows about one dispatched op, written once, in its family module.

A family module (:mod:`fastvit.families`) declares each of its ops with :func:`declare`: the name, the arguments
(each with a kind and its shape rule), the fields of the call description (:class:`fastvit.backends.Call`) that
dispatch decides on, the checked public function and its check step, the eager reference, the plain low-precision
oracle where the eager backend is not it, the self-test shapes, the tiny benchmark calls and the cost models. Every
consumer iterates over :data:`DECLARATIONS` instead of keeping its own list of op names: :mod:`fastvit.ops` (the
public functions, :func:`fastvit.ops.describe_call`, the ``torch.fx`` leaves), :mod:`fastvit.selftest` (shapes,
oracle), ``fastvit-bench overhead`` (tiny calls) and :mod:`fastvit.bench.harness` (cost models).

The call description of an op is built by keyword, through the builder :func:`call_builder` makes from the op's
``call_fields``: ``describe(device=x.device, dtype=x.dtype, features=C)``. The builder's parameters are exactly the
declared fields, so a value given under the wrong field name is a ``TypeError``, not a silently misplaced slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from fastvit.backends import Call, declare_ops

__all__ = [
    "Arg",
    "DECLARATIONS",
    "OpDeclaration",
    "SelftestShape",
    "TinyCall",
    "call_builder",
    "declare",
    "differentiable",
]

#: Argument kinds: a float tensor, an optional float tensor, an integer index tensor (values checked against a
#: range), packed-sequence offsets (``cu_seqlens``), and plain Python values.
KINDS = frozenset({"tensor", "tensor?", "index", "offsets", "int", "int?", "float", "float?", "bool", "str"})


@dataclass(frozen=True)
class Arg:
    """One argument of an op, in the order of the public signature.

    Attributes:
        name: the parameter name (timm's / MAE's / PyTorch's term).
        kind: one of :data:`KINDS`; ``"tensor"`` and ``"tensor?"`` arguments are the differentiable ones.
        shape: the shape rule in the op's vocabulary, e.g. ``"(B, N, 3·C)"``; empty for plain values.
        keyword_only: whether the parameter is keyword-only in the public function.
    """

    name: str
    kind: str
    shape: str = ""
    keyword_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Arg {self.name!r}: kind must be one of {sorted(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class SelftestShape:
    """One self-test shape of an op: ``make(generator)`` returns the op's arguments by name -- a tuple for a random
    tensor of that shape (or ``(shape, std)``), a tensor as is, ``None`` or a plain value (see
    :mod:`fastvit.selftest`). ``quick`` marks the shape(s) with tails in every block dimension that the interpreter
    runs."""

    label: str
    make: Callable[[torch.Generator], dict[str, Any]]
    quick: bool = False


@dataclass(frozen=True)
class TinyCall:
    """One call of an op on tiny tensors, timed by ``fastvit-bench overhead``: ``variant`` is appended to the op's
    name in the report (``"+residual"``); ``value_check`` marks a call whose checks read values by design (indices
    the caller made: a sort and a host read), so its added time is no dispatch cost."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    value_check: bool = False


@dataclass(frozen=True)
class OpDeclaration:
    """Everything about one dispatched op (see the module docstring).

    Attributes:
        name: the op's name: ``fastvit.ops.<name>``, the dispatch key, the self-test's and the benchmark's label.
        family: the family module that declares it (``fastvit.families.<family>``).
        args: the public function's parameters (without ``backend``), in order.
        call_fields: the :class:`fastvit.backends.Call` fields beyond ``device`` and ``dtype`` that the op's
            description sets (``mixed_dtypes`` and ``varlen`` are always accepted).
        prepare: the check step: ``prepare(*args, **kwargs)`` returns ``(call, *operands)`` -- the call description
            and the operands after the op's autocast rule -- or raises naming the bad argument.
        function: the public, checked function (re-exported by :mod:`fastvit.ops`).
        reference: the eager reference (:mod:`fastvit.reference`), the oracle's float64 ``ref``.
        pt: the oracle's ``pt`` where it is not the eager backend: the op in plain PyTorch in the input precision
            (attention: softmax(q kᵀ) v without any upcast); ``None``: the eager backend.
        selftest: the self-test's shapes (smallest first).
        tiny_calls: ``tiny_calls(t, ids_restore)`` -> the calls ``fastvit-bench overhead`` times, given a factory
            ``t(*shape)`` of random tensors on the run's device and dtype, and MAE indices made by
            :func:`fastvit.ops.random_masking` for B = 2, N = 4 patches.
        costs: benchmark cost models this family contributes (:data:`fastvit.bench.harness.COST_MODELS`).
    """

    name: str
    family: str
    args: tuple[Arg, ...]
    call_fields: tuple[str, ...]
    prepare: Callable[..., tuple]
    function: Callable[..., Any]
    reference: Callable[..., Any]
    pt: Callable[..., Any] | None = None
    selftest: tuple[SelftestShape, ...] = ()
    tiny_calls: Callable[..., list[TinyCall]] | None = None
    costs: Mapping[str, type] = field(default_factory=dict)

    @property
    def describe(self) -> Callable[..., Call]:
        """The keyword builder of this op's call description (:func:`call_builder` of :attr:`call_fields`)."""
        return call_builder(*self.call_fields)


#: op name -> its declaration, in declaration order (the families' import order).
DECLARATIONS: dict[str, OpDeclaration] = {}

_ALWAYS = ("device", "dtype", "mixed_dtypes", "varlen")
_BUILDERS: dict[tuple[str, ...], Callable[..., Call]] = {}


def call_builder(*fields: str) -> Callable[..., Call]:
    """A function that builds a :class:`fastvit.backends.Call` from keyword arguments: ``device`` and ``dtype``
    (required), the given ``fields`` (required) and ``mixed_dtypes`` / ``varlen`` (default False); every other field
    keeps its default.

    The builder is generated from ``Call._fields`` (the slot order is read, never written by hand) and costs what a
    plain function call does -- about a third of ``Call(**kwargs)``, which matters on every op call.

    Raises:
        ValueError: a name that is no field of ``Call``, or a field given twice.
    """
    key = tuple(fields)
    builder = _BUILDERS.get(key)
    if builder is not None:
        return builder
    unknown = [f for f in fields if f not in Call._fields or f in _ALWAYS]
    if unknown or len(set(fields)) != len(fields):
        raise ValueError(
            f"call fields must be distinct fields of fastvit.backends.Call other than {_ALWAYS}, got {list(fields)}"
        )
    defaults = Call._field_defaults
    slots = ", ".join(name if name in fields or name in _ALWAYS else repr(defaults[name]) for name in Call._fields)
    params = ", ".join(("device", "dtype", "*") + key + ("mixed_dtypes=False", "varlen=False"))
    namespace = {"_new": tuple.__new__, "Call": Call}
    source = f"def describe({params}):\n    return _new(Call, ({slots},))\n"
    exec(compile(source, f"<fastvit.declare.call_builder{key}>", "exec"), namespace)  # noqa: S102 (fields checked)
    builder = namespace["describe"]
    builder.__doc__ = f"Call(device=, dtype=, {', '.join(f'{f}=' for f in key)} mixed_dtypes=False, varlen=False)"
    _BUILDERS[key] = builder
    return builder


def declare(decl: OpDeclaration) -> OpDeclaration:
    """Register ``decl``: its name becomes a dispatched op (:data:`fastvit.backends.OPS`) owned by ``decl.family``.

    Raises:
        ValueError: the name is declared already (by another declaration), an argument kind is unknown, or the
            declared arguments differ from ``decl.function``'s parameters (names, order, keyword-only-ness).
    """
    import inspect

    if decl.name in DECLARATIONS:
        raise ValueError(f"op {decl.name!r} is declared twice")
    params = [p for p in inspect.signature(decl.function).parameters.values() if p.name != "backend"]
    got = [(p.name, p.kind is inspect.Parameter.KEYWORD_ONLY) for p in params]
    want = [(a.name, a.keyword_only) for a in decl.args]
    if got != want:
        raise ValueError(f"op {decl.name!r}: declared args {want} differ from the function's parameters {got}")
    call_builder(*decl.call_fields)  # validates the field names
    declare_ops(decl.family, (decl.name,))
    DECLARATIONS[decl.name] = decl
    return decl


def differentiable(decl: OpDeclaration, values: Mapping[str, Any]) -> list[str]:
    """The float-tensor arguments of ``decl`` that ``values`` (arguments by name) gives: the ones with gradients."""
    return [a.name for a in decl.args if a.kind in ("tensor", "tensor?") and values.get(a.name) is not None]
