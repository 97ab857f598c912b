"""Self-influence of every training example: how much worse the model does on an example when that example
is deleted, by four routes, each labelled with its definition, error bar and cost.

* ``loo`` - exact leave-one-out retraining (this run: same initialization, order and optimizer). Exact; error 0
  up to rounding; one retraining per example.
* ``first_order`` - the exact derivative ``d metric_i / d w_i`` at ``w = 0`` (reverse mode through the recorded
  run, :func:`delsketch.sketch.first_order`): one recorded run plus one backward pass per example. The first-order
  Taylor term of LOO; its truncation error is not bounded here.
* ``sketch`` - the diagonal of a sketch's deletion effects: every example's own loss evaluated on the
  series-valued parameters of each chunk (coefficients ``[m, K, n]``), then the per-direction degree-r terms
  ``Re[C(n+r-1, r) c_r(psi_j)_i conj(psi_{j,i})^r]``, summed over r >= 1 and averaged over directions; error bar:
  the standard error over directions. Loss only (a margin or an argmax is not analytic).
* ``subsampled`` - Feldman-Zhang / counterfactual memorization over training randomness: K models on random
  halves, score = mean over models without i - mean over models with i (oriented as above), error bar: the
  two-sample standard error.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch

from .. import series as taylor
from ..sketch import Sketch, first_order
from ..sketch.estimate import log_binom
from ..training import Task, train
from .outputs import METRICS, orientation, view
from .runs import check_indices, half_masks, loo_params, map_jobs, train_with_members

__all__ = ["ROUTES", "MemorizationResult", "memorization", "sketch_self_influence", "subsampled_scores"]

ROUTES = ("loo", "first_order", "sketch", "subsampled")

DEFINITIONS = {
    "loo": "this run: exact leave-one-out retraining (same initialization, order, optimizer)",
    "first_order": "this run: exact first-order Taylor term of leave-one-out (d metric_i / d w_i at w = 0)",
    "sketch": "this run: degree-k Taylor estimate of leave-one-out from a deletion sketch",
    "subsampled": "over training randomness (the training subset): mean over models trained without the example "
                  "minus mean over models trained with it (Feldman-Zhang / counterfactual memorization)",
}


@dataclass
class MemorizationResult:
    route: str
    metric: str
    definition: str
    orientation: str
    indices: list[int]
    scores: list[float]
    stderr: list[float]  # 0 for exact routes (loo) and for first_order (exact derivative; truncation not bounded)
    error_bar: str
    base: list[float]  # the metric of each example as trained (subsampled: mean over models with it)
    cost: dict = field(default_factory=dict)
    n: int = 0
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def ranking(self) -> list[int]:
        """Indices, most memorized first (ties keep index order)."""
        order = np.argsort(-np.asarray(self.scores), kind="stable")
        return [self.indices[k] for k in order]


def _values(v, metric, params, idx):
    with torch.no_grad():
        return v.values(metric, params, idx).detach()


def memorization(
    task: Task,
    route: str = "loo",
    metric: str = "loss",
    indices: Optional[Sequence[int]] = None,
    sketch: Optional[Sketch] = None,
    models: int = 8,
    seed: int = 0,
    degree: Optional[int] = None,
    example_batch: int = 64,
    progress=None,
    executor=None,
    task_factory=None,
    store=None,
) -> MemorizationResult:
    """Self-influence of the examples ``indices`` (default all) by ``route`` (see the module docstring).

    ``metric``: "loss" (any task), "margin" (classifiers), "token_accuracy" (text). ``sketch``: a loaded
    :class:`Sketch` of ``task`` (route "sketch"). ``models``: K for "subsampled". ``degree`` truncates the sketch.
    ``executor`` / ``task_factory``: where the retrains of routes "loo" and "subsampled" run (see
    :func:`delsketch.audit.runs.map_jobs`); the scores are the same bytes wherever they run. ``store``: a
    directory keeping each retrain's result, so an interrupted audit resumes (any executor).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r} (choose from: {', '.join(ROUTES)})")
    v = view(task)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from: {', '.join(METRICS)})")
    v.values(metric, task.init_params(), [0])  # raises a one-line error if the task cannot give this metric
    idx = check_indices(task, indices)
    sign = -METRICS[metric]  # +1 for a loss: after - before
    t0 = time.perf_counter()
    cost: dict = {}
    if route == "loo":
        base_params = train(task)
        before = _values(v, metric, base_params, idx)

        after = torch.tensor(map_jobs(_loo_job, [(metric, i) for i in idx], progress, task, executor, task_factory,
                                      store),
                             dtype=torch.float64)
        scores = sign * (after - before)
        stderr = torch.zeros_like(scores)
        base = before
        cost = {"retrains": len(idx) + 1}
        error_bar = "none: exact for this run (up to floating-point rounding)"
    elif route == "first_order":
        if metric == "token_accuracy":
            raise ValueError("route first_order needs a differentiable metric (loss or margin), not token_accuracy")
        fn = partial(v.values, metric)
        queries = [partial(_own, fn, i) for i in idx]
        E = first_order(task, queries)  # [n, len(idx)]
        d = E[torch.tensor(idx), torch.arange(len(idx))]
        scores = sign * d  # deleting i moves w_i from 0 to 1: first-order change = d metric / d w_i
        stderr = torch.zeros_like(scores)
        base = _values(v, metric, train(task), idx)
        cost = {"recorded_runs": 1, "backward_passes": len(idx), "retrains": 1}
        error_bar = "none for the derivative (exact); the higher-order Taylor terms of leave-one-out are not included"
    elif route == "sketch":
        if sketch is None:
            raise ValueError("route sketch needs a sketch (precompute one first: delsketch sketch ...)")
        if metric != "loss":
            raise ValueError(f"route sketch computes the loss only ({metric} is not analytic in the weights)")
        est, se, base = sketch_self_influence(sketch, idx, degree=degree, example_batch=example_batch)
        scores, stderr = est, se
        cost = {"sketch_directions": sketch.m, "sketch_degree": sketch.degree if degree is None else degree,
                "batched_evaluations": math.ceil(len(idx) / example_batch) * len(sketch.manifest["chunks"])}
        error_bar = f"standard error over {sketch.m} sketch directions"
    else:
        scores, stderr, base, _ = subsampled_scores(task, metric, idx, models=models, seed=seed, progress=progress,
                                                    executor=executor, task_factory=task_factory, store=store)
        cost = {"retrains": models}
        error_bar = f"two-sample standard error over {models} models on random halves"
    cost["seconds"] = round(time.perf_counter() - t0, 3)
    return MemorizationResult(
        route=route, metric=metric, definition=DEFINITIONS[route], orientation=orientation(metric), indices=idx,
        scores=[float(x) for x in scores], stderr=[float(x) for x in stderr], error_bar=error_bar,
        base=[float(x) for x in base], cost=cost, n=task.n,
        config={"models": models if route == "subsampled" else None, "seed": seed, "degree": degree},
    )


