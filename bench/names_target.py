"""Issue 12's names target: the built-in ``names`` task with a 256-direction degree-3 sketch; deletion sets of 3-8
examples; the task's three default outputs (held-out names' losses); every method against real retraining.

    PYTHONPATH=src python bench/names_target.py [--directions 256] [--degree 3] [--sets 40] [--workers 2]
        [--sketch-dir DIR] [--out bench/results/names-target.json]

Per method: Spearman of predicted vs retrained change pooled over the sets x outputs, the mean per-output
Spearman across sets, median relative error, the share within 3 (and 2) standard errors where the method has an
error bar, and the seconds it took. ``auto`` is asked twice: with the default budget, and with ``budget_s=0``
(what a user gets when retraining the sets is not affordable). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "own_model"))

from delsketch import precompute  # noqa: E402
from delsketch.io import jsonable  # noqa: E402
from delsketch.tasks import factory, get_preset  # noqa: E402
from delsketch.training import retrain, train  # noqa: E402

from run import spearman  # noqa: E402  (bench/own_model/run.py)


def metrics(pred: np.ndarray, truth: np.ndarray, se) -> dict:
    per = [spearman(pred[:, j], truth[:, j]) for j in range(truth.shape[1])]
    rel = np.abs(pred - truth) / np.maximum(np.abs(truth), 1e-12)
    out = {"spearman_pooled": spearman(pred.ravel(), truth.ravel()), "spearman_per_output": float(np.nanmean(per)),
           "median_relative_error": float(np.median(rel))}
    if se is not None and np.isfinite(se).all():
        out["within_3se"] = float(np.mean(np.abs(pred - truth) <= 3 * se))
        out["within_2se"] = float(np.mean(np.abs(pred - truth) <= 2 * se))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--directions", type=int, default=256)
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--sets", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sketch-dir", default=None)
    ap.add_argument("--out", default="bench/results/names-target.json")
    ap.add_argument("--exact", action="store_true", help="also the exact degree-k series along each set (one ring run each)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = get_preset("names")()
    queries = list(task.default_queries)
    rng = np.random.default_rng(a.seed)
    sets = [sorted(rng.choice(task.n, int(rng.integers(3, 9)), replace=False).tolist()) for _ in range(a.sets)]
    res: dict = {"task": "names preset (defaults)", "n": task.n, "steps": task.steps, "queries": queries,
                 "directions": a.directions, "degree": a.degree, "sets": len(sets),
                 "set_sizes": [len(d) for d in sets], "workers": a.workers, "cpus": os.cpu_count(),
                 "load_average_at_start": os.getloadavg()}

    t0 = time.perf_counter()
    base = train(task)
    res["retrain_s"] = time.perf_counter() - t0
    q = lambda p: torch.stack([task.query(p, s) for s in queries]).detach()  # noqa: E731
    base_v = q(base)
    t0 = time.perf_counter()
    truth = torch.stack([q(retrain(task, D)) - base_v for D in sets]).numpy()  # [S, 3]
    res["ground_truth_s"] = time.perf_counter() - t0

    spec = {"preset": "names", "data": None, "steps": None}
    sketch_dir = Path(a.sketch_dir) if a.sketch_dir else Path(tempfile.mkdtemp()) / "sketch"
    t0 = time.perf_counter()
    sk = precompute(task, sketch_dir, directions=a.directions, degree=a.degree, seed=0,
                    chunk=max(1, a.directions // 8), workers=a.workers,
                    task_spec=spec, task_factory=factory(spec) if a.workers > 1 else None)
    res["precompute_s_this_call"] = time.perf_counter() - t0
    from delsketch.sketch.answer import costs

    res["precompute_s"] = costs(sk)["precompute_s"]

    preds: dict[str, tuple[np.ndarray, object]] = {}
    # auto first, on a sketch with nothing cached yet (a loo_sum call would leave the leave-one-out runs cached,
    # which auto then uses): what a user gets on a first question
    runs = [("auto (default budget)", {}), ("auto (budget 0 s)", {"budget_s": 0.0}), ("sketch", {"method": "sketch"}),
            ("first_order+sketch", {"method": "first_order+sketch"}), ("first_order", {"method": "first_order"}),
            ("loo_sum", {"method": "loo_sum"})]
    if a.exact:
        runs.insert(5, (f"exact (degree {a.degree} series per set)", {"method": "exact"}))
    for name, kw in runs:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = sk.predict(queries, sets, **kw)
        res[f"{name}: seconds"] = time.perf_counter() - t0
        res[f"{name}: method"] = p.method
        res[f"{name}: notes"] = list(p.notes)[:3]
        if caught:
            res[f"{name}: warnings"] = sorted({str(w.message)[:300] for w in caught})
        se = None if p.stderr is None else p.stderr.numpy()
        preds[name] = (p.change.numpy(), se)
        if name == "sketch":
            for r in range(1, a.degree):
                preds[f"sketch degree {r}"] = (p.by_degree_change[:, r].numpy(), p.by_degree_stderr[:, r].numpy())
    res["methods"] = {m: metrics(pr, truth, se) for m, (pr, se) in preds.items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(jsonable(res), indent=1, allow_nan=False) + "\n")

    print(f"names: n={task.n}, {task.steps} steps, {len(sets)} sets of 3-8 examples x {len(queries)} outputs; "
          f"one retrain {res['retrain_s']:.2f} s; precompute {res['precompute_s']:.0f} s "
          f"({a.directions} directions, degree {a.degree})")
    print(f"{'method':<34} {'pooled':>7} {'per-out':>7} {'med.rel':>8} {'≤3se':>6} {'≤2se':>6} {'seconds':>8}")
    for m, v in res["methods"].items():
        sec = res.get(f"{m}: seconds")
        w3, w2 = v.get("within_3se"), v.get("within_2se")
        print(f"{m:<34} {v['spearman_pooled']:>7.3f} {v['spearman_per_output']:>7.3f} {v['median_relative_error']:>8.3f} "
              f"{'' if w3 is None else f'{w3:6.2f}'} {'' if w2 is None else f'{w2:6.2f}'} "
              f"{'' if sec is None else f'{sec:8.1f}'}")
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
