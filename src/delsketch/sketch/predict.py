"""Predictions from a sketch: one result type for any output shape and any number of deletion sets.

An output of shape ``[*out]`` (see :mod:`delsketch.training.outputs`) predicted for one deletion set gives fields
of shape ``[*out]``; for a list of S sets, ``[S, *out]``. Per-degree fields put the degree axis after the sets
axis: ``terms [S?, K, *out]``. A dict-valued output gives a dict of such tensors for each field.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..io import jsonable
from ..training.outputs import Output
from .core import StabilityWarning
from .estimate import control_variate_adjust, median_of_means

SCHEMA = "delsketch-prediction/1"

#: the fields that hold values of the output's shape (with the sets axis in front for a list of sets)
VALUE_FIELDS = ("estimate", "base", "change", "stderr", "median_of_means", "terms", "term_stderr",
                "by_degree_change", "by_degree_stderr", "safe_deletion_size", "coherence", "beyond_safe_size")


@dataclass
class Prediction:
    """What a deletion does to an output, and how the answer was obtained.

    Value fields (tensors of the output's shape, ``[S, ...]`` for S sets; dicts of them for dict outputs):
    ``estimate`` (the output after the deletion), ``base`` (as trained; no sets axis), ``change`` (estimate -
    base), ``stderr`` (its standard error; 0 for an exact method), ``median_of_means``, ``terms`` /
    ``term_stderr`` (the per-degree Taylor terms, degree axis after the sets axis), ``by_degree_change`` /
    ``by_degree_stderr`` (the change truncated at each degree r = 0..degree: bias vs noise),
    ``safe_deletion_size`` (per output element, from the stability diagnostics; NaN where none), ``coherence``
    (per set and element: how many times, at least, the set's degree-1 term exceeds that of a random set of its
    size, see :func:`coherence`; NaN where not measured), ``beyond_safe_size`` (per set and element: past the size
    the stability diagnostics support, coherence included; what the warning counts; None where not checked).

    Description: ``method`` (``"sketch"``, ``"first_order"``, ``"exact"``, ``"retrain"``), ``output`` (its
    name), ``degree``, ``directions``, ``deletion_size`` (int, or a list for S sets), ``weight``, ``delta``,
    ``control_variates``, ``warning`` (one summarized line or None), ``notes`` (reasons and advice), ``cost``
    (seconds and what was run)."""

    output: str
    method: str
    estimate: Any
    base: Any
    change: Any
    stderr: Any
    median_of_means: Any
    terms: Any
    term_stderr: Any
    by_degree_change: Any
    by_degree_stderr: Any
    safe_deletion_size: Any
    degree: int
    directions: int
    deletion_size: Union[int, list]
    weight: float
    delta: float
    shape: Any = None  # the output's shape (list, or {key: list})
    sets: Optional[int] = None  # None: one set (no sets axis)
    control_variates: bool = False
    warning: Optional[str] = None
    notes: list = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    chosen_degree: Any = None  # first_order+sketch: the truncation degree used per set and element
    coherence: Any = None
    beyond_safe_size: Any = None

    @property
    def query(self) -> str:  # the name before outputs of any shape
        return self.output

    @classmethod
    def exact(cls, out: Output, method: str, base: torch.Tensor, values: torch.Tensor, sets: list, single: bool,
              weight: float, degree: int = 0, notes: Sequence[str] = (), cost: Optional[dict] = None,
              stderr: Optional[torch.Tensor] = None) -> "Prediction":
        """The result of a method without sampling noise (``retrain``, ``first_order``, ``exact``, ...): ``base
        [P]``, ``values [S, P]`` the output after each deletion; ``stderr [S, P]`` its error bar: 0 for retraining
        (exact), NaN (null in JSON) where the method's truncation error is not estimated; per-degree fields NaN."""
        S, P = values.shape
        if stderr is None:
            stderr = torch.zeros(S, P, dtype=torch.float64) if method == "retrain" else \
                torch.full((S, P), float("nan"), dtype=torch.float64)
        nanK = torch.full((S, degree + 1, P), float("nan"), dtype=torch.float64)
        pick = (lambda v: v[0]) if single else (lambda v: v)
        shaped = {k: out.unflatten(pick(v)) for k, v in {
            "estimate": values, "change": values - base, "stderr": stderr, "median_of_means": values, "terms": nanK,
            "term_stderr": nanK, "by_degree_change": nanK, "by_degree_stderr": nanK,
            "coherence": torch.full((S, P), float("nan"), dtype=torch.float64)}.items()}
        return cls(output=out.name, method=method, base=out.unflatten(base),
                   safe_deletion_size=out.unflatten(torch.full((P,), float("nan"), dtype=torch.float64)),
                   degree=degree, directions=0, deletion_size=len(sets[0]) if single else [len(d) for d in sets],
                   weight=weight, delta=0.0, shape=_shape_json(out), sets=None if single else S,
                   notes=list(notes) + ["retraining is exact: stderr 0" if method == "retrain" else
                                        f"{method}: no sampling noise, truncation error not estimated (stderr null)"
                                        if bool(torch.isnan(stderr).all()) else f"{method}: see stderr"],
                   cost=dict(cost or {}), **shaped)

    def to_json(self) -> dict:
        """Always the same shape: the arrays carry a leading sets axis (length 1 for one set), non-finite numbers
        are ``null`` and ``nulls`` says why."""
        obj: dict = {"schema": SCHEMA}
        nulls: set = set()
        for k in ("method", "output", "degree", "directions", "weight", "delta", "control_variates", "warning"):
            obj[k] = getattr(self, k)
        obj["shape"] = self.shape
        obj["sets"] = 1 if self.sets is None else self.sets
        obj["deletion_sizes"] = [self.deletion_size] if self.sets is None else list(self.deletion_size)
        fields = VALUE_FIELDS + (("chosen_degree",) if self.chosen_degree is not None else ())
        for k in fields:
            v = getattr(self, k)
            if v is None:  # a field this answer does not carry
                obj[k] = None
                continue
            if self.sets is None and k not in ("base",):
                v = _map(v, lambda t: t.unsqueeze(0))
            obj[k] = jsonable(v, nulls, k)
        obj["notes"] = list(self.notes)
        obj["cost"] = dict(self.cost)
        obj["nulls"] = sorted(nulls)
        return obj


def _map(v, f):
    return {k: f(x) for k, x in v.items()} if isinstance(v, dict) else f(v)


def check_sets(delete, n: int) -> tuple[list[list[int]], bool]:
    """One index list or a list of index lists -> (sets, single); every index checked against n."""
    if isinstance(delete, torch.Tensor):
        delete = delete.tolist()
    single = len(delete) == 0 or not isinstance(delete[0], (list, tuple, range, np.ndarray, torch.Tensor))
    sets = [list(delete)] if single else [list(d.tolist() if isinstance(d, torch.Tensor) else d) for d in delete]
    for d in sets:
        if len(d) == 0:
            raise ValueError("empty deletion set")
        for j in d:
            if not 0 <= int(j) < n:
                raise ValueError(f"deletion index {j} outside [0, {n})")
    return [sorted(set(map(int, d))) for d in sets], single


def deletion_matrix(sets: list[list[int]], n: int, weight: float) -> torch.Tensor:
    D = torch.zeros(len(sets), n, dtype=torch.float64)
    for i, d in enumerate(sets):
        D[i, d] = weight
    return D


def growing_terms(terms: torch.Tensor, se: Optional[torch.Tensor]) -> torch.Tensor:
    """Per (set, element): do the estimated Taylor terms of this very deletion grow at the last degree? ``terms``
    ``[S, K, P]``; flagged where the last term exceeds 2 standard errors and is at least as large as the one
    before. This checks the set itself, so it catches coherent sets (a class, near neighbours) that the typical
    safe size, a statement about random sets, calls safe."""
    S, K, P = terms.shape
    if K < 3 or se is None:
        return torch.zeros(S, P, dtype=torch.bool)
    last, prev = terms[:, -1].abs(), terms[:, -2].abs()
    return (last > 2 * se[:, -1]) & (last >= prev)


def coherence(t1: torch.Tensor, c1: torch.Tensor, sizes: torch.Tensor, weight: float) -> torch.Tensor:
    """How coherent each deletion set is, per output element: a lower bound (2 standard errors) on the ratio of the
    set's degree-1 term to the RMS degree-1 term of a uniformly random deletion vector of the same norm, ``rms(c_1)
    |W| sqrt(|D|)`` (see :func:`delsketch.sketch.stability.stability_report`). About 1 or less for a random set; up
    to sqrt(n) for a set whose examples all push the output the same way (a class, near duplicates). ``t1`` [S, m, P]
    per-direction degree-1 terms, ``c1`` [m, P] degree-1 coefficients; NaN with one direction."""
    S, m, P = t1.shape
    if m < 2:
        return torch.full((S, P), float("nan"), dtype=torch.float64)
    mean, se = t1.mean(1), t1.std(1, unbiased=True) / math.sqrt(m)
    tau = (c1.abs() ** 2).mean(0).sqrt()[None, :] * abs(weight) * sizes.to(torch.float64).sqrt()[:, None]
    lo = (mean.abs() - 2 * se).clamp_min(0)
    return torch.where(tau > 0, lo / tau.clamp_min(1e-300), torch.zeros_like(lo))


def effective_sizes(sizes: torch.Tensor, weight: float, coh: torch.Tensor, n: int) -> torch.Tensor:
    """[S, P] the deletion size the safe-size check compares: W^2 |D| for a random set, scaled by coherence^2 for
    a coherent one (its terms grow like (coherence rho sqrt(|D|))^r, not (rho sqrt(|D|))^r), at most W^2 |D| n (the
    Cauchy-Schwarz worst case)."""
    eff = sizes.to(torch.float64)[:, None] * weight * weight
    k2 = torch.nan_to_num(coh, nan=1.0).clamp(1.0, math.sqrt(n)) ** 2
    return eff * k2


def beyond_safe(safe: torch.Tensor, eff: torch.Tensor, safe_eff: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[S, P]: which (set, element) pairs go past the size the diagnostics support. ``eff`` [S, P]: the effective
    sizes (:func:`effective_sizes`), compared with ``safe_eff`` [P] (the same limit without the cap at n; default
    ``safe``); False where the safe size is unknown."""
    limit = safe if safe_eff is None else safe_eff
    return (eff > limit[None, :]) & torch.isfinite(safe)[None, :]


def summarize_safety(safe: torch.Tensor, eff: torch.Tensor, over: torch.Tensor, sizes: torch.Tensor, weight: float,
                     output: str) -> Optional[str]:
    """One line for a whole call: how many (set, element) pairs go past the size the diagnostics support (``over``,
    from :func:`beyond_safe`; ``eff`` the effective sizes)."""
    ok = torch.isfinite(safe)
    if not bool(over.any()):
        return None
    S, P = over.shape
    sets_over = int(over.any(1).sum())
    where = f"{sets_over} of {S} deletion set{'s' if S > 1 else ''}"
    if P > 1:
        where += f" ({int(over.sum())} of {S * P} set-element pairs)"
    biggest = int(sizes.max())
    plain_eff = sizes.to(torch.float64)[:, None].expand_as(eff) * weight * weight
    only = over & ~beyond_safe(safe, plain_eff)  # over only because the set is coherent
    why = "" if not bool(only.any()) else (
        f"; {int(only.sum())} of them only because the set is coherent (its degree-1 term is at least "
        f"{float((eff[only] / plain_eff[only]).sqrt().max()):.3g}x that of a random set of its size, so its series "
        "behaves like that of a larger set)")
    return (f"{output}: {where} exceed the deletion size the stability diagnostics consider safe (smallest safe size "
            f"{float(safe[ok].min()):.3g}; largest set {biggest}, weight {weight}{why}); the truncated series may be "
            "inaccurate")


@dataclass
class Estimate:
    """The sketch's flat per-direction estimates for S sets of one output (what :func:`predict` shapes, and what
    :mod:`delsketch.sketch.answer` combines with exact terms): ``per_direction`` [S, m, K, P] terms, ``cum`` [S, m,
    K, P] their partial sums (control variates applied), ``terms``/``term_stderr`` [S, K, P], ``by_degree_stderr``
    [S, K, P], ``base`` [P], ``safe`` [P] per-element safe sizes, ``coherence`` [S, P], ``beyond_safe_size`` [S, P],
    the one summarized ``warning`` (not yet issued)."""

    per_direction: torch.Tensor
    cum: torch.Tensor
    terms: torch.Tensor
    term_stderr: torch.Tensor
    by_degree_stderr: torch.Tensor
    base: torch.Tensor
    safe: torch.Tensor
    warning: Optional[str]
    directions: int
    coherence: Optional[torch.Tensor] = None  # [S, P], see coherence()
    beyond_safe_size: Optional[torch.Tensor] = None  # [S, P] bool, see beyond_safe()


def estimate(sketch, out: Output, sets: list, weight: float, k: int, tolerance: float = 0.05,
             control_variates: bool = False) -> Estimate:
    """Per-direction terms of ``out`` for checked ``sets`` truncated at degree ``k``, their means and standard
    errors, and the stability check of those sets (one line)."""
    D = deletion_matrix(sets, sketch.n, weight)
    c = sketch.coefficients(out)  # [m, K, P]
    m, P = c.shape[0], c.shape[2]
    full = sketch.per_direction_terms(out, D)  # [S, m, K, P] at the sketch's degree
    terms = full[:, :, : k + 1]
    cum = terms.cumsum(2)
    if control_variates:
        lean = sketch.lean(D)  # [S, m]
        cum = torch.stack([control_variate_adjust(cum[i], lean[i], sketch.n, 1) for i in range(len(sets))])
    nan = torch.full((len(sets), k + 1, P), float("nan"), dtype=torch.float64)
    sq = math.sqrt(m)
    mean = terms.mean(1)
    term_se = terms.std(1, unbiased=True) / sq if m > 1 else nan
    stab = sketch.stability(out, tolerance=tolerance, elements=True)
    safe = torch.as_tensor(stab["safe_deletion_size"], dtype=torch.float64).reshape(P)
    sizes = torch.tensor([len(d) for d in sets])
    coh = coherence(full[:, :, 1], c[:, 1], sizes, weight) if full.shape[2] > 1 else \
        torch.full((len(sets), P), float("nan"), dtype=torch.float64)
    safe_eff = torch.as_tensor(stab["safe_effective_size"], dtype=torch.float64).reshape(P)
    eff = effective_sizes(sizes, weight, coh, sketch.n)
    over = beyond_safe(safe, eff, safe_eff)
    warn = summarize_safety(safe, eff, over, sizes, weight, out.name)
    growing = growing_terms(mean, term_se if m > 1 else None)  # [S, P]
    if bool(growing.any()):
        S = growing.shape[0]
        line = (f"{out.name}: for {int(growing.sum())} of {S * P} set-element pairs the sketch's own estimates of this "
                f"deletion's Taylor terms do not decay (the degree-{k} term, beyond 2 s.e., is at least the degree-"
                f"{k - 1} one): the truncated series is unreliable for them whatever the typical safe size says")
        warn = line if warn is None else f"{warn}; {line}"
    return Estimate(per_direction=terms, cum=cum, terms=mean, term_stderr=term_se,
                    by_degree_stderr=cum.std(1, unbiased=True) / sq if m > 1 else nan, base=c[0, 0].real, safe=safe,
                    warning=warn, directions=m, coherence=coh, beyond_safe_size=over)


def predict(
    sketch,
    output,
    delete,
    weight: float = 1.0,
    delta: float = 0.05,
    degree: Optional[int] = None,
    tolerance: float = 0.05,
    control_variates: bool = False,
) -> Prediction:
    """Predict an output after deleting D (weight W: 1 deletes, 0<W<1 downweights, W<0 upweights).

    ``output``: anything :func:`delsketch.training.outputs.as_output` takes (a callable of any shape, a query
    string, a list of them stacked on a leading axis). ``delete``: one index list, or a list of index lists.

    ``degree``: truncate at this degree (at most the sketch's). ``control_variates``: subtract the part of each
    direction's estimate explained by how far that direction happens to lean towards D (see
    :func:`control_variate_adjust`); unbiased, and a smaller standard error when that lean drives the scatter (it
    does for small deletion sets). ``terms`` then stay the plain per-degree means. Warns at most once per call."""
    out = sketch.output(output)
    sets, single = check_sets(delete, sketch.n)
    k = sketch.degree if degree is None else degree
    if not 0 <= k <= sketch.degree:
        raise ValueError(f"degree must lie in [0, {sketch.degree}]")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight}")
    est = estimate(sketch, out, sets, weight, k, tolerance, control_variates)
    if est.warning is not None:
        warnings.warn(est.warning, StabilityWarning, stacklevel=3)
    m, base, safe, warn = est.directions, est.base, est.safe, est.warning
    draws = est.cum[:, :, k]  # [S, m, P]: each direction's estimate of the output after the deletion
    fields = {
        "estimate": draws.mean(1),
        "change": draws.mean(1) - base,
        "stderr": est.by_degree_stderr[:, k],
        "median_of_means": median_of_means(draws, delta),
        "terms": est.terms,
        "term_stderr": est.term_stderr,
        "by_degree_change": est.cum.mean(1) - base,
        "by_degree_stderr": est.by_degree_stderr,
        "coherence": est.coherence,
        "beyond_safe_size": est.beyond_safe_size,
    }
    shaped = {name: out.unflatten(v[0] if single else v) for name, v in fields.items()}
    notes = []
    if not bool(torch.isfinite(safe).any()):
        notes.append(f"stability unknown: a degree-{sketch.degree} sketch cannot show whether the Taylor series converges "
                     "for this deletion (sketch at degree 3 or more for a checked safe size)")
    if m == 1:
        notes.append("stderr is null: one direction gives no spread to estimate it from")
    else:
        noisy = fields["stderr"] > fields["change"].abs()
        if bool(noisy.any()):
            notes.append(f"for {int(noisy.sum())} of {noisy.numel()} set-element pairs the standard error exceeds the "
                         "predicted change: the sketch does not determine its sign there (more directions, a lower "
                         "degree, or method='auto' for an exact or first-order answer)")
    return Prediction(
        output=out.name, method="sketch", base=out.unflatten(base), safe_deletion_size=out.unflatten(safe),
        degree=k, directions=m, deletion_size=len(sets[0]) if single else [len(d) for d in sets], weight=weight,
        delta=delta, shape=_shape_json(out), sets=None if single else len(sets), control_variates=control_variates,
        warning=warn, notes=notes, **shaped,
    )


def _shape_json(out: Output):
    s = out.shape
    return {k: list(v) for k, v in s.items()} if isinstance(s, dict) else list(s)


def effects(sketch, output, weight: float = 1.0, degree: Optional[int] = None):
    """Predicted change of an output when each single training example is deleted: ``[n, *out]``."""
    out = sketch.output(output)
    k = sketch.degree if degree is None else degree
    psi_c = sketch.psi().conj()  # [m, n]
    scale = sketch._scale()
    c = sketch.coefficients(out)  # [m, K, P]
    tot = torch.zeros(sketch.n, c.shape[-1], dtype=torch.float64)
    for r in range(1, k + 1):
        tot += torch.einsum("mp,mn->np", scale[r] * c[:, r], (weight * psi_c) ** r).real / c.shape[0]
    return out.unflatten(tot)
