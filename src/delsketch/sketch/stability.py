"""Stability diagnostics: do the Taylor terms decay with the degree, and up to what deletion size is a
truncated series trustworthy?"""

from __future__ import annotations

import math
from typing import Any

import torch

from .estimate import log_binom

def _safe_size(A: float, rho: float, k: int, n: int, tolerance: float, cap: float | None = None) -> float:
    """Largest s with sum_{r>k} A (rho sqrt(s))^r < tolerance (0 if none, ``cap`` at most: default n)."""
    cap = float(n) if cap is None else float(cap)

    def bound(size):
        x = rho * math.sqrt(size)
        if x >= 1:
            return math.inf
        return A * x ** (k + 1) / (1 - x)

    if rho <= 0:
        return cap
    lo, hi = 0.0, min(cap, 1.0 / (rho * rho))
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
    report: dict[str, Any] = {"degrees": rows, "directions": m, "n": n, "degree": k, "tolerance": tolerance}
    if k >= MIN_FIT_DEGREE:
        fit = element_stability(c.reshape(m, K, 1), n, tolerance)
        rho = float(fit["decay_per_degree"][0])
        typ = float(fit["decay_per_degree_typical"][0])
        report["decay_per_degree"] = rho
        report["log2_decay_per_degree"] = math.log2(rho) if rho > 0 else None
        report["decay_per_degree_typical"] = typ
        report["safe_deletion_size"] = safe = float(fit["safe_deletion_size"][0])
        report["safe_deletion_size_worst_case"] = float(fit["safe_deletion_size_worst_case"][0])
        report["verdict"] = {"stable": "stable: Taylor terms of a single deletion decay geometrically",
                             "marginal": "marginal: Taylor terms of a single deletion do not clearly decay",
                             "unstable": "unstable: Taylor terms grow with degree even for a single deletion; "
                                         "predictions are unreliable"}[verdict_of(typ)] + \
            f" (typical safe deletion size {safe:.3g} of {n})"
    else:
        report["decay_per_degree"] = None
        report["log2_decay_per_degree"] = None
        report["safe_deletion_size"] = None
        report["safe_deletion_size_worst_case"] = None
        report["verdict"] = (f"unknown: a degree-{k} sketch cannot show a decay (a fit through {k} degree"
                             f"{'s' if k > 1 else ''} always fits; sketch at degree {MIN_FIT_DEGREE} or more)")
    return report


#: the least degree from which a geometric decay is fitted: two degrees always lie on a line, so a degree-2 sketch
#: would report a "safe" size that nothing has checked (the exact series may diverge well inside it)
MIN_FIT_DEGREE = 3


def _fit(log_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares line through (r, log size_r), r = 1..k, for every column of ``log_sizes [k, P]``:
    (intercept, slope) as [P] tensors."""
    k = log_sizes.shape[0]
    r = torch.arange(1, k + 1, dtype=torch.float64)[:, None]
    rm, ym = r.mean(), log_sizes.mean(0)
    slope = ((r - rm) * (log_sizes - ym)).sum(0) / ((r - rm) ** 2).sum()
    return ym - slope * rm, slope


def safe_sizes(A: torch.Tensor, rho: torch.Tensor, k: int, n: int, tolerance: float,
               cap: float | None = None) -> torch.Tensor:
    """Vectorized :func:`_safe_size`: the largest s with sum_{r>k} A (rho sqrt(s))^r < tolerance, for every
    element; an element whose terms are all zero is safe at every size (``cap``, default n)."""
    A, rho = A.to(torch.float64), rho.to(torch.float64)
    top = float(n) if cap is None else float(cap)
    out = torch.empty_like(A)
    for i in range(A.numel()):
        a, p = float(A.reshape(-1)[i]), float(rho.reshape(-1)[i])
        out.reshape(-1)[i] = top if a <= 1e-250 else _safe_size(a, p, k, n, tolerance, top)
    return out


def element_stability(c: torch.Tensor, n: int, tolerance: float = 0.05) -> dict:
    """Per-element decay and safe deletion sizes of a vector output from its coefficients ``c [m, K, P]``
    (no bootstrap): what :func:`delsketch.sketch.predict.predict` checks every set against."""
    m, K, P = c.shape
    k = K - 1
    if k < MIN_FIT_DEGREE:
        nan = torch.full((P,), float("nan"), dtype=torch.float64)
        return {"safe_deletion_size": nan, "safe_deletion_size_worst_case": nan, "decay_per_degree": nan,
                "decay_per_degree_typical": nan, "safe_effective_size": nan}
    scale = torch.tensor([math.exp(log_binom(n, r)) for r in range(1, K)], dtype=torch.float64)[:, None]
    rms = (c[:, 1:].abs() ** 2).mean(0).sqrt()  # [k, P]
    zero = rms.max(0).values <= 1e-250
    log_rms = rms.clamp_min(1e-300).log()
    log_norm = (rms * scale.sqrt()).clamp_min(1e-300).log()
    a_t, s_t = _fit(log_rms)
    a_n, s_n = _fit(log_norm)
    A_t = torch.where(zero, torch.zeros_like(a_t), a_t.exp())
    A_n = torch.where(zero, torch.zeros_like(a_n), a_n.exp())
    safe = safe_sizes(A_t, s_t.exp(), k, n, tolerance)
    # the same limit on W^2 |D| coherence^2 (up to n^2), which predict compares coherent sets against: it differs
    # from the safe size only where that one stopped at its cap n
    eff = safe.clone()
    at_cap = safe >= n
    if bool(at_cap.any()):
        eff[at_cap] = safe_sizes(A_t[at_cap], s_t.exp()[at_cap], k, n, tolerance, cap=float(n) * n)
    return {
        "safe_deletion_size": safe,
        "safe_effective_size": eff,
        "safe_deletion_size_worst_case": safe_sizes(A_n, s_n.exp(), k, n, tolerance),
        "decay_per_degree": torch.where(zero, torch.zeros_like(s_n), s_n.exp()),
        "decay_per_degree_typical": torch.where(zero, torch.zeros_like(s_t), s_t.exp()),
    }


def verdict_of(rho: float) -> str:
    if rho < 0.9:
        return "stable"
    return "marginal" if rho <= 1.1 else "unstable"


def vector_report(c: torch.Tensor, n: int, names: list, tolerance: float = 0.05) -> dict:
    """The stability of a vector output ``c [m, K, P]``: per-element decay and safe sizes, and one verdict that
    counts the elements in each state (the worst element named)."""
    m, K, P = c.shape
    fit = element_stability(c, n, tolerance)
    rep: dict[str, Any] = {"directions": m, "n": n, "degree": K - 1, "tolerance": tolerance, "elements": P,
                           "names": names}
    rep.update({k: v.tolist() for k, v in fit.items()})
    if K - 1 < MIN_FIT_DEGREE:
        rep["verdict"] = f"unknown: a degree-{K - 1} sketch cannot show a decay (sketch at degree {MIN_FIT_DEGREE} or more)"
        return rep
    rho = fit["decay_per_degree_typical"]
    counts = {v: 0 for v in ("stable", "marginal", "unstable")}
    for r in rho.tolist():
        counts[verdict_of(r)] += 1
    worst = int(torch.argmax(rho))
    rep["counts"] = counts
    rep["worst_element"] = names[worst]
    rep["verdict"] = (f"{verdict_of(float(rho[worst]))}: {counts['stable']} of {P} elements stable, {counts['marginal']} "
                      f"marginal, {counts['unstable']} unstable (worst {names[worst]}, decay {float(rho[worst]):.3g} per degree)")
    return rep

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
