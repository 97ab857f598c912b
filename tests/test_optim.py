import math

import pytest
import torch

from delsketch.training import optim
from delsketch.training.optim import SGD, Adam, AdamW

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 7


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
    }
    # one gradient per step, some entries exactly zero (as for unused embedding rows)
    grads = []
    for s in range(STEPS):
        gs = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        gs["w"][0] = 0.0
        grads.append(gs)
    return params, grads


def _run_ours(opt, params, grads):
    state = opt.init(params)
    p = dict(params)
    for s, gs in enumerate(grads):
        p, state = opt.step(p, gs, state, s)
    return p


def _run_torch(cls, params, grads, **kw):
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = cls(list(ps.values()), foreach=False, **kw)
    for gs in grads:
        for k, v in ps.items():
            v.grad = gs[k].clone()
        opt.step()
    return {k: v.detach() for k, v in ps.items()}


def _close(a, b, tol=1e-12):
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=tol, atol=tol), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, weight_decay=0.01),
        dict(momentum=0.8, nesterov=True),
        dict(momentum=0.8, nesterov=True, weight_decay=0.05),
    ],
)
def test_sgd_matches_torch(kw):
    params, grads = _problem()
    ours = _run_ours(SGD(0.1, **kw), params, grads)
    ref = _run_torch(torch.optim.SGD, params, grads, lr=0.1, **kw)
    _close(ours, ref)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1), dict(betas=(0.85, 0.99), eps=1e-3)])
def test_adam_matches_torch(kw):
    params, grads = _problem(1)
    ours = _run_ours(Adam(0.01, **kw), params, grads)
    ref = _run_torch(torch.optim.Adam, params, grads, lr=0.01, **kw)
    _close(ours, ref)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, betas=(0.8, 0.95))])
def test_adamw_matches_torch(kw):
    params, grads = _problem(2)
    ours = _run_ours(AdamW(0.01, **kw), params, grads)
    ref = _run_torch(torch.optim.AdamW, params, grads, lr=0.01, **kw)
    _close(ours, ref)


def test_adam_eps_inside_matches_hand_formula():
    params, grads = _problem(3)
    lr, b1, b2, eps, S = 0.01, 0.85, 0.99, 1e-3, 10
    opt = Adam(lr, betas=(b1, b2), eps=eps, eps_inside_sqrt=True, schedule=optim.linear_decay(S))
    ours = _run_ours(opt, params, grads)
    # scalar by scalar, in Python floats, as the reference does it
    for name, p0 in params.items():
        flat = p0.reshape(-1).tolist()
        for j in range(len(flat)):
            p, m, v = flat[j], 0.0, 0.0
            for s, gs in enumerate(grads):
                g = gs[name].reshape(-1)[j].item()
                lr_t = lr * (1 - s / S)
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g**2
                m_hat = m / (1 - b1 ** (s + 1))
                v_hat = v / (1 - b2 ** (s + 1))
                p -= lr_t * m_hat / (v_hat + eps) ** 0.5
            assert math.isclose(ours[name].reshape(-1)[j].item(), p, rel_tol=1e-12, abs_tol=1e-15)


def test_adamw_eps_inside_and_decay_by_hand():
    params, grads = _problem(4)
    lr, wd, eps = 0.05, 0.1, 1e-3
    opt = AdamW(lr, betas=(0.9, 0.99), eps=eps, eps_inside_sqrt=True, weight_decay=wd)
    ours = _run_ours(opt, params, grads)
    for name in params:
        p = params[name].clone()
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        for s, gs in enumerate(grads):
            g = gs[name]
            m = 0.9 * m + 0.1 * g
            v = 0.99 * v + 0.01 * g * g
            p = p * (1 - lr * wd) - lr * (m / (1 - 0.9 ** (s + 1))) / torch.sqrt(v / (1 - 0.99 ** (s + 1)) + eps)
        assert torch.allclose(ours[name], p, rtol=1e-12, atol=1e-15)


def test_sgd_schedule_applied_by_hand():
    params, grads = _problem(5)
    sched = optim.warmup(2, then=optim.cosine(5, final=0.1))
    ours = _run_ours(SGD(0.3, schedule=sched), params, grads)
    for name in params:
        p = params[name].clone()
        for s, gs in enumerate(grads):
            p = p - 0.3 * sched(s) * gs[name]
        assert torch.equal(ours[name], p)


def test_schedules_values_and_describe():
    assert optim.constant()(123) == 1.0
    ld = optim.linear_decay(1000)
    assert ld(0) == 1.0 and ld(500) == 0.5 and ld(999) == 1 - 999 / 1000
    c = optim.cosine(10, final=0.2)
    assert c(0) == pytest.approx(1.0) and c(10) == pytest.approx(0.2) and c(20) == pytest.approx(0.2)
    assert c(5) == pytest.approx(0.6)
    wu = optim.warmup(4, then=optim.linear_decay(10))
    assert [wu(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert wu(4) == 1.0 and wu(9) == 0.5
    for s in (optim.constant(), ld, c, wu):
        rebuilt = optim.schedule_from_config(s.describe())
        assert rebuilt.describe() == s.describe()
        assert [rebuilt(k) for k in range(12)] == [s(k) for k in range(12)]


def test_describe_roundtrip_and_json():
    import json

    for opt in (
        SGD(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule=optim.cosine(100)),
        Adam(0.01, betas=(0.85, 0.99), eps=1e-3, eps_inside_sqrt=True, schedule=optim.linear_decay(1000)),
        AdamW(0.002, weight_decay=0.05, schedule=optim.warmup(10, optim.linear_decay(90))),
    ):
        d = opt.describe()
        assert json.loads(json.dumps(d)) == d
        assert optim.optimizer_from_config(d).describe() == d
    with pytest.raises(ValueError):
        optim.optimizer_from_config({"name": "rmsprop", "lr": 1.0})


def test_step_is_out_of_place_and_without_grad():
    params, grads = _problem(6)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    for opt in (SGD(0.1, momentum=0.9, weight_decay=0.1), Adam(0.1, eps_inside_sqrt=True), AdamW(0.1)):
        state = opt.init(params)
        state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}
        new, new_state = opt.step(params, grads[0], state, 0)
        for k in params:
            assert torch.equal(params[k].detach(), before[k])
            assert not new[k].requires_grad
            assert new[k].dtype == torch.float64
        for k, v in state.items():
            for n, t in v.items():
                assert torch.equal(t, state_before[k][n])
        assert set(new_state) == set(state)


def test_eps_inside_finite_at_zero_gradient():
    # a parameter whose gradient is always exactly zero stays put, with no 0/0
    p = {"a": torch.ones(3, dtype=torch.float64)}
    g = {"a": torch.zeros(3, dtype=torch.float64)}
    for opt in (Adam(0.1, eps_inside_sqrt=True, eps=1e-3), Adam(0.1)):
        new, _ = opt.step(p, g, opt.init(p), 0)
        assert torch.equal(new["a"], p["a"])


def test_bad_arguments():
    with pytest.raises(ValueError):
        SGD(0.1, nesterov=True)
    with pytest.raises(ValueError):
        Adam(0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        optim.linear_decay(0)
    with pytest.raises(KeyError):
        p = {"a": torch.ones(1, dtype=torch.float64)}
        SGD(0.1).step(p, {"b": torch.ones(1, dtype=torch.float64)}, {}, 0)
