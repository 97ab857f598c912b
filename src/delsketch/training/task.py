"""A deterministic training run (:class:`Task`): initial parameters, the batch schedule, per-example losses,
the optimizer and the normalization of the weighted batch loss. Example ``i`` carries the loss weight
``1 - w_i``; :mod:`delsketch.training.loop` executes the run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .optim import Optimizer

__all__ = ["Task", "NonFiniteError", "NORMALIZATIONS", "first_steps"]

Params = dict[str, Tensor]

NORMALIZATIONS = ("fixed", "renormalized")


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or parameter."""


def _no_queries(params: Params, q: str) -> Tensor:
    raise ValueError("this task defines no queries")


def _reject_query(q: str) -> None:
    raise ValueError("this task defines no queries")


def _no_select(predicate: str) -> list[int]:
    raise ValueError("this task defines no predicates")


@dataclass
class Task:
    """A deterministic training run.

    Fields
    ------
    name: preset / task name.
    n: number of training examples (length of ``w``).
    init_params: ``() -> {name: float64 tensor}``, deterministic.
    example_losses: ``(params, idx LongTensor [b]) -> per-example losses [b]``.
    schedule: the example indices used at each step (``schedule[s]`` for 0-based step ``s``).
    optimizer: a functional :class:`delsketch.training.optim.Optimizer`.
    normalization: ``"fixed"`` - batch loss ``sum_i (1 - w_i) loss_i / b`` (b = batch size);
        ``"renormalized"`` - ``sum_i (1 - w_i) loss_i / sum_i (1 - w_i)`` over the batch
        (a batch whose weights sum to exactly 0 contributes loss 0 instead of 0/0).
    query: ``(params, q: str) -> 0-dim tensor``, an output of the trained model.
    validate_query: ``(q: str) -> None``; raises ``ValueError`` with a one-line message.
    select: ``(predicate: str) -> sorted list of training indices``; ``ValueError`` if unknown.
    examples: the raw training examples in index order.
    config: JSON-serializable description of everything that determines the run.
    query_help / select_help: one-line syntax summaries (for the CLI).
    default_queries: a few sensible queries for this task.
    model: the ``nn.Module`` behind ``example_losses`` (informational; may be ``None``).
    gradient: ``None`` (default: the step's gradient is that of the weighted batch loss, see
        :func:`delsketch.training.loop.batch_loss`), or a gradient transform called by the loop as
        ``gradient(params, example_losses, w, idx, step, create_graph=...) -> (loss, grads)`` that returns the
        step's (detached, for reporting) batch loss and the gradients ``{name: tensor}`` handed to the optimizer
        (e.g. DP-SGD, :func:`delsketch.privacy.make_private`). Such a task may have empty batches (the
        transform handles them). Its ``describe()`` is part of the fingerprint when it has one.
    """

    name: str
    n: int
    init_params: Callable[[], Params]
    example_losses: Callable[[Params, Tensor], Tensor]
    schedule: list[list[int]]
    optimizer: Optimizer
    normalization: str = "fixed"
    query: Callable[[Params, str], Tensor] = _no_queries
    validate_query: Callable[[str], None] = _reject_query
    select: Callable[[str], list[int]] = _no_select
    examples: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    query_help: str = ""
    select_help: str = ""
    default_queries: list[str] = field(default_factory=list)
    model: Any = None
    gradient: Optional[Callable[..., tuple[Tensor, Params]]] = None

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {self.normalization!r} (choose from: {', '.join(NORMALIZATIONS)})"
            )
        if self.n <= 0:
            raise ValueError(f"task {self.name!r}: n must be positive, got {self.n}")
        for s, batch in enumerate(self.schedule):
            if len(batch) == 0 and self.gradient is None:
                raise ValueError(f"task {self.name!r}: step {s} has an empty batch")
            for i in batch:
                if not 0 <= i < self.n:
                    raise ValueError(f"task {self.name!r}: step {s} uses index {i} outside [0, {self.n})")

    @property
    def steps(self) -> int:
        """Number of steps in the full schedule."""
        return len(self.schedule)

    def describe(self) -> dict[str, Any]:
        """JSON-serializable summary (config, optimizer, normalization, sizes)."""
        return {
            "name": self.name,
            "n": self.n,
            "steps": len(self.schedule),
            "normalization": self.normalization,
            "optimizer": self.optimizer.describe(),
            "model": repr(self.model) if self.model is not None else None,
            "config": self.config,
            **({"gradient": _describe_gradient(self.gradient)} if self.gradient is not None else {}),
        }

    def fingerprint(self) -> str:
        """sha256 over the data (examples, schedule, initial parameters) and the config."""
        h = hashlib.sha256()
        h.update(json.dumps(self.describe(), sort_keys=True, default=str).encode())
        h.update(b"\0schedule\0")
        h.update(json.dumps(self.schedule, separators=(",", ":")).encode())
        h.update(b"\0examples\0")
        h.update(json.dumps(self.examples, separators=(",", ":"), sort_keys=True, default=str).encode())
        h.update(b"\0init\0")
        for name, p in self.init_params().items():
            t = p.detach().to(torch.float64).contiguous()
            h.update(name.encode() + b"\0" + json.dumps(list(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def _describe_gradient(g: Callable) -> Any:
    describe = getattr(g, "describe", None)
    return describe() if callable(describe) else repr(g)


def first_steps(task: Task, steps: Optional[int]) -> Task:
    """The task restricted to the first ``steps`` steps of its schedule (optimizer and lr schedule unchanged)."""
    if steps is None or steps == len(task.schedule):
        return task
    if not 1 <= steps <= len(task.schedule):
        raise ValueError(f"steps must lie in [1, {len(task.schedule)}] for task {task.name!r}, got {steps}")
    return dataclasses.replace(task, schedule=task.schedule[:steps], config={**task.config, "first_steps": steps})

