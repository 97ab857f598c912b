"""Stability diagnostics: do the Taylor terms decay with the degree, and up to what deletion size is a
truncated series trustworthy?"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .estimate import log_binom

def _safe_size(A: float, rho: float, k: int, n: int, tolerance: float) -> float:
    """Largest s with sum_{r>k} A (rho sqrt(s))^r < tolerance (0 if none, n at most)."""

    def bound(size):
        x = rho * math.sqrt(size)
        if x >= 1:
            return math.inf
        return A * x ** (k + 1) / (1 - x)

    if rho <= 0:
        return float(n)
    lo, hi = 0.0, min(float(n), 1.0 / (rho * rho))
    if bound(hi * (1 - 1e-12)) < tolerance:
        return hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if bound(mid) < tolerance:
            lo = mid
        else:
            hi = mid
    return lo


def stability_report(c: torch.Tensor, n: int, tolerance: float = 0.05, confidence: float = 0.95) -> dict:
    """Per-degree size estimates of the Taylor terms from sketch coefficients c [m, K].

    For psi uniform on the complex unit sphere, C(n+r-1, r) E|c_r|^2 = ||T_r||^2 (the Frobenius norm of the
    symmetric degree-r Taylor tensor, up to the symmetric normalization): the paper's figure-1 estimate, reported
    per degree as log2 with a bootstrap confidence interval and per direction.

    Two deletion-size limits follow from a geometric fit size_r ~ A rho^r and a tolerance on the truncation
    error sum_{r>k} of the dropped terms, for a deletion vector v = W 1_D with ||v||^2 = W^2 |D|:

    * ``safe_deletion_size`` (typical case): terms of size RMS(c_r) ||v||^r, which is exactly the RMS term
      size along a uniformly random direction of that norm;
    * ``safe_deletion_size_worst_case``: terms bounded by ||T_r|| ||v||^r (Cauchy-Schwarz), valid for every D
      but loose.

    ``predict`` warns when W^2 |D| exceeds the typical-case limit."""
    m, K = c.shape
    k = K - 1
    rows = []
    log_norm, log_rms = [], []
    gen = torch.Generator().manual_seed(12345)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    for r in range(1, K):
        scale = math.exp(log_binom(n, r))
        a2 = c[:, r].abs() ** 2
        rms = float(a2.mean().sqrt())
        est = rms * math.sqrt(scale)
        if m > 1:
            boot = (a2[torch.randint(0, m, (400, m), generator=gen)].mean(1) * scale).sqrt()
            lo, hi = torch.quantile(boot, torch.tensor([lo_q, hi_q], dtype=boot.dtype)).tolist()
        else:
            lo = hi = est
        per_dir = ((a2 * scale).sqrt()).clamp_min(1e-300).log2().tolist()
        rows.append({
            "degree": r,
            "log2_size": math.log2(max(est, 1e-300)),
            "log2_lo": math.log2(max(lo, 1e-300)),
            "log2_hi": math.log2(max(hi, 1e-300)),
            "rms_coefficient": rms,
            "log2_per_direction": per_dir,
        })
        log_norm.append(math.log(max(est, 1e-300)))
        log_rms.append(math.log(max(rms, 1e-300)))
    report: dict[str, Any] = {"degrees": rows, "directions": m, "n": n, "degree": k, "tolerance": tolerance}
    if k >= 2:
        rs = np.arange(1, K)
        slope, intercept = np.polyfit(rs, np.array(log_norm), 1)
        slope_t, intercept_t = np.polyfit(rs, np.array(log_rms), 1)
        rho = float(math.exp(slope))
        report["decay_per_degree"] = rho
        report["log2_decay_per_degree"] = float(slope / math.log(2))
        report["safe_deletion_size"] = _safe_size(math.exp(intercept_t), math.exp(slope_t), k, n, tolerance)
        report["safe_deletion_size_worst_case"] = _safe_size(math.exp(intercept), rho, k, n, tolerance)
        if rho < 0.9:
            verdict = "stable: Taylor terms decay geometrically"
        elif rho <= 1.1:
            verdict = "marginal: Taylor terms do not clearly decay"
        else:
            verdict = "unstable: Taylor terms grow with degree; predictions are unreliable"
        report["verdict"] = verdict
    else:
        report["decay_per_degree"] = None
        report["log2_decay_per_degree"] = None
        report["safe_deletion_size"] = None
        report["safe_deletion_size_worst_case"] = None
        report["verdict"] = "unknown: a degree-1 sketch cannot show decay"
    return report


# ---------------------------------------------------------------- gradient transforms with non-analytic branches
_CLIPPING_CACHE: "weakref.WeakKeyDictionary" = None  # type: ignore[assignment]


def clipping_diagnostics(task, steps=None):
    """The clipping counts of a task whose gradient transform exposes ``diagnostics()`` (DP-SGD), for the run a
    sketch's degree-0 part is: plain training of ``task`` for ``steps`` steps (default: all). Duck-typed: ``None``
    for a task without such a transform. The counts are measured once per (transform, steps) in this process by
    running that training (the degree-0 value of every ring run decides the same branches), so they do not depend
    on what else ran before."""
    global _CLIPPING_CACHE
    import weakref

    grad = getattr(task, "gradient", None)
    diag = getattr(grad, "diagnostics", None)
    if not callable(diag):
        return None
    if _CLIPPING_CACHE is None:
        _CLIPPING_CACHE = weakref.WeakKeyDictionary()
    per = _CLIPPING_CACHE.setdefault(grad, {})
    key = len(task.schedule) if steps is None else int(steps)
    if key not in per:
        from ..training import train

        train(task, steps=key)
        per[key] = dict(diag())
    return dict(per[key])


def fold_clipping(report: dict, diagnostics) -> dict:
    """``report`` with a ``clipping`` entry from a gradient transform's ``diagnostics()`` (``None``: unchanged).
    When any example-step's degree-0 gradient norm lay within the transform's margin of the clipping bound the
    verdict is downgraded: prefixed with ``"unreliable near the clipping boundary"`` (a deletion can move such a
    norm across the bound, where the clip's series switches branch)."""
    if diagnostics is None:
        return report
    out = dict(report)
    near = int(diagnostics.get("near_boundary", 0))
    out["clipping"] = {k: diagnostics.get(k) for k in ("steps", "examples", "clipped", "near_boundary",
                                                        "near_boundary_examples", "boundary_margin",
                                                        "min_relative_gap")}
    if near > 0:
        out["clipping"]["reliable"] = False
        out["verdict"] = (f"unreliable near the clipping boundary ({near} example-steps within "
                          f"{diagnostics.get('boundary_margin')} of C); {report.get('verdict', '')}").rstrip("; ")
    else:
        out["clipping"]["reliable"] = True
    return out
