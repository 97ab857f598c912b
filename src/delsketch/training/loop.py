"""Executing a training run, generic over the arithmetic.

A :class:`Task` bundles everything that determines a training run: initial parameters, the batch
schedule, per-example losses, the optimizer and the normalization of the weighted batch loss.
:func:`train` executes it.  Example ``i`` carries the loss weight ``1 - w_i``:

* ``w=None`` - plain training (all weights 1);
* ``w`` a float64 tensor of shape ``[n]`` - a real (re)training run, e.g. ``w = 1_D`` deletes D;
* ``w`` a :class:`delsketch.series.Series` of logical shape ``[n]`` - a ring run, in which the
  parameters become truncated power series in the weights.

The training loop only uses ``w[idx]``, ``1 - x``, ``*``, ``.sum()``, ``/`` and ``torch.where`` on
``w`` and ordinary out-of-place tensor arithmetic elsewhere, so one loop serves all three.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..series import all_finite, coefficients, is_series
from .optim import differentiable
from .task import NORMALIZATIONS, NonFiniteError, Params, Task

__all__ = ["train", "retrain", "deletion_weights", "batch_loss", "DivergenceError", "DIVERGENCE_FACTOR"]


def batch_loss(losses: Tensor, w: Optional[Tensor], idx: Tensor, normalization: str) -> Tensor:
    """The weighted batch loss of one step (see :class:`Task` for the two normalizations)."""
    b = losses.shape[0]
    if w is None:
        return losses.sum() / b
    weights = 1 - w[idx]
    total = (losses * weights).sum()
    if normalization == "fixed":
        return total / b
    if normalization == "renormalized":
        denom = weights.sum()
        # an all-deleted batch has total == 0 exactly; divide by 1 instead of 0
        denom = torch.where(denom == 0, 1.0, denom)
        return total / denom
    raise ValueError(f"unknown normalization {normalization!r} (choose from: {', '.join(NORMALIZATIONS)})")


def _fresh_leaves(params: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def _batch_gradient(task: Task, params: Params, names: list, w: Optional[Tensor], idx: Tensor,
                    record: bool) -> tuple[Tensor, Params]:
    """The default step gradient: that of the weighted batch loss."""
    with torch.enable_grad():
        losses = task.example_losses(params, idx)
        if tuple(losses.shape) != (len(idx),):
            raise ValueError(
                f"task {task.name!r}: example_losses must return per-example losses of shape "
                f"[{len(idx)}], got {list(losses.shape)}"
            )
        loss = batch_loss(losses, w, idx, task.normalization)
        grads_t = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True, create_graph=record)
    grads = {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, grads_t)}
    return loss, grads


def train(
    task: Task,
    w: Optional[Tensor] = None,
    params: Optional[Params] = None,
    steps: Optional[int] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
    check_finite: bool = True,
    check_every: int = 50,
    record: bool = False,
    device=None,
) -> Params:
    """Run steps ``0 .. steps-1`` of ``task.schedule`` and return the final parameters.

    ``w``: ``None`` (plain training), a float64 tensor ``[n]`` or a ``Series`` of logical shape
    ``[n]``; example ``i``'s loss is multiplied by ``1 - w_i``.
    ``params``: starting parameters (default ``task.init_params()``); the optimizer state always
    starts fresh at step 0.
    ``steps``: number of steps to run (default: the whole schedule).
    ``callback(step, loss)``: called after each step with the (detached) batch loss.
    ``check_finite``: after each step raise :class:`NonFiniteError` if the loss or a parameter
    is not finite, and :class:`DivergenceError` if the loss has grown by orders of magnitude
    (see :class:`_DivergenceCheck`).

    ``record``: keep the autograd graph of the whole run (the optimizer inside
    :func:`delsketch.training.optim.differentiable`), so the returned parameters are differentiable functions
    of ``w`` (reverse mode through training, :func:`delsketch.sketch.first_order`); memory grows with
    the run.

    ``device`` (e.g. ``"cuda"``): the parameters and ``w`` are moved there and the run executes inside
    ``torch.device(device)`` (tensors the task creates land there too); tensors the task's functions hold
    (data) must already be usable there. ``None``: where the parameters are (CPU for the presets).

    Returned parameters are detached float64 tensors (or Series) without ``requires_grad``, unless
    ``record``.
    """
    total = len(task.schedule)
    if steps is None:
        steps = total
    if not 0 <= steps <= total:
        raise ValueError(f"steps must lie in [0, {total}] for task {task.name!r}, got {steps}")
    if w is not None and tuple(w.shape) != (task.n,):
        raise ValueError(f"w must have shape [{task.n}], got {list(w.shape)}")
    if params is None:
        params = task.init_params()
    if device is not None:
        device = torch.device(device)
        params = {k: v.to(device) for k, v in params.items()}
        if w is not None:
            w = w.to(device)
    params = _fresh_leaves(params)
    names = list(params.keys())
    opt = task.optimizer
    state = opt.init(params)
    diverged = _DivergenceCheck()
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(device)
        if record:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(differentiable(opt))
        for s in range(steps):
            idx = torch.tensor(task.schedule[s], dtype=torch.long)
            if task.gradient is not None:
                loss, grads = task.gradient(params, task.example_losses, w, idx, s, create_graph=record)
                missing = [k for k in names if k not in grads]
                if missing:
                    raise ValueError(f"task {task.name!r}: its gradient transform returned no gradient for "
                                     f"{', '.join(map(repr, missing))}")
            else:
                loss, grads = _batch_gradient(task, params, names, w, idx, record)
            new_params, state = opt.step(params, grads, state, s)
            loss = loss.detach()
            if check_finite:
                # the loss every step (a non-finite parameter reaches the next loss); the parameters
                # every `check_every` steps and at the end, which names the parameter
                if not all_finite(loss):
                    raise NonFiniteError(f"step {s}: loss is not finite")
                diverged.check(s, loss)
                if (s + 1) % check_every == 0 or s == steps - 1:
                    for k in names:
                        if not all_finite(new_params[k]):
                            raise NonFiniteError(f"step {s}: parameter {k!r} is not finite")
            if record:
                if not any(p.requires_grad for p in new_params.values()):
                    raise TypeError(f"optimizer {type(opt).__name__} computes its update without autograd; recording "
                                    "needs a differentiable update (enter self._grad_mode() instead of torch.no_grad())")
                params = new_params
            else:
                params = _fresh_leaves(new_params)
            if callback is not None:
                callback(s, loss)
    return params if record else {k: v.detach() for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# divergence
# ----------------------------------------------------------------------------------------------

#: a run has diverged once a batch loss exceeds this multiple of max(|loss at step 0|, 1)
DIVERGENCE_FACTOR = 1e3


class DivergenceError(NonFiniteError):
    """The loss grew by orders of magnitude: training diverged (e.g. the learning rate is too large)."""


class _DivergenceCheck:
    """Flags a run whose loss grows by orders of magnitude, long before it overflows to inf/NaN.

    The reference is the batch loss of step 0 (the untrained model, before the optimizer has acted), floored
    at 1 so that a run starting at a loss near zero is not flagged for ordinary noise. A run has diverged at
    the first step whose |loss| exceeds ``DIVERGENCE_FACTOR`` (1e3) times that reference. Healthy runs stay
    far below: the largest ratio over every step of the built-in presets' runs (digits with SGD, Adam and full
    batch; names, 150 steps) is 1.14. For a ring run the check reads the degree-0 coefficient, which is the
    plain run's loss."""

    def __init__(self) -> None:
        self.reference: Optional[float] = None

    def check(self, step: int, loss: Tensor) -> None:
        value = float(coefficients(loss)[:, 0].abs().max()) if is_series(loss) else float(loss.abs())
        if self.reference is None:
            self.reference = max(value, 1.0)
        elif value > DIVERGENCE_FACTOR * self.reference:
            raise DivergenceError(
                f"training diverged at step {step}: loss {value:.3g} exceeds {DIVERGENCE_FACTOR:g} x {self.reference:.3g} "
                "(the loss at step 0, at least 1); lower the learning rate")


def deletion_weights(n: int, delete_idx: Sequence[int], weight: float = 1.0) -> Tensor:
    """The float64 vector ``weight * 1_D`` of length ``n``."""
    w = torch.zeros(n, dtype=torch.float64)
    idx = sorted(set(int(i) for i in delete_idx))
    for i in idx:
        if not 0 <= i < n:
            raise ValueError(f"deletion index {i} outside [0, {n})")
    if idx:
        w[torch.tensor(idx, dtype=torch.long)] = float(weight)
    return w


def retrain(
    task: Task,
    delete_idx: Sequence[int],
    weight: float = 1.0,
    steps: Optional[int] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
    check_finite: bool = True,
) -> Params:
    """Real retraining with ``w = weight * 1_D`` (``weight=1`` deletes ``D`` entirely)."""
    w = deletion_weights(task.n, delete_idx, weight)
    return train(task, w=w, steps=steps, callback=callback, check_finite=check_finite)

