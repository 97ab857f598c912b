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
    ``est``: [m, ...] (directions first; every other element gets its own beta). Returns the adjusted values,
    same shape (their mean is the estimate, their spread gives its standard error); with fewer than
    2 (powers + 2) directions the estimates are returned unchanged."""
    m = est.shape[0]
    if m < 2 * (powers + 2):
        return est
    flat = est.reshape(m, -1)
    Y = torch.stack([lean**j - lean_moment(n, j) for j in range(1, powers + 1)], dim=1)  # [m, J]
    Y = Y / Y.std(0, keepdim=True).clamp_min(1e-300)  # conditioning only: the fitted beta . Y is scale-free
    first = torch.arange(m) < m // 2
    out = flat.clone()
    for fit, use in ((first, ~first), (~first, first)):
        A = torch.cat([torch.ones(int(fit.sum()), 1, dtype=est.dtype), Y[fit]], dim=1)
        beta = torch.linalg.lstsq(A, flat[fit]).solution[1:]  # [J, R]
        out[use] = flat[use] - Y[use] @ beta
    return out.reshape(est.shape)


def median_of_means(x: torch.Tensor, delta: float, dim: int = None):
    """Median of g group means, g = ceil(8 ln(1/delta)) capped by the sample size (Lugosi & Mendelson).

    ``x``: [m] (a float is returned) or any shape with the directions on ``dim`` (default: dim 1 of a tensor with
    more than one dimension, the layout [S, m, ...] of :func:`delsketch.sketch.predict.predict`)."""
    if dim is None:
        dim = 0 if x.dim() == 1 else 1
    m = x.shape[dim]
    g = max(1, min(m, math.ceil(8 * math.log(1 / delta))))
    means = torch.stack([gr.mean(dim) for gr in torch.tensor_split(x, g, dim=dim)])
    med = means.median(0).values if means.dim() > 1 else means.median()
    return float(med) if med.dim() == 0 else med
