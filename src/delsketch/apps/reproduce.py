"""Reproduce the three microgpt figures of the paper with the ``paper`` preset.

Each ``figN(data, out, ...)`` writes ``<out>/figN.png`` and ``<out>/figN.json`` (every plotted number,
the configuration and wall times) and returns the JSON dict.

* :func:`fig2` - exact Taylor series of ``t -> loss("max")`` after retraining with weight ``t`` on the
  training names that contain ``x`` (one ring run at degree 6), against real retrains at
  ``t = 0, 0.1, ..., 1``: partial sums of degree 1..k as curves and their errors at ``t = 1``.
* :func:`fig3` - a deletion sketch (``directions`` random directions at ``degree``) predicting the same
  curve, with standard-error bands, against the same real retrains.
* :func:`fig1` - per-degree size estimates ``log2( sqrt(C(n+r-1, r)) |c_r| )`` of the Taylor terms of a
  training document's loss from a few ring runs at degree 100: do the terms decay, and how fast?

Sketches are built with :func:`delsketch.sketch.precompute` under ``<out>/fig1-sketch`` and
``<out>/fig3-sketch``, so an interrupted run resumes where it stopped. ``steps`` keeps only the first
``steps`` training steps (the learning-rate schedule is unchanged), for quick, smaller runs.

``progress(phase, done, total)`` is called as work advances (phase is a short text).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..io import write_json

__all__ = ["fig1", "fig2", "fig3", "PAPER", "FIGURES"]

Progress = Optional[Callable[[str, int, int], None]]

#: the paper's sizes (the defaults of the ``reproduce`` command)
PAPER = {
    "fig1": {"directions": 12, "degree": 100},
    "fig2": {"degree": 6},
    "fig3": {"directions": 500, "degree": 3},
}
FIGURES = tuple(PAPER)

DELETE = "contains:x"
QUERY = "max"
T_GRID = [round(0.1 * i, 10) for i in range(11)]  # the real retrains
T_FINE = [i / 100 for i in range(101)]  # the plotted curves


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def paper_task(data, steps):
    from ..tasks import build_from_spec

    if data is None:
        raise ValueError(
            "reproducing the paper's figures needs its data: pass data= (--data) the path to names.txt "
            "(32,032 names, one per line; e.g. ../shared/data/names.txt)"
        )
    return build_from_spec(paper_spec(data, steps))


def paper_spec(data, steps) -> dict:
    """The task spec of the paper preset (recorded in sketches; worker processes rebuild the task from it)."""
    return {"preset": "paper", "data": str(Path(data).resolve()), "steps": steps}


def paper_deletions(task) -> list[int]:
    return [i for i in task.select(DELETE) if i < task.n]


def _config(task, **extra) -> dict:
    return {
        "preset": "paper",
        "data_sha256": task.config.get("data_sha256"),
        "n": task.n,
        "steps": task.steps,
        "fingerprint": task.fingerprint(),
        **extra,
    }


def _machine() -> dict:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


def _scalar(p):
    """A scalar output's one-set Prediction with Python numbers (for the figures' JSON)."""
    from types import SimpleNamespace

    return SimpleNamespace(estimate=float(p.estimate), base=float(p.base), change=float(p.change),
                           stderr=float(p.stderr), median_of_means=float(p.median_of_means), terms=p.terms.tolist(),
                           term_stderr=p.term_stderr.tolist(), degree=p.degree)


def _report(progress: Progress, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


def _retrain_curve(task, delete: Sequence[int], query: str, ts: Sequence[float], progress: Progress) -> dict:
    """Real retraining with weight t on D for every t: the output's value and the wall time per run."""
    from ..training import retrain
    from ..sketch import evaluate

    values, seconds = [], []
    total = len(ts) * task.steps
    for i, t in enumerate(ts):
        t0 = time.perf_counter()
        params = retrain(task, delete, weight=t, callback=lambda s, loss, _i=i: _report(
            progress, "retrain", _i * task.steps + s + 1, total))
        values.append(float(evaluate(task, params, query)))
        seconds.append(round(time.perf_counter() - t0, 3))
    return {"t": list(ts), "value": values, "seconds": seconds}


