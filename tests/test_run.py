import pytest
import torch

from delsketch.training.optim import SGD, Adam
from delsketch.training import NonFiniteError, Task, deletion_weights, retrain, train

pytestmark = pytest.mark.usefixtures("single_thread")

N = 6
X = torch.tensor(
    [[1.0, 0.5], [-0.3, 2.0], [0.7, -1.1], [1.5, 0.2], [-0.8, -0.4], [0.1, 1.3]], dtype=torch.float64
)
Y = torch.tensor([0.3, -1.0, 0.8, 1.2, -0.5, 0.9], dtype=torch.float64)


def _losses(params, idx):
    r = X[idx] @ params["a"] + params["c"] - Y[idx]
    return r * r


def tiny_task(schedule=None, optimizer=None, normalization="fixed", losses=_losses, n=N):
    return Task(
        name="tiny",
        n=n,
        init_params=lambda: {
            "a": torch.tensor([0.2, -0.1], dtype=torch.float64),
            "c": torch.tensor(0.05, dtype=torch.float64),
        },
        example_losses=losses,
        schedule=schedule if schedule is not None else [[0, 1, 2], [3, 4, 5], [1, 3, 5], [0, 2, 4]],
        optimizer=optimizer if optimizer is not None else SGD(0.1),
        normalization=normalization,
        config={"what": "tiny least squares"},
        examples=[[*x, y] for x, y in zip(X.tolist(), Y.tolist())],
    )


def _hand_step(a, c, idx, weights, denom, lr):
    """One SGD step of sum_i weights_i (x_i.a + c - y_i)^2 / denom, gradients by hand."""
    ga = torch.zeros(2, dtype=torch.float64)
    gc = torch.tensor(0.0, dtype=torch.float64)
    for i, wt in zip(idx, weights):
        r = X[i] @ a + c - Y[i]
        ga = ga + wt * 2 * r * X[i] / denom
        gc = gc + wt * 2 * r / denom
    return a - lr * ga, c - lr * gc


@pytest.mark.parametrize("normalization", ["fixed", "renormalized"])
def test_normalization_by_hand(normalization):
    task = tiny_task(normalization=normalization)
    w = torch.tensor([0.5, 0.0, 1.0, 0.25, -0.5, 0.0], dtype=torch.float64)
    got = train(task, w=w, steps=2)
    p = task.init_params()
    a, c = p["a"], p["c"]
    for s in range(2):
        idx = task.schedule[s]
        weights = [1 - w[i].item() for i in idx]
        denom = len(idx) if normalization == "fixed" else sum(weights)
        a, c = _hand_step(a, c, idx, weights, denom, 0.1)
    assert torch.allclose(got["a"], a, rtol=1e-14, atol=1e-15)
    assert torch.allclose(got["c"], c, rtol=1e-14, atol=1e-15)


def test_plain_equals_zero_weights_bitwise():
    for norm in ("fixed", "renormalized"):
        task = tiny_task(optimizer=Adam(0.05, eps=1e-3, eps_inside_sqrt=True), normalization=norm)
        a = train(task)
        b = train(task, w=torch.zeros(N, dtype=torch.float64))
        for k in a:
            assert torch.equal(a[k], b[k])


def test_renormalized_all_deleted_batch_is_a_zero_step():
    task = tiny_task(normalization="renormalized")
    w = deletion_weights(N, [0, 1, 2])  # the whole first batch
    got = train(task, w=w, steps=1)
    init = task.init_params()
    for k in got:
        assert torch.equal(got[k], init[k])


