"""Exact answers for a known deletion set or for outputs named now: the exact Taylor series along one set
(one ring run) and exact first-order effects of every example (reverse mode through the run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .. import series as taylor
from ..training import NonFiniteError, Task, train
from .core import Query, evaluate, query_name, ring_train, weight_series

@dataclass
class SeriesResult:
    query: str
    coefficients: list[float]  # real parts, degree 0 first
    imag_max: float  # largest |imaginary part| (0 up to rounding for real deletions)
    value_at_1: float  # sum of the coefficients: the degree-k prediction of f(W 1_D)
    partial_sums: list[float]
    weight: float
    degree: int

    def to_json(self) -> dict:
        return asdict(self)


def exact_series(
    task: Task,
    delete: Sequence[int],
    degree: int,
    queries: Sequence[Query],
    weight: float = 1.0,
    steps: Optional[int] = None,
    callback=None,
) -> list[SeriesResult]:
    """Exact Taylor coefficients of t -> f(t W 1_D) from one ring run with w = z W 1_D."""
    v = torch.zeros(1, task.n, dtype=torch.complex128)
    v[0, list(delete)] = weight
    params = ring_train(task, weight_series(v, degree), steps=steps, callback=callback)
    out = []
    for q in queries:
        c = taylor.coefficients(evaluate(task, params, q))[0]
        re = c.real.tolist()
        out.append(
            SeriesResult(
                query=query_name(q),
                coefficients=re,
                imag_max=float(c.imag.abs().max()),
                value_at_1=float(sum(re)),
                partial_sums=np.cumsum(re).tolist(),
                weight=weight,
                degree=degree,
            )
        )
    return out


def first_order(
    task: Task,
    queries: Sequence[Query],
    steps: Optional[int] = None,
    callback=None,
    executor=None,
    task_factory=None,
    groups: Optional[int] = None,
) -> torch.Tensor:
    """Exact first-order effects: ``E[i, q] = d f_q / d w_i`` at ``w = 0`` for every training example i.

    The derivative of each output with respect to each example's deletion weight through the whole
    training run (minibatch order, momentum, Adam, learning-rate schedule: the run as it happened), by
    reverse mode through the unrolled run: one backward pass per output gives all n effects.
    ``E[D].sum(0)`` is the degree-1 Taylor term of ``t -> f(t 1_D)`` (what :func:`exact_series` computes
    one set at a time), the first-order prediction of deleting D; ``E[i] > 0`` means that deleting
    example i raises the output. Holds the whole run's autograd graph in memory (about 0.9 GB for the
    paper's 1000-step microgpt). Returns ``[n, len(queries)]`` float64.

    Needs an optimizer whose update is differentiable (the built-in SGD, Adam, AdamW are; see
    :func:`delsketch.training.optim.differentiable`).

    ``executor`` (``"process"``, ``"ray"``, an :class:`~delsketch.executors.Executor`; with ``task_factory``,
    see :func:`delsketch.sketch.precompute`) splits the outputs into ``groups`` contiguous groups (default: one
    per output) computed as separate jobs, each recording the run once: the same numbers, bit for bit, for
    the price of one recorded run per group. Outputs must then be names (strings), not callables."""

    if len(queries) == 0:
        raise ValueError("first_order needs at least one query")
    if executor is not None:
        from ..executors import get_executor

        if not all(isinstance(q, str) for q in queries):
            raise ValueError("first_order on an executor needs outputs named by strings (callables stay local)")
        g = len(queries) if groups is None else max(1, min(int(groups), len(queries)))
        bounds = [round(i * len(queries) / g) for i in range(g + 1)]
        jobs = [(list(queries[a:b]), steps) for a, b in zip(bounds, bounds[1:])]
        parts = get_executor(executor).map(_first_order_job, jobs, task=task, factory=task_factory)
        return torch.cat(parts, 1)
    w = torch.zeros(task.n, dtype=torch.float64, requires_grad=True)
    params = train(task, w=w, steps=steps, callback=callback, record=True)
    with torch.enable_grad():
        cols = []
        for j, q in enumerate(queries):
            f = q(params) if callable(q) else task.query(params, q)
            if not isinstance(f, torch.Tensor) or f.dim() != 0:
                raise ValueError("a query must return a 0-dim tensor")
            if not bool(torch.isfinite(f)):
                raise NonFiniteError(f"output {query_name(q)!r} is not finite after training")
            if not f.requires_grad:
                raise ValueError(f"output {query_name(q)!r} does not depend on the trained parameters through "
                                 "autograd (computed under torch.no_grad or detached?)")
            (g,) = torch.autograd.grad(f, w, retain_graph=j < len(queries) - 1, allow_unused=True)
            cols.append(torch.zeros(task.n, dtype=torch.float64) if g is None else g.detach())
    return torch.stack(cols, 1)



def _first_order_job(task: Task, queries: list, steps: Optional[int]) -> torch.Tensor:
    """One job of a farmed :func:`first_order`: the effects on a group of outputs."""
    return first_order(task, queries, steps=steps)
