"""One-run privacy auditing (the guessing game of Steinke, Nasr and Jagielski, 2023): plant m canaries, include
each in training independently with probability 1/2, score every canary after training, guess "in" for the
``k_in`` highest scores and "out" for the ``k_out`` lowest. Under epsilon-DP each guess is right with probability
at most ``e^eps / (1 + e^eps)`` even conditioned on the others, so the number of right guesses is dominated by a
binomial; the lower bound is the smallest epsilon not rejected at level ``beta``.

Pure-epsilon form: the delta term of the paper's bound (of order m * delta) is left out, which is negligible for
m * delta << beta (here m = 200, delta = 1e-5)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["one_run_epsilon_lower_bound"]


def one_run_epsilon_lower_bound(scores: Sequence[float], member: Sequence[bool], k_in: int, k_out: int = 0,
                                beta: float = 0.05) -> dict:
    """``{"epsilon_lower_bound", "guesses", "correct"}`` from canary ``scores`` (higher = more likely a member)
    and their true ``member``ship. The bound is the largest eps with ``P[Binom(r, e^eps/(1+e^eps)) >= correct] <=
    beta`` (0 when even eps = 0 is not rejected)."""
    from scipy.stats import binom

    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(member, dtype=bool)
    if s.shape != m.shape or s.ndim != 1:
        raise ValueError("scores and member must be 1-d and of equal length")
    if not (0 <= k_in and 0 <= k_out and 0 < k_in + k_out <= s.size):
        raise ValueError(f"need 0 < k_in + k_out <= {s.size} guesses")
    if not 0 < beta < 1:
        raise ValueError("beta must lie in (0, 1)")
    order = np.argsort(-s, kind="stable")
    correct = int(m[order[:k_in]].sum()) + int((~m[order[s.size - k_out:]]).sum() if k_out else 0)
    r = k_in + k_out

    def p_value(eps: float) -> float:  # P[Binom(r, p) >= correct]
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(correct - 1, r, p))

    if p_value(0.0) > beta:
        return {"epsilon_lower_bound": 0.0, "guesses": r, "correct": correct}
    lo, hi = 0.0, 1.0
    while p_value(hi) <= beta and hi < 100:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if p_value(mid) <= beta:
            lo = mid
        else:
            hi = mid
    return {"epsilon_lower_bound": lo, "guesses": r, "correct": correct}
