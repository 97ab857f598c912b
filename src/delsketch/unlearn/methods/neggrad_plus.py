"""``neggrad_plus``: descend on the retained data's loss and ascend on the forget set's at once,
``alpha * L_retain - (1 - alpha) * L_forget`` over the task's retained batches and forget batches."""

from __future__ import annotations

import math

from ..access import UnlearnError
from ..core import Method, register
from ._loop import descend, default_lr


def run(task, params, access, sketch=None, epochs=1.0, lr=None, momentum=0.9, alpha=0.9, forget_batch=None):
    if not 0 <= float(alpha) <= 1:
        raise UnlearnError(f"neggrad_plus: alpha must lie in [0, 1], got {alpha}")
    retain = access.retain_batches()
    forget = access.forget_batches(forget_batch or access.batch_size())
    steps = max(1, round(float(epochs) * math.ceil(len(access.retain) / access.batch_size())))

    def objective(p, s):
        return alpha * access.losses(p, next(retain)).mean() - (1 - alpha) * access.losses(p, next(forget)).mean()

    return descend(params, objective, steps, default_lr(task, lr), momentum, "neggrad_plus"), {"steps": steps}


register(Method("neggrad_plus", run, "retain+forget",
                {"epochs": 1.0, "lr": None, "momentum": 0.9, "alpha": 0.9, "forget_batch": None},
                "descend on retained data, ascend on the forget set", "the retained data and the forget set"))
