"""Independent Taylor coefficients by nested forward-mode AD (torch.func.jvp), for tests.

For a function g of a scalar t, the degree-r Taylor coefficient at t = 0 is the r-th derivative divided
by r!. Here the r-th derivative comes from nesting torch.func.jvp r times: no part of delsketch is used.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import jvp


def taylor_coefficients(g, degree: int):
    """Coefficients [c_0, ..., c_degree] of t -> g(t) at t = 0; g returns a tensor or a tuple/dict of tensors."""
    t0 = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)

    def deriv(f):
        return lambda t: jvp(f, (t,), (one,))[1]

    out = []
    f = g
    for r in range(degree + 1):
        val = f(t0)
        out.append(_scale(val, 1.0 / math.factorial(r)))
        if r < degree:
            f = deriv(f)
    return out


def _scale(v, s):
    if isinstance(v, dict):
        return {k: x * s for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(x * s for x in v)
    return v * s


def path(coeffs):
    """t -> sum_r t^r coeffs[r] (a polynomial path through tensor space)."""

    def x(t):
        out = coeffs[0]
        for r in range(1, len(coeffs)):
            out = out + t**r * coeffs[r]
        return out

    return x


def complex_by_interpolation(real_coeff_of_direction, a, b, r: int):
    """D^r f[(a+ib)^r]/r! from real-direction values: P(s) = D^r f[(a+sb)^r]/r! is a polynomial of
    degree r in s with real coefficients; fit it through r+1 real values of s and evaluate at s = i."""
    s = np.linspace(-1.0, 1.0, r + 1)
    vals = [real_coeff_of_direction(a + float(sj) * b) for sj in s]
    vals = torch.stack([torch.as_tensor(v) for v in vals])  # [r+1, *shape]
    V = torch.tensor(np.vander(s, r + 1, increasing=True), dtype=torch.float64)  # [r+1, r+1]
    poly = torch.linalg.solve(V, vals.reshape(r + 1, -1))  # coefficients in s, increasing
    powers = torch.tensor([1j**p for p in range(r + 1)], dtype=torch.complex128)
    return (powers[:, None] * poly.to(torch.complex128)).sum(0).reshape(vals.shape[1:])
