"""The first-order peer libraries (bench/accuracy/peers.py: captum TracInCP; dattri IF-CG, TracIn, TRAK;
kronfluence EK-FAC) on the bring-your-own-model benchmark (bench/own_model/task.py), merged into the results
that bench/own_model/run.py wrote.

    PYTHONPATH=src bench/accuracy/.venv/bin/python bench/own_model/peers.py --variant fullbatch|adam [--peers auto|NAME,...]
        [--json bench/results/own-model-VARIANT.json]

Run it after run.py (run.py rewrites the JSON from scratch and drops these rows). It needs the peers' venv
(bench/accuracy/setup_env.sh); the delsketch methods are not recomputed. What it does:

* builds a ``BenchTask`` (bench/accuracy/tasks.py) for the own-model task: the same MLP, data and run as
  task.py (``training`` states the run: lr, momentum, batch, steps, n, Adam or not), the 30 test losses of the
  JSON as queries, plus 5 self queries (the losses of training examples 0..4) for the orientation check;
* runs every importable peer in its own forked process (as bench/accuracy/run.py does), predicting a set D's
  change as ``scores[D].sum(0)``;
* builds the same deletion sets as run.py (``run.deletion_sets``, seed 0) and the same ground truth by
  retraining, and scores each peer per family with run.py's ``metrics``. As a check that sets and truth are
  the JSON's, the exact first-order row is recomputed here and compared with the stored one (the stored rows
  are left as they are);
* writes, per family, ``families[fam]["peer: NAME"]``, and ``peers`` (seconds, settings, versions, rank-only
  flags, orientation, failures, checks). For rank-only peers (TRAK; TracIn under Adam, whose step is not
  lr x gradient) only the Spearman numbers mean anything: their ``median_relative_error`` is null.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars (read when tqdm is first imported)

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ACC = ROOT / "bench" / "accuracy"
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # bench/child.py

import child  # noqa: E402
import run as own_run  # noqa: E402  (bench/own_model/run.py: deletion_sets, metrics)
import task as own  # noqa: E402
from delsketch.io import jsonable  # noqa: E402
from delsketch.sketch import first_order  # noqa: E402
from delsketch.tasks import load_task_file  # noqa: E402
from delsketch.training import retrain, train  # noqa: E402

PREFIX = "peer: "  # the peers' rows in families[fam], beside the delsketch methods
SELF = list(range(5))  # self queries: deleting training example j must raise its own loss


def _load(name: str, path: Path):
    """bench/accuracy's modules by path (bench/accuracy/peers.py has this file's name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


acc_tasks = _load("accuracy_tasks", ACC / "tasks.py")
acc_peers = _load("accuracy_peers", ACC / "peers.py")


def in_child(fn, *args):
    """fn(*args) in a forked process (kronfluence wraps the model's modules in place; every peer gets a fresh
    copy of the task), one thread; returns (result, seconds). See bench/child.py."""
    res, dt, _ = child.in_child(fn, *args, what="peer")
    return res, dt


