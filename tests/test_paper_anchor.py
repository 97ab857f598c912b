"""The paper preset's exact Taylor series against ../shared/reference/fig2_anchor.json.

One ring run at degree 6 over the full 1000 steps (w = z 1_D, D = the 'x' names) gives the Taylor
coefficients of t -> loss(test document) after retraining with weight t on D.

Finding: degrees 0-5 match the reference to ~1e-15 relative, but the reference's degree-6 coefficients
differ from ours by 5e-7 ("max") and 3e-6 ("emma") relative. An independent computation settles which
is right: the Cauchy integral c_r = (1/N) sum_j f(rho e^{i theta_j}) e^{-i r theta_j} / rho^r over real
training runs at complex weights (degree-0 arithmetic only, no series recurrences) agrees with our
degree-6 coefficients to ~1e-10 and not with the reference's. So degree 6 is checked against the
Cauchy integral, and the reference's top coefficient is recorded as inaccurate.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from delsketch.series import tensor as taylor
from delsketch.tasks import get_preset
from delsketch.training import train
from delsketch.sketch.exact import deletion_ring_run, series_result
from delsketch.training.outputs import as_output

from conftest import SHARED

REF = SHARED / "reference" / "fig2_anchor.json"
DATA = SHARED / "data" / "names.txt"

pytestmark = pytest.mark.skipif(not (REF.exists() and DATA.exists()), reason="../shared reference data not present")


@pytest.fixture(scope="module")
def anchor():
    ref = json.loads(REF.read_text())
    task = get_preset("paper")(data=str(DATA))
    queries = list(ref["tests"])
    params = deletion_ring_run(task, ref["deletions"], ref["degree"])  # one ring run, every query read off it
    series = {q: series_result(as_output(task, q), params, ref["degree"], 1.0, len(ref["deletions"])) for q in queries}
    return ref, task, series


def test_deletion_set_is_the_x_names(anchor):
    ref, task, _ = anchor
    assert [i for i in task.select("contains:x") if i < 1000] == ref["deletions"]


def test_taylor_coefficients_degrees_0_to_5_match_reference(anchor):
    ref, _, series = anchor
    for q, want in ref["tests"].items():
        got = series[q].coefficients
        assert series[q].imag_max == 0.0
        for r in range(6):
            w = want["taylor_coefficients_real"][r]
            assert abs(got[r] - w) <= 1e-8 * abs(w), (q, r, got[r], w)


def test_degree_6_against_cauchy_integral(anchor):
    """Independent check of the top coefficient (where the reference file is off by ~1e-6 relative)."""
    ref, task, series = anchor
    N, rho = 32, 0.35
    theta = torch.arange(N, dtype=torch.float64) * 2 * math.pi / N
    c = torch.zeros(N, 1, task.n, dtype=torch.complex128)
    c[:, 0, ref["deletions"]] = (rho * torch.exp(1j * theta))[:, None]
    params = train(task, w=taylor.variable(c), params={k: taylor.lift(p, 0) for k, p in task.init_params().items()})
    for q, want in ref["tests"].items():
        f = taylor.coefficients(task.query(params, q))[:, 0]
        for r in range(7):
            cauchy = ((f * torch.exp(-1j * r * theta)).mean() / rho**r).real.item()
            assert abs(series[q].coefficients[r] - cauchy) <= 1e-8 * abs(cauchy), (q, r)
        # the reference's degree-6 value is measurably off; if a corrected reference arrives this flags it
        ref6 = want["taylor_coefficients_real"][6]
        assert abs(ref6 - series[q].coefficients[6]) > 1e-7 * abs(ref6)


def test_partial_sums_approach_the_retrained_loss(anchor):
    """Degree-r partial sums at t = 1 against the reference's real retrain (its 'max' error shrinks with r)."""
    ref, _, series = anchor
    truth = ref["tests"]["max"]["retrained_loss"]["1.0"]
    errs = [abs(s - truth) for s in series["max"].partial_sums]
    assert errs[6] < errs[3] < errs[1]
    assert errs[6] / abs(truth - ref["tests"]["max"]["retrained_loss"]["0.0"]) < 0.02