def test_deletion_equals_removal_sgd_single_example_batches():
    """fixed normalization, batches of one, plain SGD with a constant lr: a deleted example's step
    has exactly zero gradient, so p - lr * 0 == p and the run equals training on the schedule
    without D's steps, bit for bit."""
    order = [0, 3, 1, 5, 2, 4, 3, 0, 5, 1]
    D = [1, 4]
    full = tiny_task(schedule=[[i] for i in order])
    removed = tiny_task(schedule=[[i] for i in order if i not in D])
    a = retrain(full, D)
    b = train(removed)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_deletion_with_stateful_optimizer_is_a_zero_gradient_step():
    """With Adam (or momentum) a deleted example's step still advances the optimizer: moments
    decay and the lr schedule moves on, so it is *not* the same as dropping the step.  What holds
    exactly: it equals a run in which D's examples have loss identically zero."""
    order = [0, 3, 1, 5, 2, 4, 3, 0, 5, 1]
    D = [1, 4]
    opt = Adam(0.05, betas=(0.85, 0.99), eps=1e-3, eps_inside_sqrt=True)
    mask = torch.tensor([0.0 if i in D else 1.0 for i in range(N)], dtype=torch.float64)

    def masked_losses(params, idx):
        return _losses(params, idx) * mask[idx]

    full = tiny_task(schedule=[[i] for i in order], optimizer=opt)
    zeroed = tiny_task(schedule=[[i] for i in order], optimizer=opt, losses=masked_losses)
    removed = tiny_task(schedule=[[i] for i in order if i not in D], optimizer=opt)
    a = retrain(full, D)
    b = train(zeroed)
    c = train(removed)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.allclose(a["a"], c["a"], rtol=1e-6, atol=0)


def test_retrain_fractional_weight_and_helper():
    task = tiny_task()
    w = deletion_weights(N, [2, 5], 0.5)
    assert w.tolist() == [0, 0, 0.5, 0, 0, 0.5]
    a = retrain(task, [5, 2, 2], weight=0.5)
    b = train(task, w=w)
    for k in a:
        assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError):
        deletion_weights(N, [6])


def test_determinism_and_returned_tensors():
    task = tiny_task(optimizer=Adam(0.05, eps_inside_sqrt=True, eps=1e-3))
    w = torch.tensor([0.1, 0.9, 0.0, 0.3, 0.0, 1.0], dtype=torch.float64)
    a = train(task, w=w)
    b = train(task, w=w)
    for k in a:
        assert torch.equal(a[k], b[k])
        assert not a[k].requires_grad
        assert a[k].dtype == torch.float64
    assert task.fingerprint() == tiny_task(optimizer=Adam(0.05, eps_inside_sqrt=True, eps=1e-3)).fingerprint()
    assert task.fingerprint() != tiny_task(optimizer=Adam(0.04, eps_inside_sqrt=True, eps=1e-3)).fingerprint()


def test_steps_params_and_callback():
    task = tiny_task()
    seen = []
    p2 = train(task, steps=2, callback=lambda s, loss: seen.append((s, float(loss))))
    assert [s for s, _ in seen] == [0, 1]
    # continuing from given params restarts the schedule at step 0
    p = train(task, params=p2, steps=1)
    q = train(task, steps=1)
    assert not torch.equal(p["a"], q["a"])
    assert train(task, steps=0)["c"].item() == task.init_params()["c"].item()
    with pytest.raises(ValueError):
        train(task, steps=5)
    with pytest.raises(ValueError):
        train(task, w=torch.zeros(N + 1, dtype=torch.float64))


def test_non_finite_errors():
    def overflow_loss(params, idx):
        return (params["c"] * 1e308 * 1e10 + 0 * params["a"].sum()).expand(len(idx))

    with pytest.raises(NonFiniteError, match="step 0: loss is not finite"):
        train(tiny_task(losses=overflow_loss))

    def steep(params, idx):
        return (1e200 * params["c"] ** 2 + 0 * params["a"].sum()).expand(len(idx))

    with pytest.raises(NonFiniteError, match="step 0: parameter 'c' is not finite"):
        train(tiny_task(losses=steep, optimizer=SGD(1e200)), check_every=1)
    # by default parameters are checked every 50 steps; the next step's loss stops the run
    with pytest.raises(NonFiniteError, match="step 1: loss is not finite"):
        train(tiny_task(losses=steep, optimizer=SGD(1e200)))
    # unchecked runs go through
    train(tiny_task(losses=steep, optimizer=SGD(1e200)), steps=1, check_finite=False)


def test_bad_loss_shape():
    with pytest.raises(ValueError, match="per-example losses"):
        train(tiny_task(losses=lambda p, idx: _losses(p, idx).sum()))


def test_task_validation():
    with pytest.raises(ValueError, match="normalization"):
        tiny_task(normalization="mean")
    with pytest.raises(ValueError):
        tiny_task(schedule=[[0, 6]])
    with pytest.raises(ValueError):
        tiny_task(schedule=[[]])
    t = tiny_task()
    with pytest.raises(ValueError):
        t.select("class:1")
    with pytest.raises(ValueError):
        t.validate_query("x")
