"""What an unlearning method may read of a task, and how: a guard around the task's data.

A method asks :class:`Access` for the forget set's losses, retained batches, model outputs (logits) or labels;
each request first checks that the user declared that data available (``available_data``: ``"all"``,
``"forget_only"`` or ``"none"``) and counts the example evaluations it costs (the deterministic part of the cost
record). A method that never calls a data request reads no training data (``synthetic`` and ``sketch``: see
their modules; ``tests/test_unlearn.py`` checks it on a task whose every data access raises).

Model outputs are read from what a task carries: the built-in ``digits`` preset and classifier tasks
(:func:`delsketch.audit.outputs.view`), tasks of :meth:`Task.from_module` (``task.forward`` and ``task.data``), and
the text presets (per-token logits with a mask of the real positions).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from ..training import Task

__all__ = ["AVAILABLE", "UnlearnError", "Access", "Outputs", "outputs_of", "forward", "test_data", "check_forget", "check_params"]

AVAILABLE = ("all", "forget_only", "none")


class UnlearnError(ValueError):
    """Bad input to an unlearning request (reported as one line; exit status 2 on the command line)."""


def check_forget(task: Task, forget: Sequence[int]) -> list[int]:
    """The forget set as a sorted list of distinct indices; one-line errors for empty or out-of-range sets."""
    try:
        idx = sorted({int(i) for i in forget})
    except (TypeError, ValueError):
        raise UnlearnError("the forget set must be a list of training-example indices") from None
    if not idx:
        raise UnlearnError("empty forget set: nothing to unlearn")
    bad = [i for i in idx if not 0 <= i < task.n]
    if bad:
        raise UnlearnError(f"forget index {bad[0]} out of range: the task has {task.n} training examples "
                           f"(0..{task.n - 1})")
    if len(idx) == task.n:
        raise UnlearnError(f"the forget set holds all {task.n} training examples: nothing would be retained")
    return idx


def check_params(task, params: dict) -> None:
    init = task.init_params()
    if set(params) != set(init) or any(tuple(params[k].shape) != tuple(v.shape) for k, v in init.items()):
        diff = sorted(set(params) ^ set(init)) or [k for k in init if tuple(params[k].shape) != tuple(init[k].shape)]
        raise UnlearnError(f"the model's parameters do not match task {task.name!r} (parameter {diff[0]!r} differs)")


class Outputs:
    """Logits of training examples (``[b, C]`` for a classifier; ``[b, T, C]`` with a mask for a text model) and
    their labels; ``input_shape``/``continuous`` say whether synthetic inputs can be learned."""

    def __init__(self, kind: str, logits, labels, input_shape=None, n_classes: Optional[int] = None):
        self.kind, self._logits, self._labels = kind, logits, labels
        self.input_shape, self.n_classes = input_shape, n_classes

    def logits(self, params, idx: Tensor):
        return self._logits(params, idx)

    def labels(self, idx: Tensor) -> Tensor:
        return self._labels(idx)


def forward(task: Task, params, X: Tensor) -> Tensor:
    """The model's outputs on inputs ``X`` (``task.forward`` when the task has one, else its ``model``)."""
    if task.forward is not None:
        return task.forward(params, X)
    if task.model is None:
        raise UnlearnError(f"task {task.name!r} has no model to evaluate on new inputs")
    return functional_call(task.model, params, (X,))


def _first_linear_in(model) -> Optional[int]:
    for m in getattr(model, "modules", lambda: [])():
        if isinstance(m, torch.nn.Linear):
            return int(m.in_features)
    return None


def outputs_of(task: Task) -> Optional[Outputs]:
    """How to get logits and labels of the task's training examples, or ``None`` if the task does not say."""
    from ..audit.outputs import view
    from ..tasks.microgpt import TextCorpus

    owner = getattr(task.example_losses, "__self__", None)
    if isinstance(owner, TextCorpus):
        corpus = owner

        def text_logits(params, idx):
            lengths = [corpus.lengths[i] for i in idx.tolist()]
            T = max(lengths)
            z = functional_call(corpus.model, params, (corpus.inputs[idx, :T],))
            mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
            return z, mask

        def text_labels(idx):
            return corpus.targets[idx, :max(corpus.lengths[i] for i in idx.tolist())]

        return Outputs("text", text_logits, text_labels, None, corpus.model.cfg.vocab_size)
    if task.forward is not None and task.data is not None:
        X, Y = task.data
        if not (isinstance(X, Tensor) and isinstance(Y, Tensor)):
            return None
        classes = int(Y.max()) + 1 if not Y.is_floating_point() and Y.dim() == 1 else None

        def fm_logits(params, idx):
            return task.forward(params, X[idx]), None

        return Outputs("classifier" if classes else "generic", fm_logits, lambda idx: Y[idx],
                       tuple(X.shape[1:]) if X.is_floating_point() else None, classes)
    v = view(task)
    if v.classifier is not None:
        c = v.classifier
        shape = tuple(c.X.shape[1:])
        return Outputs("classifier", lambda params, idx: (c.logits(params, idx), None), lambda idx: c.y[idx], shape,
                       int(c.y.max()) + 1)
    return None


