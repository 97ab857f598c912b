"""The three causes of memorization as experiments a user runs on their own task.

* :func:`repetition` - chosen training examples are duplicated so that each occurs ``k`` times (``k`` in
  ``copies``; the copies are planted with :func:`delsketch.audit.canaries.plant`, each joined to a seeded random
  step, so the number of steps and the learning-rate schedule stay those of the task). Memorization of an example
  at ``k`` = the change of its own metric when *all* ``k`` occurrences are deleted; beside it the change when
  only the original is deleted (its duplicates stay), which is what a per-example audit of the duplicated data
  sees.
* :func:`novelty` - every example's memorization beside its atypicality: the mean distance to its nearest
  neighbours among the other training examples in input space (classifier: the model's inputs; text: a
  character-bigram count vector with start and end marks), and for classifiers the same among the examples of
  its own class (a class-conditional density proxy); Spearman correlations and the most memorized examples.
* :func:`size` - the task built at several model widths: mean and max self-influence over a seeded sample of
  examples, and membership inference (loss threshold and LiRA, shadow models on random halves) against the
  number of parameters.

Routes: ``loo`` (exact leave-one-out retraining, this run; the default: on small tasks it is also the cheapest
exact route) or ``first_order`` (the exact derivative, a first-order estimate of the deletion). Every result
names its route, definition and error bar; every plotted number is in the returned dict.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..sketch import first_order
from ..training import Task, train
from ..training.loop import deletion_weights
from .canaries import Canary, plant
from .memorization import DEFINITIONS, memorization
from .outputs import METRICS, orientation, view

__all__ = ["EXPERIMENTS", "EXPERIMENT_ROUTES", "repetition", "novelty", "size", "atypicality", "duplicate",
           "features", "choose"]

EXPERIMENTS = ("repetition", "novelty", "size")
EXPERIMENT_ROUTES = ("loo", "first_order")


def _check_route(route: str, metric: str) -> None:
    if route not in EXPERIMENT_ROUTES:
        raise ValueError(f"unknown route {route!r} for an experiment (choose from: {', '.join(EXPERIMENT_ROUTES)})")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from: {', '.join(METRICS)})")
    if route == "first_order" and metric == "token_accuracy":
        raise ValueError("route first_order needs a differentiable metric (loss or margin), not token_accuracy")


def _mean_se(x) -> dict:
    a = np.asarray(x, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "stderr": se, "max": float(a.max()), "min": float(a.min())}


def choose(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct training indices of ``0..n-1``, seeded, sorted."""
    if not 1 <= int(k) <= n:
        raise ValueError(f"need between 1 and {n} examples, got {k}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0xE7])))
    return sorted(int(i) for i in rng.choice(n, int(k), replace=False))


# ------------------------------------------------------------------------------------------------ repetition
def duplicate(task: Task, indices: Sequence[int], copies: int, seed: int = 0) -> tuple[Task, dict[int, list[int]]]:
    """``task`` with every example of ``indices`` occurring ``copies`` times (``copies - 1`` planted duplicates).

    Returns the task and, for each original index, the training indices of all its occurrences (itself first)."""
    copies = int(copies)
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    idx = [int(i) for i in indices]
    for i in idx:
        if not 0 <= i < task.n:
            raise ValueError(f"example index {i} out of range: the task has {task.n} training examples (0..{task.n - 1})")
    if len(set(idx)) != len(idx):
        raise ValueError("duplicate(): the example indices must be distinct")
    if copies == 1:
        return task, {i: [i] for i in idx}
    v = view(task)
    ex = task.examples
    if v.kind == "classifier" and all(isinstance(ex[i], dict) and "image" in ex[i] for i in idx):
        dup = [Canary(int(ex[i]["label"]), copies - 1, image=list(ex[i]["image"])) for i in idx]
    elif v.kind == "text":
        dup = [Canary(str(ex[i]), copies - 1) for i in idx]
    else:
        raise ValueError(f"task {task.name!r}: the repetition experiment needs a text task or a classifier with "
                         "labelled image inputs")
    ptask, planted = plant(task, dup, seed)
    groups = {i: [i] + list(c.indices) for i, c in zip(idx, planted)}
    examples = list(ptask.examples)
    for i, c in zip(idx, planted):
        for j in c.indices:
            examples[j] = {**ex[i], "duplicate_of": i} if isinstance(ex[i], dict) else ex[i]
    config = {k: val for k, val in ptask.config.items() if k != "canaries"}
    config["duplicates"] = {"seed": int(seed), "copies": copies, "groups": {str(i): g for i, g in groups.items()}}
    return dataclasses.replace(ptask, examples=examples, config=config), groups


def _own(v, metric, i, params):
    return v.values(metric, params, [i])[0]


def _group_scores(ptask: Task, groups: dict[int, list[int]], route: str, metric: str):
    """(all-copies scores, one-copy scores, metric as trained) for each original index, oriented (> 0: worse
    without it)."""
    v = view(ptask)
    sign = -METRICS[metric]
    idx = list(groups)
    with torch.no_grad():
        base_params = train(ptask)
        before = v.values(metric, base_params, idx).detach()
    if route == "loo":
        every, one = [], []
        for k, i in enumerate(idx):
            for dest, D in ((every, groups[i]), (one, [i])):
                if dest is one and len(groups[i]) == 1:
                    one.append(every[-1])
                    continue
                with torch.no_grad():
                    after = float(v.values(metric, train(ptask, w=deletion_weights(ptask.n, D)), [i])[0])
                dest.append(sign * (after - float(before[k])))
        return every, one, before.tolist()
    from functools import partial

    E = first_order(ptask, [partial(_own, v, metric, i) for i in idx])  # [n, len(idx)]
    every = [sign * float(E[groups[i], k].sum()) for k, i in enumerate(idx)]
    one = [sign * float(E[i, k]) for k, i in enumerate(idx)]
    return every, one, before.tolist()


def repetition(task: Task, copies: Sequence[int] = (1, 2, 4, 8), examples: int = 16,
               indices: Optional[Sequence[int]] = None, route: str = "loo", metric: str = "loss", seed: int = 0,
               progress=None) -> dict:
    """Memorization vs repetition: the same chosen examples (``indices``, or ``examples`` seeded random ones)
    occur ``k`` times for each ``k`` in ``copies`` (one training run per ``k``); per ``k`` the change of each
    example's own metric when all its occurrences are deleted (``all_copies``) and when only the original is
    (``one_copy``), mean and standard error over the chosen examples."""
    _check_route(route, metric)
    ks = [int(k) for k in copies]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"copies must be a non-empty list of numbers >= 1, got {list(copies)}")
    idx = choose(task.n, examples, seed) if indices is None else [int(i) for i in indices]
    view(task).values(metric, task.init_params(), [0])  # one-line error if the task cannot give the metric
    t0 = time.perf_counter()
    rows = []
    for k in ks:
        ptask, groups = duplicate(task, idx, k, seed)
        every, one, before = _group_scores(ptask, groups, route, metric)
        rows.append({"copies": k, "n_with_copies": ptask.n, "occurrences": [groups[i] for i in idx],
                     "all_copies": {"scores": every, **_mean_se(every)},
                     "one_copy": {"scores": one, **_mean_se(one)},
                     "as_trained": {"values": before, **_mean_se(before)}})
        if progress is not None:
            progress(k)
    retrains = sum(1 + len(idx) * (1 if r["copies"] == 1 else 2) for r in rows) if route == "loo" else len(rows)
    return {
        "experiment": "repetition", "task": task.name, "n": task.n, "route": route, "metric": metric,
        "definition": (DEFINITIONS[route] + "; the deletion is every occurrence of the example (all_copies) or the "
                       "original only (one_copy)"),
        "orientation": orientation(metric),
        "error_bar": f"standard error of the mean over the {len(idx)} chosen examples (each score exact for its run)"
                     if route == "loo" else f"standard error over the {len(idx)} chosen examples; first-order term only",
        "examples": idx, "copies": ks, "rows": rows, "seed": int(seed),
        "cost": {"seconds": round(time.perf_counter() - t0, 3), ("retrains" if route == "loo" else "recorded_runs"): retrains},
    }


