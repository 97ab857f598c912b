"""Canaries and exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a random secret planted in the training data ``copies`` times: for a text task a random string over
a small alphabet (a document of its own), for a classifier a marked input (a random binary 8x8 pattern) with a
random label. :func:`plant` composes a task with canaries (examples appended, each copy joined to a seeded random
existing step of the schedule, so the number of steps and the learning-rate schedule are unchanged).

Exposure = log2|R| - log2 rank, rank = 1 + the number of candidates in the randomness space R with a lower loss
than the canary. R = every string of the canary's length over its alphabet (text) or the 10 labels of the marked
input (classifier). When |R| exceeds ``max_enumerate``, the rank is estimated from ``samples`` uniform draws of
R: rank ~= 1 + |R| p, p the fraction of draws with a lower loss (standard error by the delta method on the
binomial p; a documented estimate, not the skew-normal fit of the paper).

After deleting some or all copies, the predicted exposure comes from the exact Taylor series along that deletion
(one ring run with ``w = z 1_D``: every candidate's loss as a polynomial in z, summed at z = 1); its error bar
propagates an estimate of each candidate's truncation error (:func:`truncation_bound`) to an interval of ranks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .. import series as taylor
from ..sketch import ring_train, weight_series
from ..tasks.microgpt import TextCorpus
from ..training import Task, train
from ..training.loop import deletion_weights
from .outputs import Classifier, view

__all__ = ["Canary", "make_canaries", "plant", "candidate_losses", "exposure", "predicted_exposure", "canary_audit"]


@dataclass
class Canary:
    secret: Union[str, int]  # text, or the label of a marked input
    copies: int
    alphabet: str = ""  # text: the alphabet of R
    image: Optional[list] = None  # classifier: the marked input (pixel values 0..16)
    indices: list = field(default_factory=list)  # training indices of the copies (set by plant)

    def space_size(self) -> int:
        return len(self.alphabet) ** len(self.secret) if isinstance(self.secret, str) else 10


def make_canaries(task: Task, repeats: Sequence[int] = (1, 2, 4, 8), per_repeat: int = 1, seed: int = 0,
                  length: int = 4, alphabet: str = "abcdefgh") -> list[Canary]:
    """Random canaries for ``task``: ``per_repeat`` canaries for each number of copies in ``repeats``."""
    kind = view(task).kind
    if any(int(r) < 1 for r in repeats) or per_repeat < 1:
        raise ValueError("canary repeats and per_repeat must be at least 1")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0xCA9A])))
    out = []
    for r in repeats:
        for _ in range(per_repeat):
            if kind == "text":
                if length < 1 or len(set(alphabet)) != len(alphabet) or not alphabet:
                    raise ValueError("canary length must be >= 1 and the alphabet non-empty without repeats")
                out.append(Canary("".join(rng.choice(list(alphabet), length)), int(r), alphabet=alphabet))
            elif kind == "classifier":
                img = (rng.integers(0, 2, 64) * 16).tolist()
                out.append(Canary(int(rng.integers(0, 10)), int(r), image=[int(x) for x in img]))
            else:
                raise ValueError(f"task {task.name!r}: canaries need a text task or a classifier with labelled inputs")
    return out


def plant(task: Task, canaries: Sequence[Canary], seed: int = 0) -> tuple[Task, list[Canary]]:
    """A new task: ``task`` plus every copy of every canary, appended after its n examples; each copy joins a
    seeded random step of the schedule (distinct steps while there are enough). Returns the task and the
    canaries with their training ``indices``."""
    v = view(task)
    n0 = task.n
    copies = [c for c in canaries for _ in range(c.copies)]
    if not copies:
        raise ValueError("no canaries to plant")
    planted, k = [], n0
    for c in canaries:
        planted.append(dataclasses.replace(c, indices=list(range(k, k + c.copies))))
        k += c.copies
    if v.kind == "text":
        corpus = v.corpus
        for c in canaries:
            bad = corpus.bad_chars(str(c.secret))
            if bad:
                raise ValueError(f"canary {c.secret!r} has characters outside the vocabulary: {''.join(bad)!r}")
        new = TextCorpus(list(corpus.docs) + [str(c.secret) for c in copies], corpus.chars, corpus.model)
        extra = {"example_losses": new.example_losses, "query": new.query, "validate_query": new.validate_query,
                 "select": new.select, "examples": list(task.examples) + [str(c.secret) for c in copies]}
    elif v.kind == "classifier":
        cl = v.classifier
        X = torch.cat([cl.X, torch.tensor([c.image for c in copies], dtype=torch.float64) / 16.0])
        y = torch.cat([cl.y, torch.tensor([int(c.secret) for c in copies], dtype=torch.long)])
        new = Classifier(cl.model, X, y)
        ex = list(task.examples) + [{"image": list(c.image), "label": int(c.secret), "canary": True} for c in copies]
        extra = {"example_losses": new.example_losses, "examples": ex}
    else:
        raise ValueError(f"task {task.name!r}: canaries need a text task or a classifier with labelled inputs")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5C4E])))
    S = len(task.schedule)
    steps = rng.permutation(S)[: len(copies)] if len(copies) <= S else rng.integers(0, S, len(copies))
    schedule = [list(b) for b in task.schedule]
    for j, s in enumerate(steps):
        schedule[int(s)].append(n0 + j)
    config = {**task.config, "canaries": {"seed": int(seed), "planted": [
        {"secret": c.secret, "copies": c.copies, "indices": c.indices} for c in planted]}}
    new_task = dataclasses.replace(task, n=n0 + len(copies), schedule=schedule, config=config, **extra)
    return new_task, planted


def _candidates(canary: Canary, max_enumerate: int, samples: int, seed: int):
    """(candidates, position of the canary among them or None, exact)."""
    if not isinstance(canary.secret, str):
        return list(range(10)), int(canary.secret), True
    size = canary.space_size()
    if size <= max_enumerate:
        cands = ["".join(t) for t in itertools.product(canary.alphabet, repeat=len(canary.secret))]
        return cands, cands.index(canary.secret), True
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0xE5])))
    draws = ["".join(rng.choice(list(canary.alphabet), len(canary.secret))) for _ in range(samples)]
    return [canary.secret] + draws, 0, False


def candidate_losses(task: Task, params, canary: Canary, candidates: list, batch: int = 512) -> torch.Tensor:
    """The loss of every candidate under ``params``: [len] for plain parameters, [K, len] coefficients (m = 1) for
    series-valued ones."""
    v = view(task)
    if isinstance(canary.secret, str):
        if v.kind != "text":
            raise ValueError("a text canary needs a text task")
        fn = TextCorpus(candidates, v.corpus.chars, v.corpus.model).example_losses
    else:
        if v.kind != "classifier":
            raise ValueError("a marked-input canary needs a classifier task")
        x = torch.tensor([canary.image] * len(candidates), dtype=torch.float64) / 16.0
        fn = Classifier(v.classifier.model, x, torch.tensor(candidates, dtype=torch.long)).example_losses
    parts = []
    for lo in range(0, len(candidates), batch):
        idx = torch.arange(lo, min(lo + batch, len(candidates)))
        with torch.no_grad(), taylor.module_context():
            out = fn(params, idx)
        parts.append(taylor.coefficients(out)[0] if taylor.is_series(out) else out.detach())
    return torch.cat(parts, -1)


def _exposure(losses: np.ndarray, pos: int, size: int, exact: bool) -> dict:
    others = np.delete(losses, pos)
    lower = int((others < losses[pos]).sum())
    if exact:
        rank = 1 + lower
        return {"exposure": math.log2(size) - math.log2(rank), "rank": rank, "stderr": 0.0, "exact": True}
    s = others.size
    p = lower / s
    rank = 1 + size * p
    se_p = math.sqrt(max(p * (1 - p), 1.0 / s) / s)
    se = size * se_p / (rank * math.log(2))
    return {"exposure": math.log2(size) - math.log2(rank), "rank": rank, "stderr": se, "exact": False}


def exposure(task: Task, params, canary: Canary, max_enumerate: int = 1 << 16, samples: int = 4096,
             seed: int = 0) -> dict:
    """Exposure of ``canary`` under ``params`` (exact over the enumerated space, or the sampled estimate)."""
    cands, pos, exact = _candidates(canary, max_enumerate, samples, seed)
    losses = candidate_losses(task, params, canary, cands).numpy()
    out = _exposure(losses, pos, canary.space_size(), exact)
    out.update({"space": canary.space_size(), "candidates": len(cands), "canary_loss": float(losses[pos])})
    return out


def truncation_bound(c: np.ndarray) -> np.ndarray:
    """A heuristic size of the terms past degree k, per column of ``c [K, len]``: the larger of the last term
    and the geometric extrapolation ``|c_{k-1}|^2 / |c_{k-2}|`` (a single small last term can be a cancellation,
    as measured on names canaries); infinite where the terms grow (the series is not to be trusted)."""
    a = np.abs(c[1:])  # degrees 1..k
    if a.shape[0] == 1:
        return a[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        extrap = np.where(a[-3] > 0, a[-2] ** 2 / a[-3], np.inf) if a.shape[0] >= 3 else a[-2]
        grows = (a[1:] > a[:-1]).any(0)
    return np.where(grows, np.inf, np.maximum(a[-1], extrap))


def predicted_exposure(task: Task, canary: Canary, delete: Sequence[int], degree: int = 3,
                       max_enumerate: int = 1 << 16, samples: int = 4096, seed: int = 0) -> dict:
    """Exposure after deleting the training examples ``delete`` (e.g. some copies), from the exact degree-k series
    of every candidate's loss along that deletion (one ring run). ``interval``: the exposures the rank can take
    when each candidate's loss moves by up to its last Taylor term."""
    cands, pos, exact = _candidates(canary, max_enumerate, samples, seed)
    v = torch.zeros(1, task.n, dtype=torch.complex128)
    v[0, list(delete)] = 1.0
    params = ring_train(task, weight_series(v, degree))
    c = candidate_losses(task, params, canary, cands).real.numpy()  # [K, len]
    pred = c.sum(0)
    tail = truncation_bound(c)
    size = canary.space_size()
    mid = _exposure(pred, pos, size, exact)
    others = np.delete(np.arange(len(cands)), pos)
    lo_l, hi_l = pred[pos] - tail[pos], pred[pos] + tail[pos]
    best = 1 + int((pred[others] + tail[others] < lo_l).sum())  # fewest candidates surely below
    worst = 1 + int((pred[others] - tail[others] < hi_l).sum())  # most candidates possibly below
    scale = size / (len(cands) - 1) if not exact else 1.0
    to_exp = lambda r: math.log2(size) - math.log2(1 + (r - 1) * scale)  # noqa: E731
    mid.update({"interval": [to_exp(worst), to_exp(best)], "degree": degree, "route": "exact_series",
                "canary_loss": float(pred[pos]), "canary_loss_error_bound": float(tail[pos])})
    return mid


