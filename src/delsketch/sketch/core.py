"""The pieces every part of the sketch layer shares: errors, directions, ring runs, evaluating outputs."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from .. import _alloc
from .. import series as taylor
from ..training import Task, train
from ..training.outputs import as_output

FORMAT = "delsketch-sketch/1"
Query = Union[str, Callable[[dict], torch.Tensor]]


class SketchError(ValueError):
    """A sketch directory is missing, corrupt, or does not match the task."""


class RecoveryWarning(UserWarning):
    """A damaged or unverifiable file of a sketch is being recomputed (the result equals a clean run)."""


class StabilityWarning(UserWarning):
    """A prediction goes past the deletion size the stability diagnostics consider safe."""

# ----------------------------------------------------------------------------------------------
# directions
# ----------------------------------------------------------------------------------------------


def direction(seed: int, index: int, n: int) -> torch.Tensor:
    """Direction ``index`` of a sketch: complex Gaussian in C^n normalized to unit length.

    Generated from (seed, index) alone, so any direction can be regenerated independently."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), 0x5E7C])))
    z = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    z /= np.linalg.norm(z)
    return torch.from_numpy(z.astype(np.complex128))


def directions(seed: int, indices: Iterable[int], n: int) -> torch.Tensor:
    return torch.stack([direction(seed, j, n) for j in indices])


def weight_series(psi: torch.Tensor, degree: int) -> taylor.Series:
    """``w = z psi`` as a Series of logical shape [n]: psi is [m, n] complex."""
    m, n = psi.shape
    c = torch.zeros(m, degree + 1, n, dtype=torch.complex128)
    if degree >= 1:
        c[:, 1] = psi
    return taylor.variable(c)


def ring_train(task: Task, w: taylor.Series, steps: Optional[int] = None, callback=None, device=None) -> dict:
    """One ring run: train the task with series weights ``w`` (parameters start as constants). ``device``: run
    it there (see :func:`delsketch.training.train`); the returned series live on that device."""
    params0 = {k: taylor.lift(v, w.degree) for k, v in task.init_params().items()}
    # freed series blocks are reused from step to step; the collector walks only what the run makes
    with _alloc.heap_cache(), _alloc.frozen_gc(), taylor.module_context():
        return train(task, w=w, params=params0, steps=steps, callback=callback, device=device)


def evaluate(task: Task, params: dict, query) -> torch.Tensor:
    """The value of an output on (possibly series-valued) parameters, in the output's own shape."""
    out = as_output(task, query)
    with torch.no_grad():
        value = out.value(params)
    out._learn(value)  # checks it is a Tensor or a dict of Tensors
    return value


def query_name(q: Query) -> str:
    return q if isinstance(q, str) else getattr(q, "__name__", "query")

