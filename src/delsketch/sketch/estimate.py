"""Estimators over the per-direction values of a sketch: pure functions of tensors."""

from __future__ import annotations

import math

import torch

def log_binom(n: int, r: int) -> float:
    return math.lgamma(n + r) - math.lgamma(r + 1) - math.lgamma(n)


def lean_moment(n: int, j: int) -> float:
    """E[B^j] for B = |<psi, u>|^2, psi uniform on the unit sphere of C^n and u a unit vector: B ~ Beta(1, n-1),
    so E[B^j] = j! (n-1)! / (n+j-1)!."""
    return math.exp(math.lgamma(j + 1) + math.lgamma(n) - math.lgamma(n + j))


def control_variate_adjust(est: torch.Tensor, lean: torch.Tensor, n: int, powers: int) -> torch.Tensor:
    """Per-direction estimates with control variates removed, two-fold cross-fitted.

    The controls are Y_j = B^j - E[B^j] (j = 1..powers), B = ``lean`` the squared projection of each direction on
    the deletion vector: their means are known exactly (:func:`lean_moment`), so est - beta . Y has the mean of
    est for any fixed beta. beta is fitted by least squares on one half of the directions and applied to the other
    half (and vice versa), so it is independent of the values it adjusts and the mean stays exactly unbiased.
    Returns [m] adjusted values (their mean is the estimate, their spread gives its standard error); with fewer
    than 2 (powers + 2) directions the estimates are returned unchanged."""
    m = est.shape[0]
    if m < 2 * (powers + 2):
        return est
    Y = torch.stack([lean**j - lean_moment(n, j) for j in range(1, powers + 1)], dim=1)  # [m, J]
    Y = Y / Y.std(0, keepdim=True).clamp_min(1e-300)  # conditioning only: the fitted beta . Y is scale-free
    first = torch.arange(m) < m // 2
    out = est.clone()
    for fit, use in ((first, ~first), (~first, first)):
        A = torch.cat([torch.ones(int(fit.sum()), 1, dtype=est.dtype), Y[fit]], dim=1)
        beta = torch.linalg.lstsq(A, est[fit].unsqueeze(1)).solution[1:, 0]
        out[use] = est[use] - Y[use] @ beta
    return out


def median_of_means(x: torch.Tensor, delta: float) -> float:
    """Median of g group means, g = ceil(8 ln(1/delta)) capped by the sample size (Lugosi & Mendelson)."""
    m = x.shape[0]
    g = max(1, min(m, math.ceil(8 * math.log(1 / delta))))
    groups = torch.tensor_split(x, g)
    means = torch.stack([gr.mean() for gr in groups])
    return float(means.median())

