"""The one table of series rules: which aten op runs how when a :class:`~delsketch.series.Series` reaches it.

Every rule has a kind:

* ``"series"`` - ``fn(*args, **kwargs)`` receives the op's own arguments (Series and plain tensors, Python
  scalars) and returns what the op returns. It may call ordinary torch ops on its Series arguments (they
  dispatch to their own rules) or work on the coefficient stack ``x.coeffs`` (``[m, K, *shape]`` complex).
* ``"kernel"`` - an elementwise function of one tensor: ``fn(coeffs) -> coeffs`` on the ``[m, K, *shape]``
  stack (e.g. :func:`delsketch.series.kernels.exp`).
* ``"inplace"`` - an in-place op (``aten.add_``): ``fn`` is the out-of-place op; its result is written back.
* ``"decomposition"`` - torch's own decomposition of the op into other aten ops (``fn`` is ``None``).

Lookup: the exact overload first, then the op's packet (``aten.add`` covers ``aten.add.Tensor`` and
``aten.add.Scalar``). A user adds a rule with :func:`register_rule` (``replace=True`` to override a built-in
one) and checks it with :func:`delsketch.series.check_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch._decomp import get_decompositions

__all__ = ["KINDS", "Rule", "register_rule", "use_torch_decomposition", "lookup", "registered"]

KINDS = ("series", "kernel", "inplace", "decomposition")


@dataclass(frozen=True)
class Rule:
    op: Any
    kind: str
    fn: Optional[Callable]
    impl: Callable  # what the dispatcher calls with the op's arguments


_TABLE: dict[Any, Rule] = {}
_IMPLEMENTERS: dict[str, Callable[[Any, Optional[Callable]], Callable]] = {}


def implementer(kind: str):
    """Registers how a kind turns ``(op, fn)`` into the callable the dispatcher runs (used by tensor.py)."""

    def deco(make):
        _IMPLEMENTERS[kind] = make
        return make

    return deco


def _overloads(packet) -> list:
    return [getattr(packet, name) for name in packet.overloads()]


def _add(op, kind: str, fn: Optional[Callable], replace: bool) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown rule kind {kind!r} (choose from: {', '.join(KINDS)})")
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        raise TypeError(f"register_rule: {op!r} is not an aten op (e.g. torch.ops.aten.logaddexp.default)")
    old = _TABLE.get(op)
    if old is not None and old.kind != "decomposition" and not replace:
        raise ValueError(f"{op} already has a {old.kind} rule; pass replace=True to override it")
    _TABLE[op] = Rule(op, kind, fn, _IMPLEMENTERS[kind](op, fn))
    if isinstance(op, torch._ops.OpOverloadPacket) and kind != "decomposition":
        for ov in _overloads(op):  # a rule for the packet wins over torch's decompositions of its overloads
            if ov in _TABLE and _TABLE[ov].kind == "decomposition":
                del _TABLE[ov]


def register_rule(*ops, kind: str = "series", replace: bool = False):
    """Decorator: ``fn`` becomes the rule of every op in ``ops`` (aten overloads or packets).

    ::

        @delsketch.series.register_rule(torch.ops.aten.logaddexp.default)
        def logaddexp(a, b):                      # a, b: Series or plain tensors
            c = ...                               # a constant shift
            return c + torch.log(torch.exp(a - c) + torch.exp(b - c))

    ``kind`` is one of :data:`KINDS` (see the module docstring); ``replace=True`` overrides an existing rule.
    """

    def deco(fn):
        for op in ops:
            _add(op, kind, fn, replace)
        return fn

    return deco


def use_torch_decomposition(*packets) -> None:
    """Run these ops (packets or overloads) through torch's own decompositions, where no rule exists."""
    for op, fn in get_decompositions(list(packets)).items():
        if op not in _TABLE and op.overloadpacket not in _TABLE:
            _TABLE[op] = Rule(op, "decomposition", None, _IMPLEMENTERS["decomposition"](op, fn))


def lookup(func) -> Optional[Rule]:
    rule = _TABLE.get(func)
    if rule is None:
        rule = _TABLE.get(func.overloadpacket)
    return rule


def registered() -> dict[str, str]:
    """``{op name: kind}`` of every rule, sorted by name."""
    return {str(op): r.kind for op, r in sorted(_TABLE.items(), key=lambda kv: str(kv[0]))}
