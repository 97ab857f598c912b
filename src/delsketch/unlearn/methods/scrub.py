"""``scrub`` (teacher-student, after Kurmanji et al. 2023): the original model is the teacher; the student starts
as the original and alternates *max* steps (raise KL(teacher || student) on the forget set) with *min* steps
(lower KL on the retained data plus ``gamma`` times the task loss there). Max steps only in the first
``max_epochs`` epochs; an epoch is one pass over the retained batches (and one over the forget set)."""

from __future__ import annotations

import math

from ..core import Method, register
from ._loop import descend, default_lr, kl


def run(task, params, access, sketch=None, epochs=2, max_epochs=1, lr=None, momentum=0.9, alpha=1.0, gamma=1.0,
        forget_batch=None):
    teacher = {k: v.detach().clone() for k, v in params.items()}
    fb = int(forget_batch or access.batch_size())
    retain = access.retain_batches()
    forget = access.forget_batches(fb)
    per_epoch_r = math.ceil(len(access.retain) / access.batch_size())
    per_epoch_f = math.ceil(len(access.forget) / fb)
    lr = default_lr(task, lr)
    cur = params
    steps = 0

    def kl_on(p, idx):
        with_teacher = access.logits(teacher, idx)
        z, mask = access.logits(p, idx)
        return kl(with_teacher[0].detach(), z, mask)

    for e in range(int(epochs)):
        if e < int(max_epochs):
            cur = descend(cur, lambda p, s: -kl_on(p, next(forget)).mean(), per_epoch_f, lr, momentum, "scrub")
            steps += per_epoch_f

        def min_obj(p, s):
            idx = next(retain)
            return alpha * kl_on(p, idx).mean() + gamma * access.losses(p, idx).mean()

        cur = descend(cur, min_obj, per_epoch_r, lr, momentum, "scrub")
        steps += per_epoch_r
    return cur, {"steps": steps}


register(Method("scrub", run, "retain+forget",
                {"epochs": 2, "max_epochs": 1, "lr": None, "momentum": 0.9, "alpha": 1.0, "gamma": 1.0,
                 "forget_batch": None},
                "teacher-student: max KL on the forget set, min KL + task loss on the retained data",
                "the retained data and the forget set"))
