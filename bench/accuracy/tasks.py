"""Benchmark tasks: the delsketch task, its queries, tensors for the peer libraries, structured deletion sets.

Every task is described by a :class:`BenchTask`:

* ``task``: the ``delsketch.run.Task`` (ground truth = ``delsketch.run.retrain`` of it);
* ``queries``: Q outputs (strings understood by ``task.query``), each the loss of one held-out example;
* ``train_x, train_y, test_x, test_y``: the same examples as plain tensors, and ``loss(params, x, y)``,
  a batched per-example loss (vmap-friendly) that reproduces ``task.example_losses`` / ``task.query``
  exactly - this is what the peer libraries see;
* ``groups``: structured deletion sets shared by all queries (a digit class, names sharing a first letter);
* ``neighbours(q, k)``: the k training examples most similar to the held-out example of query q.
"""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from delsketch.tasks import get_preset
from delsketch.training import Task, first_steps


@dataclass
class BenchTask:
    key: str  # benchmark name, e.g. "digits", "digits-fullbatch"
    task: Task
    queries: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    loss: Callable  # (params, x [B, ...], y [B, ...]) -> [B]
    model: nn.Module
    groups: dict[str, list[int]]
    neighbours: Callable[[int, int], list[int]]
    description: str
    training: dict = field(default_factory=dict)  # what the peers need to know about the run (lr, batch, ...)
    pool: list[int] = field(default_factory=list)  # deletion candidates: the examples the run visits
    spec: dict = field(default_factory=dict)  # the preset spec that rebuilds `task` (sketch worker processes)

    def __post_init__(self):
        if not self.pool:
            self.pool = sorted(set(i for b in self.task.schedule for i in b))


# ------------------------------------------------------------------------------------------------ digits


def digits_task(key: str, n_queries: int, batch, steps=None) -> BenchTask:
    from sklearn.datasets import load_digits

    task = get_preset("digits")(batch=batch, steps=steps)
    cfg = task.config
    X, Y = load_digits(return_X_y=True)
    perm = np.random.RandomState(cfg["split"]["seed"]).permutation(len(Y))
    n_train, n_test = cfg["split"]["n_train"], cfg["split"]["n_test"]
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    assert [int(j) for j in te] == cfg["split"]["test_source_indices"]
    assert [e["source_index"] for e in task.examples] == [int(j) for j in tr]
    Xtr = torch.tensor(X[tr] / 16.0, dtype=torch.float64)
    Ytr = torch.tensor(Y[tr], dtype=torch.long)
    Xte = torch.tensor(X[te] / 16.0, dtype=torch.float64)
    Yte = torch.tensor(Y[te], dtype=torch.long)
    model = task.model

    def loss(params, x, y):
        logits = functional_call(model, params, (x,))
        return -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    queries = [f"test:{k}" for k in range(n_queries)]
    groups = {f"class:{c}": task.select(f"class:{c}") for c in range(10)}

    def neighbours(qi: int, k: int) -> list[int]:
        d = ((Xtr - Xte[qi]) ** 2).sum(-1)
        return sorted(torch.argsort(d, stable=True)[:k].tolist())

    opt = task.optimizer.describe()
    desc = (f"digits preset: tanh MLP 64-32-10, {n_train} train / {n_test} test, SGD lr 0.1 momentum 0.9, "
            + (f"full batch, {task.steps} steps" if batch is None else f"batch {batch}, {task.steps} steps (3 epochs)"))
    return BenchTask(key, task, queries, Xtr, Ytr, Xte[:n_queries], Yte[:n_queries], loss, model, groups,
                     neighbours, desc,
                     training={"optimizer": opt, "lr": 0.1, "momentum": 0.9, "batch": batch or n_train,
                               "steps": task.steps, "n": n_train, "adam": False},
                     spec={"preset": "digits", "data": None, "steps": None, "preset_steps": steps, "batch": batch})


# ------------------------------------------------------------------------------------------------ names


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _text_tensors(corpus, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    T = corpus.block_size
    xs, ys = [], []
    for d in docs:
        x, y = corpus.encode(d)
        pad = T - len(x)
        xs.append(x + [corpus.bos] * pad)
        ys.append(y + [-1] * pad)  # -1: position not predicted
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


def text_task(key: str, preset: str, n_queries: int, data=None, steps=None, **overrides) -> BenchTask:
    task = get_preset(preset)(data=data, **overrides)
    if steps is not None:
        task = first_steps(task, steps)
    corpus = task.example_losses.__self__  # the TextCorpus behind the preset
    model = task.model
    train_docs = list(task.examples)
    # held-out queries: documents of the same source that are not training documents
    if preset == "names":
        from delsketch.tasks.names import census_names

        docs, _ = census_names()
        rng = random.Random(task.config["seed"])
        docs = list(docs)
        rng.shuffle(docs)
        held = docs[task.n:]
    else:  # paper: the documents after the first n of the preset's shuffle
        from delsketch.tasks.paper import SEED, load_docs

        docs, _ = load_docs(data)
        rng = random.Random(SEED)
        docs = list(docs)
        rng.shuffle(docs)
        held = docs[task.n:]
    seen = set(train_docs)
    queries = []
    for d in held:
        if d not in seen and d not in queries:
            queries.append(d)
        if len(queries) == n_queries:
            break
    Xtr, Ytr = _text_tensors(corpus, train_docs)
    Xte, Yte = _text_tensors(corpus, queries)

    def loss(params, x, y):
        logits = functional_call(model, params, (x,))
        logp = torch.log_softmax(logits, -1)
        mask = (y >= 0).to(logp.dtype)
        nll = -logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (nll * mask).sum(-1) / mask.sum(-1)

    # the examples the run actually visits (all of them, unless the run was cut with first_steps)
    visited = sorted(set(i for b in task.schedule for i in b))
    first = {}
    for i in visited:
        first.setdefault(train_docs[i][0], []).append(i)
    common = sorted(first, key=lambda c: (-len(first[c]), c))[:10]
    groups = {f"startswith:{c}": sorted(first[c]) for c in sorted(common)}

    def neighbours(qi: int, k: int) -> list[int]:
        q = queries[qi]
        d = [(_edit_distance(q, train_docs[i]), i) for i in visited]
        return sorted(i for _, i in sorted(d)[:k])

    steps_run = task.steps
    desc = (f"{preset} preset: microgpt (1 layer, 16-dim, 4 heads), {task.n} training names, batch 1, "
            f"{steps_run} steps, Adam (eps inside sqrt), linear lr decay")
    return BenchTask(key, task, queries, Xtr, Ytr, Xte, Yte, loss, model, groups, neighbours, desc,
                     training={"optimizer": task.optimizer.describe(), "lr": task.optimizer.describe().get("lr"),
                               "batch": 1, "steps": steps_run, "n": task.n, "adam": True},
                     spec={"preset": preset, "data": str(Path(data).resolve()) if data else None, "steps": steps,
                           **overrides})


def check_loss_consistency(bt: BenchTask) -> float:
    """Max |difference| between the peers' loss and the task's own per-example losses and queries."""
    p = bt.task.init_params()
    idx = torch.arange(min(bt.task.n, 40))
    a = bt.task.example_losses(p, idx)
    b = bt.loss(p, bt.train_x[idx], bt.train_y[idx])
    c = torch.stack([bt.task.query(p, q) for q in bt.queries])
    d = bt.loss(p, bt.test_x, bt.test_y)
    return float(max((a - b).abs().max(), (c - d).abs().max()))
