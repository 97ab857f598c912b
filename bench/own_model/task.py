"""The benchmark's user-style task: a small SiLU MLP of the user's own on scikit-learn's breast-cancer table (a
dataset none of the presets use), built only through the public front door, as a user would.

``make(variant)`` returns ``(task, outputs, test)``; ``variant`` is ``"fullbatch"`` (SGD with momentum, full
batch, 150 steps) or ``"adam"`` (minibatch Adam, eps inside the square root, 8 epochs of batch 32).
Usable as ``--task bench/own_model/task.py:make_fullbatch`` from the CLI.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from delsketch import Adam, Task
from delsketch.training import outputs

N_TRAIN = 400
N_OUTPUTS = 30


def data():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    X = (X - X[order[:N_TRAIN]].mean(0)) / X[order[:N_TRAIN]].std(0)
    X, y = torch.from_numpy(X[order]), torch.from_numpy(y[order]).long()
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def loss_fn(out, t):
    return F.cross_entropy(out, t, reduction="none")


def make(variant: str = "fullbatch"):
    (X, y), (Xt, yt) = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2)).double()
    if variant == "fullbatch":
        task = Task.from_module(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                steps=150)
    elif variant == "adam":
        task = Task.from_module(model, (X, y), loss_fn, Adam(0.003, eps_inside_sqrt=True, eps=1e-4), epochs=8,
                                batch_size=32, shuffle_seed=0)
    else:
        raise ValueError(f"unknown variant {variant!r} (fullbatch | adam)")
    outs = {"test_losses": outputs.losses(task, Xt[:N_OUTPUTS], yt[:N_OUTPUTS], name="test_losses"),
            "test_loss": outputs.loss(task, Xt, yt, name="test_loss")}
    return task, outs, (Xt, yt)


def make_fullbatch():
    task, outs, _ = make("fullbatch")
    return task, outs


def make_adam():
    task, outs, _ = make("adam")
    return task, outs