def per_example_ce(logits, y):
    """task.loss_fn (F.cross_entropy, reduction='none') written with log_softmax + gather (vmap-friendly)."""
    return -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def bench_task(variant: str, task) -> "acc_tasks.BenchTask":
    (X, y), (Xt, yt) = own.data()
    # from_module's float64 copy (its parameter names are the task's), with gradients on: from_module freezes
    # its copy, and the peers take their gradients with respect to the module's parameters
    model = copy.deepcopy(task.model).requires_grad_(True)
    opt = task.optimizer.describe()
    batch = max(len(b) for b in task.schedule)
    adam = variant == "adam"
    training = {"optimizer": opt, "lr": opt["lr"], "momentum": None if adam else opt["momentum"],
                "betas": opt.get("betas"), "batch": batch, "steps": task.steps, "n": task.n, "adam": adam,
                "epochs": task.config.get("epochs"), "normalization": task.normalization}
    desc = ("own-model MLP 30-32-32-2 (SiLU) on breast-cancer, " + (
        f"full-batch SGD lr {opt['lr']} momentum {opt['momentum']}, {task.steps} steps" if not adam else
        f"minibatch Adam lr {opt['lr']} (eps {opt['eps']} inside sqrt), batch {batch}, "
        f"{task.config.get('epochs')} epochs = {task.steps} steps"))

    def loss(params, x, yy):
        return per_example_ce(task.forward(params, x), yy)

    Q = own.N_OUTPUTS
    bt = acc_tasks.BenchTask(
        key=f"own_model-{variant}", task=task,
        queries=[f"test_losses[{k}]" for k in range(Q)] + [f"train loss {j} (self)" for j in SELF],
        train_x=X, train_y=y, test_x=torch.cat([Xt[:Q], X[SELF]]), test_y=torch.cat([yt[:Q], y[SELF]]),
        loss=loss, model=model, groups={}, neighbours=lambda q, k: [], description=desc, training=training,
        spec={"task": f"bench/own_model/task.py:make_{variant}"})
    bt.n_main = Q

    def margin(params, x, yy):  # TRAK's output function, log(p / (1 - p)), for two classes
        logits = task.forward(params, x)
        return logits.gather(-1, yy.unsqueeze(-1)).squeeze(-1) - logits.gather(-1, (1 - yy).unsqueeze(-1)).squeeze(-1)

    bt.margin = margin
    bt.margin_description = ("margin log(p/(1-p)) of the correct class, as the logit difference of the two classes "
                             "(the model is confident enough that p rounds to 1 in float64 and log1p(-p) is infinite)")
    return bt


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="fullbatch", choices=["fullbatch", "adam"])
    ap.add_argument("--peers", default="auto", help="comma list of peers, or 'auto' (all importable)")
    ap.add_argument("--json", default=None, help="the results of run.py to merge into")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(a.json or ROOT / f"bench/results/own-model-{a.variant}.json")
    res = json.loads(path.read_text())
    assert res["variant"] == a.variant, (res["variant"], a.variant)

    ref = f"{HERE / 'task.py'}:make_{a.variant}"  # as run.py loads it
    task = load_task_file(ref)
    test_losses = task.outputs["test_losses"]
    (X, _), (Xt, _) = own.data()
    bt = bench_task(a.variant, task)
    Q = bt.n_main
    base = train(task)
    base_v = test_losses.flat(base)
    idx = torch.arange(task.n)
    checks = {"loss_consistency_max_abs_diff": float(max(
        (bt.loss(base, bt.test_x[:Q], bt.test_y[:Q]) - base_v).abs().max(),
        (bt.loss(base, bt.train_x, bt.train_y) - task.example_losses(base, idx)).abs().max()))}
    assert checks["loss_consistency_max_abs_diff"] < 1e-10, checks

    names = [p for p in acc_peers.PEERS if acc_peers.importable(p)] if a.peers == "auto" else a.peers.split(",")
    info: dict = {"command": "PYTHONPATH=src bench/accuracy/.venv/bin/python bench/own_model/peers.py " + " ".join(argv or sys.argv[1:]),
                  "versions": {**acc_peers.versions(), "torch": torch.__version__, "python": platform.python_version()},
                  "not_run": {p: acc_peers.why_unavailable(p) for p in acc_peers.PEERS if p not in names},
                  "training_as_the_peers_see_it": bt.training, "description": bt.description,
                  "cpus": os.cpu_count(), "threads": 1, "load_average_at_start": os.getloadavg(),
                  "seconds": {}, "settings": {}, "rank_only": {}, "failures": {}}
    scores = {}
    for name in names:
        try:
            out, dt = in_child(acc_peers.PEERS[name], bt)
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
            msg = str(e).strip().splitlines()
            info["failures"][name] = msg[0] if msg else repr(e)
            print(f"{name}: FAILED: {info['failures'][name]}", flush=True)
            continue
        bad = int((~np.isfinite(out["scores"])).sum())
        if bad:
            info["failures"][name] = f"{bad} of {out['scores'].size} scores are not finite"
            print(f"{name}: FAILED: {info['failures'][name]}", flush=True)
            continue
        full = np.zeros((task.n, len(bt.queries)))
        full[bt.pool] = out["scores"]
        scores[name] = full
        info["seconds"][name] = dt
        info["settings"][name] = out["settings"]
        info["rank_only"][name] = bool(out["rank_only"])
        print(f"{name}: {dt:.1f} s{' (rank only)' if out['rank_only'] else ''}", flush=True)

    fams = own_run.deletion_sets(task, X, Xt)  # run.py's sets (seed 0)
    assert {k: len(v) for k, v in fams.items()} == res["deletion_sets"], (res["deletion_sets"], fams.keys())
    sets = [D for f in fams.values() for D in f]
    t0 = time.perf_counter()
    truth = torch.stack([test_losses.flat(retrain(task, D)) - base_v for D in sets]).numpy()  # [S, 30]
    info["ground_truth_s"] = time.perf_counter() - t0
    self_truth = [float(task.example_losses(retrain(task, [j]), torch.tensor([j]))[0]
                        - task.example_losses(base, torch.tensor([j]))[0]) for j in SELF]

    # the check: the exact first-order row from these sets and this truth equals the stored one
    E = first_order(task, test_losses).numpy()
    fo_pred = np.stack([E[D].sum(0) for D in sets])
    diff, at = 0.0, 0
    for fam, fs in fams.items():
        sl = slice(at, at + len(fs))
        at += len(fs)
        mine, stored = own_run.metrics(fo_pred[sl], truth[sl], None), res["families"][fam]["first_order (exact)"]
        diff = max(diff, *(abs(mine[k] - stored[k]) for k in mine))
    checks["first_order_row_vs_stored_max_abs_diff"] = diff
    assert diff < 1e-6, f"the deletion sets or the truth differ from the JSON's (first-order row off by {diff})"

    orient = {"truth_positive": float(np.mean([t > 0 for t in self_truth]))}
    for fam in res["families"]:  # drop the rows of an earlier peers run
        res["families"][fam] = {m: v for m, v in res["families"][fam].items() if not m.startswith(PREFIX)}
    for name, S in scores.items():
        pred = np.stack([S[D, :Q].sum(0) for D in sets])
        at = 0
        for fam, fs in fams.items():
            sl = slice(at, at + len(fs))
            at += len(fs)
            row = own_run.metrics(pred[sl], truth[sl], None)
            if info["rank_only"][name]:
                row["median_relative_error"] = None
                row["rank_only"] = True
            res["families"][fam][PREFIX + name] = row
        orient[name] = float(np.mean([S[j, Q + a] > 0 for a, j in enumerate(SELF)]))
    info["orientation_self_deletion_positive"] = orient
    info["checks"] = checks
    info["rank_only_note"] = ("rank-only peers: their scores are not in units of the loss change (TRAK: margin "
                              "units; TracIn under Adam: the step is not lr x gradient), so median_relative_error "
                              "is null; only the Spearman numbers are meaningful")
    res["peers"] = info
    path.write_text(json.dumps(jsonable(res), indent=1, allow_nan=False) + "\n")

    head = f"{'family':<13} {'method':<34} {'Spearman/out':>12} {'pooled':>7} {'med.rel.err':>11}"
    print(head)
    for fam, ms in res["families"].items():
        for m in ["first_order (exact)", "summed exact leave-one-out"] + [PREFIX + n for n in scores]:
            v = ms[m]
            rel = v["median_relative_error"]
            print(f"{fam:<13} {m:<34} {v['spearman_per_output']:>12.3f} {v['spearman_pooled']:>7.3f} "
                  f"{'rank only' if rel is None else f'{rel:.3f}':>11}")
    print(f"orientation (share of self deletions predicted to raise the own loss): {orient}")
    print(f"checks: {checks}; wrote {path}")
    return res


if __name__ == "__main__":
    main()
