"""``check_rule``: test a series rule (or any function of tensors run on Series) against nested forward-mode
AD (``torch.func.jvp``), which shares nothing with delsketch's rules."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.func import jvp

from .tensor import Series, coefficients, variable

__all__ = ["check_rule"]


def _taylor_by_jvp(g: Callable[[Tensor], Any], degree: int) -> list:
    """[g(0), g'(0), g''(0)/2, ...] of a function of a scalar t, by nesting torch.func.jvp."""
    t0 = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    out, f = [], g
    for r in range(degree + 1):
        out.append(_map(f(t0), lambda v, r=r: v / math.factorial(r)))
        if r < degree:
            f = (lambda h: (lambda t: jvp(h, (t,), (one,))[1]))(f)
    return out


def _map(v, fn):
    if isinstance(v, (tuple, list)):
        return type(v)(_map(x, fn) for x in v)
    return fn(v) if isinstance(v, Tensor) and v.is_floating_point() else v


def _leaves(v) -> list:
    if isinstance(v, (tuple, list)):
        return [x for item in v for x in _leaves(item)]
    return [v]


def check_rule(op_or_fn: Callable, *example_inputs: Any, degree: int = 3, seed: int = 0, atol: float = 1e-10,
               rtol: float = 1e-9, reference: Optional[Callable] = None, **kwargs: Any) -> float:
    """Check that running ``op_or_fn`` on power series gives the Taylor coefficients that nested
    ``torch.func.jvp`` gives. Returns the largest absolute error; raises ``AssertionError`` naming the
    output and degree that differ.

    Every floating-point tensor among ``example_inputs`` becomes a random polynomial path
    ``x(t) = x + t d_1 + ... + t^degree d_degree`` (seeded); other arguments (ints, dims, index tensors) and
    ``kwargs`` pass through. The series side runs ``op_or_fn`` on those paths as Series (one direction); the
    reference differentiates ``t -> reference(*x(t), **kwargs)`` (``reference`` defaults to ``op_or_fn``;
    pass a plain-torch formula when the op has no forward-mode derivative). Non-analytic ops pass only away
    from their kinks; pick inputs there.

    ::

        from delsketch.series import check_rule, register_rule
        check_rule(torch.ops.aten.logaddexp.default, torch.randn(5, dtype=torch.float64),
                   torch.randn(5, dtype=torch.float64))
    """
    gen = torch.Generator().manual_seed(seed)
    paths: dict[int, list[Tensor]] = {}
    for i, a in enumerate(example_inputs):
        if isinstance(a, Tensor) and a.is_floating_point():
            a = a.detach().to(torch.float64)
            paths[i] = [a] + [torch.randn(a.shape, generator=gen, dtype=torch.float64) for _ in range(degree)]
    if not paths:
        raise ValueError("check_rule: no floating-point tensor among the example inputs")

    def plain(t):
        args = list(example_inputs)
        for i, cs in paths.items():
            args[i] = sum(t**r * c for r, c in enumerate(cs))
        return (reference or op_or_fn)(*args, **kwargs)

    want = [_leaves(v) for v in _taylor_by_jvp(plain, degree)]
    args = list(example_inputs)
    for i, cs in paths.items():
        args[i] = variable(torch.stack(cs).to(torch.complex128).unsqueeze(0))
    got = _leaves(op_or_fn(*args, **kwargs))
    worst = 0.0
    for j, g in enumerate(got):
        if not isinstance(g, Series):
            continue
        c = coefficients(g)[0]
        for r in range(degree + 1):
            w = want[r][j]
            err = float((c[r] - w).abs().max()) if c[r].numel() else 0.0
            worst = max(worst, err)
            if err > atol + rtol * float(w.abs().max() if w.numel() else 0.0):
                raise AssertionError(f"check_rule: output {j}, degree {r}: series and nested jvp differ by {err:.3g}")
    return worst
