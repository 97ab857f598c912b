"""The default answer (method="auto") and every method behind it, each checked against an independent
computation: real retraining, first_order / exact_series run separately, leave-one-out retrains; the stability
verdict on a task whose exact series diverges."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from delsketch.apps.cli import main
from delsketch.sketch import StabilityWarning, exact_series, first_order, precompute, Sketch
from delsketch.sketch.answer import choose_degrees, costs as answer_costs
from delsketch.tasks import factory, get_preset
from delsketch.training import outputs as O
from delsketch.training import retrain, train

SETS = [[1, 2, 3], [0], list(range(10, 22))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = get_preset("digits")(n_train=60, epochs=1)
    d = tmp_path_factory.mktemp("ans") / "sk"
    spec = {"preset": "digits", "data": None, "steps": None, "n_train": 60, "epochs": 1}
    sk = precompute(task, d, directions=48, degree=3, chunk=16, task_spec=spec, task_factory=factory(spec))
    return task, sk, d


def _truth(task, out, sets):
    base = out.flat(train(task))
    return torch.stack([out.flat(retrain(task, D)) for D in sets]) - base


def test_auto_retrains_when_it_is_cheap_and_says_so(setup):
    task, sk, _ = setup
    out = O.own_losses(task, [0, 1, 2, 3])
    p = sk.predict(out, SETS)
    assert p.method == "retrain" and any("auto chose retrain" in n for n in p.notes)
    torch.testing.assert_close(p.change, _truth(task, out, SETS), rtol=0, atol=1e-14)
    assert bool((p.stderr == 0).all()) and p.cost["retrain_s"] > 0
    assert json.loads((sk.path / "costs.json").read_text())["retrain_s"] == p.cost["retrain_s"]


def test_first_order_and_loo_sum_are_their_exact_definitions(setup, tmp_path):
    task, sk, d = setup
    out = O.own_losses(task, [0, 5])
    fo = sk.predict(out, SETS, method="first_order")
    E = first_order(task, O.own_losses(task, [0, 5]))  # computed here, independently of the sketch's cache
    want = torch.stack([E[D].sum(0) for D in SETS])
    torch.testing.assert_close(fo.change, want, rtol=1e-10, atol=1e-14)
    # its error bar: the sketch's estimate of the left-out terms 2..k (|mean| + 1 s.e. over the directions),
    # recomputed from the sketch's per-direction terms
    from delsketch.sketch.predict import deletion_matrix

    hi = sk.per_direction_terms(out, deletion_matrix(SETS, task.n, 1.0))[:, :, 2:].sum(2)  # [S, m, P]
    bar = hi.mean(1).abs() + hi.std(1) / hi.shape[1] ** 0.5
    torch.testing.assert_close(fo.stderr, bar, rtol=1e-10, atol=1e-15)
    assert any("left-out terms of degree 2..3" in n for n in fo.notes)
    truth = _truth(task, out, SETS)
    assert float(((fo.change - truth).abs() <= 3 * fo.stderr).double().mean()) >= 0.8  # against retraining
    # cached beside the sketch, keyed by the output: a fresh Sketch reads it; a damaged file is recomputed
    files = sorted((d / "effects").glob("first_order-*.safetensors"))
    assert len(files) == 1
    again = Sketch.load(d, task).predict(O.own_losses(task, [0, 5]), SETS, method="first_order")
    torch.testing.assert_close(again.change, fo.change, rtol=0, atol=0)
    raw = bytearray(files[0].read_bytes())
    raw[-3] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    fixed = Sketch.load(d, task).predict(O.own_losses(task, [0, 5]), SETS, method="first_order")
    torch.testing.assert_close(fixed.change, fo.change, rtol=0, atol=0)
    loo = sk.predict(out, SETS, method="loo_sum")
    single = _truth(task, out, [[i] for i in range(task.n)])  # [n, P]
    torch.testing.assert_close(loo.change, torch.stack([single[D].sum(0) for D in SETS]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loo.change[1], _truth(task, out, [[0]])[0], rtol=1e-12, atol=1e-14)  # LOO exact


def test_exact_method_is_the_exact_series(setup):
    task, sk, _ = setup
    p = sk.predict("test:mean", SETS, method="exact")
    for i, D in enumerate(SETS):
        ser = exact_series(task, D, 3, "test:mean")
        assert float(p.estimate[i]) == pytest.approx(float(ser.value_at_1), rel=1e-12)


def test_first_order_plus_sketch(setup):
    """Over the retraining budget auto answers with the exact degree-1 term plus the sketch's higher terms up to
    a per-element degree; recomputed here from first_order and the sketch's own terms. Its error bars cover
    retraining for most pairs, and it is closer to retraining than the sketch alone (whether it beats first order
    alone depends on the sketch's noise: bench/own_model measures it)."""
    task, sk, _ = setup
    out = O.own_losses(task, list(range(12)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StabilityWarning)
        p = sk.predict(out, SETS, method="first_order+sketch")
        s = sk.predict(out, SETS, method="sketch")
    assert p.method == "first_order+sketch"
    E = first_order(task, out)
    lin = torch.stack([E[D].sum(0) for D in SETS])
    deg = p.chosen_degree
    assert deg.shape == (3, 12) and int(deg.min()) >= 1 and int(deg.max()) <= 3
    want = lin + sum(torch.where(deg >= r, s.terms[:, r], torch.zeros_like(lin)) for r in (2, 3))
    torch.testing.assert_close(p.change, want, rtol=1e-10, atol=1e-14)
    truth = _truth(task, out, SETS)
    assert bool((p.stderr > 0).all())
    assert float(((p.change - truth).abs() <= 2 * p.stderr).double().mean()) >= 0.8
    assert float((p.change - truth).abs().mean()) < float((s.change - truth).abs().mean())  # beats the sketch alone


def test_auto_over_budget_uses_the_cached_leave_one_out_parameters(setup):
    """Over the retraining budget, with n retrains cheaper than the precompute, auto sums exact leave-one-out effects;
    the leave-one-out parameters are kept beside the sketch, so a new output needs no retraining."""
    task, sk, d = setup
    out = O.own_losses(task, [7, 8])
    p = sk.predict(out, SETS, budget_s=0)
    assert p.method == "loo_sum" and any("auto chose loo_sum" in n for n in p.notes)
    single = _truth(task, out, [[i] for i in range(task.n)])
    torch.testing.assert_close(p.change, torch.stack([single[D].sum(0) for D in SETS]), rtol=1e-12, atol=1e-14)
    assert len(list((d / "effects").glob("loo-params-*.safetensors"))) == 1
    fresh = Sketch.load(d, task)
    q = fresh.predict("test:mean", [[4, 5]], budget_s=0)
    assert q.method == "loo_sum" and "cached" in q.notes[0]
    want = float(task.query(retrain(task, [4]), "test:mean") + task.query(retrain(task, [5]), "test:mean")
                 - 2 * task.query(train(task), "test:mean"))
    assert float(q.change[0]) == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_auto_falls_back_to_first_order_when_even_loo_is_too_dear(setup, tmp_path):
    """The decision reads the recorded cost of one run: with 100 s per retrain neither the sets nor the n
    leave-one-out runs fit (and none are cached), so auto answers with the exact first-order term and says why."""
    task = setup[0]
    sk = precompute(task, tmp_path / "sk", directions=4, degree=3, chunk=4)
    costs = answer_costs(sk)  # measured and recorded once
    (tmp_path / "sk" / "costs.json").write_text(json.dumps({"fingerprint": costs["fingerprint"], "retrain_s": 100.0}))
    p = Sketch.load(tmp_path / "sk", task).predict("test:mean", SETS)
    assert p.method == "first_order" and "auto chose first_order" in p.notes[0]
    E = first_order(task, "test:mean")
    torch.testing.assert_close(p.change, torch.stack([E[D].sum() for D in SETS]), rtol=1e-10, atol=1e-14)
    assert any("retraining the 3 sets would take about 300 s" in n for n in p.notes)


def test_growing_terms_of_the_set_itself_are_flagged():
    """A set whose own estimated terms grow at the last degree (significantly) is flagged; decaying, or growing
    within the noise, is not."""
    from delsketch.sketch.predict import growing_terms

    t = torch.tensor([[[1.0], [0.5], [2.0], [8.0]], [[1.0], [0.5], [0.1], [0.01]], [[1.0], [0.5], [2.0], [8.0]]],
                     dtype=torch.float64)
    se = torch.tensor([[[0.0], [0.01], [0.1], [0.5]], [[0.0], [0.01], [0.01], [0.001]], [[0.0], [0.01], [3.0], [9.0]]],
                      dtype=torch.float64)
    assert growing_terms(t, se)[:, 0].tolist() == [True, False, False]


def test_choose_degrees_on_known_terms():
    """Terms 1, 0.5, 0.01, 0.0001 with tiny noise: go to degree 3; a degree-2 term lost in noise: stop at 1."""
    t = torch.tensor([[[0.0], [1.0], [0.5], [0.01]], [[0.0], [1.0], [0.001], [0.0005]]], dtype=torch.float64)
    se = torch.tensor([[[0.0], [0.0], [1e-4], [1e-4]], [[0.0], [0.0], [0.1], [0.1]]], dtype=torch.float64)
    cum = torch.tensor([[[0.0], [0.0], [1e-4], [1.4e-4]], [[0.0], [0.0], [0.1], [0.14]]], dtype=torch.float64)
    deg, bar = choose_degrees(t, se, cum)
    assert deg.tolist() == [[3], [1]]
    assert 0 < float(bar[0, 0]) < 0.01 and float(bar[1, 0]) >= 0.1  # the bar counts the dropped term + its s.e.


def test_stability_on_a_task_whose_series_diverges(tmp_path):
    """digits with lr 0.5: the exact degree-8 series of deleting half the examples grows (|c_8| > 100 |c_1|).
    A degree-2 sketch claims no safe size; a degree-3 sketch's typical safe size is far below 50, predict warns
    once, and its error bar is wide (it does not claim the truth precisely)."""
    task = get_preset("digits")(n_train=100, epochs=2, lr=0.5)
    D = list(range(0, 100, 2))
    c = exact_series(task, D, 8, "test:mean").coefficients
    assert abs(float(c[8])) > 100 * abs(float(c[1]))
    low = precompute(task, tmp_path / "k2", directions=16, degree=2, chunk=16)
    rep = low.stability("test:mean")
    assert rep["safe_deletion_size"] is None and rep["verdict"].startswith("unknown")
    assert any("stability unknown" in n for n in low.predict("test:mean", D, method="sketch").notes)
    sk = precompute(task, tmp_path / "k3", directions=64, degree=3, chunk=32)
    rep = sk.stability("test:mean")
    assert rep["safe_deletion_size"] < 25 and f"typical safe deletion size {rep['safe_deletion_size']:.3g}" in rep["verdict"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = sk.predict("test:mean", [D, D[:40], D[:30]], method="sketch")
    msgs = [w for w in caught if issubclass(w.category, StabilityWarning)]
    assert len(msgs) == 1 and "3 of 3 deletion sets" in str(msgs[0].message)
    truth = float(task.query(retrain(task, D), "test:mean") - task.query(train(task), "test:mean"))
    assert abs(float(p.change[0]) - truth) <= 3 * float(p.stderr[0])


def test_cli_method_and_budget(setup, capsys):
    _, _, d = setup
    rc = main(["predict", str(d), "--delete", "0:4", "--query", "test:mean", "--json"])
    obj = json.loads(capsys.readouterr().out)["predictions"][0]
    assert rc == 0 and obj["method"] == "retrain" and obj["stderr"] == [0.0]
    rc = main(["predict", str(d), "--delete", "0:4", "--query", "test:mean", "--budget", "0"])
    cap = capsys.readouterr()
    assert rc == 0 and "method loo_sum" in cap.out and "auto chose loo_sum" in cap.err
    rc = main(["predict", str(d), "--delete", "0:4", "--query", "test:mean", "--method", "first_order+sketch"])
    assert rc == 0 and "method first_order+sketch" in capsys.readouterr().out
    for bad in (["--method", "magic"], ["--budget", "-1"], ["--budget", "nan"], ["--method", "retrain", "--by-degree"]):
        rc = main(["predict", str(d), "--delete", "0:4", "--query", "test:mean", *bad])
        assert rc == 2 and capsys.readouterr().err.count("\n") == 1, bad


def test_auto_choice_rule():
    """auto's rule as a pure function of the recorded costs (what bench/accuracy's report applies to its run)."""
    from delsketch.sketch.answer import auto_choice

    assert auto_choice(10, 500, 1.0, 100.0, 30.0)[0] == "retrain"  # 10 s of retraining fits 30 s
    assert auto_choice(40, 50, 1.0, 60.0, 30.0)[0] == "loo_sum"  # 40 s > 30 s; 50 LOO runs <= the 60 s precompute
    assert auto_choice(40, 50, 1.0, 10.0, 30.0)[0] == "first_order"  # 50 s of LOO > max(30, 10)
    assert auto_choice(40, 50, 1.0, 10.0, 30.0, loo_cached=True)[0] == "loo_sum"
    assert auto_choice(40, 50, 1.0, 60.0, 30.0, weight=0.5)[0] == "first_order"  # loo_sum answers deletions only
    assert auto_choice(1, 50, None, None, 30.0)[0] == "first_order"  # no recorded cost: nothing assumed cheap
