"""Retraining references for several requests at once, farmed out to worker processes.

Each worker rebuilds the task from a picklable ``task_factory`` (e.g. :func:`delsketch.tasks.factory`), checks
its fingerprint against the parent's, and retrains without one forget set per job (one torch thread per
worker). Retraining is deterministic, so the parameters are the same bytes as a serial
:func:`delsketch.training.retrain`."""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from ..training import Task, retrain
from .access import UnlearnError

__all__ = ["retrain_many", "references"]

_WORKER: dict = {}


def _init(task_factory: Callable[[], Task], fingerprint: str) -> None:
    torch.set_num_threads(1)
    task = task_factory()
    _WORKER.update(task=task, error=None if task.fingerprint() == fingerprint else
                   "a worker rebuilt a different task from task_factory")


def _job(forget: list) -> tuple:
    if _WORKER["error"]:
        raise UnlearnError(_WORKER["error"])
    t0 = time.perf_counter()
    p = retrain(_WORKER["task"], forget)
    return p, time.perf_counter() - t0


def retrain_many(task: Task, forget_sets: Sequence[Sequence[int]], task_factory: Optional[Callable[[], Task]] = None,
                 workers: int = 1) -> list[tuple[dict, float]]:
    """``[(retrained params, seconds)]`` for each forget set; in ``workers`` spawned processes when a
    ``task_factory`` is given and ``workers > 1``, else in this process."""
    sets = [sorted({int(i) for i in D}) for D in forget_sets]
    if workers <= 1 or task_factory is None or len(sets) < 2:
        out = []
        for D in sets:
            t0 = time.perf_counter()
            out.append((retrain(task, D), time.perf_counter() - t0))
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    fp = task.fingerprint()
    if task_factory().fingerprint() != fp:
        raise UnlearnError("task_factory does not rebuild this task (fingerprints differ)")
    with ProcessPoolExecutor(min(workers, len(sets)), mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(task_factory, fp)) as ex:
        return list(ex.map(_job, sets))


def references(task: Task, forget_sets: Sequence[Sequence[int]], *, task_factory=None, workers: int = 1,
               original: Optional[dict] = None, **kwargs) -> list:
    """One retraining :class:`~delsketch.unlearn.verify.Reference` per forget set, the retrainings farmed out
    (see :func:`retrain_many`); ``kwargs`` go to :func:`delsketch.unlearn.verify.reference`."""
    from ..training import train
    from .verify import reference

    if original is None:
        original = train(task)
    done = retrain_many(task, forget_sets, task_factory, workers)
    return [reference(task, D, original=original, retrained=(p, s), **kwargs) for D, (p, s) in zip(forget_sets, done)]
