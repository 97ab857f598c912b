"""The audit's targets, measured: every route's memorization scores against exact leave-one-out retraining of
every training example (Spearman, precision among the top 20, cost), LiRA with 16 shadows on an overfit model
against the loss threshold, and canary exposure before and after deletion.

    PYTHONPATH=src python bench/audit/run.py --task digits --out bench/results/audit-digits.json
    PYTHONPATH=src python bench/audit/run.py --task names --n 100 --out bench/results/audit-names.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from delsketch import precompute
from delsketch.audit import canary_audit, membership_audit, memorization
from delsketch.io import versions, write_json
from delsketch.tasks import get_preset


def compare(score, truth, top=20):
    s, t = np.asarray(score), np.asarray(truth)
    k = min(top, len(t))
    top_s, top_t = set(np.argsort(-s, kind="stable")[:k]), set(np.argsort(-t, kind="stable")[:k])
    return {"spearman": float(spearmanr(s, t).statistic), f"precision_at_{k}": len(top_s & top_t) / k}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["digits", "names"], default="digits")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--directions", type=int, default=64)
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: memorization,membership,canaries")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    skip = set(filter(None, a.skip.split(",")))
    if a.task == "digits":
        task = get_preset("digits")(n_train=a.n or 500)
        overfit = get_preset("digits")(n_train=a.n or 500, hidden=64, epochs=30)
    else:
        n = a.n or 300
        task = get_preset("names")(n=n, steps=n)
        overfit = get_preset("names")(n=n, steps=4 * n)
    res = {"task": task.describe(), "versions": versions()}
    if "memorization" not in skip:
        t0 = time.perf_counter()
        loo = memorization(task, route="loo")
        res["loo"] = {"seconds": round(time.perf_counter() - t0, 2), "scores": loo.scores}
        print("loo", res["loo"]["seconds"], flush=True)
        routes = {}
        fo = memorization(task, route="first_order")
        routes["first_order"] = {**compare(fo.scores, loo.scores), "cost": fo.cost}
        print("first_order", routes["first_order"], flush=True)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            sk = precompute(task, d, directions=a.directions, degree=a.degree, chunk=16)
            pre = time.perf_counter() - t0
            for k in range(1, a.degree + 1):
                r = memorization(task, route="sketch", sketch=sk, degree=k)
                routes[f"sketch_m{a.directions}_degree{k}"] = {**compare(r.scores, loo.scores),
                                                               "cost": {**r.cost, "precompute_seconds": round(pre, 2)},
                                                               "median_stderr": float(np.median(r.stderr))}
                print("sketch", k, routes[f"sketch_m{a.directions}_degree{k}"], flush=True)
        sub = memorization(task, route="subsampled", models=a.models)
        routes[f"subsampled_{a.models}"] = {**compare(sub.scores, loo.scores), "cost": sub.cost,
                                            "note": "a different definition (over training randomness)"}
        print("subsampled", routes[f"subsampled_{a.models}"], flush=True)
        res["routes_vs_loo"] = routes
        write_json(a.out, res)
    if "membership" not in skip:
        m = membership_audit(overfit, models=a.models, bootstrap=200)
        res["membership"] = {"task": overfit.describe(), **{k: v for k, v in m.items() if k not in ("per_example_lira",)}}
        for at in res["membership"]["attacks"].values():
            at.pop("fpr"), at.pop("tpr")
        res["membership"]["counterfactual"].pop("scores"), res["membership"]["counterfactual"].pop("stderr")
        print("membership", {k: (v["auc"], v["tpr_at_fpr"], v["ci"]) for k, v in m["attacks"].items()},
              m["spearman_counterfactual_vs_lira"], flush=True)
        write_json(a.out, res)
    if "canaries" not in skip:
        kw = {"length": 4, "alphabet": "abcdefgh"} if a.task == "names" else {}
        c = canary_audit(task, repeats=(1, 2, 4, 8, 16), degree=3, **kw)
        res["canaries"] = c
        for row in c["canaries"]:
            print("canary", row["secret"], row["copies"], round(row["trained"]["exposure"], 3),
                  [(d["delete"], round(d["predicted"]["exposure"], 3), d["retrained"]["exposure"], d["within_error_bar"])
                   for d in row["deletions"]], flush=True)
        write_json(a.out, res)


if __name__ == "__main__":
    main()
