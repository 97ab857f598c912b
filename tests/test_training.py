"""Whole training runs in the ring against nested torch.func.jvp of an independent functional loop.

For a real direction v, the final parameters theta(t) of training with weights w = t v are a smooth
function of t; a ring run with w = z v must return their Taylor coefficients. The reference below
is its own training loop (torch.func.grad, hand-written SGD / Adam), sharing only the model code.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from delsketch.series import tensor as taylor
from delsketch.training.optim import SGD, Adam
from delsketch.tasks import get_preset
from delsketch.training import Task, train

from jets import taylor_coefficients

DEG = 3


def reference_final_params(task: Task, w, steps, kind: str, hp: dict):
    """Plain functional training with weights w (a tensor, possibly carrying forward-mode tangents)."""
    params = task.init_params()
    names = list(params)
    state = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
    for s in range(steps):
        idx = torch.tensor(task.schedule[s])

        def loss_fn(p):
            losses = task.example_losses(p, idx)
            return (losses * (1 - w[idx])).sum() / len(idx)

        g = torch.func.grad(loss_fn)(params)
        new = {}
        for k in names:
            if kind == "sgd":
                buf = hp["momentum"] * state[k][0] + g[k]
                state[k] = (buf, state[k][1])
                new[k] = params[k] - hp["lr"] * buf
            else:  # Adam, eps inside the square root, linear decay
                b1, b2 = hp["betas"]
                m = b1 * state[k][0] + (1 - b1) * g[k]
                v = b2 * state[k][1] + (1 - b2) * g[k] * g[k]
                state[k] = (m, v)
                lr = hp["lr"] * (1 - s / hp["horizon"])
                mh = m / (1 - b1 ** (s + 1))
                vh = v / (1 - b2 ** (s + 1))
                new[k] = params[k] - lr * mh / torch.sqrt(vh + hp["eps"])
        params = new
    return params


def compare(task, steps, kind, hp, seed=0, tol=1e-10):
    n = task.n
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    v2 = torch.randn(n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    # two real directions in one ring run (m = 2)
    c = torch.zeros(2, DEG + 1, n, dtype=torch.complex128)
    c[0, 1], c[1, 1] = v, v2
    params0 = {k: taylor.lift(p, DEG) for k, p in task.init_params().items()}
    ring = train(task, w=taylor.variable(c), params=params0, steps=steps)
    plain = train(task, steps=steps)
    for j, direction in enumerate([v, v2]):
        ref = taylor_coefficients(lambda t: reference_final_params(task, t * direction, steps, kind, hp), DEG)
        for k in plain:
            got = taylor.coefficients(ring[k])
            got = got.expand(2, *got.shape[1:])[j]
            # degree 0 equals plain training
            torch.testing.assert_close(got[0].real, plain[k], rtol=1e-12, atol=1e-12)
            assert got[0].imag.abs().max() == 0
            for r in range(1, DEG + 1):
                scale = ref[r][k].abs().max().item()
                torch.testing.assert_close(got[r].real, ref[r][k], rtol=tol, atol=tol * max(scale, 1e-300))


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16, dtype=torch.float64)
        self.fc2 = nn.Linear(16, 3, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _mlp_task(n=40, steps=20, batch=8, lr=0.1, momentum=0.9):
    torch.manual_seed(0)
    model = GeluMLP()
    X = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=g).tolist() * 10
    schedule = [perm[i * batch : (i + 1) * batch] for i in range(steps)]

    def example_losses(params, idx):
        logits = functional_call(model, params, (X[idx],))
        return F.cross_entropy(logits, y[idx], reduction="none")

    return Task(name="mlp", n=n, init_params=lambda: {k: v.clone() for k, v in init.items()},
                example_losses=example_losses, schedule=schedule, optimizer=SGD(lr=lr, momentum=momentum))


def test_gelu_mlp_20_sgd_steps_batch_8():
    compare(_mlp_task(), 20, "sgd", {"lr": 0.1, "momentum": 0.9})


def test_microgpt_10_adam_steps():
    task = get_preset("names")(n=10, steps=10)
    hp = {"lr": 0.01, "betas": (0.85, 0.99), "eps": 1e-3, "horizon": 10}
    compare(task, 10, "adam", hp)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, dtype=torch.float64)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4, dtype=torch.float64)

    def forward(self, x):
        h = self.pool(torch.tanh(self.conv(x)))
        return self.fc(h.flatten(1))


def test_small_cnn_5_steps():
    torch.manual_seed(0)
    model = SmallCNN()
    n = 12
    X = torch.randn(n, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    init = {k: p.detach().clone() for k, p in model.named_parameters()}

    def example_losses(params, idx):
        return F.cross_entropy(functional_call(model, params, (X[idx],)), y[idx], reduction="none")

    schedule = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [3, 7, 11, 0], [1, 5, 9, 2]]
    task = Task(name="cnn", n=n, init_params=lambda: {k: v.clone() for k, v in init.items()},
                example_losses=example_losses, schedule=schedule, optimizer=SGD(lr=0.2, momentum=0.5))
    compare(task, 5, "sgd", {"lr": 0.2, "momentum": 0.5})


def test_complex_direction_run_matches_real_direction_runs():
    """A ring run along a complex direction a + ib equals, degree by degree, the polynomial in s of the
    real-direction runs along a + s b evaluated at s = i (real runs checked against jvp above)."""
    import numpy as np

    task = _mlp_task(steps=6)
    n = task.n
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(n, generator=gen, dtype=torch.float64) / n**0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) / n**0.5
    s = np.linspace(-1, 1, DEG + 1)
    c = torch.zeros(DEG + 2, DEG + 1, n, dtype=torch.complex128)
    for j, sj in enumerate(s):
        c[j, 1] = a + float(sj) * b
    c[DEG + 1, 1] = a + 1j * b
    params0 = {k: taylor.lift(p, DEG) for k, p in task.init_params().items()}
    out = train(task, w=taylor.variable(c), params=params0)
    V = torch.tensor(np.vander(s, DEG + 1, increasing=True), dtype=torch.complex128)
    for k, p in out.items():
        co = taylor.coefficients(p)
        for r in range(1, DEG + 1):
            real_vals = co[: DEG + 1, r].reshape(DEG + 1, -1)
            poly = torch.linalg.solve(V, real_vals)
            at_i = sum(poly[q] * (1j) ** q for q in range(DEG + 1)).reshape(p.shape)
            torch.testing.assert_close(co[DEG + 1, r], at_i, rtol=1e-9, atol=1e-12)


def test_loss_backward_and_stock_sgd_on_series_parameters():
    """An unmodified nn.Module with series parameters: loss.backward() fills .grad, and torch.optim.SGD steps."""
    torch.manual_seed(0)
    model = GeluMLP()
    X = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    plain = {k: p.detach().clone() for k, p in model.named_parameters()}
    params = {k: taylor.lift(p, 2, requires_grad=True) for k, p in plain.items()}
    w = torch.zeros(1, 3, 8, dtype=torch.complex128)
    w[0, 1] = 1.0 / 8**0.5
    losses = F.cross_entropy(functional_call(model, params, (X,)), y, reduction="none")
    ((1 - taylor.variable(w)) * losses).mean().backward()
    opt = torch.optim.SGD(list(params.values()), lr=0.1, foreach=False)
    opt.step()
    # reference: the same step by the functional loop
    task = Task(name="one", n=8, init_params=lambda: {k: v.clone() for k, v in plain.items()},
                example_losses=lambda p, idx: F.cross_entropy(functional_call(model, p, (X[idx],)), y[idx], reduction="none"),
                schedule=[list(range(8))], optimizer=SGD(lr=0.1))
    ref = train(task, w=taylor.variable(w), params={k: taylor.lift(v, 2) for k, v in plain.items()})
    for k in params:
        torch.testing.assert_close(taylor.coefficients(params[k]), taylor.coefficients(ref[k]).expand_as(taylor.coefficients(params[k])))


@pytest.mark.parametrize("kernel", ["native", "eager"])
@pytest.mark.parametrize(
    "opt",
    [Adam(lr=0.05, eps=1e-3, eps_inside_sqrt=True), Adam(lr=0.05, eps=1e-6, weight_decay=0.1)],
    ids=["adam-eps-inside", "adam-standard-wd"],
)
def test_fused_series_optimizer_path_equals_generic_path(opt, kernel, monkeypatch, tmp_path):
    """Adam's fused coefficient path for Series (the native kernel, or its eager slices) gives the generic
    (dispatch) path's numbers."""
    import dataclasses
    import shutil

    from delsketch.series import native
    from delsketch.training import optim
    from delsketch.training.optim import AdamW

    if kernel == "native" and shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("DELSKETCH_NATIVE", "1" if kernel == "native" else "0")
    native._reset()
    calls = []
    real = native.adam_update
    monkeypatch.setattr(native, "adam_update", lambda *a: calls.append(real(*a)) or calls[-1])

    for o in (opt, AdamW(lr=0.05, eps=1e-4, eps_inside_sqrt=True, weight_decay=0.1)):
        task = dataclasses.replace(_mlp_task(steps=4), optimizer=o)
        c = torch.zeros(3, 5, task.n, dtype=torch.complex128)  # degree 4: every term of the power recurrences
        c[:, 1] = torch.randn(3, task.n, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
        run = lambda: train(task, w=taylor.variable(c), params={k: taylor.lift(p, 4) for k, p in task.init_params().items()})
        fused = run()
        with monkeypatch.context() as mp:
            mp.setattr(optim, "_is_series", lambda x: False)
            generic = run()
        for k in fused:
            torch.testing.assert_close(taylor.coefficients(fused[k]), taylor.coefficients(generic[k]), rtol=1e-10, atol=1e-12)
    assert calls and all(calls) if kernel == "native" else not any(calls)
    monkeypatch.undo()
    native._reset()


# ----------------------------------------------------------------------------------------------
# divergence and the standard-Adam domain error
# ----------------------------------------------------------------------------------------------


def test_divergence_is_an_error_naming_the_step_and_the_loss():
    """lr 1e4 on digits: the loss grows from 2.5 to ~1e5 within 3 steps without ever turning non-finite; the
    run stops at the first step whose loss exceeds 1e3 x the step-0 loss, in plain training and in a ring run
    (degree-0 coefficient), and the message's numbers are the losses an unchecked run reports."""
    from delsketch.sketch import directions, ring_train, weight_series
    from delsketch.training import DIVERGENCE_FACTOR, DivergenceError, NonFiniteError

    task = get_preset("digits")(n_train=100, lr=1e4)
    losses = []
    train(task, callback=lambda s, l: losses.append(float(l)), check_finite=False)  # the unchecked run
    assert all(math.isfinite(x) for x in losses)
    first = next(s for s, x in enumerate(losses) if x > DIVERGENCE_FACTOR * max(losses[0], 1))
    assert first >= 1
    with pytest.raises(DivergenceError, match=rf"diverged at step {first}: loss {re.escape(f'{losses[first]:.3g}')} ") as e:
        train(task)
    assert isinstance(e.value, NonFiniteError) and "\n" not in str(e.value) and "learning rate" in str(e.value)
    with pytest.raises(DivergenceError, match=rf"step {first}: loss {re.escape(f'{losses[first]:.3g}')} "):
        ring_train(task, weight_series(directions(0, range(2), task.n), 1))


@pytest.mark.parametrize("kw", [{}, {"optimizer": "adam"}, {"batch": None}])
def test_divergence_check_stays_quiet_on_healthy_runs(kw):
    """The digits presets as shipped (SGD, Adam, full batch) run to the end; their largest loss is within 2x of
    the step-0 loss, three orders of magnitude below the threshold."""
    from delsketch.training import DIVERGENCE_FACTOR

    task = get_preset("digits")(n_train=200, **kw)
    losses = []
    train(task, callback=lambda s, l: losses.append(float(l)))
    assert len(losses) == task.steps
    assert max(losses) < 2 * max(losses[0], 1) < DIVERGENCE_FACTOR * max(losses[0], 1) / 100


def _relu_task(inside: bool) -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 2, (20,))
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    return Task(name="relu", n=20, init_params=lambda: {k: v.clone() for k, v in init.items()},
                example_losses=lambda p, idx: F.cross_entropy(functional_call(model, p, (X[idx],)), y[idx], reduction="none"),
                schedule=[[(4 * s + i) % 20 for i in range(4)] for s in range(5)],
                optimizer=Adam(lr=0.01, eps_inside_sqrt=inside))


def test_standard_adam_with_relu_names_the_fix():
    """A ReLU leaves some second moments exactly zero: standard Adam's ring run fails with a SeriesDomainError
    that names Adam(..., eps_inside_sqrt=True); that variant runs and its degree-0 part equals plain training."""
    from delsketch.series import SeriesDomainError
    from delsketch.sketch import directions, ring_train, weight_series

    psi = directions(0, range(2), 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", taylor.NonAnalyticWarning)  # ReLU's, expected here
        with pytest.raises(SeriesDomainError, match=r"use Adam\(\.\.\., eps_inside_sqrt=True\)"):
            ring_train(_relu_task(False), weight_series(psi, 2))
        task = _relu_task(True)
        ring = ring_train(task, weight_series(psi, 2))
    plain = train(task)
    for k in plain:
        assert torch.allclose(taylor.coefficients(ring[k])[:, 0].real, plain[k], rtol=1e-12, atol=1e-12)
