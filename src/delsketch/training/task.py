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
    forward: ``(params, inputs) -> model outputs`` (set by :meth:`from_module`; ``None`` for tasks that
        only define ``example_losses``).
    loss_fn: ``(outputs, targets) -> per-example losses [b]`` (set by :meth:`from_module`).
    data: the training ``(inputs, targets)`` tensors in index order (set by :meth:`from_module`); part of
        the fingerprint.
    gradient: ``None`` (default: the step's gradient is that of the weighted batch loss, see
        :func:`delsketch.training.loop.batch_loss`), or a gradient transform called by the loop as
        ``gradient(params, example_losses, w, idx, step, create_graph=...) -> (loss, grads)`` that returns the
        step's (detached, for reporting) batch loss and the gradients ``{name: tensor}`` handed to the optimizer
        (e.g. DP-SGD, :func:`delsketch.privacy.make_private`). Such a task may have empty batches (the
        transform handles them). Its ``describe()`` is part of the fingerprint when it has one.
    outputs: named outputs ``{name: callable params -> Tensor (any shape) or Output}``, usable wherever a query
        string is (``sketch.predict("test_losses", D)``, ``delsketch predict --query test_losses``); not part of
        the fingerprint (outputs are chosen after training).
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
    forward: Optional[Callable[[Params, Any], Any]] = None
    loss_fn: Optional[Callable[[Any, Any], Tensor]] = None
    data: Optional[tuple] = None
    gradient: Optional[Callable[..., tuple[Tensor, Params]]] = None
    outputs: dict = field(default_factory=dict)

    @classmethod
    def from_module(cls, model, data, loss_fn, optimizer, **kwargs) -> "Task":
        """The task of an ordinary PyTorch training loop; see :func:`delsketch.training.from_module.from_module`."""
        from .from_module import from_module

        return from_module(model, data, loss_fn, optimizer, **kwargs)

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
        """sha256 over the data (examples, schedule, initial parameters) and the config; for a task with data
        tensors or a loss function (:meth:`from_module`) also over every part of :meth:`fingerprints`."""
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
        if self.data is not None or self.loss_fn is not None:
            h.update(b"\0parts\0")
            h.update(json.dumps(self.fingerprints(), sort_keys=True).encode())
        return h.hexdigest()

    def fingerprints(self) -> dict[str, str]:
        """sha256 of each part of the task, so a mismatch can say which part differs:

        * ``data``: the training examples and the data tensors (bytes, shapes and dtypes, in index order);
        * ``model``: the initial parameters, the model's other state (buffers, frozen parameters) and its repr;
        * ``recipe``: the schedule, optimizer, normalization, sizes and config;
        * ``loss``: the loss function (qualified name, source when available, settings of a loss module).
        """
        data = hashlib.sha256(json.dumps(self.examples, separators=(",", ":"), sort_keys=True, default=str).encode())
        for t in self.data or ():
            _hash_tensors(data, {"": t})
        model = hashlib.sha256(repr(self.model).encode() if self.model is not None else b"")
        init = self.init_params()
        _hash_tensors(model, init)
        state_dict = getattr(self.model, "state_dict", None)
        if callable(state_dict):
            # the module's own values of the parameters passed in explicitly are never used (and a preset's
            # module holds whatever torch's global generator gave it): only its other state counts
            _hash_tensors(model, {k: v for k, v in state_dict().items() if k not in init})
        recipe = hashlib.sha256(json.dumps(
            {k: v for k, v in self.describe().items() if k != "model"}, sort_keys=True, default=str).encode())
        recipe.update(json.dumps(self.schedule, separators=(",", ":")).encode())
        loss = hashlib.sha256(describe_callable(self.loss_fn).encode())
        return {"data": data.hexdigest(), "model": model.hexdigest(), "recipe": recipe.hexdigest(),
                "loss": loss.hexdigest()}


def _hash_tensors(h, tensors: dict) -> None:
    for name, t in tensors.items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(torch.float64)
        t = t.contiguous()
        h.update(f"{name}\0{list(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.numpy().tobytes())


def describe_callable(fn: Any) -> str:
    """A stable text for a function (its qualified name and source when ``inspect`` finds it; a
    ``functools.partial``'s arguments; an ``nn.Module`` loss's settings and state)."""
    import functools
    import inspect

    if fn is None:
        return "none"
    if isinstance(fn, functools.partial):
        return (f"partial({describe_callable(fn.func)}, args={fn.args!r}, "
                f"keywords={json.dumps(fn.keywords, sort_keys=True, default=repr)})")
    parts = [f"{getattr(fn, '__module__', None) or type(fn).__module__}."
             f"{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"]
    if isinstance(fn, torch.nn.Module):
        parts.append(repr(fn))
        parts.append(json.dumps({k: v for k, v in vars(fn).items() if not k.startswith("_")}, sort_keys=True,
                                default=repr))
        h = hashlib.sha256()
        _hash_tensors(h, fn.state_dict())
        parts.append(h.hexdigest())
        fn = type(fn)
    try:
        parts.append(inspect.getsource(fn))
    except Exception:  # no source (OSError, TypeError), or linecache found an unrelated file of the same name and
        pass  # tokenizing it failed (tokenize.TokenError, SyntaxError): the qualified name stands alone
    return "\n".join(parts)


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

