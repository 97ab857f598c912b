"""``digits``: a small MLP on scikit-learn's bundled 8x8 handwritten digits.

Data: ``sklearn.datasets.load_digits`` (1,797 images, 64 features with values 0..16, scaled to
[0, 1] by dividing by 16); a fixed split from ``numpy.random.RandomState(seed).permutation``:
the first ``n_train`` (500) indices train, the next ``n_test`` (100) test.

Model: MLP 64 -> ``hidden`` (32) -> 10 with a smooth activation (``tanh`` default, or exact
``gelu``), per-example cross-entropy.  Parameters ``fc1.weight [hidden, 64], fc1.bias,
fc2.weight [10, hidden], fc2.bias``; weights drawn with ``random.Random(seed).gauss(0, 1/sqrt(fan_in))``
row by row, biases zero.

Training (default, minibatch): ``batch`` = 32 examples per step, a fresh seeded shuffle of the
training set each epoch (``random.Random(seed + 1)``), the last short batch kept (16 steps per
epoch for 500 examples), ``epochs`` = 3, i.e. 48 steps.  Full-batch variant: ``batch=None``, every
step uses all training examples, ``steps`` default 100.  ``steps`` overrides the number of steps
either way (more epochs are generated as needed).

Optimizer: SGD with momentum 0.9, lr 0.1, constant schedule (``optimizer="sgd"``, the default:
its update is a polynomial in the gradients, so ring runs are analytic everywhere), or the
paper's Adam with eps 1e-3 inside the sqrt (``optimizer="adam"``, lr 0.01, betas (0.85, 0.99),
linear decay).

Queries: ``test:K`` (cross-entropy of test example K), ``train:K`` (of training example K),
``test:mean`` (mean test cross-entropy).  Predicates: ``class:C`` (training examples with label C).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from ..training.optim import SGD, Adam, Optimizer, constant, linear_decay
from ..training import Task

__all__ = ["build", "MLP"]

ACTIVATIONS = ("tanh", "gelu")


class MLP(nn.Module):
    """``64 -> hidden -> 10`` with a smooth activation; returns logits."""

    def __init__(self, n_in: int = 64, hidden: int = 32, n_out: int = 10, activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (choose from: {', '.join(ACTIVATIONS)})")
        self.fc1 = nn.Linear(n_in, hidden, dtype=torch.float64)
        self.fc2 = nn.Linear(hidden, n_out, dtype=torch.float64)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = torch.tanh(h) if self.activation == "tanh" else nn.functional.gelu(h, approximate="none")
        return self.fc2(h)


def _cross_entropy(model: nn.Module, params, x: Tensor, y: Tensor) -> Tensor:
    logits = functional_call(model, params, (x,))
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def build(data: str | None = None, steps: int | None = None, n_train: int = 500, n_test: int = 100,
          hidden: int = 32, activation: str = "tanh", batch: int | None = 32, epochs: int = 3,
          optimizer: str = "sgd", lr: float | None = None, momentum: float = 0.9, seed: int = 0,
          normalization: str = "fixed") -> Task:
    if data is not None:
        raise ValueError("the 'digits' preset uses scikit-learn's bundled digits and takes no data file")
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    total = len(Y)
    n_train, n_test = int(n_train), int(n_test)
    if n_train <= 0 or n_test < 0 or n_train + n_test > total:
        raise ValueError(f"need n_train > 0, n_test >= 0 and n_train + n_test <= {total}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (choose from: {', '.join(ACTIVATIONS)})")
    perm = np.random.RandomState(int(seed)).permutation(total)
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    Xtr = torch.tensor(X[tr] / 16.0, dtype=torch.float64)
    Ytr = torch.tensor(Y[tr], dtype=torch.long)
    Xte = torch.tensor(X[te] / 16.0, dtype=torch.float64)
    Yte = torch.tensor(Y[te], dtype=torch.long)
    train_labels = [int(v) for v in Y[tr]]

    # ---- schedule
    if batch is None:
        steps = 100 if steps is None else int(steps)
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        schedule = [list(range(n_train)) for _ in range(steps)]
    else:
        batch = int(batch)
        if not 1 <= batch <= n_train:
            raise ValueError(f"batch must lie in [1, {n_train}] (or None for full batch), got {batch}")
        per_epoch = math.ceil(n_train / batch)
        steps = int(epochs) * per_epoch if steps is None else int(steps)
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        rng = random.Random(int(seed) + 1)
        schedule = []
        while len(schedule) < steps:
            order = list(range(n_train))
            rng.shuffle(order)
            schedule += [order[i : i + batch] for i in range(0, n_train, batch)]
        schedule = schedule[:steps]

    # ---- optimizer
    opt: Optimizer
    if optimizer == "sgd":
        lr = 0.1 if lr is None else float(lr)
        opt = SGD(lr=lr, momentum=float(momentum), schedule=constant())
    elif optimizer == "adam":
        lr = 0.01 if lr is None else float(lr)
        opt = Adam(lr=lr, betas=(0.85, 0.99), eps=1e-3, eps_inside_sqrt=True, schedule=linear_decay(steps))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (choose from: sgd, adam)")

    # ---- model and init
    hidden = int(hidden)
    model = MLP(64, hidden, 10, activation)
    init_rng = random.Random(int(seed))
    init: dict[str, Tensor] = {}
    for name, (nout, nin) in (("fc1", (hidden, 64)), ("fc2", (10, hidden))):
        std = 1.0 / math.sqrt(nin)
        init[f"{name}.weight"] = torch.tensor(
            [[init_rng.gauss(0, std) for _ in range(nin)] for _ in range(nout)], dtype=torch.float64
        )
        init[f"{name}.bias"] = torch.zeros(nout, dtype=torch.float64)

    def init_params() -> dict[str, Tensor]:
        return {k: v.clone() for k, v in init.items()}

    def example_losses(params, idx: Tensor) -> Tensor:
        return _cross_entropy(model, params, Xtr[idx], Ytr[idx])

    # ---- queries
    def _parse(q: str) -> tuple[str, int | None]:
        if not isinstance(q, str):
            raise ValueError("a query is a string such as 'test:17', 'train:3' or 'test:mean'")
        kind, sep, arg = q.partition(":")
        if not sep or kind not in ("test", "train"):
            raise ValueError(f"bad query {q!r} (use test:K, train:K or test:mean)")
        if kind == "test" and arg == "mean":
            if n_test == 0:
                raise ValueError("test:mean needs n_test > 0")
            return kind, None
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"bad query {q!r}: {arg!r} is not an integer index") from None
        size = n_test if kind == "test" else n_train
        if not 0 <= k < size:
            raise ValueError(f"bad query {q!r}: index must lie in [0, {size})")
        return kind, k

    def validate_query(q: str) -> None:
        _parse(q)

    def query(params, q: str) -> Tensor:
        kind, k = _parse(q)
        if k is None:
            return _cross_entropy(model, params, Xte, Yte).mean()
        X_, Y_ = (Xte, Yte) if kind == "test" else (Xtr, Ytr)
        return _cross_entropy(model, params, X_[k : k + 1], Y_[k : k + 1])[0]

    def select(predicate: str) -> list[int]:
        kind, sep, arg = predicate.partition(":")
        if kind != "class" or not sep:
            raise ValueError(f"unknown predicate {predicate!r} (use class:C with C in 0..9)")
        try:
            c = int(arg)
        except ValueError:
            raise ValueError(f"bad predicate {predicate!r}: {arg!r} is not a class label") from None
        if not 0 <= c <= 9:
            raise ValueError(f"bad predicate {predicate!r}: class must lie in 0..9")
        return [i for i, lab in enumerate(train_labels) if lab == c]

    examples = [
        {"label": int(Y[j]), "image": [int(v) for v in X[j]], "source_index": int(j)} for j in tr
    ]
    config = {
        "preset": "digits",
        "data": f"sklearn.datasets.load_digits ({total} images)",
        "split": {"seed": int(seed), "n_train": n_train, "n_test": n_test,
                  "test_source_indices": [int(j) for j in te]},
        "model": {"kind": "mlp", "sizes": [64, hidden, 10], "activation": activation},
        "batch": batch,
        "epochs": int(epochs) if batch is not None else None,
        "steps": steps,
        "normalization": normalization,
        "seed": int(seed),
    }
    return Task(
        name="digits",
        n=n_train,
        init_params=init_params,
        example_losses=example_losses,
        schedule=schedule,
        optimizer=opt,
        normalization=normalization,
        query=query,
        validate_query=validate_query,
        select=select,
        examples=examples,
        config=config,
        query_help="test:K | train:K (cross-entropy of that example) | test:mean (mean test cross-entropy)",
        select_help="class:C (training examples with label C, 0..9)",
        default_queries=["test:0", "test:1", "test:mean"],
        model=model,
    )

