"""``finetune``: continue training the model on the retained data only (the task's own batches with the
forgotten examples removed), SGD with momentum; forgetting comes only from the retained data's pull."""

from __future__ import annotations

import math

from ..core import Method, register
from ._loop import descend, default_lr


def run(task, params, access, sketch=None, epochs=1.0, lr=None, momentum=0.9):
    batches = access.retain_batches()
    per_epoch = math.ceil(len(access.retain) / access.batch_size())
    steps = max(1, round(float(epochs) * per_epoch))

    def objective(p, s):
        return access.losses(p, next(batches)).mean()

    return descend(params, objective, steps, default_lr(task, lr), momentum, "finetune"), {"steps": steps}


register(Method("finetune", run, "retain+forget", {"epochs": 1.0, "lr": None, "momentum": 0.9},
                "fine-tune on the retained data", "the retained training data"))