# ------------------------------------------------------------------------------------------------ novelty
def _bigrams(doc: str, vocab: dict) -> np.ndarray:
    s = "^" + doc + "$"
    out = np.zeros(len(vocab))
    for a, b in zip(s, s[1:]):
        out[vocab[a + b]] += 1
    return out


def features(task: Task) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """(features [n, d], labels [n] or None, description) of every training example for the atypicality."""
    v = view(task)
    if v.kind == "classifier":
        return (v.classifier.X.numpy().astype(np.float64), v.classifier.y.numpy(),
                "the model's input vector (pixels / 16 for digits), Euclidean distance")
    if v.kind == "text":
        docs = [str(d) for d in v.corpus.docs]
        grams = sorted({a + b for d in docs for a, b in zip("^" + d + "$", d + "$")})
        vocab = {g: k for k, g in enumerate(grams)}
        return (np.stack([_bigrams(d, vocab) for d in docs]), None,
                "character-bigram counts of the document with start (^) and end ($) marks, Euclidean distance")
    raise ValueError(f"task {task.name!r}: atypicality needs a classifier with inputs or a text task")


def atypicality(task: Task, neighbours: int = 5) -> dict:
    """Mean Euclidean distance from each training example to its ``neighbours`` nearest other training examples
    (``knn_distance``), and for classifiers to its nearest examples of the same class (``knn_distance_same_class``;
    fewer neighbours where the class is smaller, ``nan`` for an example alone in its class)."""
    X, y, desc = features(task)
    n = X.shape[0]
    k = int(neighbours)
    if not 1 <= k <= n - 1:
        raise ValueError(f"neighbours must lie in [1, {n - 1}] for {n} training examples, got {neighbours}")
    sq = (X * X).sum(1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0.0))
    np.fill_diagonal(D, np.inf)
    out = {"neighbours": k, "features": desc, "knn_distance": np.sort(D, 1)[:, :k].mean(1).tolist()}
    if y is not None:
        same = np.where(y[:, None] == y[None, :], D, np.inf)
        s = np.sort(same, 1)[:, :k]
        with np.errstate(invalid="ignore"):
            cnt = np.isfinite(s).sum(1)
            val = np.where(cnt > 0, np.where(np.isfinite(s), s, 0).sum(1) / np.maximum(cnt, 1), np.nan)
        out["knn_distance_same_class"] = val.tolist()
    return out


