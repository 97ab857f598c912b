"""delsketch.unlearn: every method behind one interface, checked against independent computations (real
retraining, torch.func.hessian, a sketch's error bars) and on a task whose training data cannot be read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from delsketch.apps.cli import main
from delsketch.tasks import get_preset
from delsketch.training import Task, deletion_weights, retrain, train
from delsketch.unlearn import (METHODS, UnlearnError, load, reference, save, unlearn, unlearn_sequence, verify)


@pytest.fixture(scope="module")
def digits():
    task = get_preset("digits")(n_train=100, n_test=200, batch=20, epochs=4)
    return task, train(task)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_every_method_is_registered():
    assert list(METHODS) == ["retrain", "finetune", "gradient_ascent", "neggrad_plus", "scrub", "newton",
                             "synthetic", "sketch"]


def test_retrain_verifies_perfectly_against_itself(digits):
    task, p = digits
    D = task.select("class:3")
    u = unlearn(task, D, "retrain", params=p)
    # the method is real retraining: equal to an independent run of the loop with deletion weights
    assert _same(u.params, train(task, w=deletion_weights(task.n, D)))
    v = verify(task, u, original=p)
    assert v["param_distance"] == 0.0 and v["ks"]["pvalue"] == 1.0 and v["ks"]["statistic"] == 0.0
    assert v["unlearned"] == v["reference_metrics"]
    assert v["relearn_steps"] == v["relearn_steps_reference"] and v["relearn_ratio"] == 1.0
    assert v["verdict"].startswith("retrain: close")
    assert v["reference_metrics"]["forget_acc"] < v["original"]["forget_acc"]  # the class really was forgotten
    # accuracies against an independent evaluation of the model (privacy's digits helpers)
    from delsketch.privacy import accuracy, digits_test_data

    X, y = digits_test_data(task)
    assert v["original"]["test_acc"] == pytest.approx(accuracy(task, p, X, y), abs=1e-15)
    assert v["unlearned"]["test_acc"] == pytest.approx(accuracy(task, u.params, X, y), abs=1e-15)
    Xf = torch.tensor([task.examples[i]["image"] for i in D], dtype=torch.float64) / 16
    assert v["unlearned"]["forget_acc"] == pytest.approx(accuracy(task, u.params, Xf, torch.full((len(D),), 3)), abs=1e-15)


def test_approximate_methods_run_and_verdicts_name_a_side(digits):
    task, p = digits
    D = task.select("class:3")
    ref = reference(task, D, original=p)
    for m in ("finetune", "gradient_ascent", "neggrad_plus", "scrub"):
        u = unlearn(task, D, m, params=p)
        assert not _same(u.params, p)
        v = verify(task, u, reference=ref)
        word = v["verdict"].split(":")[1].split(";")[0].strip()
        assert word in ("close", "over-unlearned", "under-unlearned")
        # the numbers next to each other: the reference side is the real retraining's
        assert v["reference_metrics"]["forget_loss"] == pytest.approx(
            float(task.example_losses(retrain(task, D), torch.tensor(D)).mean()), rel=1e-12)
        assert 0 < u.cost["retrain_equivalents"] < 5


def _logreg_task(n=150, wd=0.01):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:n] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[:n], dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    return Task.from_module(model, (X, y), loss, torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=wd),
                            steps=400), X, y


def test_newton_step_equals_an_independent_hessian_solve_and_moves_toward_retraining():
    wd = 0.01
    task, X, y = _logreg_task(wd=wd)
    p = train(task)
    D = [0, 5, 9, 33, 70]
    # damping = the weight decay: the Hessian of the objective SGD minimizes (loss + wd/2 |theta|^2)
    u = unlearn(task, D, "newton", params=p, damping=wd)
    keep = torch.tensor([i for i in range(task.n) if i not in set(D)])
    names = ["weight", "bias"]
    theta = torch.cat([p[k].reshape(-1) for k in names])

    def split(v):
        return {"weight": v[:640].reshape(10, 64), "bias": v[640:]}

    def L(v, idx):  # written independently of the task: cross-entropy of the linear model
        W, b = split(v)["weight"], split(v)["bias"]
        return F.cross_entropy(X[idx] @ W.T + b, y[idx], reduction="sum") / task.n

    H = torch.func.hessian(lambda v: L(v, keep))(theta)
    g_f = torch.func.grad(lambda v: L(v, torch.tensor(D)))(theta)
    want = theta + torch.linalg.solve(H + wd * torch.eye(len(theta), dtype=torch.float64), g_f)
    got = torch.cat([u.params[k].reshape(-1) for k in names])
    assert torch.allclose(got, want, rtol=0, atol=1e-9), float((got - want).abs().max())
    assert not u.info["indefinite"]
    r = retrain(task, D)
    rt = torch.cat([r[k].reshape(-1) for k in names])
    before, after = float((theta - rt).norm()), float((got - rt).norm())
    assert after < 0.2 * before, (before, after)


def test_mia_advantage_is_the_roc_curves_largest_gap():
    import numpy as np

    from delsketch.audit.mia import loss_threshold
    from delsketch.unlearn.verify import advantage

    g = np.random.default_rng(0)
    for a, b in ((g.normal(0, 1, 40), g.normal(0.5, 1, 70)), (g.integers(0, 4, 30) * 1.0, g.integers(0, 4, 50) * 1.0)):
        r = loss_threshold(a, b)
        assert advantage(a, b) == pytest.approx(float(np.max(np.abs(np.array(r["tpr"]) - np.array(r["fpr"])))), abs=1e-12)


def test_lira_level_of_the_forget_set(digits):
    task, p = digits
    D = task.select("class:3")
    ref = reference(task, D, original=p, lira=4)
    u = unlearn(task, D, "retrain", params=p)
    v = verify(task, u, reference=ref)
    L = v["lira"]
    assert L["unlearned"] == L["reference"]  # retraining against itself
    # the original model trained on the class; the retrained one never saw it: LiRA must tell them apart
    assert L["original"]["member_rate"] > L["reference"]["member_rate"]


def test_newton_refuses_large_models(digits):
    task, p = digits
    with pytest.raises(UnlearnError, match="max_params=100"):
        unlearn(task, [1, 2], "newton", params=p, max_params=100)


def test_sketch_method_agrees_with_retraining_within_its_error_bars(tmp_path):
    from delsketch.sketch import precompute
    from delsketch.unlearn.methods.sketch import predicted_params

    task = get_preset("digits")(n_train=100, n_test=50, batch=20, epochs=2)
    sk = precompute(task, tmp_path / "sk", 64, 3)
    p = train(task)
    hits = []
    for D in ([3, 17, 42], task.select("class:3")):
        u = unlearn(task, D, "sketch", params=p, sketch=sk, available_data="none")
        # Sketch.predict of the parameters output equals the estimator written out on the stored series
        est, se = predicted_params(sk, D, 1)
        assert all(torch.allclose(u.params[k], est[k], rtol=0, atol=1e-13) for k in est)
        assert all(torch.allclose(u.stderr[k], se[k], rtol=0, atol=1e-13) for k in se)
        r = retrain(task, D)
        cover = torch.cat([((u.params[k] - r[k]).abs() <= 2 * u.stderr[k] + 1e-12).flatten() for k in r])
        assert float(cover.double().mean()) >= 0.9
        ref = reference(task, D, kind="sketch", sketch=sk, original=p)
        pred = ref.predicted["forget_loss"]
        real = task.example_losses(r, torch.tensor(D))
        hits += ((torch.tensor(pred["per_example"]) - real).abs() <= 2 * torch.tensor(pred["per_example_stderr"])).tolist()
        v = verify(task, u, reference=ref)
        assert v["reference"] == "sketch" and "sketch" in v["verdict"] and "reference_predicted" in v
        assert u.cost["example_evaluations"] == 0
    assert sum(hits) / len(hits) >= 0.9, hits  # the forget set's predicted losses, pooled over both requests
    # data-free at deletion time: the same answer with the task's data (also the sketch's own task) sealed
    sealed = dataclasses.replace(task, example_losses=_no_losses, examples=_NoData(), query=_no_losses)
    real_task, sk.task = sk.task, sealed
    try:
        again = unlearn(sealed, D, "sketch", params=p, sketch=sk, available_data="none", fingerprint=task.fingerprint())
    finally:
        sk.task = real_task
    assert _same(again.params, u.params)
    save(u, tmp_path / "out")
    back = load(tmp_path / "out", task)
    assert _same(back.stderr, u.stderr)


class _NoData(list):
    """Training examples that cannot be read."""

    def __getitem__(self, i):
        raise RuntimeError("training data read")

    def __iter__(self):
        raise RuntimeError("training data read")

    def __len__(self):
        raise RuntimeError("training data read")


def _no_losses(params, idx):
    raise RuntimeError("training data read")


def test_synthetic_reads_no_training_data(digits):
    task, p = digits
    fp = task.fingerprint()
    sealed = dataclasses.replace(task, example_losses=_no_losses, examples=_NoData(), query=_no_losses)
    with pytest.raises(RuntimeError, match="training data read"):  # the seal works: any read raises
        unlearn(sealed, [1], "gradient_ascent", params=p, fingerprint=fp)
    with pytest.raises(UnlearnError, match="available_data='none'"):  # and the guard stops a data method first
        unlearn(sealed, [1], "finetune", params=p, available_data="none", fingerprint=fp)
    D = task.select("class:3")
    u = unlearn(sealed, D, "synthetic", params=p, available_data="none", forget_labels=[3], fingerprint=fp)
    assert u.cost["example_evaluations"] == 0 and u.info["data_touched"] == "no data at all"
    v = verify(task, u, original=p)  # verification itself uses the real task
    assert v["unlearned"]["forget_acc"] <= 0.1 < v["original"]["forget_acc"]
    assert v["unlearned"]["test_acc"] >= v["reference_metrics"]["test_acc"] - 0.05
    # without the labels it would have to read the forget examples, which is refused
    with pytest.raises(UnlearnError, match="forget_labels"):
        unlearn(sealed, D, "synthetic", params=p, available_data="none", fingerprint=fp)


def test_bad_input_is_one_line(digits, tmp_path):
    task, p = digits
    cases = [
        (dict(forget=[], method="finetune"), "empty forget set"),
        (dict(forget=[5, 100], method="finetune"), "out of range"),
        (dict(forget=[-1], method="finetune"), "out of range"),
        (dict(forget=[1], method="nope"), "unknown unlearning method"),
        (dict(forget=[1], method="finetune", bogus=1), "no setting 'bogus'"),
        (dict(forget=[1], method="retrain", available_data="forget_only"), "needs the retained training data"),
        (dict(forget=[1], method="gradient_ascent", available_data="none"), "needs the forget set's examples"),
        (dict(forget=[1], method="sketch"), "needs a sketch"),
        (dict(forget=list(range(100)), method="finetune"), "nothing would be retained"),
    ]
    for kw, msg in cases:
        with pytest.raises(UnlearnError, match=msg) as e:
            unlearn(task, params=p, **kw)
        assert "\n" not in str(e.value)
    other = get_preset("digits")(n_train=100, n_test=200, batch=20, epochs=4, hidden=16)
    with pytest.raises(UnlearnError, match="do not match task"):
        unlearn(other, [1], "finetune", params=p)
    u = unlearn(task, [1], "gradient_ascent", params=p)
    with pytest.raises(UnlearnError, match="made from another task"):
        verify(get_preset("digits")(n_train=100, n_test=200, batch=20, epochs=3), u)
    with pytest.raises(UnlearnError, match="pass the trained model's params"):
        unlearn(task, [1], "gradient_ascent", available_data="forget_only")


def test_save_load_roundtrip_checksum_fingerprint_and_no_overwrite(digits, tmp_path):
    task, p = digits
    u = unlearn(task, [1, 2, 3], "gradient_ascent", params=p)
    out = save(u, tmp_path / "u")
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "gradient_ascent" and man["forget"] == [1, 2, 3] and man["fingerprint"] == task.fingerprint()
    assert set(man["settings"]) == set(METHODS["gradient_ascent"].defaults) and "retrain_equivalents" in man["cost"]
    back = load(out, task)
    assert _same(back.params, u.params) and back.forget == u.forget and back.settings == u.settings
    first = (out / "params.safetensors").read_bytes(), (out / "manifest.json").read_bytes()
    # the same request again: allowed, and the same bytes (deterministic method)
    save(unlearn(task, [1, 2, 3], "gradient_ascent", params=p), out)
    assert ((out / "params.safetensors").read_bytes(), (out / "manifest.json").read_bytes()) == first
    # a different request into the same directory, or a foreign non-empty directory: refused
    with pytest.raises(UnlearnError, match="refusing to overwrite"):
        save(unlearn(task, [1, 2], "gradient_ascent", params=p), out)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.pt").write_bytes(b"original model")
    with pytest.raises(UnlearnError, match="refusing to overwrite"):
        save(u, tmp_path / "model")
    assert (tmp_path / "model" / "weights.pt").read_bytes() == b"original model"
    # another task's fingerprint
    other = get_preset("digits")(n_train=100, n_test=200, batch=20, epochs=4, seed=1)
    with pytest.raises(UnlearnError, match="does not match the task"):
        load(out, other)
    # a corrupted parameter file
    data = bytearray((out / "params.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(UnlearnError, match="checksum mismatch"):
        load(out, task)


def test_requests_in_sequence_are_cumulative(digits):
    task, p = digits
    reqs = [[1, 2, 3], [10, 11], task.select("class:7")[:4]]
    seq = unlearn_sequence(task, reqs, "retrain", params=p)
    union = sorted(set().union(*map(set, reqs)))
    assert seq[-1]["unlearned"].forgotten == union
    assert _same(seq[-1]["unlearned"].params, retrain(task, union))
    assert all(s["verification"]["param_distance"] == 0.0 for s in seq)
    approx = unlearn_sequence(task, reqs, "finetune", params=p)
    assert [s["verification"]["forgotten"] for s in approx] == [3, 5, 9]
    assert approx[1]["unlearned"].previously_forgotten == [1, 2, 3]


def test_cli_unlearn_and_verify(tmp_path, capsys):
    out = tmp_path / "u"
    args = ["unlearn", "--preset", "digits", "--set", "n_train=100", "--set", "n_test=100", "--set", "batch=20",
            "--forget", "class:3", "--method", "neggrad_plus"]
    assert main(args + ["--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "neggrad_plus" and res["forgotten"] == 7
    assert main(["unlearn", "verify", str(out), "--lira", "4", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["method"] == "neggrad_plus" and v["reference"] == "retrain" and "verdict" in v
    assert v["lira"]["shadow_models"] == 4
    for bad, msg in ((["--forget", "0:500", "--method", "scrub", "--out", str(tmp_path / "x")], "out of range"),
                     (["--forget", "class:3", "--method", "finetune", "--out", str(out)], "refusing to overwrite"),
                     (["--forget", "class:3", "--method", "scrub", "--available-data", "none", "--out",
                       str(tmp_path / "y")], "needs the retained"),
                     (["--forget", "class:3", "--method", "zap", "--out", str(tmp_path / "z")], "unknown unlearning")):
        assert main(args[:9] + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert main(["unlearn", "verify", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_sketch_method_and_sketch_reference(tmp_path, capsys):
    sets = ["--set", "n_train=100", "--set", "n_test=50", "--set", "batch=20", "--set", "epochs=2"]
    assert main(["sketch", "--preset", "digits", *sets, "--directions", "16", "--degree", "2", "--out",
                 str(tmp_path / "sk")]) == 0
    capsys.readouterr()
    out = tmp_path / "u"
    assert main(["unlearn", "--preset", "digits", *sets, "--forget", "3,17,42", "--method", "sketch", "--sketch",
                 str(tmp_path / "sk"), "--available-data", "none", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cost"]["example_evaluations"] == 0 and res["settings"] == {"degree": 1}
    assert main(["unlearn", "verify", str(out), "--reference", "sketch", "--sketch", str(tmp_path / "sk"), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["reference"] == "sketch" and "reference_predicted" in v and v["reference_predicted"]["forget_loss"]["stderr"] > 0
    assert main(["unlearn", "--preset", "digits", *sets, "--forget", "3", "--method", "sketch", "--out",
                 str(tmp_path / "v")]) == 2
    assert "needs --sketch" in capsys.readouterr().err


def test_references_farmed_out_to_workers_equal_serial_retraining():
    from delsketch.tasks import factory
    from delsketch.unlearn import references

    spec = {"preset": "digits", "data": None, "steps": None, "n_train": 100, "n_test": 50, "batch": 20, "epochs": 2}
    task = factory(spec)()
    sets = [[1, 2, 3], task.select("class:5"), [40, 41]]
    refs = references(task, sets, task_factory=factory(spec), workers=2)
    for D, ref in zip(sets, refs):
        assert _same(ref.params, retrain(task, D)) and ref.forgotten == sorted(D)
    with pytest.raises(UnlearnError, match="fingerprints differ"):
        references(task, sets, task_factory=factory({**spec, "seed": 1}), workers=2)


def test_mia_advantage_is_the_ks_statistic_and_its_chance_level():
    # the loss-threshold advantage max_t |TPR - FPR| is the two-sample KS statistic (scipy computes it
    # independently); under no membership signal it exceeds the reported chance level about 5 % of the time
    import numpy as np
    from scipy.stats import ks_2samp

    from delsketch.unlearn.verify import advantage

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=50), rng.normal(0.3, 1.2, size=130)
        assert abs(advantage(a, b) - ks_2samp(a, b).statistic) < 1e-12
    chance = 1.358 * np.sqrt((50 + 130) / (50 * 130))
    over = np.mean([advantage(rng.normal(size=50), rng.normal(size=130)) > chance for _ in range(2000)])
    assert 0.02 < over < 0.08, over
