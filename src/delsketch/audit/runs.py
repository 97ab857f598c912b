"""Training many models: leave-one-out retrains and models on random halves (shadow models).

Every job is independent, so they all go through :func:`map_jobs`, which hands them to an executor
(:mod:`delsketch.executors`: in-process by default, local worker processes or Ray). A job is ``fn(task, *args)``
with a module-level ``fn``; executors that run jobs elsewhere rebuild the task with ``task_factory``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np
import torch

from ..executors import get_executor, map_stored
from ..training import Task, train
from ..training.loop import deletion_weights

__all__ = ["map_jobs", "half_masks", "train_with_members", "loo_params"]

T = TypeVar("T")


def map_jobs(fn: Callable[..., T], jobs: Iterable[tuple], progress: Optional[Callable[[int], None]] = None,
             task: Optional[Task] = None, executor=None, task_factory=None, store=None) -> list[T]:
    """``[fn(task, *job) for job in jobs]`` through ``executor`` (``None``: in this process; a name such as
    ``"process"``/``"ray"`` or a :class:`delsketch.executors.Executor`). Without ``task``: ``[fn(*job) ...]`` in
    this process. ``progress(finished)`` counts finished jobs. ``store`` (a directory): each job's result is
    written there as it finishes and a rerun skips the jobs whose verified result is present
    (:class:`delsketch.executors.ResultStore`)."""
    jobs = [tuple(j) for j in jobs]
    if task is None:
        out = []
        for k, job in enumerate(jobs):
            out.append(fn(*job))
            if progress is not None:
                progress(k + 1)
        return out
    finished = 0

    def on_result(k, r):
        nonlocal finished
        finished += 1
        if progress is not None:
            progress(finished)

    if store is not None:
        return map_stored(get_executor(executor), fn, jobs, store, task=task, factory=task_factory,
                          on_result=on_result)
    return get_executor(executor).map(fn, jobs, task=task, factory=task_factory, on_result=on_result)


def half_masks(n: int, models: int, seed: int) -> torch.Tensor:
    """``[models, n]`` bool: which examples each model trains on. Every example is IN exactly half the models
    (for even ``models``; the LiRA paper's balanced design): column i is a seeded permutation of half ones, half
    zeros, so IN/OUT sample sizes per example are equal."""
    if models < 2:
        raise ValueError(f"need at least 2 models on random halves, got {models}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0xA0D1])))
    base = np.arange(models) < (models + 1) // 2
    cols = np.stack([rng.permutation(base) for _ in range(n)], axis=1)
    return torch.from_numpy(cols)


def train_with_members(task: Task, members: torch.Tensor, steps: Optional[int] = None) -> dict:
    """Train with every non-member deleted (``w = 1`` outside ``members``): the same schedule and optimizer, the
    deleted examples' losses weighted 0 (so "training randomness" here is the subset only)."""
    w = (~members).to(torch.float64)
    return train(task, w=w, steps=steps)


def loo_params(task: Task, i: int, steps: Optional[int] = None) -> dict:
    return train(task, w=deletion_weights(task.n, [i]), steps=steps)


def check_indices(task: Task, indices: Optional[Sequence[int]]) -> list[int]:
    if indices is None:
        return list(range(task.n))
    out = []
    for i in indices:
        i = int(i)
        if not 0 <= i < task.n:
            raise ValueError(f"example index {i} out of range: the task has {task.n} training examples (0..{task.n - 1})")
        out.append(i)
    if not out:
        raise ValueError("no example indices given")
    return out