def _loo_job(task: Task, metric: str, i: int) -> float:
    return float(_values(view(task), metric, loo_params(task, i), [i])[0])


def _subset_job(task: Task, metric: str, idx, members: torch.Tensor) -> torch.Tensor:
    return _values(view(task), metric, train_with_members(task, members), idx)


def _own(fn, i, params):
    return fn(params, [i])[0]


def sketch_self_influence(sk: Sketch, idx: Sequence[int], degree: Optional[int] = None, example_batch: int = 64):
    """Per-example degree-k estimates of the change of each example's own loss when it alone is deleted.

    Returns (estimate [len(idx)], standard error over directions, degree-0 loss (the trained model's))."""
    k = sk.degree if degree is None else int(degree)
    if not 1 <= k <= sk.degree:
        raise ValueError(f"degree must lie in [1, {sk.degree}]")
    task = sk.task
    index = torch.tensor(list(idx), dtype=torch.long)
    psi_c = sk.psi().conj()[:, index]  # [m, b]
    scale = torch.tensor([math.exp(log_binom(sk.n, r)) for r in range(k + 1)], dtype=torch.float64)
    coeffs = []  # per chunk: [m_chunk, K, len(idx)]
    for params in sk.chunk_params():
        mc = next(iter(params.values())).m
        parts = []
        for lo in range(0, len(index), example_batch):
            with torch.no_grad(), taylor.module_context():
                c = taylor.coefficients(task.example_losses(params, index[lo : lo + example_batch]))
            parts.append(c.expand(mc, *c.shape[1:]))
        coeffs.append(torch.cat(parts, -1))
    c = torch.cat(coeffs)[:, : k + 1]  # [m, k+1, b]
    r = torch.arange(k + 1)[None, :, None]
    terms = (scale[None, :, None] * c * psi_c[:, None, :] ** r).real  # [m, k+1, b]
    per_dir = terms[:, 1:].sum(1)  # [m, b]
    m = per_dir.shape[0]
    est = per_dir.mean(0)
    se = per_dir.std(0, unbiased=True) / math.sqrt(m) if m > 1 else torch.full_like(est, float("nan"))
    return est, se, c[0, 0].real


def subsampled_scores(task: Task, metric: str, idx: Sequence[int], models: int = 8, seed: int = 0,
                      masks: Optional[torch.Tensor] = None, progress=None, executor=None, task_factory=None,
                      store=None):
    """Train ``models`` models on random halves (or on ``masks [K, n]``) and return (score, stderr, mean IN value,
    per-model values [K, len(idx)]) of the counterfactual estimator."""
    v = view(task)
    if masks is None:
        masks = half_masks(task.n, models, seed)
    vals = torch.stack(map_jobs(_subset_job, [(metric, list(idx), mk) for mk in masks], progress, task, executor,
                                task_factory, store))  # [K, b]
    return (*counterfactual(vals, masks[:, list(idx)], -METRICS[metric]), vals)


def counterfactual(vals: torch.Tensor, inside: torch.Tensor, sign: int):
    """sign * (mean OUT - mean IN) per column, its two-sample standard error, and the mean IN value."""
    inside = inside.to(torch.bool)
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    if bool((n_in == 0).any() or (n_out == 0).any()):
        raise ValueError("every example needs at least one model with it and one without it")
    fi, fo = inside.to(vals.dtype), (~inside).to(vals.dtype)
    mean_in = (vals * fi).sum(0) / n_in
    mean_out = (vals * fo).sum(0) / n_out
    var_in = (((vals - mean_in) ** 2) * fi).sum(0) / (n_in - 1).clamp_min(1)
    var_out = (((vals - mean_out) ** 2) * fo).sum(0) / (n_out - 1).clamp_min(1)
    se = torch.sqrt(var_in / n_in + var_out / n_out)
    se = torch.where((n_in < 2) | (n_out < 2), torch.full_like(se, float("nan")), se)
    return sign * (mean_out - mean_in), se, mean_in
