"""Outputs of any shape: vector and dict outputs through predict, effects, stability, first_order, exact_series and
retraining, checked element by element against the scalar path and against real retraining; one result type and
strict JSON; the CLI's --task FILE.py:FUNCTION round trip."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from delsketch import Task, precompute
from delsketch.sketch import Prediction, Sketch, StabilityWarning, exact_series, first_order
from delsketch.tasks import get_preset, load_task_file
from delsketch.training import outputs as O
from delsketch.training import retrain, train

from conftest import REPO


def _user_task():
    torch.manual_seed(0)
    X, y = torch.randn(60, 5, dtype=torch.float64), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3)).double()
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")
    task = Task.from_module(model, (X, y), loss, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), steps=30)
    Xt, yt = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    return task, Xt, yt


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    task, Xt, yt = _user_task()
    sk = precompute(task, tmp_path_factory.mktemp("u") / "sk", directions=96, degree=2, chunk=32, seed=3)
    return task, Xt, yt, sk


def test_vector_output_equals_the_scalar_path_element_by_element(user):
    task, Xt, yt, sk = user
    vec = O.losses(task, Xt, yt)
    sets = [[0, 1, 2], [5], list(range(10, 16))]
    p = sk.predict(vec, sets)
    assert isinstance(p, Prediction) and p.estimate.shape == (3, 6) and p.terms.shape == (3, 3, 6) and p.sets == 3
    for j in range(6):
        scalar = lambda params, j=j: task.loss_fn(task.forward(params, Xt[j : j + 1]), yt[j : j + 1])[0]
        q = sk.predict(scalar, sets)
        for field in ("estimate", "stderr", "median_of_means", "terms", "by_degree_stderr"):
            torch.testing.assert_close(getattr(p, field)[..., j], getattr(q, field), rtol=1e-10, atol=1e-13)
    one = sk.predict(vec, sets[0])  # one set: no sets axis
    assert one.change.shape == (6,) and one.sets is None
    torch.testing.assert_close(one.change, p.change[0], rtol=1e-12, atol=1e-15)
    eff = sk.effects(vec)
    assert eff.shape == (task.n, 6)
    torch.testing.assert_close(eff[5], p.change[1], rtol=1e-9, atol=1e-13)


def test_vector_predictions_cover_retraining(user):
    """20 random sets of 1-4 examples, six test losses: at least 90 % of the 120 retrained changes lie within 3
    standard errors of the prediction."""
    task, Xt, yt, sk = user
    vec = O.losses(task, Xt, yt)
    rng = random.Random(5)
    sets = [sorted(rng.sample(range(task.n), rng.randint(1, 4))) for _ in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StabilityWarning)
        p = sk.predict(vec, sets)
    truth = torch.stack([vec.flat(retrain(task, D)) for D in sets])  # [20, 6]
    torch.testing.assert_close(p.base, vec.flat(train(task)), rtol=1e-12, atol=1e-14)
    hits = ((p.estimate - truth).abs() <= 3 * p.stderr).to(torch.float64).mean()
    assert hits >= 0.9, float(hits)


def test_dict_output_parameters_against_the_exact_series(user):
    """The parameters themselves as an output: every field is a dict shaped like the parameters, and the
    prediction centres on the exact degree-2 series along D (mean z-score small, 99 % within 4 s.e.)."""
    task, _, _, sk = user
    D = [3, 7, 11, 40]
    p = sk.predict(O.parameters(), D)
    shapes = {k: tuple(v.shape) for k, v in task.init_params().items()}
    assert {k: tuple(v.shape) for k, v in p.change.items()} == shapes
    assert {k: tuple(v.shape) for k, v in p.terms.items()} == {k: (3, *s) for k, s in shapes.items()}
    ex = exact_series(task, D, 2, O.parameters())
    z = torch.cat([((p.estimate[k] - ex.value_at_1[k]) / p.stderr[k]).reshape(-1) for k in shapes])
    assert (z.abs() < 4).to(torch.float64).mean() > 0.99 and abs(float(z.mean())) < 0.5
    for k in shapes:  # degree 0 is the trained model itself, exactly
        torch.testing.assert_close(p.base[k], train(task)[k], rtol=1e-12, atol=1e-14)


def test_first_order_and_exact_series_keep_the_shape(user):
    task, Xt, yt, _ = user
    vec = O.losses(task, Xt[:3], yt[:3])
    E = first_order(task, vec)
    assert E.shape == (task.n, 3)
    for j in range(3):
        col = first_order(task, lambda p, j=j: task.loss_fn(task.forward(p, Xt[j : j + 1]), yt[j : j + 1])[0])
        torch.testing.assert_close(E[:, j], col, rtol=1e-10, atol=1e-14)
    D = [1, 2, 9]
    ser = exact_series(task, D, 1, vec)
    assert ser.coefficients.shape == (2, 3)
    torch.testing.assert_close(ser.coefficients[1], E[D].sum(0), rtol=1e-9, atol=1e-13)  # degree 1 = summed effects
    own = first_order(task, O.own_losses(task, [4, 8]))
    assert own.shape == (task.n, 2)
    P = first_order(task, O.parameters(["0.bias"]))
    assert set(P) == {"0.bias"} and P["0.bias"].shape == (task.n, 12)


def test_own_losses_and_ready_made_outputs(user):
    task, Xt, yt, _ = user
    params = train(task)
    own = O.own_losses(task)
    torch.testing.assert_close(own.flat(params), task.example_losses(params, torch.arange(task.n)))
    assert O.loss(task, Xt, yt).value(params).shape == ()
    assert O.predictions(task, Xt).value(params).shape == (6, 3)
    with pytest.raises(ValueError, match="out of range"):
        O.own_losses(task, [task.n])
    with pytest.raises(ValueError, match="Task.from_module"):
        O.losses(get_preset("digits")(n_train=40, epochs=1), Xt, yt)


def test_stability_of_a_vector_output(user):
    task, Xt, yt, sk = user
    rep = sk.stability(O.losses(task, Xt, yt))
    assert rep["elements"] == 6 and len(rep["safe_deletion_size"]) == 6 and rep["verdict"].count("of 6 elements") == 1
    for j in range(6):  # each element's safe size is the scalar report's
        scalar = lambda params, j=j: task.loss_fn(task.forward(params, Xt[j : j + 1]), yt[j : j + 1])[0]
        assert rep["safe_deletion_size"][j] == pytest.approx(sk.stability(scalar)["safe_deletion_size"], rel=1e-12)


def test_one_warning_per_call_not_per_set(user):
    task, Xt, yt, sk = user
    big = [list(range(k, k + 50)) for k in range(5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = sk.predict(O.losses(task, Xt, yt), big)
    msgs = [str(w.message) for w in caught if issubclass(w.category, StabilityWarning)]
    safe = torch.as_tensor(sk.stability(O.losses(task, Xt, yt), elements=True)["safe_deletion_size"])
    if bool((safe < 50).any()):
        assert len(msgs) == 1 and "of 5 deletion sets" in msgs[0] and p.warning == msgs[0]
    else:
        assert msgs == [] and p.warning is None


def test_json_is_strict_and_always_has_a_sets_axis(user, tmp_path):
    task, Xt, yt, sk = user
    p = sk.predict(O.losses(task, Xt, yt), [1, 2]).to_json()
    q = sk.predict(O.losses(task, Xt, yt), [[1, 2], [3]]).to_json()
    for obj in (p, q):
        json.dumps(obj, allow_nan=False)
        assert obj["schema"] == "delsketch-prediction/1" and obj["shape"] == [6]
    assert p["sets"] == 1 and len(p["change"]) == 1 and len(p["change"][0]) == 6 and len(p["base"]) == 6
    assert q["sets"] == 2 and q["deletion_sizes"] == [2, 1]
    lone = precompute(task, tmp_path / "one", directions=1, degree=1, seed=0)
    r = lone.predict(O.losses(task, Xt, yt), [1]).to_json()
    json.dumps(r, allow_nan=False)
    assert r["stderr"] == [[None] * 6] and "stderr" in r["nulls"] and any("one direction" in n for n in r["notes"])


def test_an_output_that_changes_shape_is_refused(user):
    task, _, _, sk = user
    calls = []

    def flaky(p):
        calls.append(1)
        return p["0.bias"][: len(calls)]

    out = O.Output(flaky)
    out.flat(train(task))
    with pytest.raises(ValueError, match="changed its shape"):
        out.flat(train(task))


TASK_FILE = '''
import torch, torch.nn as nn, torch.nn.functional as F
from delsketch import Task
from delsketch.training import outputs

def make():
    torch.manual_seed(0)
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 2, (40,))
    Xt, yt = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")
    task = Task.from_module(model, (X, y), loss, torch.optim.SGD(model.parameters(), lr=0.1), steps=20)
    return task, {"test_losses": outputs.losses(task, Xt, yt), "test_loss": outputs.loss(task, Xt, yt)}
'''


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "delsketch", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_task_file_round_trip(tmp_path):
    """A sketch built by the CLI from --task FILE.py:make is the one Python builds (same bytes), and predict on it
    (named vector output) gives the Python API's numbers; the JSON is strict and always a list of predictions."""
    f = tmp_path / "mytask.py"
    f.write_text(textwrap.dedent(TASK_FILE))
    ref = f"{f}:make"
    d = tmp_path / "cli-sketch"
    r = _cli("sketch", "--task", ref, "--directions", "8", "--degree", "2", "--chunk", "4", "--out", str(d))
    assert r.returncode == 0, r.stderr
    task = load_task_file(ref)
    py = precompute(task, tmp_path / "py-sketch", directions=8, degree=2, chunk=4, seed=0, task_spec={"task": ref})
    for name in ("base.safetensors", "chunk-00000.safetensors", "chunk-00001.safetensors"):
        assert (d / name).read_bytes() == (tmp_path / "py-sketch" / name).read_bytes()
    r = _cli("predict", str(d), "--delete", "0:3", "--query", "test_losses", "--query", "test_loss", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    a, b = obj["predictions"]
    assert a["shape"] == [5] and b["shape"] == [] and a["output"] == "test_losses"
    want = Sketch.load(d, task).predict("test_losses", [0, 1, 2])
    assert a["change"][0] == pytest.approx(want.change.tolist(), rel=1e-12)
    r = _cli("predict", str(d), "--delete", "0:3", "--query", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "test_losses" in r.stderr
    for bad in (["--task", str(f)], ["--task", f"{tmp_path}/missing.py:make"], ["--task", f"{f}:other"],
                ["--task", ref, "--preset", "digits"]):
        r = _cli("retrain", *bad, "--delete", "1", "--query", "test_loss")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), (bad, r.stderr)
    r = _cli("retrain", "--task", ref, "--delete", "1", "--query", "test_losses", "--json")
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(r.stdout)["predictions"]
    truth = task.outputs["test_losses"].flat(retrain(task, [1])).tolist()
    assert p["method"] == "retrain" and p["estimate"][0] == pytest.approx(truth, rel=1e-12)
