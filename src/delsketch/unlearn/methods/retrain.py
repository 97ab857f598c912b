"""``retrain``: the exact answer and the reference: train the task again from its initial parameters with every
forgotten example's loss weighted 0 (:func:`delsketch.training.retrain`). Reads all the training data."""

from __future__ import annotations

from ...training import retrain
from ..core import Method, register, run_cost


def run(task, params, access, sketch=None):
    access.need("retain")
    new = retrain(task, access.forgotten)
    access.examples += run_cost(task)
    return new, {"exact": True}


register(Method("retrain", run, "retain+forget", {}, "exact: retrain without the forget set",
                "all training data (retrains from the initial parameters; forgotten examples weighted 0)", exact=True))
