"""The delsketch side of the benchmark: retraining truth, the exact first-order term, the sketch.

* ``truth``: ``delsketch.run.retrain(task, D)`` for every deletion set, all queries read off each retrained model.
* ``first_order_gradients``: the exact derivative d f_q / d w_i of every query with respect to every example's
  deletion weight, through the whole training run (reverse mode through the unrolled run: one backward pass per
  query gives all n per-example derivatives). Summed over D it is the degree-1 Taylor term of t -> f(t 1_D),
  i.e. the exact first-order prediction; it is checked against ``delsketch.sketch.exact_series`` (one ring run
  per set) on a few sets, and the check is stored in the results.
* ``sketch_coefficients``: precompute a sketch and read the per-direction series coefficients of every query;
  predictions for many sets then come from ``Sketch.per_direction_terms`` (the arithmetic behind
  ``Sketch.predict``; ``check_predict`` verifies they agree with ``Sketch.predict``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from delsketch import training as run
from delsketch import sketch as sk
from delsketch.tasks import factory


def base_values(bt) -> np.ndarray:
    p = run.train(bt.task)
    with torch.no_grad():
        return np.array([float(bt.task.query(p, q)) for q in bt.queries])


def truth(bt, sets: list[list[int]], base: np.ndarray, progress=None) -> tuple[np.ndarray, float]:
    """Actual change [S, Q] of every query after retraining without each set, and seconds per retrain."""
    out = np.zeros((len(sets), len(bt.queries)))
    t0 = time.perf_counter()
    for s, D in enumerate(sets):
        p = run.retrain(bt.task, D)
        with torch.no_grad():
            out[s] = [float(bt.task.query(p, q)) for q in bt.queries]
        if progress and (s + 1) % 50 == 0:
            progress(f"retrained {s + 1}/{len(sets)}")
    dt = (time.perf_counter() - t0) / max(1, len(sets))
    return out - base[None], dt


# ------------------------------------------------------------------------------------------------ first order


def first_order_gradients(bt) -> np.ndarray:
    """d f_q / d w_i at w = 0 for every example i and query q: [n, Q] (``delsketch.first_order``: reverse mode
    through the unrolled training run)."""
    return sk.first_order(bt.task, bt.queries).numpy()


def check_first_order(bt, G: np.ndarray, sets: list[list[int]]) -> dict:
    """Compare sum_{i in D} G[i] with the degree-1 coefficient of delsketch.sketch.exact_series."""
    worst = 0.0
    for D in sets:
        res = sk.exact_series(bt.task, D, 1, bt.queries)  # the queries stacked: coefficients [2, Q]
        c1 = res.coefficients[1].numpy()
        mine = G[D].sum(0)
        worst = max(worst, float(np.max(np.abs(mine - c1) / (np.abs(c1) + 1e-12))))
    return {"sets_checked": len(sets), "max_relative_difference": worst}


# ------------------------------------------------------------------------------------------------ the sketch


def sketch_coefficients(bt, directory: Path, directions: int, degree: int, seed: int, reuse: bool = False,
                        workers: int = 1) -> dict:
    """Precompute (or reuse) a sketch; return its psi, per-query coefficients and timings.

    ``workers`` > 1 computes chunks in that many processes (byte-identical results); the per-chunk times in
    timings.json stay per-process seconds, so precompute_seconds() reports single-core work."""
    directory = Path(directory)
    if directory.exists() and not reuse:
        shutil.rmtree(directory)
    t0 = time.perf_counter()
    chunk = 64 if workers == 1 else max(16, min(256, -(-directions // (4 * workers))))
    S = sk.precompute(bt.task, directory, directions=directions, degree=degree, seed=seed, chunk=chunk,
                      workers=workers, task_spec=bt.spec or None,
                      task_factory=factory(bt.spec) if bt.spec else None)
    wall = time.perf_counter() - t0
    chunk_times = chunk_timings(directory)
    t1 = time.perf_counter()
    coeffs = np.stack([S.coefficients(q)[:, :, 0].numpy() for q in bt.queries])  # [Q, m, K]: scalar queries
    t_coef = (time.perf_counter() - t1) / len(bt.queries)
    stab = []
    for q in bt.queries:
        r = S.stability(q)
        stab.append({"query": q, "verdict": r["verdict"], "decay_per_degree": r["decay_per_degree"],
                     "safe_deletion_size": r["safe_deletion_size"],
                     "safe_deletion_size_worst_case": r["safe_deletion_size_worst_case"],
                     "log2_size": [d["log2_size"] for d in r["degrees"]]})
    return {"psi": S.psi().numpy(), "coeffs": coeffs, "chunk_times": chunk_times, "precompute_wall_s": wall, "coef_s_per_query": t_coef, "stability": stab,
            "n": bt.task.n, "degree": degree}


def chunk_timings(directory: Path) -> list[tuple[int, int, float]]:
    """(first direction, count, seconds) of every chunk of a stored sketch (manifest.json + timings.json)."""
    directory = Path(directory)
    man = json.loads((directory / "manifest.json").read_text())
    times = json.loads((directory / "timings.json").read_text())["chunks"]
    return sorted((c["first"], c["count"], float(times[name])) for name, c in man["chunks"].items())


def precompute_seconds(chunks: list[tuple[int, int, float]], m: int) -> float:
    """Precompute time of the first m directions (a partly used chunk counts pro rata)."""
    return float(sum(t * min(1.0, max(0.0, (m - first) / count)) for first, count, t in chunks))


def sketch_terms(sc: dict, sets: list[list[int]], m: int) -> np.ndarray:
    """Per-direction estimated Taylor terms [Q, S, m, K] (Sketch.per_direction_terms, first m directions)."""
    n, K = sc["n"], sc["degree"] + 1
    Dm = np.zeros((len(sets), n))
    for s, D in enumerate(sets):
        Dm[s, D] = 1.0
    psi = sc["psi"][:m]
    proj = Dm @ psi.conj().T  # [S, m]
    scale = np.array([math.exp(math.lgamma(n + r) - math.lgamma(r + 1) - math.lgamma(n)) for r in range(K)])
    powers = proj[..., None] ** np.arange(K)  # [S, m, K]
    c = sc["coeffs"][:, :m]  # [Q, m, K]
    return (scale * c[:, None] * powers[None]).real


def sketch_predictions(sc: dict, sets: list[list[int]], m: int, degree: int, terms=None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted change and its standard error, [S, Q] each."""
    t = sketch_terms(sc, sets, m) if terms is None else terms[:, :, :m]
    est = t[..., 1:degree + 1].sum(-1)  # change = sum of degree >= 1 terms, per direction  [Q, S, m]
    mean = est.mean(-1)
    se = est.std(-1, ddof=1) / math.sqrt(m)
    return mean.T, se.T


def check_predict(bt, directory: Path, sc: dict, sets: list[list[int]], m_total: int) -> float:
    """Max |difference| between sketch_predictions and Sketch.predict on a few sets (all directions)."""
    S = sk.Sketch.load(directory, bt.task)
    mine, mine_se = sketch_predictions(sc, sets, m_total, sc["degree"])
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = S.predict(bt.queries, sets)  # fields [len(sets), Q]
    worst = max(float((p.change.numpy() - mine).__abs__().max()), float((p.stderr.numpy() - mine_se).__abs__().max()))
    return worst
