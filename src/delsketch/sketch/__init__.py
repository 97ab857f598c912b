"""Deletion sketches: precompute, store, predict, diagnose.

Example i of a task carries the loss weight ``1 - w_i``; an output f of the trained model is a function
f(w), and deleting the set D means evaluating f(1_D). A sketch is m ring runs with ``w = z psi_j``,
psi_j uniform on the unit sphere of C^n. Every output computed from the trained series-valued
parameters is a polynomial in z whose degree-r coefficient c_r(psi) satisfies

    E[ C(n+r-1, r) c_r(psi) (sum_i v_i conj(psi_i))^r ] = T_r[v^r],

the degree-r Taylor term of f at v (here v = W 1_D). Summing r = 0..k estimates f(W 1_D).

Modules: ``core`` (errors, directions, ring runs, evaluating outputs), ``precompute``, ``store`` (the files
and :class:`Sketch`), ``estimate`` (pure estimators), ``predict`` (the result type), ``stability``,
``exact`` (exact series for one set, exact first-order effects).
"""

from .core import FORMAT, Query, RecoveryWarning, SketchError, StabilityWarning, direction, directions, evaluate, query_name, ring_train, weight_series
from .estimate import control_variate_adjust, lean_moment, log_binom, median_of_means
from .exact import SeriesResult, exact_series, first_order
from .precompute import precompute
from .predict import Prediction
from .stability import stability_report
from .store import Sketch, SketchConfig, read_manifest

__all__ = [
    "FORMAT", "Query", "RecoveryWarning", "SketchError", "StabilityWarning", "direction", "directions", "evaluate", "query_name",
    "ring_train", "weight_series", "control_variate_adjust", "lean_moment", "log_binom", "median_of_means",
    "SeriesResult", "exact_series", "first_order", "precompute", "Prediction", "stability_report", "Sketch",
    "SketchConfig", "read_manifest",
]
