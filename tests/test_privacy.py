"""DP-SGD (delsketch.privacy): accounting against Opacus, one step against Opacus's clipped step, determinism,
ring runs against finite differences of retraining, bad input."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from delsketch import SGD, Task, exact_series, first_order, train
from delsketch.privacy import (DP, PerExampleGradientError, PrivacyError, diagnostics, epsilon, fold_stability,
                               make_private, noise_multiplier_for, privacy_of)

opacus = pytest.importorskip("opacus")

torch.set_num_threads(1)


def small_task(n=48, batch=8, steps=12, seed=0, lr=0.1, momentum=0.9, model=None, d=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    init = {k: p.detach().clone() for k, p in model.named_parameters()}

    def example_losses(p, idx):
        return F.cross_entropy(functional_call(model, p, (X[idx],)), y[idx], reduction="none")

    schedule = [[(batch * s + i) % n for i in range(batch)] for s in range(steps)]
    task = Task(name="small", n=n, init_params=lambda: {k: v.clone() for k, v in init.items()},
                example_losses=example_losses, schedule=schedule, optimizer=SGD(lr=lr, momentum=momentum),
                model=model, config={"seed": seed})
    return task, model, X, y


# ---------------------------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_privacy_engine(accountant):
    # a real Opacus run (Poisson sampling) records its steps; our epsilon of (sigma, q, steps) must match its own
    from opacus import PrivacyEngine

    n, bs, sigma = 64, 16, 0.9
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 5, generator=g), torch.randint(0, 2, (n,), generator=g)
    model = nn.Sequential(nn.Linear(5, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=bs)
    engine = PrivacyEngine(accountant=accountant)
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=sigma, max_grad_norm=1.0)
    steps = 0
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad()
            if len(xb):
                F.cross_entropy(model(xb), yb).backward()
            opt.step()
            steps += 1
    assert sum(h[2] for h in engine.accountant.history) == steps
    ours = epsilon(sigma, bs / n, steps, 1e-5, accountant)
    theirs = engine.get_epsilon(1e-5)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert 0.5 < ours < 50


def test_rdp_epsilon_equals_opacus_analysis():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    for sigma, q, steps, delta in [(1.1, 0.01, 1000, 1e-5), (0.7, 0.064, 48, 1e-5), (3.0, 0.5, 10, 1e-6)]:
        alphas = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=alphas)
        eps, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
        assert epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(float(eps), rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_for_target(accountant):
    sigma = noise_multiplier_for(2.0, 1e-5, 0.05, 200, accountant)
    eps = epsilon(sigma, 0.05, 200, 1e-5, accountant)
    assert 2.0 - 0.02 <= eps <= 2.0
    assert epsilon(sigma * 0.9, 0.05, 200, 1e-5, accountant) > 2.0  # less noise spends more
    assert epsilon(0.0, 0.05, 200, 1e-5, accountant) == math.inf
    assert epsilon(sigma, 0.05, 0, 1e-5, accountant) == 0.0


def test_make_private_records_the_epsilon_it_spends():
    task, *_ = small_task(steps=30)
    dt = make_private(task, DP(target_epsilon=4.0, target_delta=1e-3, accountant="rdp"))
    p = dt.config["privacy"]
    assert p["sample_rate"] == pytest.approx(8 / 48) and p["steps"] == 30 and p["sampling"] == "poisson"
    assert p["epsilon"] <= 4.0 and p["epsilon"] == pytest.approx(epsilon(p["noise_multiplier"], 8 / 48, 30, 1e-3, "rdp"))
    assert privacy_of(dt)["epsilon"] == pytest.approx(p["epsilon"], rel=1e-12)
    assert privacy_of(dt, accountant="prv")["epsilon"] != p["epsilon"]
    fixed = make_private(task, DP(noise_multiplier=1.0, delta=1e-3, poisson=False))
    assert fixed.schedule == task.schedule and "not a proven guarantee" in fixed.config["privacy"]["caveat"]


def test_from_module_privacy_is_make_private():
    """Task.from_module(..., privacy=DP(...)) is the same task as make_private(Task.from_module(...), DP(...))."""
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    opt = lambda: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    dp = DP(noise_multiplier=1.0, max_grad_norm=0.5, seed=4, delta=1e-3)
    a = Task.from_module(model, (X, y), loss, opt(), steps=6, batch_size=8, privacy=dp)
    b = make_private(Task.from_module(model, (X, y), loss, opt(), steps=6, batch_size=8), dp)
    plain = Task.from_module(model, (X, y), loss, opt(), steps=6, batch_size=8)
    assert a.fingerprint() == b.fingerprint() != plain.fingerprint()
    assert a.schedule == b.schedule and a.config["privacy"] == b.config["privacy"]
    pa, pb = train(a), train(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ---------------------------------------------------------------------------------------------- the step

def test_one_step_equals_opacus_clipped_step():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    task, model, X, y = small_task(n=48, batch=16, steps=1, momentum=0.0)
    idx = task.schedule[0]
    # a bound between the per-example gradient norms, so some examples are clipped and some are not
    norms = []
    for i in idx:
        model.zero_grad()
        F.cross_entropy(model(X[i : i + 1]), y[i : i + 1]).backward()
        norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters())))
    C = sorted(norms)[len(norms) // 2] * 1.0001
    dt = make_private(task, DP(noise_multiplier=0.0, max_grad_norm=C, poisson=False, delta=1e-3))
    ours = train(dt)
    d = diagnostics(dt)
    assert 0 < d["clipped"] < len(idx)

    m = GradSampleModule(copy.deepcopy(model))
    opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=len(idx))
    opt.zero_grad()
    F.cross_entropy(m(X[idx]), y[idx]).backward()
    opt.step()
    theirs = {k.removeprefix("_module."): v.detach() for k, v in m.named_parameters()}
    moved = max(float((ours[k] - task.init_params()[k]).abs().max()) for k in ours)
    assert moved > 1e-3
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-12), k


def test_noise_is_added_and_scaled():
    # the step's gradient minus the noise-free step's is sigma C xi / (q n), xi ~ N(0, 1) from the seeded stream
    from delsketch.privacy import step_noise

    task, *_ = small_task(steps=1, momentum=0.0)
    a = make_private(task, DP(noise_multiplier=0.0, max_grad_norm=0.5, delta=1e-3, seed=3))
    b = make_private(task, DP(noise_multiplier=2.0, max_grad_norm=0.5, delta=1e-3, seed=3))
    pa, pb = train(a), train(b)
    xi = step_noise(3, 0, {k: v.shape for k, v in pa.items()})
    q_n = b.config["privacy"]["sample_rate"] * task.n
    for k in pa:
        assert torch.allclose(pb[k] - pa[k], -0.1 * 2.0 * 0.5 * xi[k] / q_n, atol=1e-14)


def test_private_run_is_deterministic_and_differs_from_plain():
    task, *_ = small_task(steps=20)
    dp = DP(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-3, seed=7)
    a, b = train(make_private(task, dp)), train(make_private(task, dp))
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    c = train(make_private(task, DP(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-3, seed=8)))
    plain = train(task)
    assert all(float((a[k] - c[k]).abs().max()) > 1e-6 for k in a)
    assert all(float((a[k] - plain[k]).abs().max()) > 1e-6 for k in a)
    fp = {make_private(task, dp).fingerprint(), make_private(task, DP(noise_multiplier=1.0, max_grad_norm=0.5,
          delta=1e-3, seed=8)).fingerprint(), task.fingerprint()}
    assert len(fp) == 3


def test_empty_batches_add_noise_only():
    task, *_ = small_task(steps=40, momentum=0.0)
    dt = make_private(task, DP(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, delta=1e-3))
    empties = [s for s, b in enumerate(dt.schedule) if not b]
    assert empties and len(empties) < 40
    p = train(dt)
    assert diagnostics(dt)["empty_batches"] == len(empties)
    assert all(torch.isfinite(v).all() for v in p.values())
    # an all-empty run is a pure random walk of the noise
    only = make_private(task, DP(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-6, delta=1e-3))
    assert not any(only.schedule)
    from delsketch.privacy import step_noise

    p0, p = task.init_params(), train(only)
    qn = 1e-6 * task.n
    shapes = {k: v.shape for k, v in p0.items()}
    noises = [step_noise(0, s, shapes) for s in range(40)]
    walk = {k: p0[k] - sum(0.1 * 1.0 * xi[k] / qn for xi in noises) for k in p0}
    for k in p:
        assert torch.allclose(p[k], walk[k], rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------------------------------------- ring runs

def _ring_ready():
    """A DP task whose gradient norms stay away from the clipping bound (the series is valid there)."""
    task, model, X, y = small_task(n=40, batch=8, steps=10, lr=0.2)
    for C in (0.8, 0.6, 1.0, 0.5, 1.2):
        dt = make_private(task, DP(noise_multiplier=0.3, max_grad_norm=C, delta=1e-3, seed=2))
        train(dt)
        d = diagnostics(dt)
        if d["min_relative_gap"] > 0.03 and 0 < d["clipped"] < d["examples"]:
            return dt, model, X, y
    raise AssertionError("no clipping bound away from every gradient norm")


def test_ring_run_matches_finite_differences_of_retraining():
    dt, model, X, y = _ring_ready()
    D = [1, 5, 17, 30]
    probe = lambda p: F.cross_entropy(functional_call(model, p, (X[:4],)), y[:4])  # noqa: E731
    res = exact_series(dt, D, degree=2, output=probe)
    assert diagnostics(dt)["near_boundary"] == 0

    def f(h):
        w = torch.zeros(dt.n, dtype=torch.float64)
        w[D] = h
        return float(probe(train(dt, w=w)))

    h = 1e-4
    fp, f0, fm = f(h), f(0.0), f(-h)
    assert res.coefficients[0] == pytest.approx(f0, abs=1e-12)
    assert res.coefficients[1] == pytest.approx((fp - fm) / (2 * h), rel=1e-6)
    assert 2 * res.coefficients[2] == pytest.approx((fp - 2 * f0 + fm) / h**2, rel=1e-3)
    assert abs(res.coefficients[1]) > 1e-4
    # reverse mode through the DP run (vmapped per-example gradients with create_graph) gives the same degree 1
    E = first_order(dt, [probe])
    assert float(E[D].sum()) == pytest.approx(float(res.coefficients[1]), rel=1e-9)


def test_ring_run_counts_examples_near_the_boundary():
    task, model, X, y = small_task(n=40, batch=8, steps=3, lr=0.2)
    dt = make_private(task, DP(noise_multiplier=0.3, max_grad_norm=1.0, delta=1e-3))
    train(dt)
    # put the bound on an example's gradient norm at step 0
    from delsketch.privacy.dpsgd import DPGradient

    hook: DPGradient = dt.gradient
    idx = torch.tensor(dt.schedule[0] or [0])
    per, _ = hook.per_example({k: v.requires_grad_(True) for k, v in task.init_params().items()},
                              task.example_losses, idx)
    norm = float(torch.stack([v.reshape(len(idx), -1).norm(dim=1) for v in per.values()], 1).norm(dim=1)[0])
    near = make_private(task, DP(noise_multiplier=0.3, max_grad_norm=norm * 1.001, delta=1e-3))
    exact_series(near, [2], degree=1, output=lambda p: p["0.bias"].sum())
    d = diagnostics(near)
    assert d["near_boundary"] >= 1 and int(idx[0]) in d["near_boundary_examples"]
    rep = fold_stability({"verdict": "stable: Taylor terms decay geometrically"}, d)
    assert rep["verdict"].startswith("unreliable near the clipping boundary") and rep["dp_near_boundary"] >= 1
    assert fold_stability({"verdict": "stable"}, {"near_boundary": 0})["verdict"] == "stable"


def test_sketch_stability_reads_the_clipping_boundary(tmp_path):
    # Sketch.stability folds the DP transform's boundary count of the sketched run (its degree-0 part, plain DP
    # training) into the verdict; the sketch layer reads it duck-typed through task.gradient.diagnostics()
    from delsketch import precompute
    from delsketch.sketch.stability import stability_report

    task, model, X, y = small_task(n=40, batch=8, steps=3, lr=0.2)
    probe = lambda p: F.cross_entropy(functional_call(model, p, (X[:4],)), y[:4])  # noqa: E731
    dt = make_private(task, DP(noise_multiplier=0.3, max_grad_norm=1.0, delta=1e-3))
    idx = torch.tensor(dt.schedule[0])
    per, _ = dt.gradient.per_example({k: v.requires_grad_(True) for k, v in task.init_params().items()},
                                     task.example_losses, idx)
    norm = float(torch.stack([v.reshape(len(idx), -1).norm(dim=1) for v in per.values()], 1).norm(dim=1)[0])
    near = make_private(task, DP(noise_multiplier=0.3, max_grad_norm=norm * 1.001, delta=1e-3))
    sk = precompute(near, tmp_path / "near", directions=4, degree=2, chunk=4)
    train(near, w=torch.ones(near.n, dtype=torch.float64))  # another run in between must not change the answer
    rep = sk.stability(probe)
    train(near)
    d = diagnostics(near)  # the counts of plain DP training of the task, measured here directly
    assert rep["clipping"]["near_boundary"] == d["near_boundary"] >= 1 and not rep["clipping"]["reliable"]
    assert rep["clipping"]["near_boundary_examples"] == d["near_boundary_examples"] and int(idx[0]) in d["near_boundary_examples"]
    plain = stability_report(sk.coefficients(probe)[:, :, 0], sk.n)  # a scalar output: [m, K]
    assert rep["verdict"].startswith("unreliable near the clipping boundary") and rep["verdict"].endswith(plain["verdict"])
    # away from the boundary: an entry saying so and the verdict unchanged; a non-private task: no entry
    ok, *_ = _ring_ready()
    sk2 = precompute(ok, tmp_path / "ok", directions=4, degree=2, chunk=4)
    rep2 = sk2.stability(probe)
    assert rep2["clipping"]["near_boundary"] == 0 and rep2["clipping"]["reliable"]
    assert rep2["verdict"] == stability_report(sk2.coefficients(probe)[:, :, 0], sk2.n)["verdict"]
    sk3 = precompute(task, tmp_path / "plain", directions=4, degree=2, chunk=4)
    assert "clipping" not in sk3.stability(probe)


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_settings_are_one_line_errors():
    task, *_ = small_task()
    cases = [
        lambda: DP(target_epsilon=0, target_delta=1e-5),
        lambda: DP(target_epsilon=-1, target_delta=1e-5),
        lambda: DP(target_epsilon=3),
        lambda: DP(),
        lambda: DP(noise_multiplier=1.0, target_epsilon=3, target_delta=1e-5),
        lambda: DP(noise_multiplier=1.0, max_grad_norm=0),
        lambda: DP(noise_multiplier=1.0, sample_rate=1.5),
        lambda: DP(noise_multiplier=1.0, accountant="gdp2"),
        lambda: make_private(task, DP(target_epsilon=3, target_delta=1 / 48)),  # delta >= 1/n
        lambda: make_private(task, DP(noise_multiplier=1.0, delta=0.5)),
        lambda: make_private(make_private(task, DP(noise_multiplier=1.0, delta=1e-3)), DP(noise_multiplier=1.0, delta=1e-3)),
        lambda: make_private(task, {"noise_multiplier": 1.0}),
        lambda: epsilon(1.0, 0.0, 10, 1e-5),
        lambda: make_private(task, DP(target_epsilon=1e-9, target_delta=1e-3)),
    ]
    for case in cases:
        with pytest.raises(PrivacyError) as e:
            case()
        assert "\n" not in str(e.value) and str(e.value)


def test_layers_without_per_example_gradients_are_refused():
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    task, *_ = small_task(model=bn)
    with pytest.raises(PerExampleGradientError, match=r"layer 1 \(BatchNorm1d\)"):
        make_private(task, DP(noise_multiplier=1.0, delta=1e-3))

    # a loss that couples the examples of a batch without any named layer (batch-centred features)
    base, model, X, y = small_task()

    def coupled(p, idx):
        x = X[idx] - X[idx].mean(0) if len(idx) > 1 else X[idx]
        return F.cross_entropy(functional_call(model, p, (x,)), y[idx], reduction="none")

    import dataclasses

    with pytest.raises(PerExampleGradientError, match="depends on the other examples"):
        make_private(dataclasses.replace(base, example_losses=coupled, model=None), DP(noise_multiplier=1.0, delta=1e-3))

    def broken(p, idx):
        if len(idx) == 1:
            raise RuntimeError("no single examples\nsecond line")
        return base.example_losses(p, idx)

    with pytest.raises(PerExampleGradientError) as e:
        make_private(dataclasses.replace(base, example_losses=broken), DP(noise_multiplier=1.0, delta=1e-3))
    assert "\n" not in str(e.value)


def test_missing_opacus_is_a_one_line_error():
    code = ("import sys; sys.modules['opacus'] = None; sys.modules['opacus.accountants'] = None\n"
            "from delsketch.privacy import epsilon, PrivacyError\n"
            "try:\n    epsilon(1.0, 0.1, 10, 1e-5)\nexcept PrivacyError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ERR privacy accounting needs opacus") and out.count("\n") == 1


# ---------------------------------------------------------------------------------------------- audit

# ---------------------------------------------------------------------------------------------- CLI

def test_cli_train_reports_epsilon_and_accuracy(capsys):
    import json

    from delsketch.apps.cli import main

    assert main(["train", "--preset", "digits", "--steps", "20", "--dp-epsilon", "3", "--dp-delta", "1e-5",
                 "--accountant", "rdp", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["private"] and r["steps"] == 20 and r["sampling"] == "poisson"
    assert r["sample_rate"] == pytest.approx((19 * 32 + 20) / 20 / 500)  # the first 20 batches: mean size / n
    assert r["epsilon"] <= 3 and r["epsilon"] == pytest.approx(epsilon(r["noise_multiplier"], r["sample_rate"], 20, 1e-5, "rdp"))
    assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["shifted_test_accuracy"] <= 1
    for bad in (["--dp-epsilon", "0", "--dp-delta", "1e-5"], ["--dp-epsilon", "3", "--dp-delta", "0.002"],
                ["--dp-delta", "1e-5"], ["--dp-epsilon", "3"], ["--dp-epsilon", "3", "--dp-delta", "1e-5", "--dp-clip", "-1"]):
        assert main(["train", "--preset", "digits", "--steps", "2", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (bad, err)


def test_one_run_lower_bound_on_randomized_response():
    # each canary's membership guess is right with probability e^eps/(1+e^eps): an eps-DP mechanism with the bound
    # tight, so the audit must stay below eps and come close to it with many canaries
    import numpy as np

    from delsketch.privacy import one_run_epsilon_lower_bound

    eps = 2.0
    rng = np.random.default_rng(0)
    below = 0
    for trial in range(20):
        member = rng.random(2000) < 0.5
        right = rng.random(2000) < math.exp(eps) / (1 + math.exp(eps))
        guess_in = np.where(right, member, ~member)
        scores = guess_in + 1e-3 * rng.random(2000)  # all "in" guesses above all "out" guesses
        k_in = int(guess_in.sum())
        r = one_run_epsilon_lower_bound(scores, member, k_in=k_in, k_out=2000 - k_in)
        assert r["correct"] == int(right.sum())
        below += r["epsilon_lower_bound"] <= eps
        assert r["epsilon_lower_bound"] > 1.5
    assert below >= 17  # beta = 0.05: the bound exceeds the truth in about 5 % of trials
    none = one_run_epsilon_lower_bound([0.0] * 10, [True, False] * 5, k_in=5)  # 3 of 5 right: no evidence
    assert none["epsilon_lower_bound"] == 0.0


def test_vmap_and_per_example_loop_agree():
    # the fast path (vmap) is the one taken on plain tensors, also when recording; the loop (ring runs, fallback)
    # computes the same run
    task, *_ = small_task(steps=6)
    dp = DP(noise_multiplier=0.7, max_grad_norm=0.5, delta=1e-3, seed=4)
    fast, slow = make_private(task, dp), make_private(task, dp)
    fast.gradient._linear = None  # (the Linear-only path is tested against vmap below)
    slow.gradient._use_vmap, slow.gradient._linear = False, None
    a, b = train(fast), train(slow)
    assert fast.gradient._use_vmap and fast.gradient.path == "vmap" and slow.gradient.path == "loop"
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-13), k
    train(fast, w=torch.zeros(task.n, dtype=torch.float64, requires_grad=True), record=True)
    assert fast.gradient._use_vmap


def test_linear_only_path_equals_vmap():
    # a Linear-only model: per-example norms ||g_i|| ||a_i|| from one batch backward and the clipped sum as
    # (coef g)^T a, against vmapped per-example gradients: the whole run (clipping, deletion weights, noise),
    # and reverse mode through it (first_order)
    task, model, X, y = small_task(n=40, batch=8, steps=8)
    before = train(task)
    dp = DP(noise_multiplier=0.5, max_grad_norm=1.6, delta=1e-3, seed=3)  # clips 33 of 73 example-steps
    lin, ref = make_private(task, dp), make_private(task, dp)
    ref.gradient._linear = None
    w = torch.zeros(task.n, dtype=torch.float64)
    w[[1, 7, 20]] = 1.0
    w[3] = 0.25
    for weights in (None, w):
        a, b = train(lin, w=weights), train(ref, w=weights)
        assert lin.gradient.path == "linear" and ref.gradient.path == "vmap"
        d1, d2 = diagnostics(lin), diagnostics(ref)
        assert d1["clipped"] == d2["clipped"] and 0 < d1["clipped"] < d1["examples"]
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12), k
        assert max(float((a[k] - task.init_params()[k]).abs().max()) for k in a) > 1e-2
    probe = lambda p: F.cross_entropy(functional_call(model, p, (X[:5],)), y[:5])  # noqa: E731
    E1, E2 = first_order(lin, [probe]), first_order(ref, [probe])
    assert lin.gradient.path == "linear"
    assert torch.allclose(E1, E2, rtol=0, atol=1e-12) and float(E1.abs().max()) > 1e-3
    # the recording forwards are gone again: a plain run of the same model is the plain run it was before
    assert all("forward" not in vars(mod) and not mod._forward_hooks for mod in model.modules())
    assert all(torch.equal(before[k], v) for k, v in train(task).items())


def test_linear_only_path_steps_aside_where_it_does_not_apply():
    # a Linear applied twice (weights shared across two uses) or a parameter outside a Linear: the vmap path
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6).double(), nn.Linear(6, 3).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.s = nn.Linear(6, 3).double(), nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return self.a(x) * self.s

    class Doubled(nn.Linear):  # a Linear subclass with its own forward: recorded by a hook, then the check
        def forward(self, x):  # against vmap finds the rank-1 formula wrong for it
            return 2 * super().forward(x)

    class WithDoubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Doubled(6, 6).double(), nn.Linear(6, 3).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    for m in (Twice(), Scaled(), WithDoubled()):
        torch.manual_seed(0)
        task, *_ = small_task(steps=4, model=m)
        dp = DP(noise_multiplier=0.5, max_grad_norm=0.3, delta=1e-3)
        t, slow = make_private(task, dp), make_private(task, dp)
        slow.gradient._use_vmap, slow.gradient._linear = False, None
        a, b = train(t), train(slow)
        assert t.gradient.path == "vmap"
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-13), k
        # nothing of the recording is left on the model: no instance-level forward, no hook
        assert all("forward" not in vars(mod) and not mod._forward_hooks for mod in m.modules())


def test_workers_rebuild_the_private_task(tmp_path):
    # a precompute farmed out to spawned workers rebuilds the DP task from private_factory: the same bytes as one
    # process; the plain task's factory builds the non-private task, which the fingerprint check refuses
    from delsketch import precompute
    from delsketch.privacy import private_factory
    from delsketch.tasks import build_from_spec, factory

    spec = {"preset": "digits", "epochs": 1, "n_train": 64}
    dp = DP(noise_multiplier=0.8, max_grad_norm=1.0, delta=1e-3, sample_rate=0.25)
    task = make_private(build_from_spec(spec), dp)
    assert private_factory(factory(spec), dp)().fingerprint() == task.fingerprint()
    kw = dict(directions=4, degree=1, chunk=2)
    here = precompute(task, tmp_path / "here", **kw)
    there = precompute(task, tmp_path / "there", **kw, task_factory=private_factory(factory(spec), dp),
                       executor="process", workers=2)
    names = sorted(p.name for p in (tmp_path / "here").glob("chunk*"))
    assert names and all((tmp_path / "here" / f).read_bytes() == (tmp_path / "there" / f).read_bytes() for f in names)
    assert torch.equal(here.coefficients("test:mean"), there.coefficients("test:mean"))
    with pytest.raises(Exception, match="fingerprint"):
        precompute(task, tmp_path / "plain", **kw, task_factory=factory(spec), executor="process", workers=2)
    with pytest.raises(PrivacyError, match="DP"):
        private_factory(factory(spec), {"noise_multiplier": 1.0})
