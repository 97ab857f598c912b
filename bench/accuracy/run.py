"""Accuracy benchmark: delsketch's sketch and exact first-order term against retraining and peer libraries.

One command regenerates everything (results JSON, docs/accuracy.md, docs/figures/accuracy-*.png):

    bench/accuracy/.venv/bin/python bench/accuracy/run.py            # full run, with the peers (see README.md)
    python bench/accuracy/run.py --small --json /tmp/a.json --md /tmp/a.md   # CI smoke configuration

Peers (captum, dattri, kronfluence) are used when importable; with the package's own environment they are
skipped and the report says so. See docs/accuracy.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars (read when tqdm is first imported)

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # bench/child.py

import child  # noqa: E402
import methods  # noqa: E402
import metrics  # noqa: E402
import tasks as btasks  # noqa: E402

FRACTIONS = [0.01, 0.02, 0.05, 0.10, 0.50]

# per task: queries, leave-one-out examples, random sets per size, sketch sizes
FULL = {
    "digits": dict(queries=20, loo=100, sets=40, ms=[64, 256, 1024], degree=3, topk=0.05),
    "digits-fullbatch": dict(queries=20, loo=60, sets=30, ms=[64, 256, 1024], degree=3, topk=0.05, steps=100),
    "names": dict(queries=20, loo=60, sets=30, ms=[64, 256, 1024], degree=3, topk=0.05),
    "paper": dict(queries=10, loo=30, sets=20, ms=[64, 256, 1024], degree=3, topk=0.05),
}
SMALL = {
    "digits": dict(queries=10, loo=24, sets=12, ms=[64, 256], degree=3, topk=0.05),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


CHILD_MEMORY_GB = 14  # address-space limit of every forked method process (a MemoryError, not the OOM killer)


def in_child(fn, *args):
    """fn(*args) in a forked process with the memory limit: (result, seconds, peak RSS MiB), see bench/child.py."""
    return child.in_child(fn, *args, memory_gb=CHILD_MEMORY_GB)


# ------------------------------------------------------------------------------------------------ tasks


def build_task(key: str, cfg: dict, data: str | None):
    if key == "digits":
        bt = btasks.digits_task(key, cfg["queries"], batch=32)
    elif key == "digits-fullbatch":
        bt = btasks.digits_task(key, cfg["queries"], batch=None, steps=cfg.get("steps", 30))
    elif key == "names":
        bt = btasks.text_task(key, "names", cfg["queries"])
    elif key == "paper":
        if data is None:
            raise ValueError("the paper task needs --data PATH (names.txt)")
        bt = btasks.text_task(key, "paper", cfg["queries"], data=data, steps=cfg.get("steps"))
    else:
        raise ValueError(key)
    # self queries (the loss of training examples 0..4): the orientation check "deleting a training
    # example raises its own loss" for every method
    J = list(range(5))
    if key.startswith("digits"):
        selfq = [f"train:{j}" for j in J]
    else:
        selfq = [bt.task.examples[j] for j in J]
    bt.n_main = len(bt.queries)
    bt.self_idx = J
    bt.queries = bt.queries + selfq
    bt.test_x = torch.cat([bt.test_x, bt.train_x[J]])
    bt.test_y = torch.cat([bt.test_y, bt.train_y[J]])
    return bt


def make_sets(bt, cfg: dict, seed: int) -> dict[str, list[list[int]]]:
    pool = np.array(bt.pool)  # deletion candidates: the examples the run visits
    n = len(pool)
    rng = np.random.default_rng(seed)
    fams = {"loo": [[int(i)] for i in sorted(rng.choice(pool, min(cfg["loo"], n), replace=False))]}
    for f in FRACTIONS:
        size = max(1, round(f * n))
        fams[f"random {int(round(100 * f))}%"] = [sorted(int(i) for i in rng.choice(pool, size, replace=False))
                                                  for _ in range(cfg["sets"])]
    fams["groups"] = [list(v) for v in bt.groups.values()]
    return fams


# ------------------------------------------------------------------------------------------------ main


def run_task(key: str, cfg: dict, args, peer_names: list[str]) -> dict:
    import peers as bpeers

    torch.manual_seed(0)
    bt = build_task(key, cfg, args.data)
    n, Q = bt.task.n, bt.n_main
    log(f"{key}: {bt.description}; n={n}, {Q} queries")
    res: dict = {"task": key, "description": bt.description, "n": n, "visited": len(bt.pool), "steps": bt.task.steps,
                 "queries": bt.queries[:Q], "config": cfg,
                 "loss_consistency": btasks.check_loss_consistency(bt)}
    base = methods.base_values(bt)

    # ---- per-example stage of every method (each in its own process: time and peak RSS)
    timing: dict = {}
    G, dt, rss = in_child(methods.first_order_gradients, bt)
    timing["first-order"] = {"setup_s": dt, "per_query_s": dt / len(bt.queries), "peak_rss_mb": rss}
    log(f"{key}: exact first order in {dt:.1f}s")
    res["first_order_check"] = methods.check_first_order(bt, G, [[0, 1, 2], list(range(0, n, 7))])
    log(f"{key}: first order vs exact_series: {res['first_order_check']}")

    mmax = max(cfg["ms"])
    sdir = Path(args.workdir) / f"sketch-{key}-m{mmax}-d{cfg['degree']}"
    sc, dt, rss = in_child(methods.sketch_coefficients, bt, sdir, mmax, cfg["degree"], args.seed, args.reuse,
                           args.workers)
    for m in cfg["ms"]:
        timing[f"sketch m={m}"] = {"precompute_s": methods.precompute_seconds(sc["chunk_times"], m),
                                   "chunk": sc["chunk_times"][0][1],
                                   "coef_per_query_s": sc["coef_s_per_query"], "peak_rss_mb": rss}
    log(f"{key}: sketch m={mmax} degree {cfg['degree']} precomputed in "
        f"{methods.precompute_seconds(sc['chunk_times'], mmax):.1f}s")
    res["sketch_predict_check_max_abs_diff"] = methods.check_predict(bt, sdir, sc, [[0], [1, 2, 3], list(range(0, n, 3))], mmax)
    res["stability"] = sc["stability"][:Q]

    scores: dict[str, dict] = {}
    for name in peer_names:
        try:
            out, dt, rss = in_child(bpeers.PEERS[name], bt)
            full = np.zeros((n, len(bt.queries)))
            full[bt.pool] = out["scores"]
            out["scores"] = full
            scores[name] = out
            timing[name] = {"setup_s": dt, "per_query_s": dt / len(bt.queries), "peak_rss_mb": rss}
            log(f"{key}: peer {name} in {dt:.1f}s")
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
            msg = str(e).strip().splitlines()
            res.setdefault("peer_failures", {})[name] = msg[0] if msg else repr(e)
            log(f"{key}: peer {name} FAILED: {msg[0] if msg else e}")
            if args.verbose:
                print(e)

    # ---- deletion sets
    fams = make_sets(bt, cfg, args.seed + 1)
    k = max(1, round(cfg["topk"] * len(bt.pool)))
    outside = np.setdiff1d(np.arange(n), bt.pool)
    # per-query structured sets: the k examples whose deletion the selector predicts raises the query's loss most
    t0 = time.perf_counter()
    eff_sketch, _ = methods.sketch_predictions(sc, [[i] for i in range(n)], mmax, cfg["degree"])
    t_eff = time.perf_counter() - t0
    selectors = {"sketch": eff_sketch, "first-order": G}
    for name, out in scores.items():
        selectors[name] = out["scores"]
    perq: dict[str, list[list[int]]] = {}
    for sname, E in selectors.items():
        E = E.copy()
        E[outside] = -np.inf  # never visited: not a candidate
        perq[f"top {k} by {sname}"] = [sorted(np.argsort(-E[:, q], kind="stable")[:k].tolist()) for q in range(Q)]
    perq[f"{k} nearest"] = [bt.neighbours(q, k) for q in range(Q)]

    # ---- ground truth: retrain without every distinct set
    allsets: list[list[int]] = []
    index: dict[tuple, int] = {}

    def add(D):
        key_ = tuple(sorted(D))
        if key_ not in index:
            index[key_] = len(allsets)
            allsets.append(list(key_))
        return index[key_]

    fam_idx = {f: [add(D) for D in sets] for f, sets in fams.items()}
    perq_idx = {f: [add(D) for D in sets] for f, sets in perq.items()}
    self_idx = [add([j]) for j in bt.self_idx]
    log(f"{key}: retraining {len(allsets)} deletion sets")
    true_all, t_retrain = methods.truth(bt, allsets, base, progress=lambda s: log(f"{key}: {s}"))
    timing["retrain"] = {"per_set_s": t_retrain}

    # ---- predictions of every method for every set: [S, Q_all] (+ stderr for the sketch)
    preds: dict[str, tuple] = {}
    Dm = np.zeros((len(allsets), n))
    for s, D in enumerate(allsets):
        Dm[s, D] = 1.0
    t0 = time.perf_counter()
    terms = methods.sketch_terms(sc, allsets, mmax)
    for m in cfg["ms"]:
        for r in range(1, cfg["degree"] + 1):
            preds[f"sketch m={m} d={r}"] = methods.sketch_predictions(sc, allsets, m, r, terms=terms)
    t_pred = (time.perf_counter() - t0) / (len(allsets) * len(bt.queries) * len(cfg["ms"]) * cfg["degree"])
    for m in cfg["ms"]:
        timing[f"sketch m={m}"]["predict_per_set_query_s"] = t_pred
    del terms
    preds["first-order"] = (Dm @ G, None)
    rank_only = {}
    for name, out in scores.items():
        preds[name] = (Dm @ out["scores"], None)
        rank_only[name] = bool(out.get("rank_only"))
    res["methods"] = list(preds)
    res["rank_only"] = rank_only
    res["peer_settings"] = {name: out["settings"] for name, out in scores.items()}
    res["timing"] = timing

    # ---- metrics
    table: dict = {}
    plot_data: dict = {}
    for fam, idx in fam_idx.items():
        T = true_all[idx, :Q]
        table[fam] = {"sets": len(idx), "size": int(np.median([len(allsets[i]) for i in idx])), "methods": {}}
        for name, (P, SE) in preds.items():
            table[fam]["methods"][name] = metrics.summarize(P[idx, :Q], T, None if SE is None else SE[idx, :Q],
                                                            rank_only=rank_only.get(name, False))
        plot_data[fam] = {"true": T, "pred": {name: P[idx, :Q] for name, (P, _) in preds.items()}}
    for fam, idx in perq_idx.items():
        T = true_all[idx, np.arange(Q)]
        table[fam] = {"sets": len(idx), "size": k, "one_set_per_query": True, "methods": {}}
        for name, (P, SE) in preds.items():
            table[fam]["methods"][name] = metrics.summarize(
                P[idx, np.arange(Q)], T, None if SE is None else SE[idx, np.arange(Q)], per_query=False,
                rank_only=rank_only.get(name, False))
        plot_data[fam] = {"true": T, "pred": {name: P[idx, np.arange(Q)] for name, (P, _) in preds.items()}}
    res["families"] = table
    # orientation: deleting training example j must raise the loss of example j
    orient = {"truth_positive": float(np.mean([true_all[s, Q + a] > 0 for a, s in enumerate(self_idx)]))}
    for name, (P, _) in preds.items():
        orient[name] = float(np.mean([P[s, Q + a] > 0 for a, s in enumerate(self_idx)]))
    res["orientation_self_deletion_positive"] = orient
    res["effects_time_s"] = t_eff
    return res, plot_data


SEP = "\x1f"  # joins task / family / method in a flat safetensors key (method names contain spaces and '=')


def save_plots(plots: dict, path: Path) -> None:
    """The scatter-plot data (nested dict of arrays) as one safetensors file, written atomically."""
    from safetensors.numpy import save_file

    flat = {}
    for task, fams in plots.items():
        for fam, d in fams.items():
            flat[SEP.join([task, fam, "true"])] = np.ascontiguousarray(d["true"], dtype=np.float64)
            for name, P in d["pred"].items():
                flat[SEP.join([task, fam, "pred", name])] = np.ascontiguousarray(P, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp))
    os.replace(tmp, path)


def load_plots(path: Path) -> dict:
    from safetensors.numpy import load_file

    plots: dict = {}
    for key, arr in load_file(str(path)).items():
        task, fam, kind, *name = key.split(SEP)
        d = plots.setdefault(task, {}).setdefault(fam, {"true": None, "pred": {}})
        if kind == "true":
            d["true"] = arr
        else:
            d["pred"][name[0]] = arr
    return plots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the CI smoke configuration (digits only, small)")
    ap.add_argument("--tasks", default=None, help="comma list (default: digits,digits-fullbatch,names; +paper with --data)")
    ap.add_argument("--peers", default="auto", help="comma list of peers, 'auto' (all importable) or 'none'")
    ap.add_argument("--data", default=None, help="names.txt for the paper task")
    ap.add_argument("--m", default=None, help="comma list of sketch sizes overriding the defaults (e.g. 64,256,1024)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "accuracy.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "accuracy.md"))
    ap.add_argument("--figures", default=None, help="figure directory (default: figures/ next to --md)")
    ap.add_argument("--workdir", default=str(HERE / "work"), help="where sketches are stored")
    ap.add_argument("--reuse", action="store_true", help="reuse stored sketches (timings then come from timings.json)")
    ap.add_argument("--workers", type=int, default=1, help="sketch worker processes (2 on a 2-core machine)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite --md and the figures from --json and the plot data saved next to it (no runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import peers as bpeers
    import report

    figdir = Path(args.figures) if args.figures else Path(args.md).parent / "figures"
    plot_file = Path(args.workdir) / (Path(args.json).stem + "-plots.safetensors")
    if args.report_only:
        out = json.loads(Path(args.json).read_text())
        report.write(out, load_plots(plot_file), Path(args.md), figdir)
        log(f"wrote {args.md}, figures in {figdir}")
        return 0

    configs = SMALL if args.small else FULL
    keys = args.tasks.split(",") if args.tasks else [k for k in configs if k != "paper" or args.data]
    if args.peers == "none":
        peer_names = []
    elif args.peers == "auto":
        peer_names = [p for p in bpeers.PEERS if bpeers.importable(p)]
    else:
        peer_names = args.peers.split(",")
    unavailable = {p: bpeers.why_unavailable(p) for p in bpeers.PEERS if p not in peer_names}
    out = {"generated_by": " ".join(["python", "bench/accuracy/run.py",
                                     *(sys.argv[1:] if argv is None else list(argv))]),
           "argv": sys.argv[1:] if argv is None else list(argv),
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                       "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "peer_versions": bpeers.versions(), "peers_not_run": unavailable, "small": args.small, "tasks": {}}
    plots = {}
    t_all = time.perf_counter()
    for key in keys:
        cfg = dict((configs.get(key) or FULL[key]))
        if args.m:
            cfg["ms"] = [int(x) for x in args.m.split(",")]
        t0 = time.perf_counter()
        res, pdata = run_task(key, cfg, args, peer_names)
        res["wall_s"] = time.perf_counter() - t0
        out["tasks"][key] = res
        plots[key] = pdata
        log(f"{key}: done in {res['wall_s']:.0f}s")
    out["wall_s"] = time.perf_counter() - t_all
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=float) + "\n")
    plot_file.parent.mkdir(parents=True, exist_ok=True)
    save_plots(plots, plot_file)
    report.write(out, plots, Path(args.md), figdir)
    log(f"wrote {args.json}, {args.md}, figures in {figdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
