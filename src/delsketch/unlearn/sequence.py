"""Forget requests arriving one after another: each applied to the result of the previous ones (the retained
data shrinks with every request), with a verification against retraining without everything forgotten so far
after each."""

from __future__ import annotations

from typing import Optional, Sequence

from ..training import Task, train
from .core import unlearn
from .verify import verify

__all__ = ["unlearn_sequence"]


def unlearn_sequence(task: Task, requests: Sequence[Sequence[int]], method: str, *, params: Optional[dict] = None,
                     check: bool = True, sketch=None, test=None, **kwargs) -> list[dict]:
    """Apply ``method`` to each forget set of ``requests`` in turn. Returns one entry per request:
    ``{"unlearned": Unlearned, "verification": dict or None}``."""
    original = train(task) if params is None else params
    cur, previous, out = original, [], []
    for forget in requests:
        u = unlearn(task, forget, method, params=cur, previously_forgotten=previous, sketch=sketch, **kwargs)
        v = verify(task, u, original=original, test=test) if check else None
        out.append({"unlearned": u, "verification": v})
        cur, previous = u.params, u.forgotten
    return out
