"""Bring-your-own-model benchmark: a user's MLP on a table none of the presets use (bench/own_model/task.py),
through the public API only, against real retraining.

    PYTHONPATH=src python bench/own_model/run.py [--variant fullbatch|adam] [--directions 64] [--degree 2]
        [--workers 2] [--out bench/results/own-model-fullbatch.json]

Measures: the plain run against the user's own torch loop; the sketch's precompute; one predict call for 30
test losses x every deletion set (a vector output, one batched pass per chunk); exact first order (30 outputs);
the summed exact leave-one-out effects (n retrains); and, per family of deletion sets (LOO, random 1 / 5 / 10 /
50 %, a class, the nearest neighbours of a test point, the highest-loss examples), per-output Spearman, pooled
Spearman, median relative error and 2-s.e. coverage against retraining. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from delsketch import precompute  # noqa: E402
from delsketch.io import jsonable  # noqa: E402
from delsketch.sketch import first_order  # noqa: E402
from delsketch.tasks import load_task_file  # noqa: E402
from delsketch.training import retrain, train  # noqa: E402

import task as own  # noqa: E402


def torch_loop_error(variant: str) -> float:
    """max |param difference| between delsketch's plain run and the user's own torch loop (full batch SGD)."""
    task, _, _ = own.make(variant)
    if variant != "fullbatch":
        return float("nan")
    (X, y), _ = own.data()
    torch.manual_seed(0)
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(30, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(150):
        opt.zero_grad()
        own.loss_fn(model(X), y).mean().backward()
        opt.step()
    mine = train(task)
    return max(float((mine[k] - v.detach()).abs().max()) for k, v in model.named_parameters())


def deletion_sets(task, X, Xt, seed: int = 0) -> dict[str, list[list[int]]]:
    n = task.n
    rng = np.random.default_rng(seed)
    fams = {"loo": [[int(i)] for i in rng.choice(n, 34, replace=False)]}
    for pct in (1, 5, 10, 50):
        k = max(1, round(n * pct / 100))
        fams[f"random_{pct}%"] = [sorted(rng.choice(n, k, replace=False).tolist()) for _ in range(24)]
    y = task.data[1]
    structured = []
    for c in (0, 1):  # a random half of one class (the whole class would remove the label)
        idx = torch.nonzero(y == c).flatten().numpy()
        for _ in range(4):
            structured.append(sorted(rng.choice(idx, len(idx) // 10, replace=False).tolist()))
    d = torch.cdist(Xt[:8], X)  # the 20 nearest training neighbours of a test point
    structured += [sorted(torch.argsort(d[j])[:20].tolist()) for j in range(8)]
    own_loss = own.loss_fn(task.forward(train(task), X), y)
    order = torch.argsort(own_loss, descending=True)
    structured += [sorted(order[:k].tolist()) for k in (5, 10, 20, 40)]  # the highest-loss examples
    fams["structured"] = structured
    return fams


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def metrics(pred: np.ndarray, truth: np.ndarray, se: np.ndarray | None) -> dict:
    """pred, truth: [S, P] changes. Per-output Spearman across the sets (mean over outputs), pooled Spearman,
    median relative error, 2-s.e. coverage."""
    per = [spearman(pred[:, j], truth[:, j]) for j in range(truth.shape[1])]
    rel = np.abs(pred - truth) / np.maximum(np.abs(truth), 1e-12)
    out = {"spearman_per_output": float(np.nanmean(per)), "spearman_pooled": spearman(pred.ravel(), truth.ravel()),
           "median_relative_error": float(np.median(rel))}
    if se is not None and np.isfinite(se).any():  # methods without an error bar (null stderr) get no coverage
        out["coverage_2se"] = float(np.mean(np.abs(pred - truth) <= 2 * se))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="fullbatch", choices=["fullbatch", "adam"])
    ap.add_argument("--directions", type=int, default=64)
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sketch-dir", default=None, help="keep the sketch here (resumable) instead of a temp dir")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out_path = Path(a.out or f"bench/results/own-model-{a.variant}.json")
    ref = f"{HERE / 'task.py'}:make_{a.variant}"
    task = load_task_file(ref)
    test_losses = task.outputs["test_losses"]
    (X, _), (Xt, _) = own.data()
    res: dict = {"variant": a.variant, "n": task.n, "steps": task.steps, "outputs": own.N_OUTPUTS,
                 "directions": a.directions, "degree": a.degree, "workers": a.workers, "cpus": os.cpu_count(),
                 "load_average_at_start": os.getloadavg()}
    res["torch_loop_max_abs_difference"] = torch_loop_error(a.variant)

    t0 = time.perf_counter()
    base = train(task)
    res["retrain_s"] = time.perf_counter() - t0
    fams = deletion_sets(task, X, Xt)
    sets = [D for f in fams.values() for D in f]
    res["deletion_sets"] = {k: len(v) for k, v in fams.items()}

    t0 = time.perf_counter()
    base_v = test_losses.flat(base)
    truth = torch.stack([test_losses.flat(retrain(task, D)) - base_v for D in sets]).numpy()  # [S, P]
    res["ground_truth_s"] = time.perf_counter() - t0

    sketch_dir = Path(a.sketch_dir) if a.sketch_dir else Path(tempfile.mkdtemp()) / "sketch"
    t0 = time.perf_counter()
    sk = precompute(task, sketch_dir, directions=a.directions, degree=a.degree, seed=0, chunk=max(1, a.directions // 8),
                    workers=a.workers, task_spec={"task": ref},
                    task_factory=functools.partial(load_task_file, ref) if a.workers > 1 else None)
    res["precompute_s_this_call"] = time.perf_counter() - t0  # 0 when the sketch dir held a finished sketch
    from delsketch.sketch.answer import costs

    res["precompute_s"] = costs(sk)["precompute_s"]  # the sum of the recorded chunk times (resumed or not)

    preds: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = sk.predict(test_losses, sets, method="sketch")
    res["predict_s_all_sets_all_outputs"] = time.perf_counter() - t0
    res["predict_warnings"] = sorted({str(w.message) for w in caught})
    preds[f"sketch degree {a.degree}"] = (p.change.numpy(), p.stderr.numpy())
    for r in range(1, a.degree):
        preds[f"sketch degree {r}"] = (p.by_degree_change[:, r].numpy(), p.by_degree_stderr[:, r].numpy())
    t0 = time.perf_counter()
    p2 = sk.predict(test_losses, sets, method="sketch")
    res["predict_s_again_cached"] = time.perf_counter() - t0
    assert torch.equal(p2.change, p.change)

    for name, kw in (("auto (default budget)", {}), ("first_order+sketch", {"method": "first_order+sketch"})):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = sk.predict(test_losses, sets, **kw)
        res[f"{name} s"] = time.perf_counter() - t0
        res[f"{name} method"] = q.method
        preds[name] = (q.change.numpy(), q.stderr.numpy())
        if q.chosen_degree is not None:
            res[f"{name} chosen degrees"] = {str(r): int((q.chosen_degree == r).sum()) for r in range(1, a.degree + 1)}

    t0 = time.perf_counter()
    E = first_order(task, test_losses).numpy()  # [n, P]
    res["first_order_s"] = time.perf_counter() - t0
    preds["first_order (exact)"] = (np.stack([E[D].sum(0) for D in sets]), None)

    t0 = time.perf_counter()
    loo = torch.stack([test_losses.flat(retrain(task, [i])) - base_v for i in range(task.n)]).numpy()  # [n, P]
    res["loo_s"] = time.perf_counter() - t0
    preds["summed exact leave-one-out"] = (np.stack([loo[D].sum(0) for D in sets]), None)

    rows = {}
    at = 0
    for fam, fs in fams.items():
        sl = slice(at, at + len(fs))
        at += len(fs)
        rows[fam] = {m: metrics(pr[sl], truth[sl], None if se is None else se[sl]) for m, (pr, se) in preds.items()}
    res["families"] = rows
    res["cost_s"] = {"sketch precompute": res["precompute_s"], "first_order (30 outputs)": res["first_order_s"],
                     "leave-one-out (n retrains)": res["loo_s"], "one retrain": res["retrain_s"]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(jsonable(res), indent=1, allow_nan=False) + "\n")

    print(f"{a.variant}: n={task.n}, {task.steps} steps, {len(sets)} deletion sets x {own.N_OUTPUTS} outputs; "
          f"torch-loop difference {res['torch_loop_max_abs_difference']:.2e}")
    print(f"precompute {res['precompute_s']:.1f} s ({a.directions} directions, degree {a.degree}, {a.workers} workers); "
          f"predict {res['predict_s_all_sets_all_outputs']:.2f} s for all sets x outputs (again: "
          f"{res['predict_s_again_cached']:.3f} s); first order {res['first_order_s']:.1f} s; LOO {res['loo_s']:.1f} s; "
          f"one retrain {res['retrain_s']:.3f} s")
    head = f"{'family':<13} {'method':<28} {'Spearman/out':>12} {'pooled':>7} {'med.rel.err':>11} {'cov 2se':>8}"
    print(head)
    for fam, ms in rows.items():
        for m, v in ms.items():
            cov = v.get("coverage_2se")
            print(f"{fam:<13} {m:<28} {v['spearman_per_output']:>12.3f} {v['spearman_pooled']:>7.3f} "
                  f"{v['median_relative_error']:>11.3f} {'' if cov is None else f'{cov:8.2f}'}")
    print(f"wrote {out_path}")
    return res


if __name__ == "__main__":
    main()