def _describe(task: Task, i: int):
    ex = task.examples[i] if i < len(task.examples) else None
    if isinstance(ex, dict) and "image" in ex:
        return {"label": int(ex["label"]), "image": list(ex["image"])}
    if isinstance(ex, str):
        return {"text": ex}
    return {}


def novelty(task: Task, route: str = "loo", metric: str = "loss", neighbours: int = 5, top: int = 16,
            indices: Optional[Sequence[int]] = None, bins: int = 5, progress=None) -> dict:
    """Memorization of every example (or ``indices``) against its atypicality: Spearman correlations (with
    p-values), the mean memorization per atypicality quantile bin, and the ``top`` most memorized examples
    themselves (image and label, or text) with their scores and atypicality."""
    from scipy.stats import spearmanr

    _check_route(route, metric)
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    t0 = time.perf_counter()
    aty = atypicality(task, neighbours)
    mem = memorization(task, route=route, metric=metric, indices=indices, progress=progress)
    idx = mem.indices
    s = np.asarray(mem.scores)
    out = {"experiment": "novelty", "task": task.name, "n": task.n, "route": route, "metric": metric,
           "definition": mem.definition, "orientation": mem.orientation, "error_bar": mem.error_bar,
           "indices": idx, "scores": mem.scores, "atypicality": {"neighbours": aty["neighbours"],
                                                                 "features": aty["features"]},
           "spearman": {}, "binned": {}}
    for key in ("knn_distance", "knn_distance_same_class"):
        if key not in aty:
            continue
        a = np.asarray(aty[key])[idx]
        out["atypicality"][key] = a.tolist()
        ok = np.isfinite(a)
        r = spearmanr(a[ok], s[ok])
        out["spearman"][key] = {"rho": float(r.statistic), "p_value": float(r.pvalue), "examples": int(ok.sum())}
        edges = np.quantile(a[ok], np.linspace(0, 1, bins + 1))
        which = np.clip(np.searchsorted(edges, a[ok], side="right") - 1, 0, bins - 1)
        out["binned"][key] = [{"atypicality_lo": float(edges[b]), "atypicality_hi": float(edges[b + 1]),
                               **_mean_se(s[ok][which == b])} for b in range(bins) if (which == b).sum() > 0]
    order = np.argsort(-s, kind="stable")[: min(top, len(idx))]
    out["most_memorized"] = [{"index": idx[j], "score": float(s[j]),
                              **{key: out["atypicality"][key][j] for key in ("knn_distance", "knn_distance_same_class")
                                 if key in out["atypicality"]},
                              **_describe(task, idx[j])} for j in order]
    out["cost"] = {**mem.cost, "seconds": round(time.perf_counter() - t0, 3)}
    return out


