"""Per-example outputs of a trained model on its own training examples: the loss, and where the task says what
the examples are, a classifier's correctness margin and logit-scaled confidence, or a text model's per-token
accuracy.

The built-in presets are recognized from what a :class:`Task` carries (``digits``: examples are dicts with an
``image`` of 0..16 pixel values and a ``label``, inputs are ``image / 16``; text presets: ``example_losses`` is a
:class:`delsketch.tasks.microgpt.TextCorpus` method). This is the one place to wire the front door
(``Task.from_module``) and vector outputs (``training.outputs``) in when they land: :func:`view` is all the rest
of :mod:`delsketch.audit` asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from ..tasks.microgpt import TextCorpus
from ..training import Task

__all__ = ["METRICS", "Classifier", "ExampleView", "view", "metric_fn", "orientation"]

#: metric -> +1 if a larger value means "learned better" (so deleting a memorized example lowers it), -1 for losses
METRICS = {"loss": -1, "margin": +1, "token_accuracy": +1}


class Classifier:
    """Inputs ``X [n, d]``, labels ``y [n]`` and a model returning logits: per-example cross-entropy, margin and
    logit-scaled confidence. Serves as a task's ``example_losses`` (the canaries extend a classifier task with it)."""

    def __init__(self, model: torch.nn.Module, X: Tensor, y: Tensor):
        self.model, self.X, self.y = model, X, y

    def logits(self, params, idx: Tensor) -> Tensor:
        return functional_call(self.model, params, (self.X[idx],))

    def example_losses(self, params, idx: Tensor) -> Tensor:
        logp = torch.log_softmax(self.logits(params, idx), dim=-1)
        return -logp.gather(-1, self.y[idx].unsqueeze(-1)).squeeze(-1)

    def margin(self, params, idx: Tensor) -> Tensor:
        """logit of the true label minus the largest other logit (> 0: classified correctly)."""
        z = self.logits(params, idx)
        true = z.gather(-1, self.y[idx].unsqueeze(-1)).squeeze(-1)
        others = z.scatter(-1, self.y[idx].unsqueeze(-1), float("-inf"))
        return true - others.max(-1).values

    def confidence(self, params, idx: Tensor) -> Tensor:
        """log p_y - log(1 - p_y), computed stably (LiRA's logit-scaled confidence)."""
        z = self.logits(params, idx)
        true = z.gather(-1, self.y[idx].unsqueeze(-1)).squeeze(-1)
        others = z.scatter(-1, self.y[idx].unsqueeze(-1), float("-inf"))
        return true - torch.logsumexp(others, -1)


def digits_classifier(task: Task) -> Optional[Classifier]:
    ex = task.examples
    if task.model is None or len(ex) != task.n or not all(isinstance(e, dict) and "image" in e and "label" in e for e in ex):
        return None
    X = torch.tensor([e["image"] for e in ex], dtype=torch.float64) / 16.0
    y = torch.tensor([int(e["label"]) for e in ex], dtype=torch.long)
    return Classifier(task.model, X, y)


def token_accuracy(corpus: TextCorpus, params, idx: Tensor) -> Tensor:
    """Fraction of a document's predicted positions where the model's most likely next token is the true one."""
    lengths = [corpus.lengths[i] for i in idx.tolist()]
    T = max(lengths)
    logits = functional_call(corpus.model, params, (corpus.inputs[idx, :T],))
    hit = (logits.argmax(-1) == corpus.targets[idx, :T]).to(torch.float64)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    return (hit * mask).sum(-1) / torch.tensor(lengths, dtype=torch.float64)


def text_confidence(losses: Tensor) -> Tensor:
    """For a text example, p = exp(-mean token loss) (geometric mean token probability); log p - log(1 - p)."""
    return -losses - torch.log(-torch.expm1(-losses))


@dataclass
class ExampleView:
    """What the audit can compute for each training example: ``kind`` is "classifier", "text" or "generic"."""

    kind: str
    task: Task
    classifier: Optional[Classifier] = None
    corpus: Optional[TextCorpus] = None

    def metrics(self) -> list[str]:
        return ["loss"] + (["margin"] if self.classifier else []) + (["token_accuracy"] if self.corpus else [])

    def values(self, metric: str, params, idx: Sequence[int]) -> Tensor:
        """The metric of examples ``idx`` under ``params`` (plain or series-valued for the loss)."""
        fn = metric_fn(self, metric)
        return fn(params, torch.as_tensor(list(idx), dtype=torch.long))

    def confidence(self, params, idx: Tensor) -> Tensor:
        if self.classifier is not None:
            return self.classifier.confidence(params, idx)
        return text_confidence(self.task.example_losses(params, idx))


def view(task: Task) -> ExampleView:
    c = digits_classifier(task)
    if c is not None:
        return ExampleView("classifier", task, classifier=c)
    owner = getattr(task.example_losses, "__self__", None)
    if isinstance(owner, TextCorpus):
        return ExampleView("text", task, corpus=owner)
    if isinstance(owner, Classifier):
        return ExampleView("classifier", task, classifier=owner)
    return ExampleView("generic", task)


def metric_fn(v: ExampleView, metric: str) -> Callable[[dict, Tensor], Tensor]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from: {', '.join(METRICS)})")
    if metric == "loss":
        return v.task.example_losses
    if metric == "margin":
        if v.classifier is None:
            raise ValueError(f"task {v.task.name!r} has no class labels: the margin needs a classifier (use --metric loss)")
        return v.classifier.margin
    if v.corpus is None:
        raise ValueError(f"task {v.task.name!r} is not a text task: token accuracy needs tokenized documents (use --metric loss)")
    return lambda params, idx: token_accuracy(v.corpus, params, idx)


def orientation(metric: str) -> str:
    return ("score = loss after deletion - loss as trained (> 0: the model did worse on the example without it)"
            if METRICS[metric] < 0 else
            f"score = {metric} as trained - {metric} after deletion (> 0: the model did worse on the example without it)")
