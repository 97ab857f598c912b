"""Where first order's error on structured deletion sets comes from (issue 12's "show where the limit is").

    PYTHONPATH=src python bench/own_model/structured_limit.py [--variant fullbatch] [--degree 6]
        [--out bench/results/own-model-structured-limit.json]

For the structured family of bench/own_model/run.py (same sets, same 30 test losses, truth by retraining): the
exact Taylor series along each set (one ring run per set) truncated at degrees 1..k, against the summed exact
leave-one-out effects. The series at degree 1 is exact first order; its higher degrees add each example's own
nonlinearity *and* the interactions between the deleted examples, which the leave-one-out sum cannot see. If the
series' error keeps falling below the leave-one-out sum's, the limit of loo_sum on these sets is the interactions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from delsketch.sketch.exact import deletion_ring_run  # noqa: E402
from delsketch.tasks import load_task_file  # noqa: E402
from delsketch.training import retrain, train  # noqa: E402

import task as own  # noqa: E402
from run import deletion_sets, metrics  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="fullbatch", choices=["fullbatch", "adam"])
    ap.add_argument("--degree", type=int, default=6)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = f"{HERE / 'task.py'}:make_{a.variant}"
    task = load_task_file(ref)
    out = task.outputs["test_losses"]
    (X, _), (Xt, _) = own.data()
    sets = deletion_sets(task, X, Xt)["structured"]
    base = out.flat(train(task))
    truth = torch.stack([out.flat(retrain(task, D)) - base for D in sets]).numpy()
    t0 = time.perf_counter()
    coeffs = []  # [S, K+1, P]
    for D in sets:
        c = out.flat_coefficients(deletion_ring_run(task, D, a.degree), a.degree)[0].real
        coeffs.append(c.detach())
    series_s = time.perf_counter() - t0
    C = torch.stack(coeffs).numpy()
    t0 = time.perf_counter()
    loo = torch.stack([out.flat(retrain(task, [i])) - base for i in range(task.n)]).numpy()
    loo_s = time.perf_counter() - t0
    rows = {f"exact series, degree {r}": metrics(C[:, 1 : r + 1].sum(1), truth, None) for r in range(1, a.degree + 1)}
    rows["summed exact leave-one-out"] = metrics(np.stack([loo[D].sum(0) for D in sets]), truth, None)
    last = np.abs(C[:, a.degree]).max(1) / np.maximum(np.abs(C[:, 1]).max(1), 1e-300)
    res = {"variant": a.variant, "sets": len(sets), "set_sizes": [len(D) for D in sets], "degree": a.degree,
           "series_s": series_s, "loo_s": loo_s, "rows": rows,
           "last_term_over_first_median": float(np.median(last))}
    path = Path(a.out or f"bench/results/own-model-structured-limit.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{a.variant}: {len(sets)} structured sets x {truth.shape[1]} outputs; series {series_s:.0f} s, LOO {loo_s:.0f} s")
    print(f"{'method':<30} {'Spearman/out':>12} {'pooled':>7} {'med.rel.err':>11}")
    for m, v in rows.items():
        print(f"{m:<30} {v['spearman_per_output']:>12.3f} {v['spearman_pooled']:>7.3f} {v['median_relative_error']:>11.3f}")
    print(f"median |degree-{a.degree} term| / |degree-1 term|: {res['last_term_over_first_median']:.3g}; wrote {path}")


if __name__ == "__main__":
    main()
