"""Task.from_module, the front door for an ordinary PyTorch model, data, per-example loss and optimizer.

Ground truths are independent of delsketch's training code: the user's own torch loop (a DataLoader with a
seeded generator, torch.optim, loss.backward()), and finite differences of real retraining."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from delsketch import SGD, Adam, Sketch, SketchError, Task, cosine, exact_series, precompute, retrain, train
from delsketch.training import FromModuleWarning, batches

N, D_IN, D_OUT = 24, 5, 3


def data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.randint(0, D_OUT, (n,), generator=g)


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.SiLU(), nn.Linear(8, D_OUT)).to(dtype)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


OPTIMIZERS = {
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.8, dampening=0.3, weight_decay=1e-2),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1),
}


def torch_loop(model, X, y, make_opt, *, steps=None, epochs=None, batch_size=None, seed=0):
    """What a user writes: their own loop, torch.optim, mean loss, backward."""
    m = copy.deepcopy(model)
    opt = make_opt(m.parameters())

    def step(xb, yb):
        opt.zero_grad()
        ce(m(xb), yb).mean().backward()
        opt.step()

    if batch_size is None:
        for _ in range(steps):
            step(X, y)
    else:
        loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        for _ in range(epochs):
            for xb, yb in loader:
                step(xb, yb)
    return {k: p.detach() for k, p in m.named_parameters()}


@pytest.mark.parametrize("batching", ["full", "minibatch"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_plain_run_reproduces_the_users_torch_loop(name, batching):
    model, (X, y) = mlp(), data()
    kw = dict(steps=12) if batching == "full" else dict(epochs=3, batch_size=7)  # 24 = 7+7+7+3
    want = torch_loop(model, X, y, OPTIMIZERS[name], seed=5, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FromModuleWarning)
        task = Task.from_module(model, (X, y), ce, OPTIMIZERS[name](model.parameters()), shuffle_seed=5, **kw)
    got = train(task)
    assert task.steps == (12 if batching == "full" else 12)
    init = dict(model.named_parameters())
    for k in want:
        assert (want[k] - init[k]).abs().max() > 1e-3  # training moved the parameters
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)
    # the user's model is untouched
    torch.testing.assert_close(dict(model.named_parameters())["0.weight"], mlp()[0].weight)


def test_schedule_is_the_dataloaders_batches():
    X, y = data()
    loader = DataLoader(TensorDataset(torch.arange(N), y), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    want = [xb.tolist() for _ in range(3) for xb, _ in loader]
    assert batches(N, epochs=3, batch_size=5, shuffle_seed=3) == want
    assert batches(N, steps=7, batch_size=5, shuffle_seed=3) == want[:7]
    assert batches(N, steps=2) == [list(range(N))] * 2


def test_float32_model_runs_in_float64_on_a_copy_and_says_so():
    model32, (X, y) = mlp(dtype=torch.float32), data()
    with pytest.warns(FromModuleWarning, match="float32.*float64"):
        task = Task.from_module(model32, (X.float(), y), ce, torch.optim.SGD(model32.parameters(), lr=0.1), steps=3)
    assert task.config["converted_from"] == ["torch.float32"]
    assert next(model32.parameters()).dtype == torch.float32  # the user's model is unchanged
    assert all(p.dtype == torch.float64 for p in task.init_params().values())
    assert task.data[0].dtype == torch.float64
    # float64 arithmetic from the float32 values: the same as the float64 loop started there
    want = torch_loop(copy.deepcopy(model32).double(), X.float().double(), y,
                      lambda ps: torch.optim.SGD(ps, lr=0.1), steps=3)
    got = train(task)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-13)


class PairDataset(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def test_dataset_inputs_give_the_same_task():
    model, (X, y) = mlp(), data()
    opt = lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    a = Task.from_module(model, (X, y), ce, opt(), steps=4)
    b = Task.from_module(model, TensorDataset(X, y), ce, opt(), steps=4)
    c = Task.from_module(model, PairDataset(X, y), ce, opt(), steps=4)
    assert a.fingerprint() == b.fingerprint() == c.fingerprint()
    assert a.forward is not None and a.loss_fn is ce and isinstance(a.model, nn.Module)
    torch.testing.assert_close(a.forward(a.init_params(), X[:2]), model(X[:2]))


def test_buffers_and_frozen_parameters_stay_fixed():
    X, y = data()
    model = nn.Sequential(nn.Linear(D_IN, 8), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.Linear(8, D_OUT)).double()
    model[2].eval()
    model[2].running_mean.fill_(0.3)
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    task = Task.from_module(model, (X, y), ce, opt, steps=5)
    assert "0.weight" not in task.init_params() and "2.running_mean" in task.config["fixed"]
    mb = copy.deepcopy(model)
    want = torch_loop(mb, X, y, lambda ps: torch.optim.SGD([p for p in ps if p.requires_grad], lr=0.1), steps=5)
    got = train(task)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)


def test_lr_schedule_and_delsketch_optimizer():
    model, (X, y) = mlp(), data()
    task = Task.from_module(model, (X, y), ce, SGD(0.2, momentum=0.5), steps=6, lr_schedule=cosine(6))
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    for _ in range(6):
        opt.zero_grad()
        ce(m(X), y).mean().backward()
        opt.step()
        sched.step()
    got = train(task)
    for k, p in m.named_parameters():
        torch.testing.assert_close(got[k], p.detach(), rtol=0, atol=1e-12)


# -- fingerprints -------------------------------------------------------------------------------------


def _task(model=None, X=None, y=None, loss=ce, **kw):
    model = model if model is not None else mlp()
    if X is None:
        X, y = data()
    return Task.from_module(model, (X, y), loss, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            steps=kw.pop("steps", 3), **kw)


def test_fingerprint_covers_data_model_loss_and_recipe():
    base = _task()
    assert base.fingerprint() == _task().fingerprint()
    X, y = data()
    X2 = X.clone()
    X2[7, 2] += 1e-9
    y2 = y.clone()
    y2[3] = (y2[3] + 1) % D_OUT
    changed = {
        "data": [_task(X=X2, y=y), _task(X=X, y=y2)],
        "model": [_task(model=mlp(seed=1))],
        "loss": [_task(loss=lambda out, t: F.cross_entropy(out, t, reduction="none", label_smoothing=0.1)),
                 _task(loss=nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1))],
        "recipe": [_task(steps=4), _task(normalization="renormalized")],
    }
    ref = base.fingerprints()
    for part, tasks in changed.items():
        for t in tasks:
            assert t.fingerprint() != base.fingerprint()
            assert [k for k in ref if t.fingerprints()[k] != ref[k]] == [part]
    # two loss modules that differ only in a setting repr() does not show
    a = _task(loss=nn.CrossEntropyLoss(reduction="none")).fingerprints()["loss"]
    b = _task(loss=nn.CrossEntropyLoss(reduction="none", label_smoothing=0.2)).fingerprints()["loss"]
    assert a != b


def test_sketch_for_other_data_model_or_loss_is_refused_naming_the_part(tmp_path):
    base = _task()
    precompute(base, tmp_path / "s", directions=4, degree=2, chunk=4)
    Sketch.load(tmp_path / "s", _task())
    X, y = data()
    X2 = X.clone()
    X2[0, 0] += 1.0
    others = {
        "data": _task(X=X2, y=y),
        "model": _task(model=mlp(seed=2)),
        "loss": _task(loss=lambda out, t: ce(out, t) * 2),
    }
    for part, other in others.items():
        with pytest.raises(SketchError, match=rf"the {part} differs \(fingerprint") as e:
            Sketch.load(tmp_path / "s", other)
        assert "\n" not in str(e.value)


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_inputs_give_one_line_errors():
    model, (X, y) = mlp(), data()
    sgd = lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cases = [
        (dict(data=(X, y[:-1])), "same number of examples"),
        (dict(data=[1, 2, 3]), "data must be"),
        (dict(loss=lambda o, t: F.cross_entropy(o, t)), r"per-example losses of shape \[24\].*got \[\]"),
        (dict(opt=torch.optim.RMSprop(model.parameters(), lr=0.1)), "RMSprop is not supported.*SGD"),
        (dict(opt=torch.optim.Adam(model.parameters(), lr=0.1, amsgrad=True)), "amsgrad"),
        (dict(opt=torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)), "maximize"),
        (dict(opt=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)), "not a parameter of the model"),
        (dict(kw=dict()), "exactly one of steps= or epochs="),
        (dict(kw=dict(steps=3, epochs=2)), "exactly one of steps= or epochs="),
        (dict(kw=dict(steps=3, batch_size=0)), "batch_size"),
        (dict(kw=dict(steps=3, normalization="mean")), "normalization"),
        (dict(kw=dict(steps=3, lr_schedule=0.5)), "lr_schedule"),
        (dict(model=nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Dropout(0.5)).double()), "Dropout"),
        (dict(model=nn.Sequential(nn.Linear(D_IN, D_OUT), nn.BatchNorm1d(D_OUT)).double()), "BatchNorm1d"),
    ]
    for case, msg in cases:
        m = case.get("model", model)
        opt = case.get("opt") or torch.optim.SGD(m.parameters(), lr=0.1)
        kw = case.get("kw", dict(steps=3))
        with pytest.raises((ValueError, TypeError), match=msg) as e:
            Task.from_module(m, case.get("data", (X, y)), case.get("loss", ce), opt, **kw)
        assert "\n" not in str(e.value), str(e.value)
    used = sgd()
    model(X).sum().backward()
    used.step()
    with pytest.raises(ValueError, match="already taken steps"):
        Task.from_module(model, (X, y), ce, used, steps=3)


def test_standard_adam_is_flagged_with_the_fix():
    model, (X, y) = mlp(), data()
    with pytest.warns(FromModuleWarning, match="eps_inside_sqrt=True"):
        Task.from_module(model, (X, y), ce, torch.optim.Adam(model.parameters(), lr=0.01), steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FromModuleWarning)
        Task.from_module(model, (X, y), ce, Adam(0.01, eps_inside_sqrt=True), steps=2)


# -- ring runs ----------------------------------------------------------------------------------------


def test_ring_run_matches_finite_differences_of_retraining():
    """Degree-2 exact series of a test loss after deleting D with weight t, against a 5-point stencil
    on real retraining at t = 0, +-h, +-2h."""
    model, (X, y) = mlp(), data()
    Xt, yt = data(seed=9, n=4)
    task = Task.from_module(model, (X, y), ce, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                            epochs=2, batch_size=8, shuffle_seed=1)
    delete = [2, 11, 19]
    probe = lambda p: ce(task.forward(p, Xt), yt).mean()
    res = exact_series(task, delete, 2, probe)
    h = 1e-2
    f = {t: float(probe(retrain(task, delete, weight=t))) for t in (-2 * h, -h, 0.0, h, 2 * h)}
    d1 = (f[-2 * h] - 8 * f[-h] + 8 * f[h] - f[2 * h]) / (12 * h)
    d2 = (-f[2 * h] + 16 * f[h] - 30 * f[0.0] + 16 * f[-h] - f[-2 * h]) / (12 * h * h)
    c = res.coefficients
    assert abs(c[0] - f[0.0]) < 1e-12
    assert abs(c[1]) > 1e-4 and abs(c[2]) > 1e-5
    assert abs(c[1] - d1) < 1e-8 * max(1, abs(d1))
    assert abs(c[2] - d2 / 2) < 1e-6 * max(1, abs(d2))