def test_data(task: Task) -> Optional[tuple[Tensor, Tensor]]:
    """Held-out ``(X, y)`` the task was built with (the ``digits`` preset's test split), else ``None``."""
    if task.config.get("preset") == "digits":
        from ..privacy import digits_test_data

        X, y = digits_test_data(task)
        return (X, y) if len(y) else None
    return None


class Access:
    """The guarded view of one request: ``forget`` (this request's indices), ``forgotten`` (everything forgotten
    so far, this request included) and ``retain`` (the rest)."""

    def __init__(self, task: Task, forget: Sequence[int], available: str = "all", method: str = "?",
                 previously: Sequence[int] = ()):
        if available not in AVAILABLE:
            raise UnlearnError(f"unknown available_data {available!r} (choose from: {', '.join(AVAILABLE)})")
        self.task, self.available, self.method = task, available, method
        self.forget = list(forget)
        self.forgotten = sorted(set(self.forget) | {int(i) for i in previously})
        gone = set(self.forgotten)
        self.retain = [i for i in range(task.n) if i not in gone]
        self.examples = 0  # example evaluations (forward + backward) on training data
        self.synthetic = 0  # evaluations on synthetic inputs
        self._outputs = None

    # -- guards ---------------------------------------------------------------------------------
    def need(self, what: str) -> None:
        """``what``: "retain" (the retained training data) or "forget" (the forget set's examples)."""
        ok = self.available == "all" or (what == "forget" and self.available == "forget_only")
        if not ok:
            data = "the retained training data" if what == "retain" else "the forget set's examples"
            raise UnlearnError(f"method {self.method!r} needs {data}, but available_data={self.available!r}")

    def _which(self, idx) -> Tensor:
        idx = torch.as_tensor(list(idx) if not isinstance(idx, Tensor) else idx, dtype=torch.long)
        gone = set(self.forget)
        kinds = {"forget" if int(i) in gone else "retain" for i in idx.tolist()}
        for k in sorted(kinds):
            self.need(k)
        return idx

    # -- reads ----------------------------------------------------------------------------------
    def losses(self, params, idx) -> Tensor:
        idx = self._which(idx)
        self.examples += len(idx)
        return self.task.example_losses(params, idx)

    def outputs(self) -> Outputs:
        if self._outputs is None:
            self._outputs = outputs_of(self.task)
            if self._outputs is None:
                raise UnlearnError(f"method {self.method!r} needs the model's outputs (logits), which task "
                                   f"{self.task.name!r} does not expose (use Task.from_module or a built-in preset)")
        return self._outputs

    def logits(self, params, idx):
        idx = self._which(idx)
        self.examples += len(idx)
        return self.outputs().logits(params, idx)

    def labels(self, idx) -> Tensor:
        idx = self._which(idx)
        return self.outputs().labels(idx)

    def batch_size(self) -> int:
        return max(1, len(self.task.schedule[0])) if self.task.schedule else 32

    def retain_batches(self):
        """An endless stream of retained batches: the task's own schedule, epoch after epoch, with every
        forgotten example removed (so the batches and their order are the training run's)."""
        self.need("retain")
        gone = set(self.forgotten)
        while True:
            for batch in self.task.schedule:
                b = [i for i in batch if i not in gone]
                if b:
                    yield b

    def forget_batches(self, size: Optional[int] = None):
        """An endless stream of forget-set batches of ``size`` (default: the whole forget set each step)."""
        self.need("forget")
        size = len(self.forget) if size is None else int(size)
        k = math.ceil(len(self.forget) / size)
        while True:
            for j in range(k):
                yield self.forget[j * size:(j + 1) * size]
