"""``gradient_ascent``: raise the loss of the forget set (SGD on minus its mean loss). Reads only the forget
set's examples; with nothing holding the rest of the model in place it over-unlearns as steps grow."""

from __future__ import annotations

from ..core import Method, register
from ._loop import descend, default_lr


def run(task, params, access, sketch=None, steps=5, lr=None, lr_scale=0.1, momentum=0.0, batch=None):
    batches = access.forget_batches(batch)

    def objective(p, s):
        return -access.losses(p, next(batches)).mean()

    lr = default_lr(task, lr) * (float(lr_scale) if lr is None else 1.0)
    return descend(params, objective, int(steps), lr, momentum, "gradient_ascent"), {"steps": int(steps), "lr": lr}


register(Method("gradient_ascent", run, "forget",
                {"steps": 5, "lr": None, "lr_scale": 0.1, "momentum": 0.0, "batch": None},
                "gradient ascent on the forget set", "the forget set's examples only"))