def canary_audit(task: Task, repeats: Sequence[int] = (1, 2, 4, 8), per_repeat: int = 1, seed: int = 0,
                 degree: int = 3, length: int = 4, alphabet: str = "abcdefgh", partial: bool = True,
                 max_enumerate: int = 1 << 16, samples: int = 4096, progress=None) -> dict:
    """Plant canaries, train, measure exposure; then for every canary predict the exposure after deleting all its
    copies (and half of them, ``partial``) and check it against retraining."""
    import time

    t0 = time.perf_counter()
    canaries = make_canaries(task, repeats, per_repeat, seed, length, alphabet)
    ptask, planted = plant(task, canaries, seed)
    params = train(ptask)
    kw = {"max_enumerate": max_enumerate, "samples": samples, "seed": seed}
    rows = []
    for c in planted:
        row = {"secret": c.secret, "copies": c.copies, "indices": c.indices, "trained": exposure(ptask, params, c, **kw),
               "deletions": []}
        sets = [("all", c.indices)] + ([("half", c.indices[: c.copies // 2])] if partial and c.copies >= 2 else [])
        for label, D in sets:
            pred = predicted_exposure(ptask, c, D, degree=degree, **kw)
            actual = exposure(ptask, train(ptask, w=deletion_weights(ptask.n, D)), c, **kw)
            lo, hi = pred["interval"]
            se = max(pred["stderr"], actual["stderr"])
            row["deletions"].append({"delete": label, "deleted": len(D), "predicted": pred, "retrained": actual,
                                     "within_error_bar": bool(lo - 2 * se <= actual["exposure"] <= hi + 2 * se)})
            if progress is not None:
                progress()
        rows.append(row)
    return {"task": task.name, "n": task.n, "n_with_canaries": ptask.n, "canaries": rows,
            "space": planted[0].space_size(), "seed": seed, "degree": degree,
            "definition": "this run: exposure of each canary in the model trained with it; after deletion, predicted "
                          "from the exact Taylor series along the deletion and checked against retraining",
            "cost": {"seconds": round(time.perf_counter() - t0, 3)}}
