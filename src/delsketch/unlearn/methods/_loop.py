"""The small pieces the approximate methods share: a descent loop with delsketch's functional SGD, the KL
divergence between two models' outputs, and the default learning rate."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...series import all_finite
from ...training.optim import SGD
from ..access import UnlearnError

__all__ = ["descend", "kl", "default_lr"]


def default_lr(task, lr: Optional[float]) -> float:
    """``lr`` if given, else the task's own learning rate (its optimizer's ``lr``), else 0.01."""
    if lr is not None:
        return float(lr)
    return float(getattr(task.optimizer, "lr", 0.01))


def descend(params: dict, objective: Callable[[dict, int], Tensor], steps: int, lr: float, momentum: float = 0.9,
            method: str = "?", variables: Optional[list] = None) -> dict:
    """``steps`` steps of SGD (momentum ``momentum``) on ``objective(params, step)``; returns new parameters.
    ``variables``: the names to update (default all). A non-finite objective is a one-line error."""
    if steps < 0:
        raise UnlearnError(f"{method}: steps must be >= 0, got {steps}")
    if not lr > 0:
        raise UnlearnError(f"{method}: lr must be positive, got {lr}")
    names = list(params) if variables is None else list(variables)
    opt = SGD(lr=float(lr), momentum=float(momentum))
    cur = {k: v.detach() for k, v in params.items()}
    state = opt.init({k: cur[k] for k in names})
    for s in range(int(steps)):
        leaves = {k: (v.requires_grad_(True) if k in names else v) for k, v in
                  ((k, v.detach().clone()) for k, v in cur.items())}
        with torch.enable_grad():
            loss = objective(leaves, s)
            grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        if not all_finite(loss.detach()):
            raise UnlearnError(f"{method}: the objective became non-finite at step {s} (lower lr)")
        g = {k: (gr if gr is not None else torch.zeros_like(leaves[k])) for k, gr in zip(names, grads)}
        new, state = opt.step({k: leaves[k].detach() for k in names}, g, state, s)
        cur = {**cur, **{k: v.detach() for k, v in new.items()}}
    for k, v in cur.items():
        if not all_finite(v):
            raise UnlearnError(f"{method}: parameter {k!r} became non-finite (lower lr)")
    return cur


def kl(teacher_logits: Tensor, student_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Per-example KL(teacher || student) over the last axis; for ``[b, T, C]`` outputs, the mean over the
    positions where ``mask`` is 1."""
    lt = torch.log_softmax(teacher_logits, -1)
    ls = torch.log_softmax(student_logits, -1)
    d = (lt.exp() * (lt - ls)).sum(-1)
    if d.dim() == 1:
        return d
    if mask is None:
        return d.flatten(1).mean(1)
    return (d * mask).sum(-1) / mask.sum(-1)
