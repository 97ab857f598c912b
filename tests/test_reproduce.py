"""``delsketch reproduce fig1|fig2|fig3`` at small sizes, checked against independent computations."""

from __future__ import annotations

import json
import math

import pytest

from delsketch.apps.cli import main
from delsketch.tasks import get_preset
from delsketch.training import first_steps, retrain
from delsketch.sketch import Sketch, evaluate, exact_series, stability_report

from conftest import NAMES_TXT

pytestmark = pytest.mark.skipif(not NAMES_TXT.is_file(), reason=f"reference data {NAMES_TXT} is absent")

STEPS = 30


def run(capsys, *args):
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def task():
    return first_steps(get_preset("paper")(data=str(NAMES_TXT)), STEPS)


@pytest.fixture(scope="module")
def deletions(task):
    return task.select("contains:x")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


@pytest.fixture(scope="module")
def fig2_json(out_dir):
    """fig2 first: fig3 in the same directory reuses its retrains."""
    rc = main(["reproduce", "fig2", "--data", str(NAMES_TXT), "--out", str(out_dir), "--steps", str(STEPS),
               "--degree", "4", "--json"])
    assert rc == 0
    return json.loads((out_dir / "fig2.json").read_text())


def test_fig2_against_exact_series_and_retraining(fig2_json, out_dir, task, deletions):
    res = fig2_json
    assert (out_dir / "fig2.png").stat().st_size > 5000
    assert res["deletions"] == deletions and res["deletion_size"] == 18
    assert res["config"]["steps"] == STEPS and res["config"]["paper_size"] is False
    assert res["retrain"]["t"] == [round(0.1 * i, 10) for i in range(11)]

    ser = exact_series(task, deletions, 4, "max")
    c = ser.coefficients.tolist()
    assert res["series"]["coefficients"] == pytest.approx(c, rel=1e-12, abs=1e-15)
    # degree-1 partial sum at t = 1 is c0 + c1; the curves are the partial sums at every t
    e1 = res["errors_at_1"][1]
    assert e1["degree"] == 1 and e1["partial_sum"] == pytest.approx(c[0] + c[1], rel=1e-12)
    t, curve3 = res["curves"]["t"], res["curves"]["partial_sums"]["3"]
    for i in (0, 37, 100):
        assert curve3[i] == pytest.approx(sum(c[j] * t[i] ** j for j in range(4)), rel=1e-12)

    # the retrain at t = 1 is real retraining without D; at t = 0 it is plain training (= c0)
    y1 = float(evaluate(task, retrain(task, deletions, weight=1.0), "max"))
    assert res["retrain"]["value"][-1] == pytest.approx(y1, rel=1e-12)
    assert res["retrain"]["value"][0] == pytest.approx(c[0], rel=1e-12)
    y_half = float(evaluate(task, retrain(task, deletions, weight=0.5), "max"))
    assert res["retrain"]["value"][5] == pytest.approx(y_half, rel=1e-12)
    for e in res["errors_at_1"]:
        assert e["error"] == pytest.approx(e["partial_sum"] - y1, abs=1e-12)
    # the series converges here: higher degrees are closer to the retrained value
    errs = [e["abs_error"] for e in res["errors_at_1"]]
    assert errs[4] < errs[1] < errs[0]
    for key in ("retrains_s", "ring_run_s", "total_s"):
        assert res["timings"][key] > 0


