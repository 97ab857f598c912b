"""sketch.first_order: exact first-order effects of every training example by reverse mode through the run.

Checked against two independent computations: the degree-1 coefficient of exact_series (a forward ring run
with w = z 1_D) and central finite differences of real float64 retraining with w = ±eps e_i."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from delsketch.apps.cli import main
from delsketch.training.optim import SGD, AdamW, differentiable
from delsketch.tasks import get_preset
from delsketch.training import train
from delsketch.sketch import evaluate, exact_series, first_order


@pytest.fixture(scope="module")
def digits():
    return get_preset("digits")(n_train=60, epochs=2)


def _check_against_exact_series(task, queries, sets, steps=None):
    E = first_order(task, queries, steps=steps)
    assert E.shape == (task.n, len(queries)) and E.dtype == torch.float64
    for D in sets:
        r = exact_series(task, D, 1, queries, steps=steps)  # the queries stacked: coefficients [2, len(queries)]
        for j, q in enumerate(queries):
            assert float(E[D, j].sum()) == pytest.approx(float(r.coefficients[1, j]), rel=1e-9, abs=1e-14), (D, q)
    return E


def test_sgd_momentum_matches_exact_series(digits):
    _check_against_exact_series(digits, ["test:0", "test:mean"], [[3], [1, 5, 7, 30], digits.select("class:2")])


def test_adam_matches_exact_series():
    task = get_preset("names")()
    _check_against_exact_series(task, ["emma", "max"], [[0], [1, 5, 7, 30]], steps=40)


def test_adamw_matches_exact_series(digits):
    task = dataclasses.replace(digits, optimizer=AdamW(lr=0.01, weight_decay=0.1, eps_inside_sqrt=True))
    _check_against_exact_series(task, ["test:1"], [[2, 9], list(range(20))])


def test_matches_finite_differences_of_retraining(digits):
    E = first_order(digits, ["test:0"])
    eps = 1e-5
    for i in (4, 17):
        vals = []
        for sgn in (1, -1):
            w = torch.zeros(digits.n, dtype=torch.float64)
            w[i] = sgn * eps
            vals.append(float(evaluate(digits, train(digits, w=w), "test:0")))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert float(E[i, 0]) == pytest.approx(fd, rel=1e-6, abs=1e-10), i


def test_optimizer_without_autograd_is_named(digits):
    class Frozen(SGD):
        def step(self, params, grads, state, step):
            with torch.no_grad():
                return {k: p - self.lr * grads[k] for k, p in params.items()}, state

    task = dataclasses.replace(digits, optimizer=Frozen(lr=0.1))
    with pytest.raises(TypeError, match="Frozen"):
        first_order(task, ["test:0"])
    opt = SGD(lr=0.1)
    with differentiable(opt):
        assert opt._differentiable
    assert not opt._differentiable  # restored: plain training stays under no_grad


def test_detached_output_is_an_error_not_zeros(digits):
    detached = lambda p: digits.query(p, "test:0").detach()
    with pytest.raises(ValueError, match="autograd"):
        first_order(digits, [detached])
    assert torch.equal(first_order(digits, ["test:0"], steps=0), torch.zeros(digits.n, 1, dtype=torch.float64))


def test_cli_influence(capsys):
    rc = main(["influence", "--preset", "digits", "--steps", "10", "--query", "test:0", "--top", "3", "--json"])
    import json

    obj = json.loads(capsys.readouterr().out)["results"][0]
    assert rc == 0 and len(obj["effects"]) == obj["n"] == 500 and len(obj["top"]) == 3
    mags = [abs(x["effect"]) for x in obj["top"]]
    assert mags == sorted(mags, reverse=True) and mags[0] == max(abs(e) for e in obj["effects"])
    assert all(obj["effects"][x["index"]] == x["effect"] for x in obj["top"])
    rc = main(["influence", "--preset", "digits", "--query", "test:0", "--top", "0"])
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1


def test_readme_example_emma():
    """The README's illustration: on the names preset, 'emma' depends most on 'elma', 'ima', 'zelma'."""
    task = get_preset("names")()
    e = first_order(task, ["emma"])[:, 0]
    top = torch.argsort(e.abs(), descending=True)[:3].tolist()
    assert [task.examples[i] for i in top] == ["elma", "ima", "zelma"] and bool((e[top] > 0).all())
