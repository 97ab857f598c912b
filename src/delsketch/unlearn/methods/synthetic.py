"""``synthetic``: data-free class unlearning in the spirit of error-maximizing noise (UNSIR, Tarun et al.).

What it reads: the trained parameters, the model (to evaluate it on inputs it makes up), and the *labels* of the
forget set - given as ``forget_labels`` or, when not given, read from the forget examples' labels (that needs
``available_data`` "forget_only" or "all"). It reads no input of any training example, no retained example
and no test example.

1. **Noise** (impair set): for every forget label c, ``noise`` inputs learned from a seeded Gaussian start by
   gradient ascent on ``CE(model(x), c) - reg * mean(x^2)``: inputs the trained model finds least like c.
2. **Impressions** (repair set): for every label k, ``impressions`` inputs learned by descent on
   ``CE(model(x), k) + reg * mean(x^2)``: inputs the trained model takes for k. Their targets are the trained
   model's own output distributions with the forget labels removed (probability renormalized over the
   retained labels) - the synthetic stand-in for retained data, labelled by the original model.
3. **Impair**: ``impair_steps`` steps on the noise labelled c (minimize ``CE(student(noise), c)``) together with
   the KL to the targets on the impressions (error-maximizing noise pushes the forget labels' decision weights
   away; the KL term keeps the rest).
4. **Repair**: ``repair_steps`` steps of KL(targets || student) on the impressions only.

Defaults (``noise_weight`` 0.3, ``impair_steps`` 20, ``lr`` 0.05) were chosen by ``bench/unlearning/tune.py`` on a
digits split the benchmark does not use (seed 1), over all ten forget-a-class requests.

Inputs are continuous vectors of the shape the model's first ``nn.Linear`` takes (or ``input_shape``), clipped to
``input_bounds`` when given (the input domain, e.g. [0, 1] for pixel intensities: a fact about the format, not
data). A task whose inputs are tokens is refused."""

from __future__ import annotations

from typing import Optional

import torch

from ..access import UnlearnError, _first_linear_in, forward
from ..core import Method, register
from ._loop import descend, kl


def _learn_inputs(task, params, labels, count, shape, steps, lr, reg, sign, g, bounds, access):
    """Inputs for each label (``sign`` +1: maximize the label's loss; -1: minimize it). Returns (X, y)."""
    ys = torch.tensor([c for c in labels for _ in range(count)], dtype=torch.long)
    X = torch.randn((len(ys), *shape), generator=g, dtype=torch.float64)
    if bounds is not None:
        lo, hi = bounds
        X = (lo + hi) / 2 + (hi - lo) / 4 * X
        X = X.clamp(lo, hi)
    frozen = {k: v.detach() for k, v in params.items()}
    for s in range(int(steps)):
        X = X.detach().requires_grad_(True)
        with torch.enable_grad():
            z = forward(task, frozen, X)
            ce = torch.nn.functional.cross_entropy(z, ys, reduction="sum")
            obj = -sign * ce + reg * (X ** 2).sum()  # descended; per input: its own loss and penalty
            (gx,) = torch.autograd.grad(obj, X)
        access.synthetic += len(ys)
        X = X.detach() - lr * gx
        if bounds is not None:
            X = X.clamp(*bounds)
    return X.detach(), ys


def run(task, params, access, sketch=None, forget_labels=None, noise=32, impressions=32, input_steps=100,
        input_lr=0.1, reg=0.01, impair_steps=20, repair_steps=50, lr=0.05, momentum=0.9, noise_weight=0.3,
        input_shape=None, input_bounds=None, seed=0):
    if forget_labels is None:
        try:
            access.need("forget")
        except UnlearnError as e:
            raise UnlearnError(f"{e}; pass forget_labels=[...] to unlearn without reading any example") from None
        if access.outputs().kind != "classifier":
            raise UnlearnError(f"synthetic needs a classifier on continuous inputs; task {task.name!r} is "
                               f"{access.outputs().kind}")
        forget_labels = sorted({int(v) for v in access.labels(access.forget).tolist()})
        source = "read from the forget examples' labels"
    else:
        try:
            forget_labels = sorted({int(c) for c in forget_labels})
        except (TypeError, ValueError):
            raise UnlearnError("synthetic: forget_labels must be a list of class labels (integers)") from None
        source = "given (forget_labels)"
    if task.model is None and task.forward is None:
        raise UnlearnError("synthetic needs the model to evaluate on synthetic inputs")
    shape = tuple(input_shape) if input_shape is not None else None
    if shape is None:
        d = _first_linear_in(task.model)
        if d is None:
            raise UnlearnError("synthetic: cannot tell the input shape (pass input_shape=[...])")
        shape = (d,)
    bounds: Optional[tuple] = tuple(map(float, input_bounds)) if input_bounds is not None else None
    frozen = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        try:
            C = int(forward(task, frozen, torch.zeros((1, *shape), dtype=torch.float64)).shape[-1])
        except (RuntimeError, TypeError, IndexError):
            raise UnlearnError("synthetic needs a classifier on continuous inputs (its inputs look like tokens)") from None
    bad = [c for c in forget_labels if not 0 <= c < C]
    if bad:
        raise UnlearnError(f"synthetic: forget label {bad[0]} outside the model's {C} classes")
    retained = [k for k in range(C) if k not in set(forget_labels)]
    if not retained:
        raise UnlearnError("synthetic: every class would be forgotten")
    g = torch.Generator().manual_seed(int(seed))
    Xn, yn = _learn_inputs(task, params, forget_labels, int(noise), shape, input_steps, input_lr, reg, +1, g, bounds,
                           access)
    Xi, yi = _learn_inputs(task, params, list(range(C)), int(impressions), shape, input_steps, input_lr, reg, -1, g,
                           bounds, access)
    with torch.no_grad():
        zt = forward(task, frozen, Xi)
        zt[:, forget_labels] = float("-inf")  # the original model's outputs with the forget labels removed
        target = torch.log_softmax(zt, -1).clamp_min(-1e4)  # finite logits for the KL
    n_syn = len(yn) + len(yi)

    def impair(p, s):
        access.synthetic += n_syn
        ce = torch.nn.functional.cross_entropy(forward(task, p, Xn), yn)
        return noise_weight * ce + kl(target, forward(task, p, Xi)).mean()

    def repair(p, s):
        access.synthetic += len(yi)
        return kl(target, forward(task, p, Xi)).mean()

    cur = descend(params, impair, int(impair_steps), float(lr), momentum, "synthetic")
    cur = descend(cur, repair, int(repair_steps), float(lr), momentum, "synthetic")
    return cur, {"forget_labels": forget_labels, "forget_labels_source": source, "input_shape": list(shape),
                 "noise_inputs": len(yn), "impression_inputs": len(yi),
                 "data_touched": ("the forget set's labels only (" + source + "); no training, retained or test "
                                  "example's inputs") if source.startswith("read") else "no data at all"}


register(Method("synthetic", run, "none",
                {"forget_labels": None, "noise": 32, "impressions": 32, "input_steps": 100, "input_lr": 0.1,
                 "reg": 0.01, "impair_steps": 20, "repair_steps": 50, "lr": 0.05, "momentum": 0.9,
                 "noise_weight": 0.3, "input_shape": None, "input_bounds": None, "seed": 0},
                "data-free: error-maximizing noise to impair, impressions labelled by the original model to repair",
                "the forget set's labels (or none, with forget_labels); no example inputs"))
