"""Classification accuracy of a trained task's model on held-out data (the digits preset's test split and a
shifted copy), for the price-of-privacy measurements and the CLI."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from ..training import Task

__all__ = ["digits_test_data", "shifted", "accuracy", "losses"]


def digits_test_data(task: Task) -> tuple[Tensor, Tensor]:
    """The test split a ``digits`` task was built with (``task.config["split"]``), as ``(X [N, 64] in [0, 1], y)``."""
    split = task.config.get("split") if task.config.get("preset") == "digits" else None
    if not split or "test_source_indices" not in split:
        raise ValueError(f"task {task.name!r} has no digits test split in its config")
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    te = np.asarray(split["test_source_indices"], dtype=np.int64)
    return torch.tensor(X[te] / 16.0, dtype=torch.float64), torch.tensor(Y[te], dtype=torch.long)


def shifted(X: Tensor, noise: float = 0.3, seed: int = 0) -> Tensor:
    """A distribution-shifted copy: additive Gaussian noise of std ``noise`` (seeded), clipped to [0, 1]."""
    g = torch.Generator().manual_seed(int(seed))
    return (X + noise * torch.randn(X.shape, generator=g, dtype=X.dtype)).clamp(0.0, 1.0)


def _logits(task: Task, params: dict, X: Tensor) -> Tensor:
    if task.model is None:
        raise ValueError(f"task {task.name!r} has no model to evaluate")
    with torch.no_grad():
        return functional_call(task.model, {k: v.detach() for k, v in params.items()}, (X,))


def accuracy(task: Task, params: dict, X: Tensor, y: Tensor) -> float:
    """Fraction of ``X`` whose arg-max logit is ``y``."""
    return float((_logits(task, params, X).argmax(-1) == y).double().mean())


def losses(task: Task, params: dict, X: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy of ``X`` (for membership inference)."""
    return torch.nn.functional.cross_entropy(_logits(task, params, X), y, reduction="none")