def _reusable_retrains(out: Path, task, delete, query, ts) -> Optional[dict]:
    """fig2's retrains, when ``<out>/fig2.json`` holds them for this very task, D, query and grid."""
    p = out / "fig2.json"
    if not p.is_file():
        return None
    try:
        old = json.loads(p.read_text())
        if (old["config"]["fingerprint"] == task.fingerprint() and old["deletions"] == list(delete)
                and old["query"] == query and old["retrain"]["t"] == list(ts)):
            return old
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _start(data, out, steps, query):
    """Common start of fig2/fig3: the output folder, the clock, the machine, the task and D."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = _machine()
    task = paper_task(data, steps)
    task.validate_query(query)
    return out, t_start, machine, task, paper_deletions(task)


def _workers(workers: Optional[int]) -> int:
    """None or 0: one worker process per core."""
    return max(1, os.cpu_count() or 1) if not workers else int(workers)


def _timed_sketch(task, sdir: Path, directions, degree, seed, chunk, phase, progress, data, steps, workers=1):
    """precompute (resumable) in ``sdir``; returns the sketch, its wall time and the per-chunk times."""
    from ..sketch import precompute
    from ..tasks import factory

    t0 = time.perf_counter()
    sk = precompute(task, sdir, directions, degree, seed=seed, chunk=chunk, workers=workers,
                    progress=lambda d, tot: _report(progress, phase, d, tot),
                    task_spec=paper_spec(data, steps), task_factory=factory(paper_spec(data, steps)))
    sketch_s = time.perf_counter() - t0
    try:
        chunk_times = json.loads((sdir / "timings.json").read_text())["chunks"]
    except (OSError, ValueError, KeyError):
        chunk_times = {}
    return sk, sketch_s, chunk_times


def _finish(res: dict, out: Path, name: str, plot, t_start: float) -> dict:
    """Plot, record the plot and total times, write the JSON; returns ``res``."""
    t0 = time.perf_counter()
    plot(res, out / f"{name}.png")
    res["timings"]["plot_s"] = round(time.perf_counter() - t0, 3)
    res["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    write_json(out / f"{name}.json", res, sort_keys=False)
    return res


def _plt():
    from . import report  # noqa: F401  (selects the headless backend)
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# figure 2: the exact series against real retraining
# ----------------------------------------------------------------------------------------------


def fig2(data, out, degree: int = 6, steps: Optional[int] = None, query: str = QUERY,
         progress: Progress = None) -> dict:
    """Degree-r partial sums of the exact Taylor series of t -> query(t 1_D) against real retrains."""
    from ..sketch import exact_series

    if not 1 <= degree <= 100:
        raise ValueError(f"degree must lie in [1, 100], got {degree}")
    out, t_start, machine, task, D = _start(data, out, steps, query)

    t0 = time.perf_counter()
    rt = _retrain_curve(task, D, query, T_GRID, progress)
    retrain_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ser = exact_series(task, D, degree, query,
                       callback=lambda s, loss: _report(progress, "ring run", s + 1, task.steps))
    ring_s = time.perf_counter() - t0

    c = np.array(ser.coefficients)
    tf = np.array(T_FINE)
    powers = tf[:, None] ** np.arange(degree + 1)  # [T, K]
    curves = {str(r): (powers[:, : r + 1] @ c[: r + 1]).tolist() for r in range(1, degree + 1)}
    y0, y1 = rt["value"][0], rt["value"][-1]
    change = y1 - y0
    errors = []
    for r in range(degree + 1):
        p = float(c[: r + 1].sum())
        errors.append({
            "degree": r,
            "partial_sum": p,
            "retrained": y1,
            "error": p - y1,
            "abs_error": abs(p - y1),
            "relative_to_change": abs(p - y1) / abs(change) if change != 0 else None,
        })
    # error of each partial sum at every retrained t
    tg = np.array(T_GRID)
    pg = tg[:, None] ** np.arange(degree + 1)
    grid_err = {str(r): ((pg[:, : r + 1] @ c[: r + 1]) - np.array(rt["value"])).tolist() for r in range(degree + 1)}

    res = {
        "figure": "fig2",
        "config": _config(task, degree=degree, query=query, delete=DELETE, paper_size=(
            task.steps == 1000 and task.n == 1000 and degree == PAPER["fig2"]["degree"])),
        "deletions": D,
        "deletion_size": len(D),
        "query": query,
        "retrain": rt,
        "series": {"coefficients": ser.coefficients.tolist(), "imag_max": ser.imag_max,
                   "partial_sums_at_1": ser.partial_sums.tolist()},
        "curves": {"t": T_FINE, "partial_sums": curves},
        "errors_at_1": errors,
        "errors_on_grid": {"t": T_GRID, "by_degree": grid_err},
        "timings": {"retrains_s": round(retrain_s, 3), "retrain_each_s": rt["seconds"],
                    "ring_run_s": round(ring_s, 3), "ring_s_per_step": round(ring_s / task.steps, 5)},
        "machine": machine,
        "png": "fig2.png",
    }
    return _finish(res, out, "fig2", _plot_fig2, t_start)


def _plot_fig2(res: dict, path: Path) -> None:
    from .report import save_figure

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    K = res["config"]["degree"]
    cmap = plt.get_cmap("viridis")
    for r in range(1, K + 1):
        ax.plot(res["curves"]["t"], res["curves"]["partial_sums"][str(r)], color=cmap((r - 1) / max(K - 1, 1)),
                lw=1.3, label=f"degree {r}")
    ax.plot(res["retrain"]["t"], res["retrain"]["value"], "o", color="crimson", ms=5, zorder=5,
            label="real retraining")
    ax.set_xlabel("weight t on the deleted set (t = 1: deleted)")
    ax.set_ylabel(f"loss of '{res['query']}'")
    ax.set_title(f"exact Taylor series vs retraining: |D| = {res['deletion_size']} ('x' names), "
                 f"{res['config']['steps']} steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    rs = [e["degree"] for e in res["errors_at_1"]]
    errs = [max(e["abs_error"], 1e-300) for e in res["errors_at_1"]]
    ax2.semilogy(rs, errs, "o-", color="k")
    ax2.set_xticks(rs if len(rs) <= 12 else rs[:: max(1, len(rs) // 10)])
    ax2.set_xlabel("degree r of the partial sum")
    ax2.set_ylabel("|partial sum - retrained| at t = 1")
    ax2.set_title("truncation error at t = 1", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# figure 3: a sketch against real retraining
# ----------------------------------------------------------------------------------------------


def fig3(data, out, directions: int = 500, degree: int = 3, steps: Optional[int] = None, seed: int = 0,
         chunk: int = 250, query: str = QUERY, delta: float = 0.05, workers: Optional[int] = None,
         progress: Progress = None) -> dict:
    """Sketch prediction of t -> query(t 1_D) with standard errors against real retrains.

    ``workers``: processes computing chunks of directions at once (default: one per core)."""
    from ..sketch import StabilityWarning

    out, t_start, machine, task, D = _start(data, out, steps, query)
    sdir = out / "fig3-sketch"

    workers = _workers(workers)
    sk, sketch_s, chunk_times = _timed_sketch(task, sdir, directions, degree, seed, min(chunk, directions),
                                              "sketch", progress, data, steps, workers)

    t0 = time.perf_counter()
    caught_msgs: set[str] = set()
    est, se = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StabilityWarning)
        sk.coefficients(query)  # cached for the grid below
        for t in T_FINE:
            if t == 0:
                p = sk.predict(query, D, weight=1.0, degree=0)  # f(0): the trained model, exactly
                est.append(float(p.estimate))
                se.append(0.0)
                continue
            p = sk.predict(query, D, weight=t, delta=delta)
            est.append(float(p.estimate))
            se.append(float(p.stderr))
        at1 = _scalar(sk.predict(query, D, weight=1.0, delta=delta))
        by_degree = [_scalar(sk.predict(query, D, weight=1.0, degree=r, delta=delta)) for r in range(degree + 1)]
        grid = [_scalar(sk.predict(query, D, weight=t, delta=delta)) if t > 0 else None for t in T_GRID]
        stab = sk.stability(query)
    caught_msgs.update(str(w.message) for w in caught)
    predict_s = time.perf_counter() - t0

    fig2_res = _reusable_retrains(out, task, D, query, T_GRID)
    t0 = time.perf_counter()
    if fig2_res is not None:
        rt = dict(fig2_res["retrain"], reused_from="fig2.json")
    else:
        rt = dict(_retrain_curve(task, D, query, T_GRID, progress), reused_from=None)
    retrain_s = time.perf_counter() - t0

    y1 = rt["value"][-1]
    true_change = y1 - rt["value"][0]
    err = at1.estimate - y1
    z_grid = []
    for t, y, p in zip(T_GRID, rt["value"], grid):
        if p is None:
            z_grid.append(None)
        else:
            z_grid.append((p.estimate - y) / p.stderr if p.stderr > 0 else None)

    res = {
        "figure": "fig3",
        "config": _config(task, directions=sk.m, degree=degree, seed=seed, chunk=min(chunk, directions),
                          query=query, delete=DELETE, delta=delta,
                          paper_size=(task.steps == 1000 and task.n == 1000 and sk.m == PAPER["fig3"]["directions"]
                                      and degree == PAPER["fig3"]["degree"])),
        "deletions": D,
        "deletion_size": len(D),
        "query": query,
        "sketch_dir": sdir.name,
        "curve": {"t": T_FINE, "estimate": est, "stderr": se},
        "at_1": {
            "estimate": at1.estimate,
            "base": at1.base,
            "predicted_change": at1.change,
            "stderr": at1.stderr,
            "median_of_means": at1.median_of_means,
            "delta": delta,
            "terms": at1.terms,
            "term_stderr": at1.term_stderr,
            "retrained": y1,
            "true_change": true_change,
            "error": err,
            "error_in_stderr": err / at1.stderr if at1.stderr > 0 else None,
            "median_of_means_error": at1.median_of_means - y1,
            "by_degree": [{"degree": p.degree, "estimate": p.estimate, "stderr": p.stderr,
                           "error": p.estimate - y1} for p in by_degree],
        },
        "retrain": {**rt, "predicted": [p.estimate if p else est[0] for p in grid],
                    "stderr": [p.stderr if p else 0.0 for p in grid], "error_in_stderr": z_grid},
        "stability": {k: stab.get(k) for k in ("verdict", "decay_per_degree", "log2_decay_per_degree",
                                               "safe_deletion_size", "safe_deletion_size_worst_case")},
        "warnings": sorted(caught_msgs),
        "timings": {
            "sketch_s_this_call": round(sketch_s, 3),
            "sketch_workers": workers,
            "sketch_chunks_s": chunk_times,
            "sketch_total_s": round(sum(chunk_times.values()), 3) if chunk_times else None,
            "sketch_s_per_direction_step": (round(sum(chunk_times.values()) / (sk.m * task.steps), 6)
                                            if chunk_times else None),
            "predict_s": round(predict_s, 3),
            "retrains_s": round(retrain_s, 3),
        },
        "machine": machine,
        "png": "fig3.png",
    }
    if fig2_res is not None:
        # the sketch's per-degree terms estimate the exact series coefficients of fig 2 (unbiasedly)
        exact = fig2_res["series"]["coefficients"]
        kk = min(degree, len(exact) - 1)
        res["exact_terms"] = {
            "coefficients": exact[: kk + 1],
            "error_in_stderr": [None] + [(at1.terms[r] - exact[r]) / at1.term_stderr[r]
                                         if at1.term_stderr[r] > 0 else None for r in range(1, kk + 1)],
            "partial_sum_at_1": float(sum(exact[: kk + 1])),
        }
        res["exact_terms"]["curve"] = fig2_res["curves"]["partial_sums"].get(str(degree)) if kk == degree else None
    return _finish(res, out, "fig3", _plot_fig3, t_start)


def _plot_fig3(res: dict, path: Path) -> None:
    from .report import save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    t = np.array(res["curve"]["t"])
    e = np.array(res["curve"]["estimate"])
    s = np.array(res["curve"]["stderr"])
    ax.fill_between(t, e - 2 * s, e + 2 * s, color="tab:blue", alpha=0.15, lw=0, label="± 2 s.e.")
    ax.fill_between(t, e - s, e + s, color="tab:blue", alpha=0.3, lw=0, label="± 1 s.e.")
    ax.plot(t, e, color="tab:blue", lw=1.8,
            label=f"sketch: {res['config']['directions']} directions, degree {res['config']['degree']}")
    ex = res.get("exact_terms")
    if ex and ex.get("curve"):
        ax.plot(res["curve"]["t"], ex["curve"], "--", color="0.35", lw=1.2,
                label=f"exact degree-{res['config']['degree']} series (fig 2)")
    ax.plot(res["retrain"]["t"], res["retrain"]["value"], "o", color="crimson", ms=5, zorder=5,
            label="real retraining")
    ax.plot([1.0], [res["at_1"]["median_of_means"]], "D", color="darkorange", ms=7, zorder=6,
            label=f"median of means at t = 1 (δ = {res['at_1']['delta']})")
    ax.set_xlabel("weight t on the deleted set (t = 1: deleted)")
    ax.set_ylabel(f"loss of '{res['query']}'")
    a = res["at_1"]
    z = a["error_in_stderr"]
    ax.set_title(f"sketch vs retraining, |D| = {res['deletion_size']}, {res['config']['steps']} steps; "
                 f"error at t = 1: {z:+.2f} s.e." if z is not None else "sketch vs retraining", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# figure 1: stability, from a few degree-100 ring runs
# ----------------------------------------------------------------------------------------------


def _fit(rs: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(rs, y, 1)[0]) if len(rs) >= 2 else float("nan")


def fig1(data, out, directions: int = 12, degree: int = 100, steps: Optional[int] = None,
         doc: Optional[str] = None, seed: int = 0, chunk: Optional[int] = None, check_degree: int = 6,
         tolerance: float = 0.05, workers: Optional[int] = None, progress: Progress = None) -> dict:
    """log2( sqrt(C(n+r-1, r)) |c_r| ) per direction and degree for the loss of a training document.

    ``workers``: processes computing chunks of directions at once (default: one per core; the default
    ``chunk`` splits the directions evenly between them).

    ``check_degree``: a second ring run at this low degree with the same directions; its coefficients
    must equal the degree-``degree`` run's first ``check_degree + 1`` (truncation does not change lower
    coefficients), which tests that the long series lost no accuracy (0 skips the check)."""
    from .. import series as taylor
    from ..sketch import evaluate, ring_train, stability_report, weight_series

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = _machine()
    task = paper_task(data, steps)
    doc = task.examples[0] if doc is None else doc
    task.validate_query(doc)
    workers = _workers(workers)
    chunk = -(-directions // workers) if chunk is None else min(chunk, directions)
    sdir = out / "fig1-sketch"

    sk, sketch_s, chunk_times = _timed_sketch(task, sdir, directions, degree, seed, chunk, "ring runs",
                                              progress, data, steps, workers)

    c = sk.coefficients(doc)[:, :, 0]  # [m, K]: a scalar output
    rep = stability_report(c, task.n, tolerance=tolerance)
    rows = rep["degrees"]
    rs = np.array([row["degree"] for row in rows], dtype=float)
    log2_size = np.array([row["log2_size"] for row in rows])
    per_dir = np.array([row["log2_per_direction"] for row in rows]).T  # [m, K-1]
    mean_log2 = per_dir.mean(0)
    half = rs >= max(1, degree // 2)
    tail_slope = _fit(rs[half], log2_size[half])
    absc = c[:, 1:].abs()

    check = None
    if check_degree and 1 <= check_degree < degree:
        t0 = time.perf_counter()
        low = ring_train(task, weight_series(sk.psi(), check_degree),
                         callback=lambda s, loss: _report(progress, f"degree-{check_degree} check", s + 1, task.steps))
        cl = taylor.coefficients(evaluate(task, low, doc))
        cl = cl.expand(c.shape[0], *cl.shape[1:])
        rel = ((c[:, : check_degree + 1] - cl).abs() / cl.abs().clamp_min(1e-300)).amax(0)
        check = {"degree": check_degree, "max_relative_difference": rel.tolist(),
                 "agrees": bool(rel.max() < 1e-8), "seconds": round(time.perf_counter() - t0, 3)}

    # terms ~ A rho^r ||v||^r: the series in the deletion converges only while rho^2 |D| < 1 (unit weights)
    rho_all = 2.0 ** rep["log2_decay_per_degree"] if rep["log2_decay_per_degree"] is not None else None
    rho_tail = 2.0 ** tail_slope if math.isfinite(tail_slope) else None
    res = {
        "figure": "fig1",
        "config": _config(task, directions=sk.m, degree=degree, seed=seed, chunk=chunk, query=doc,
                          tolerance=tolerance,
                          paper_size=(task.steps == 1000 and task.n == 1000 and sk.m == PAPER["fig1"]["directions"]
                                      and degree == PAPER["fig1"]["degree"])),
        "query": doc,
        "sketch_dir": sdir.name,
        "degrees": rs.astype(int).tolist(),
        "log2_per_direction": per_dir.tolist(),
        "log2_size": log2_size.tolist(),
        "log2_lo": [row["log2_lo"] for row in rows],
        "log2_hi": [row["log2_hi"] for row in rows],
        "mean_of_log2_per_direction": mean_log2.tolist(),
        "degree_0_value": float(c[0, 0].real),
        "fit": {
            "log2_decay_per_degree": rep["log2_decay_per_degree"],
            "decay_per_degree": rep["decay_per_degree"],
            "tail_from_degree": int(rs[half][0]) if half.any() else None,
            "tail_log2_decay_per_degree": tail_slope,
            "tail_decay_per_degree": rho_tail,
            "series_radius_deletion_size": (1.0 / rho_all ** 2) if rho_all else None,
            "tail_series_radius_deletion_size": (1.0 / rho_tail ** 2) if rho_tail else None,
            "safe_deletion_size": rep["safe_deletion_size"],
            "safe_deletion_size_worst_case": rep["safe_deletion_size_worst_case"],
            "tolerance": tolerance,
            "verdict": rep["verdict"],
        },
        "coefficient_range": {"min_abs": float(absc.min()), "max_abs": float(absc.max()),
                              "float64_min_normal": float(np.finfo(np.float64).tiny)},
        "low_degree_check": check,
        "timings": {
            "sketch_s_this_call": round(sketch_s, 3),
            "sketch_workers": workers,
            "sketch_chunks_s": chunk_times,
            "sketch_total_s": round(sum(chunk_times.values()), 3) if chunk_times else None,
            "ring_s_per_step_all_directions": (round(sum(chunk_times.values()) / task.steps, 5) if chunk_times else None),
        },
        "machine": machine,
        "png": "fig1.png",
    }
    return _finish(res, out, "fig1", _plot_fig1, t_start)


def _plot_fig1(res: dict, path: Path) -> None:
    from .report import save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    rs = np.array(res["degrees"])
    for j, row in enumerate(res["log2_per_direction"]):
        ax.plot(rs, row, color="tab:blue", lw=0.6, alpha=0.45, label="single directions" if j == 0 else None)
    ax.fill_between(rs, res["log2_lo"], res["log2_hi"], color="k", alpha=0.12, lw=0, label="95% bootstrap interval")
    ax.plot(rs, res["log2_size"], color="k", lw=2.2, label=f"estimate over {len(res['log2_per_direction'])} directions")
    f = res["fit"]
    if f["log2_decay_per_degree"] is not None:
        b = float(np.mean(res["log2_size"]) - f["log2_decay_per_degree"] * rs.mean())
        ax.plot(rs, b + f["log2_decay_per_degree"] * rs, "--", color="crimson", lw=1,
                label=f"fit: {f['log2_decay_per_degree']:+.3f} bits per degree")
    ax.set_xlabel("degree r")
    ax.set_ylabel("log2( sqrt(C(n+r-1, r)) |c_r| )")
    ax.set_title(f"size of the degree-r Taylor term, loss of training document '{res['query']}', "
                 f"{res['config']['steps']} steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def run_figure(name: str, data, out, progress: Progress = None, **kwargs) -> dict:
    """Dispatch by name (``fig1``, ``fig2``, ``fig3``); ``kwargs`` that are None take the paper's defaults."""
    fns = {"fig1": fig1, "fig2": fig2, "fig3": fig3}
    if name not in fns:
        raise ValueError(f"unknown figure {name!r} (choose from: {', '.join(FIGURES)})")
    kw = {k: v for k, v in kwargs.items() if v is not None}
    return fns[name](data, out, progress=progress, **kw)
