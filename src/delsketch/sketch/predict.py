"""Predictions from a sketch: the result type and the estimators applied to a deletion set."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .core import Query, StabilityWarning, query_name
from .estimate import control_variate_adjust, median_of_means


@dataclass
class Prediction:
    query: str
    estimate: float  # mean over directions of the degree-k estimate
    base: float  # f(0): the trained model's value
    change: float  # estimate - base
    stderr: float  # standard error of the estimate over directions
    median_of_means: float
    delta: float  # failure probability of the median-of-means bound
    terms: list[float]  # per-degree estimated Taylor terms, degree 0 first
    term_stderr: list[float]
    directions: int
    degree: int
    deletion_size: int
    weight: float
    safe_deletion_size: Optional[float] = None
    warning: Optional[str] = None
    control_variates: bool = False
    # [change, stderr] of the estimate truncated at each degree r = 0..degree (the last row is change/stderr):
    # the trade-off between truncation bias (low r) and sampling noise (high r), see docs/accuracy.md
    by_degree: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def predict(
    sketch,
    queries: Union[Query, Sequence[Query]],
    delete: Union[Sequence[int], Sequence[Sequence[int]]],
    weight: float = 1.0,
    delta: float = 0.05,
    degree: Optional[int] = None,
    tolerance: float = 0.05,
    control_variates: bool = False,
) -> Union[Prediction, list]:
    """Predict outputs after deleting D (weight W: 1 deletes, 0<W<1 downweights, W<0 upweights).

    ``queries``: one query or a list; ``delete``: one index list or a list of index lists. Returns a
    Prediction, or nested lists [query][set] when lists were given.

    ``degree``: truncate at this degree (at most the sketch's). ``control_variates``: subtract the part
    of each direction's estimate explained by how far that direction happens to lean towards D (see
    :func:`control_variate_adjust`); unbiased, and a smaller standard error when that lean drives the
    scatter (it does for small deletion sets). ``terms`` then stay the plain per-degree means."""
    single_q = isinstance(queries, str) or callable(queries)
    qs = [queries] if single_q else list(queries)
    single_d = len(delete) == 0 or not isinstance(delete[0], (list, tuple, range, np.ndarray, torch.Tensor))
    sets = [list(delete)] if single_d else [list(d) for d in delete]
    k = sketch.degree if degree is None else degree
    if not 0 <= k <= sketch.degree:
        raise ValueError(f"degree must lie in [0, {sketch.degree}]")
    D = torch.zeros(len(sets), sketch.n, dtype=torch.float64)
    for i, d in enumerate(sets):
        if len(d) == 0:
            raise ValueError("empty deletion set")
        for j in d:
            if not 0 <= int(j) < sketch.n:
                raise ValueError(f"deletion index {j} outside [0, {sketch.n})")
        D[i, list(map(int, d))] = weight
    lean = sketch.lean(D) if control_variates else None
    out = []
    for q in qs:
        terms = sketch.per_direction_terms(q, D)[..., : k + 1]  # [S, m, K]
        stab = sketch.stability(q, tolerance=tolerance)
        row = []
        for i, d in enumerate(sets):
            t = terms[i]
            m = t.shape[0]
            cum = t.cumsum(-1)  # [m, k+1]: the estimate truncated at each degree
            if lean is not None:
                cum = torch.stack([control_variate_adjust(cum[:, r], lean[i], sketch.n, 1)
                                   for r in range(k + 1)], -1)
            est = cum[:, k]  # [m]
            base = float(t[0, 0])
            by_degree = [[float(cum[:, r].mean()) - base,
                          float(cum[:, r].std(unbiased=True) / math.sqrt(m)) if m > 1 else float("nan")]
                         for r in range(k + 1)]
            se = by_degree[k][1]
            mom = median_of_means(est, delta)
            size = len(set(map(int, d)))
            safe = stab.get("safe_deletion_size")
            warn = None
            eff = size * weight * weight
            if safe is not None and eff > safe:
                warn = (
                    f"deletion of {size} examples (weight {weight}) exceeds the size the stability diagnostics "
                    f"consider safe ({safe:.3g}); the truncated series may be inaccurate"
                )
                warnings.warn(warn, StabilityWarning)
            row.append(
                Prediction(
                    query=query_name(q),
                    estimate=float(est.mean()),
                    base=base,
                    change=float(est.mean()) - base,
                    stderr=se,
                    median_of_means=mom,
                    delta=delta,
                    terms=t.mean(0).tolist(),
                    term_stderr=(t.std(0, unbiased=True) / math.sqrt(m)).tolist() if m > 1 else [float("nan")] * (k + 1),
                    directions=m,
                    degree=k,
                    deletion_size=size,
                    weight=weight,
                    safe_deletion_size=safe,
                    warning=warn,
                    control_variates=lean is not None,
                    by_degree=by_degree,
                )
            )
        out.append(row)
    if single_q and single_d:
        return out[0][0]
    if single_d:
        return [r[0] for r in out]
    if single_q:
        return out[0]
    return out

def effects(sketch, queries: Sequence[Query], weight: float = 1.0, degree: Optional[int] = None) -> torch.Tensor:
    """Predicted change of every output when each single training example is deleted: [n, len(queries)]."""
    k = sketch.degree if degree is None else degree
    psi_c = sketch.psi().conj()  # [m, n]
    scale = sketch._scale()
    cols = []
    for q in queries:
        c = sketch.coefficients(q)  # [m, K]
        tot = torch.zeros(sketch.n, dtype=torch.float64)
        for r in range(1, k + 1):
            tot += (scale[r] * (c[:, r : r + 1] * (weight * psi_c) ** r)).real.mean(0)
        cols.append(tot)
    return torch.stack(cols, dim=1)
