"""The memorization audit against independent computations: real retraining (through the presets' own query
path), finite differences, the sketch's own effects, scipy's Mann-Whitney U and Gaussian densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, norm

from delsketch import precompute, retrain, train
from delsketch.audit import (Canary, candidate_losses, exposure, half_masks, loss_threshold, lira_scores,
                             memorization, plant, predicted_exposure, roc_metrics, membership_audit)
from delsketch.tasks import get_preset


@pytest.fixture(scope="module")
def digits():
    return get_preset("digits")(n_train=24, n_test=4, hidden=6, batch=6, epochs=2)


@pytest.fixture(scope="module")
def names():
    return get_preset("names")(n=16, steps=16)


def test_loo_is_retraining_through_the_presets_query(digits):
    r = memorization(digits, route="loo", indices=[0, 5, 23])
    base = train(digits)
    for i, s in zip(r.indices, r.scores):
        after = float(digits.query(retrain(digits, [i]), f"train:{i}"))
        assert s == pytest.approx(after - float(digits.query(base, f"train:{i}")), abs=1e-12)
    assert r.stderr == [0.0] * 3 and r.route == "loo" and "this run" in r.definition
    assert max(r.scores) > 0.01  # deleting an example raises its own loss on this tiny task


@pytest.mark.parametrize("metric", ["loss", "margin"])
def test_first_order_matches_finite_differences_of_retraining(digits, metric):
    from delsketch.audit.outputs import view

    r = memorization(digits, route="first_order", metric=metric, indices=[2, 7])
    v, eps = view(digits), 1e-6
    for i, s in zip(r.indices, r.scores):
        before = float(v.values(metric, train(digits), [i])[0])
        after = float(v.values(metric, retrain(digits, [i], weight=eps), [i])[0])
        fd = (after - before) / eps * (1 if metric == "loss" else -1)
        assert s == pytest.approx(fd, rel=1e-4, abs=1e-7)


def test_sketch_route_is_the_diagonal_of_the_sketch_effects(digits, tmp_path):
    sk = precompute(digits, tmp_path / "sk", directions=6, degree=2, chunk=4)
    r = memorization(digits, route="sketch", sketch=sk, example_batch=5)
    for i in (0, 11, 23):
        q = lambda p, i=i: digits.example_losses(p, torch.tensor([i]))[0]  # noqa: E731
        assert r.scores[i] == pytest.approx(float(sk.effects([q])[i, 0]), abs=1e-12)
    assert r.base == pytest.approx(digits.example_losses(train(digits), torch.arange(24)).tolist(), abs=1e-10)
    assert all(s > 0 for s in r.stderr) and "6 sketch directions" in r.error_bar


def test_subsampled_is_out_minus_in_over_retrained_halves(digits):
    r = memorization(digits, route="subsampled", models=4, seed=3, indices=[1, 9])
    masks = half_masks(digits.n, 4, 3)
    for i, s in zip(r.indices, r.scores):
        vals = [float(digits.query(retrain(digits, [j for j in range(digits.n) if not masks[k, j]]), f"train:{i}"))
                for k in range(4)]
        inside = [v for k, v in enumerate(vals) if masks[k, i]]
        outside = [v for k, v in enumerate(vals) if not masks[k, i]]
        assert s == pytest.approx(np.mean(outside) - np.mean(inside), abs=1e-12)
        assert r.stderr[r.indices.index(i)] == pytest.approx(
            math.sqrt(np.var(inside, ddof=1) / 2 + np.var(outside, ddof=1) / 2), abs=1e-12)
    assert masks.sum(0).tolist() == [2] * digits.n


def test_bad_input_is_a_one_line_error(digits, names):
    with pytest.raises(ValueError, match=r"example index 24 out of range.*\(0\.\.23\)"):
        memorization(digits, indices=[24])
    with pytest.raises(ValueError, match="no class labels: the margin needs a classifier"):
        memorization(names, metric="margin", indices=[0])
    with pytest.raises(ValueError, match="not a text task"):
        memorization(digits, metric="token_accuracy", indices=[0])
    with pytest.raises(ValueError, match="unknown route"):
        memorization(digits, route="magic")


def test_roc_metrics_against_mann_whitney():
    rng = np.random.default_rng(0)
    m, o = rng.normal(1, 1, 300), rng.normal(0, 1, 500)
    r = roc_metrics(m, o)
    assert r["auc"] == pytest.approx(mannwhitneyu(m, o).statistic / (m.size * o.size), abs=1e-12)
    # TPR at FPR 1%: the threshold just above the 5th largest non-member score (5/500 = 1%)
    thr = np.sort(o)[-5]
    assert r["tpr_at_fpr"]["0.01"] == pytest.approx((m >= thr).mean() if (o >= thr).sum() <= 5 else (m > thr).mean())
    assert set(r) >= {"auc", "tpr_at_fpr", "fpr", "tpr"} and set(r["tpr_at_fpr"]) == {"0.001", "0.01"}
    assert roc_metrics([3, 1], [2, 0])["auc"] == 0.75
    assert loss_threshold([0.1, 0.2], [0.3, 0.05])["auc"] == pytest.approx(roc_metrics([-0.1, -0.2], [-0.3, -0.05])["auc"])


def test_lira_scores_are_gaussian_likelihood_ratios():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(8, 5, generator=g, dtype=torch.float64)
    inside = torch.tensor([[k % 2 == (j % 2) for j in range(5)] for k in range(8)])
    x = torch.randn(5, generator=g, dtype=torch.float64)
    s = lira_scores(x, phi, inside)
    for j in range(5):
        a, b = phi[inside[:, j], j].numpy(), phi[~inside[:, j], j].numpy()
        on = norm.logpdf(x[j], a.mean(), a.std(ddof=1)) - norm.logpdf(x[j], b.mean(), b.std(ddof=1))
        assert s["online"][j] == pytest.approx(on, abs=1e-10)
        assert s["offline"][j] == pytest.approx(norm.logcdf(x[j], b.mean(), b.std(ddof=1)), abs=1e-10)


def test_membership_audit_on_an_overfit_model():
    task = get_preset("digits")(n_train=40, n_test=4, hidden=16, batch=8, epochs=8)
    r = membership_audit(task, models=6, bootstrap=20)
    lira = r["attacks"]["lira_online"]
    assert lira["members"] + lira["nonmembers"] == 6 * 40
    assert lira["ci"]["auc"][0] <= lira["auc"] <= lira["ci"]["auc"][1]
    assert r["attacks"]["loss_threshold"]["auc"] > 0.55  # an overfit model leaks membership
    assert len(r["counterfactual"]["scores"]) == 40 and -1 <= r["spearman_counterfactual_vs_lira"] <= 1


def test_planting_composes_with_the_presets(digits, names):
    c = Canary(secret=3, copies=2, image=[16, 0] * 32)
    pt, (pc,) = plant(digits, [c], seed=1)
    assert pt.n == digits.n + 2 and pc.indices == [24, 25] and len(pt.schedule) == len(digits.schedule)
    p = digits.init_params()
    assert torch.equal(pt.example_losses(p, torch.arange(24)), digits.example_losses(p, torch.arange(24)))
    assert sorted(i for b in pt.schedule for i in b) == sorted([i for b in digits.schedule for i in b] + [24, 25])
    # the canary's label loss through candidate_losses equals the planted task's own loss of that copy
    losses = candidate_losses(pt, p, pc, list(range(10)))
    assert float(losses[3]) == pytest.approx(float(pt.example_losses(p, torch.tensor([24]))[0]), abs=1e-14)


def test_text_exposure_is_the_rank_among_all_candidates(names):
    c = Canary(secret="ba", copies=3, alphabet="abc")
    pt, (pc,) = plant(names, [c], seed=0)
    params = train(pt)
    e = exposure(pt, params, pc)
    cands = [a + b for a in "abc" for b in "abc"]
    losses = {s: float(pt.query(params, s)) for s in cands}  # the preset's own query path
    rank = 1 + sum(v < losses["ba"] for s, v in losses.items() if s != "ba")
    assert e["exact"] and e["rank"] == rank and e["exposure"] == pytest.approx(math.log2(9) - math.log2(rank))


def test_predicted_exposure_after_deletion_agrees_with_retraining(names):
    c = Canary(secret="cab", copies=4, alphabet="abcd")
    pt, (pc,) = plant(names, [c], seed=0)
    trained = exposure(pt, train(pt), pc)
    for D in (pc.indices, pc.indices[:2]):
        pred = predicted_exposure(pt, pc, D, degree=3)
        actual = exposure(pt, retrain(pt, D), pc)
        lo, hi = pred["interval"]
        assert lo <= actual["exposure"] <= hi and lo <= pred["exposure"] <= hi
    assert actual["exposure"] <= trained["exposure"]  # deleting copies does not raise exposure here


TINY = ["--preset", "digits", "--set", "n_train=20", "--set", "hidden=6", "--set", "batch=5", "--set", "epochs=2"]


def test_cli_memorization_and_errors(tmp_path, capsys):
    import json

    from delsketch.apps.cli import main

    out = tmp_path / "m.json"
    assert main(["audit", "memorization", *TINY, "--route", "loo", "--indices", "0:4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    task = get_preset("digits")(n_train=20, hidden=6, batch=5, epochs=2)
    assert r["scores"] == pytest.approx(memorization(task, route="loo", indices=range(4)).scores, abs=1e-14)
    capsys.readouterr()
    assert main(["audit", "memorization", *TINY, "--indices", "20"]) == 2
    assert capsys.readouterr().err.strip() == "error: example index 20 out of range: the task has 20 training examples (0..19)"
    assert main(["audit", "memorization", "--preset", "names", "--set", "n=10", "--metric", "margin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "margin needs a classifier" in err and err.count("\n") == 1


def test_cli_membership_writes_roc(tmp_path):
    from delsketch.apps.cli import main

    assert main(["audit", "membership", *TINY, "--models", "4", "--bootstrap", "5", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "membership.json").exists()


def test_cli_report(tmp_path):
    from delsketch.apps.cli import main

    assert main(["audit", "report", *TINY, "--verify", "3", "--models", "4", "--repeats", "1,4", "--widths", "3,5",
                 "--sample", "3", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Most memorized examples" in md and "## Membership inference" in md and "## Canaries" in md
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("memorization.png", "roc.png", "exposure.png"))
    assert "## The causes of memorization" in md and "### Size: model width" in md
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("most-memorized.png", "repetition.png", "novelty.png",
                                                               "novelty-examples.png", "size.png"))


def test_loss_threshold_against_pair_counting():
    g = torch.Generator().manual_seed(0)
    mem = (torch.randn(200, generator=g, dtype=torch.float64) * 0.5 + 0.3).tolist()
    non = (torch.randn(300, generator=g, dtype=torch.float64) * 0.5 + 0.8).tolist()
    r = loss_threshold(mem, non, fprs=(0.001, 0.01, 0.1))
    pairs = sum((a < b) + 0.5 * (a == b) for a in mem for b in non) / (len(mem) * len(non))
    assert r["auc"] == pytest.approx(pairs, abs=1e-12)
    # TPR at FPR 1%: members strictly below the 4th-lowest non-member loss (at most 3 of the 300 let through)
    t = sorted(non)[3]
    assert r["tpr_at_fpr"]["0.01"] == pytest.approx(sum(a < t for a in mem) / len(mem), abs=1e-12)
    assert r["tpr_at_fpr"]["0.001"] <= r["tpr_at_fpr"]["0.01"] <= r["tpr_at_fpr"]["0.1"]
    with pytest.raises(ValueError):
        loss_threshold([], non)


# ---------------------------------------------------------------- the three causes as experiments
def test_repetition_is_retraining_without_every_copy(digits):
    from delsketch.audit.experiments import duplicate, repetition

    r = repetition(digits, copies=(1, 3), indices=[2, 9], route="loo")
    assert r["rows"][0]["all_copies"]["scores"] == pytest.approx(
        memorization(digits, route="loo", indices=[2, 9]).scores, abs=1e-14)
    ptask, groups = duplicate(digits, [2, 9], 3)
    assert ptask.n == digits.n + 4 and len(ptask.schedule) == len(digits.schedule)
    base = train(ptask)
    for k, i in enumerate([2, 9]):
        occ = groups[i]
        assert len(occ) == 3 and r["rows"][1]["occurrences"][k] == occ
        own = ptask.example_losses(base, torch.tensor(occ))
        assert torch.equal(own, own[:1].expand(3))  # the copies are the example itself
        before = float(digits.query(base, f"train:{i}"))  # the preset's own query path (its original inputs)
        every = float(digits.query(retrain(ptask, occ), f"train:{i}")) - before
        one = float(digits.query(retrain(ptask, [i]), f"train:{i}")) - before
        assert r["rows"][1]["all_copies"]["scores"][k] == pytest.approx(every, abs=1e-12)
        assert r["rows"][1]["one_copy"]["scores"][k] == pytest.approx(one, abs=1e-12)
    assert r["rows"][1]["all_copies"]["mean"] == pytest.approx(np.mean(r["rows"][1]["all_copies"]["scores"]), abs=1e-15)


def test_repetition_first_order_is_the_derivative_along_all_copies(digits, names):
    from delsketch.audit.experiments import duplicate, repetition

    r = repetition(digits, copies=(2,), indices=[4], route="first_order")
    ptask, groups = duplicate(digits, [4], 2)
    eps, base = 1e-6, float(digits.query(train(ptask), "train:4"))
    fd = (float(digits.query(retrain(ptask, groups[4], weight=eps), "train:4")) - base) / eps
    assert r["rows"][0]["all_copies"]["scores"][0] == pytest.approx(fd, rel=1e-4)
    tp, g = duplicate(names, [3], 4)
    assert [tp.examples[j] for j in g[3]] == [names.examples[3]] * 4


def test_atypicality_against_sklearn_nearest_neighbours(digits, names):
    from collections import Counter

    from sklearn.neighbors import NearestNeighbors

    from delsketch.audit.experiments import atypicality, features

    a = atypicality(digits, neighbours=3)
    X = np.array([e["image"] for e in digits.examples], dtype=np.float64) / 16.0
    y = np.array([e["label"] for e in digits.examples])
    d, _ = NearestNeighbors(n_neighbors=4).fit(X).kneighbors(X)
    assert a["knn_distance"] == pytest.approx(d[:, 1:].mean(1), abs=1e-10)
    for c in np.unique(y):
        m = np.flatnonzero(y == c)
        if len(m) < 4:
            continue
        dc, _ = NearestNeighbors(n_neighbors=4).fit(X[m]).kneighbors(X[m])
        assert np.asarray(a["knn_distance_same_class"])[m] == pytest.approx(dc[:, 1:].mean(1), abs=1e-10)
    F, labels, _ = features(names)
    assert labels is None and F.shape[0] == names.n
    s = "^" + names.examples[0] + "$"
    assert sorted(F[0][F[0] > 0].tolist()) == sorted(Counter(a + b for a, b in zip(s, s[1:])).values())


def test_novelty_pairs_each_example_with_its_atypicality(digits):
    from scipy.stats import spearmanr

    from delsketch.audit.experiments import atypicality, novelty

    r = novelty(digits, route="loo", neighbours=3, top=4)
    loo = memorization(digits, route="loo")
    assert r["scores"] == pytest.approx(loo.scores, abs=1e-14)
    a = atypicality(digits, neighbours=3)["knn_distance"]
    assert r["spearman"]["knn_distance"]["rho"] == pytest.approx(spearmanr(a, loo.scores).statistic, abs=1e-12)
    top = loo.ranking()[:4]
    assert [e["index"] for e in r["most_memorized"]] == top
    assert r["most_memorized"][0]["image"] == digits.examples[top[0]]["image"]
    assert 1 <= len(r["binned"]["knn_distance"]) <= 5


def test_size_counts_parameters_and_retrains_each_width():
    from delsketch.audit.experiments import size

    make = lambda h: get_preset("digits")(n_train=16, n_test=0, hidden=h, batch=8, epochs=2)  # noqa: E731
    r = size(make, widths=(2, 5), sample=3, models=4, bootstrap=5)
    for row in r["rows"]:
        t = make(row["hidden"])
        assert row["parameters"] == sum(p.numel() for p in t.model.parameters())
        base = train(t)
        for i, s in zip(r["sample"], row["self_influence"]["scores"]):
            assert s == pytest.approx(float(t.query(retrain(t, [i]), f"train:{i}") - t.query(base, f"train:{i}")),
                                      abs=1e-12)
        m = membership_audit(t, models=4, bootstrap=5)
        assert row["membership"]["loss_threshold"]["auc"] == pytest.approx(m["attacks"]["loss_threshold"]["auc"])
    assert r["task"] == "digits"


def test_experiments_bad_input_is_one_line(digits, names, capsys):
    from delsketch.apps.cli import main
    from delsketch.audit.experiments import novelty, repetition, size

    for call, msg in ((lambda: repetition(digits, copies=(0, 2)), "copies"),
                      (lambda: repetition(digits, examples=25), "between 1 and 24"),
                      (lambda: repetition(digits, indices=[24]), "out of range"),
                      (lambda: repetition(digits, route="sketch"), "unknown route"),
                      (lambda: novelty(digits, neighbours=24), "neighbours must lie in"),
                      (lambda: novelty(names, route="first_order", metric="token_accuracy"), "differentiable"),
                      (lambda: size(lambda h: digits, widths=()), "widths"),
                      (lambda: size(lambda h: digits, models=2), "at least 4")):
        with pytest.raises(ValueError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["audit", "experiment", "size", "--preset", "names", "--set", "n=10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hidden" in err and err.count("\n") == 1
    assert main(["audit", "experiment", "repetition", *TINY, "--copies", "1,x"]) == 2
    assert capsys.readouterr().err.strip() == "error: bad --copies '1,x' (expected whole numbers separated by commas, e.g. 1,2,4,8)"


def test_cli_experiment_writes_png_and_json(tmp_path):
    import json

    from delsketch.apps.cli import main
    from delsketch.audit.experiments import repetition

    assert main(["audit", "experiment", "repetition", *TINY, "--copies", "1,2", "--examples", "3",
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "repetition.json").read_text())
    task = get_preset("digits")(n_train=20, hidden=6, batch=5, epochs=2)
    assert r["rows"][1]["all_copies"]["scores"] == pytest.approx(
        repetition(task, copies=(1, 2), examples=3)["rows"][1]["all_copies"]["scores"], abs=1e-14)
    assert (tmp_path / "repetition.png").stat().st_size > 1000
