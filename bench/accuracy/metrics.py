"""Accuracy metrics of predicted against actual change."""

from __future__ import annotations

import numpy as np


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    # average ties
    xs = x[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        if j > i:
            r[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3:
        return float("nan")
    ra, rb = _rank(a), _rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def summarize(pred: np.ndarray, true: np.ndarray, se: np.ndarray | None = None, per_query: bool = True,
              rank_only: bool = False) -> dict:
    """pred, true, se: [S, Q] (S deletion sets, Q queries); or [P] for one set per query.

    spearman: mean over queries of the Spearman correlation across the S sets (the LDS at 50%), or the
    Spearman over the P pairs when per_query is False; spearman_pooled: over all entries.
    """
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    out: dict = {"count": int(true.size)}
    if per_query and pred.ndim == 2 and pred.shape[0] >= 3:
        rhos = [spearman(pred[:, q], true[:, q]) for q in range(pred.shape[1])]
        rhos = [r for r in rhos if np.isfinite(r)]
        out["spearman"] = float(np.mean(rhos)) if rhos else float("nan")
    else:
        out["spearman"] = spearman(pred.ravel(), true.ravel())
    out["spearman_pooled"] = spearman(pred.ravel(), true.ravel())
    out["sign_agreement"] = float(np.mean(np.sign(pred) == np.sign(true)))
    if not rank_only:
        denom = np.abs(true)
        rel = np.abs(pred - true) / np.where(denom > 0, denom, np.nan)
        out["median_relative_error"] = float(np.nanmedian(rel))
        out["median_abs_error"] = float(np.median(np.abs(pred - true)))
    out["median_abs_change"] = float(np.median(np.abs(true)))
    if se is not None:
        out["coverage_2se"] = float(np.mean(np.abs(pred - true) <= 2 * np.asarray(se)))
    return out