def test_fig3_against_sketch_predict(fig2_json, out_dir, task, deletions, capsys):
    rc, out, _ = run(capsys, "reproduce", "fig3", "--data", str(NAMES_TXT), "--out", str(out_dir),
                     "--steps", str(STEPS), "--directions", "16", "--degree", "3", "--json")
    assert rc == 0
    res = json.loads(out)
    assert res == json.loads((out_dir / "fig3.json").read_text())
    assert (out_dir / "fig3.png").stat().st_size > 5000
    assert res["config"]["directions"] == 16 and res["config"]["degree"] == 3

    sk = Sketch.load(out_dir / "fig3-sketch", task)
    p1 = sk.predict("max", deletions, weight=1.0)
    a = res["at_1"]
    assert a["estimate"] == pytest.approx(float(p1.estimate), rel=1e-12)
    assert a["stderr"] == pytest.approx(float(p1.stderr), rel=1e-12)
    assert a["median_of_means"] == pytest.approx(float(p1.median_of_means), rel=1e-12)
    assert a["terms"] == pytest.approx(p1.terms.tolist(), rel=1e-12)
    p = sk.predict("max", deletions, weight=0.3)
    assert res["curve"]["estimate"][30] == pytest.approx(float(p.estimate), rel=1e-12)
    assert res["curve"]["stderr"][30] == pytest.approx(float(p.stderr), rel=1e-12)
    assert res["curve"]["estimate"][0] == pytest.approx(fig2_json["series"]["coefficients"][0], rel=1e-12)

    # retrains reused from fig2; error in standard errors is consistent
    assert res["retrain"]["reused_from"] == "fig2.json"
    assert res["retrain"]["value"] == fig2_json["retrain"]["value"]
    y1 = fig2_json["retrain"]["value"][-1]
    assert a["retrained"] == y1
    assert a["error_in_stderr"] == pytest.approx(float((p1.estimate - y1) / p1.stderr), rel=1e-12)
    # the sketch's term estimates are compared with fig2's exact coefficients
    ex = res["exact_terms"]
    assert ex["coefficients"] == fig2_json["series"]["coefficients"][:4]
    assert ex["error_in_stderr"][1] == pytest.approx(float((p1.terms[1] - ex["coefficients"][1]) / p1.term_stderr[1]), rel=1e-12)
    assert all(math.isfinite(z) for z in ex["error_in_stderr"][1:])

    # a second call resumes the stored sketch instead of recomputing it
    rc, out, _ = run(capsys, "reproduce", "fig3", "--data", str(NAMES_TXT), "--out", str(out_dir),
                     "--steps", str(STEPS), "--directions", "16", "--degree", "3", "--json")
    again = json.loads(out)
    assert rc == 0 and again["at_1"] == res["at_1"]
    assert again["timings"]["sketch_s_this_call"] < res["timings"]["sketch_s_this_call"]


def test_fig1_against_stability_report(out_dir, task, capsys):
    rc, out, _ = run(capsys, "reproduce", "fig1", "--data", str(NAMES_TXT), "--out", str(out_dir),
                     "--steps", str(STEPS), "--directions", "4", "--degree", "12")
    assert rc == 0 and "bits per degree" in out
    res = json.loads((out_dir / "fig1.json").read_text())
    assert (out_dir / "fig1.png").stat().st_size > 5000
    assert res["query"] == task.examples[0]
    assert res["degrees"] == list(range(1, 13))

    sk = Sketch.load(out_dir / "fig1-sketch", task)
    c = sk.coefficients(task.examples[0])[:, :, 0]  # a scalar output: [m, K]
    rep = stability_report(c, task.n)
    assert res["log2_size"] == pytest.approx([r["log2_size"] for r in rep["degrees"]], rel=1e-12)
    assert res["fit"]["log2_decay_per_degree"] == pytest.approx(rep["log2_decay_per_degree"], rel=1e-12)
    assert res["fit"]["safe_deletion_size"] == pytest.approx(rep["safe_deletion_size"], rel=1e-9)
    # per direction: log2( sqrt(C(n+r-1, r)) |c_r| ), computed here from scratch
    for j in (0, 3):
        for r in (1, 7, 12):
            want = 0.5 * math.log2(math.comb(task.n + r - 1, r)) + math.log2(abs(complex(c[j, r])))
            assert res["log2_per_direction"][j][r - 1] == pytest.approx(want, rel=1e-9)
    # the bold line estimates log2 sqrt(C E|c_r|^2)
    r = 5
    ms = float((c[:, r].abs() ** 2).mean())
    assert res["log2_size"][r - 1] == pytest.approx(0.5 * math.log2(math.comb(task.n + r - 1, r) * ms), rel=1e-9)
    # the long run's first coefficients equal a separate degree-6 run's
    chk = res["low_degree_check"]
    assert chk["degree"] == 6 and chk["agrees"] and max(chk["max_relative_difference"]) < 1e-10


def test_python_api_returns_what_it_writes(tmp_path):
    from delsketch.apps.reproduce import fig2

    res = fig2(str(NAMES_TXT), tmp_path, degree=2, steps=5)
    assert res == json.loads((tmp_path / "fig2.json").read_text())
    assert len(res["errors_at_1"]) == 3 and (tmp_path / "fig2.png").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["reproduce", "fig2"], "--data"),
        (["reproduce", "fig2", "--data", "/nonexistent/names.txt"], "not found"),
        (["reproduce", "fig2", "--data", str(NAMES_TXT), "--directions", "4"], "no --directions"),
        (["reproduce", "fig3", "--data", str(NAMES_TXT), "--degree", "0"], "--degree"),
        (["reproduce", "fig1", "--data", str(NAMES_TXT), "--steps", "0"], "--steps"),
        (["reproduce", "fig4", "--data", str(NAMES_TXT)], "fig4"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    rc, out, err = run(capsys, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error:") and err.count("\n") == 1 and needle in err
