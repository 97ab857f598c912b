"""Exact answers for a known deletion set or for outputs named now: the exact Taylor series along one set
(one ring run) and exact first-order effects of every example (reverse mode through the run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..io import jsonable
from ..training import NonFiniteError, Task, train
from ..training.outputs import as_output
from .core import ring_train, weight_series


@dataclass
class SeriesResult:
    """The exact Taylor series of ``t -> f(t W 1_D)`` for an output of any shape (dict outputs: dicts of these).

    ``coefficients [K, *out]`` (real parts, degree 0 first), ``partial_sums [K, *out]`` (the series truncated at
    each degree, evaluated at t = 1), ``value_at_1 [*out]`` (the degree-k prediction of f(W 1_D)), ``imag_max``
    (largest |imaginary part|: 0 up to rounding for real deletions)."""

    output: str
    coefficients: Any
    partial_sums: Any
    value_at_1: Any
    imag_max: float
    weight: float
    degree: int
    deletion_size: int

    @property
    def query(self) -> str:
        return self.output

    def to_json(self) -> dict:
        nulls: set = set()
        obj = {k: jsonable(getattr(self, k), nulls, k) for k in
               ("output", "coefficients", "partial_sums", "value_at_1", "imag_max", "weight", "degree", "deletion_size")}
        obj["method"] = "exact"
        obj["nulls"] = sorted(nulls)
        return obj


def exact_series(
    task: Task,
    delete: Sequence[int],
    degree: int,
    output,
    weight: float = 1.0,
    steps: Optional[int] = None,
    callback=None,
) -> SeriesResult:
    """Exact Taylor coefficients of t -> f(t W 1_D) from one ring run with w = z W 1_D.

    ``output``: any output (a callable of any shape, a query string, or a list of them stacked on a leading
    axis: ``coefficients`` is then ``[K, len(list), ...]``)."""
    out = as_output(task, output)
    idx = sorted(set(int(i) for i in delete))
    params = deletion_ring_run(task, idx, degree, weight, steps=steps, callback=callback)
    return series_result(out, params, degree, weight, len(idx))


def deletion_ring_run(task: Task, idx: Sequence[int], degree: int, weight: float = 1.0, steps=None, callback=None):
    """The ring run with w = z W 1_D: parameters whose coefficients are the exact Taylor series along D."""
    v = torch.zeros(1, task.n, dtype=torch.complex128)
    v[0, list(idx)] = weight
    return ring_train(task, weight_series(v, degree), steps=steps, callback=callback)


def series_result(out, params: dict, degree: int, weight: float, size: int) -> SeriesResult:
    """An output's exact series read off the parameters of :func:`deletion_ring_run`."""
    c = out.flat_coefficients(params, degree)[0]  # [K, P]
    re = c.real
    return SeriesResult(
        output=out.name, coefficients=_by_degree(out, re), partial_sums=_by_degree(out, re.cumsum(0)),
        value_at_1=out.unflatten(re.sum(0)), imag_max=float(c.imag.abs().max()) if c.numel() else 0.0,
        weight=weight, degree=degree, deletion_size=size,
    )


def _by_degree(out, x: torch.Tensor):
    """[K, P] -> [K, *out] (or a dict of those)."""
    return out.unflatten(x)


def first_order(
    task: Task,
    output,
    steps: Optional[int] = None,
    callback=None,
):
    """Exact first-order effects: ``E[i, ...] = d f / d w_i`` at ``w = 0`` for every training example i.

    The derivative of an output with respect to each example's deletion weight through the whole training run
    (minibatch order, momentum, Adam, learning-rate schedule: the run as it happened), by reverse mode through the
    unrolled run: one backward pass per output element gives all n effects. ``E[D].sum(0)`` is the degree-1
    Taylor term of ``t -> f(t 1_D)`` (what :func:`exact_series` computes one set at a time), the first-order
    prediction of deleting D; ``E[i] > 0`` means that deleting example i raises the output. Holds the whole run's
    autograd graph in memory (about 0.9 GB for the paper's 1000-step microgpt).

    ``output``: any output; a list of query strings gives ``[n, len(list)]``. Returns ``[n, *out]`` float64 (a
    dict of those for a dict output). Needs an optimizer whose update is differentiable (the built-in SGD, Adam,
    AdamW are; see :func:`delsketch.training.optim.differentiable`)."""
    if isinstance(output, (list, tuple)) and len(output) == 0:
        raise ValueError("first_order needs at least one output")
    out = as_output(task, output)
    w = torch.zeros(task.n, dtype=torch.float64, requires_grad=True)
    params = train(task, w=w, steps=steps, callback=callback, record=True)
    with torch.enable_grad():
        f = out.flat(params)  # [P]
        if not bool(torch.isfinite(f).all()):
            raise NonFiniteError(f"output {out.name!r} is not finite after training")
        if not f.requires_grad:
            raise ValueError(f"output {out.name!r} does not depend on the trained parameters through "
                             "autograd (computed under torch.no_grad or detached?)")
        cols = []
        for j in range(f.numel()):
            if not f[j].requires_grad:
                cols.append(torch.zeros(task.n, dtype=torch.float64))
                continue
            (g,) = torch.autograd.grad(f[j], w, retain_graph=j < f.numel() - 1, allow_unused=True)
            cols.append(torch.zeros(task.n, dtype=torch.float64) if g is None else g.detach())
    return out.unflatten(torch.stack(cols, 1))
