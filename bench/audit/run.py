"""The audit's targets, measured: every route's memorization scores against exact leave-one-out retraining of
every training example (Spearman, precision among the top 20, cost), LiRA with 16 shadows on an overfit model
against the loss threshold, and canary exposure before and after deletion.

    PYTHONPATH=src python bench/audit/run.py --task digits --out bench/results/audit-digits.json
    PYTHONPATH=src python bench/audit/run.py --task names --n 100 --out bench/results/audit-names.json

The three causes of memorization (``delsketch.audit.experiments``), JSON to bench/results/audit-<experiment>-<task>.json
and figures to docs/figures/audit-<experiment>-<task>.png:

    PYTHONPATH=src python bench/audit/run.py --experiment repetition|novelty|size [--task digits]
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
    ap.add_argument("--out", default=None)
    ap.add_argument("--experiment", choices=["repetition", "novelty", "size"], default=None,
                    help="run one of the three causes instead (its own config; see experiment())")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.experiment:
        return experiment(a.experiment, a.task, a.n)
    if a.out is None:
        ap.error("--out is required")
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


def experiment(name: str, task_name: str, n=None):
    """The committed configs: digits n = 500 (the preset: 48 SGD steps; size: 30 epochs, 480 steps, so that
    the wider models overfit), route loo (exact; on this task also the cheapest)."""
    from pathlib import Path

    from delsketch.apps import audit_plots as ap
    from delsketch.audit import experiments as ex

    t0 = time.perf_counter()
    if task_name == "digits":
        build = lambda **kw: get_preset("digits")(n_train=n or 500, **kw)  # noqa: E731
    else:
        build = lambda **kw: get_preset("names")(n=n or 100, steps=n or 100, **kw)  # noqa: E731
    fig = Path("docs/figures") / f"audit-{name}-{task_name}.png"
    if name == "repetition":
        res = ex.repetition(build(), copies=(1, 2, 4, 8, 16), examples=32, route="loo")
        ap.plot_repetition(res, fig)
        for r in res["rows"]:
            print(r["copies"], round(r["all_copies"]["mean"], 4), round(r["all_copies"]["stderr"], 4),
                  round(r["one_copy"]["mean"], 4), round(r["one_copy"]["stderr"], 4))
    elif name == "novelty":
        res = ex.novelty(build(), route="loo", neighbours=5, top=24)
        ap.plot_novelty(res, fig)
        ap.plot_most_memorized(res, fig.with_name(f"audit-novelty-examples-{task_name}.png"))
        print(res["spearman"])
    else:
        if task_name != "digits":
            raise SystemExit("the size experiment needs the digits preset (hidden width)")
        res = ex.size(lambda h: build(hidden=h, epochs=30), widths=(4, 8, 16, 32, 64, 128, 256), sample=100,
                      models=16, route="loo")
        ap.plot_size(res, fig)
        for r in res["rows"]:
            print(r["hidden"], r["parameters"], round(r["self_influence"]["mean"], 4),
                  round(r["self_influence"]["stderr"], 4), round(r["counterfactual_memorization"]["mean"], 4),
                  {k: round(v["auc"], 3) for k, v in r["membership"].items()}, r["seconds"])
    res["bench"] = {"command": f"PYTHONPATH=src python bench/audit/run.py --experiment {name} --task {task_name}"
                    + (f" --n {n}" if n else ""), "seconds": round(time.perf_counter() - t0, 2), "versions": versions()}
    write_json(f"bench/results/audit-{name}-{task_name}.json", res)
    print(f"{name}: {res['bench']['seconds']} s; wrote bench/results/audit-{name}-{task_name}.json and {fig}")


if __name__ == "__main__":
    main()
