"""``sketch``: the parameters a deletion sketch predicts for the model retrained without the forget set, with a
standard error per parameter. Data-free at deletion time: reads only the sketch's files (base parameters,
directions psi, series coefficients).

For each stored direction j the degree-k estimate of a parameter is
``sum_{r=0..k} Re[C(n+r-1, r) c_r(psi_j) (sum_{i in D} conj psi_{j,i})^r]`` (the estimator of
:mod:`delsketch.sketch.predict`, applied to every parameter entry); the prediction is the mean over directions,
its error bar the standard error over directions (``Sketch.predict`` of the output
:func:`delsketch.training.outputs.parameters`). D is everything forgotten so far (a sketch predicts from the
original run).

Default ``degree`` 1: every parameter entry carries its own sampling noise, and the noise of the degree-r term
grows like C(n+r-1, r); on the digits benchmark (64 directions, n = 500) the degree-2 and degree-3 parameter
predictions were farther from the retrained parameters than the original model was, and degree 3 broke the
model's test accuracy (docs/unlearning.md). ``degree=None`` uses the sketch's full degree."""

from __future__ import annotations

import math

import torch

from ... import series as taylor
from ...sketch.estimate import log_binom
from ..access import UnlearnError
from ..core import Method, register


def predicted_params(sk, delete, degree=None):
    """(estimate, stderr) dicts of tensors shaped like the parameters, for deleting ``delete``: the estimator
    written out on the stored series-valued parameters. The method itself asks ``Sketch.predict`` with the
    ready-made output :func:`delsketch.training.outputs.parameters`; ``tests/test_unlearn.py`` checks that the
    two agree."""
    k = sk.degree if degree is None else int(degree)
    if not 0 <= k <= sk.degree:
        raise UnlearnError(f"sketch: degree must lie in [0, {sk.degree}]")
    psi = sk.psi()
    s = psi[:, torch.tensor(list(delete), dtype=torch.long)].conj().sum(1)  # [m]
    scale = torch.tensor([math.exp(log_binom(sk.n, r)) for r in range(k + 1)], dtype=torch.complex128)
    per_dir: dict = {}
    o = 0
    for params in sk.chunk_params():
        mc = next(iter(params.values())).m
        pw = s[o:o + mc, None] ** torch.arange(k + 1)  # [mc, k+1]
        for name, p in params.items():
            c = taylor.coefficients(p)[:, : k + 1]  # [mc, k+1, *shape]
            w = (scale * pw).reshape(mc, k + 1, *([1] * (c.dim() - 2)))
            per_dir.setdefault(name, []).append((c * w).sum(1).real)
        o += mc
    est, se = {}, {}
    for name, parts in per_dir.items():
        v = torch.cat(parts)  # [m, *shape]
        est[name] = v.mean(0)
        se[name] = v.std(0, unbiased=True) / math.sqrt(v.shape[0]) if v.shape[0] > 1 else torch.full_like(v[0], math.nan)
    return est, se


def run(task, params, access, sketch=None, degree=1):
    import warnings

    from ...training.outputs import parameters

    if degree is not None and not 0 <= int(degree) <= sketch.degree:
        raise UnlearnError(f"sketch: degree must lie in [0, {sketch.degree}] (the sketch's degree)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = sketch.predict(parameters(), access.forgotten, degree=degree, method="sketch")  # never "auto": it may retrain
    info = {"stderr": dict(pred.stderr), "directions": sketch.m,
            "degree": sketch.degree if degree is None else int(degree), "sketch": str(sketch.path)}
    if caught:
        info["warning"] = str(caught[0].message).splitlines()[0]
    return dict(pred.estimate), info


register(Method("sketch", run, "none", {"degree": 1},
                "the parameters predicted by a deletion sketch, with error bars",
                "none: only the stored sketch (base parameters, directions, series coefficients)"))