# ------------------------------------------------------------------------------------------------ size
def parameter_count(task: Task) -> int:
    return int(sum(v.numel() for v in task.init_params().values()))


def size(make_task: Callable[[int], Task], widths: Sequence[int] = (8, 16, 32, 64, 128), sample: int = 100,
         models: int = 16, route: str = "loo", metric: str = "loss", seed: int = 0, bootstrap: int = 200,
         width_name: str = "hidden", progress=None) -> dict:
    """Memorization and membership inference against model size: for each width ``make_task(width)``; the mean
    and max self-influence over a seeded sample of ``sample`` examples (the same indices at every width), and
    membership inference with ``models`` shadow models on random halves (loss threshold, LiRA online with fixed
    variance; AUC and TPR at 0.1 % and 1 % FPR with 95 % bootstrap intervals) beside the counterfactual
    memorization over training randomness from the same models."""
    from .mia import membership_audit

    _check_route(route, metric)
    ws = [int(w) for w in widths]
    if not ws or any(w < 1 for w in ws):
        raise ValueError(f"widths must be a non-empty list of numbers >= 1, got {list(widths)}")
    if models < 4:
        raise ValueError("models must be at least 4 (each target needs IN and OUT shadows)")
    t0 = time.perf_counter()
    rows, idx, task_name = [], None, None
    for w in ws:
        task = make_task(w)
        task_name = task.name
        if idx is None:
            idx = choose(task.n, min(int(sample), task.n), seed)
        elif max(idx) >= task.n:
            raise ValueError("every width must have the same training set")
        ts = time.perf_counter()
        mem = memorization(task, route=route, metric=metric, indices=idx)
        mia = membership_audit(task, models=models, seed=seed, bootstrap=bootstrap)
        attacks = {}
        for name in ("loss_threshold", "lira_online_fixed_variance", "lira_online"):
            a = mia["attacks"][name]
            attacks[name] = {"auc": a["auc"], "auc_ci": a["ci"]["auc"], "tpr_at_fpr": a["tpr_at_fpr"],
                             "tpr_ci": a["ci"]["tpr_at_fpr"], "decisions": a["members"] + a["nonmembers"]}
        cf = mia["counterfactual"]["scores"]
        rows.append({width_name: w, "parameters": parameter_count(task), "self_influence": {
            "scores": mem.scores, **_mean_se(mem.scores)}, "membership": attacks,
            "counterfactual_memorization": _mean_se(cf),
            "spearman_counterfactual_vs_lira": mia["spearman_counterfactual_vs_lira"],
            "seconds": round(time.perf_counter() - ts, 3)})
        if progress is not None:
            progress(w)
    return {
        "experiment": "size", "task": task_name, "route": route, "metric": metric,
        "definition": {"self_influence": DEFINITIONS[route] + f"; mean over {len(idx)} sampled examples",
                       "membership": "over training randomness: shadow and target models on random halves, "
                                     "leave-one-model-out", "counterfactual_memorization": DEFINITIONS["subsampled"]},
        "orientation": orientation(metric),
        "error_bar": {"self_influence": f"standard error of the mean over the {len(idx)} sampled examples",
                      "membership": "95 % percentile bootstrap", "counterfactual_memorization":
                      "standard error of the mean over all examples"},
        "width_name": width_name, "widths": ws, "sample": idx, "models": int(models), "rows": rows, "seed": int(seed),
        "cost": {"seconds": round(time.perf_counter() - t0, 3)},
    }
