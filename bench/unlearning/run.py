"""Unlearning benchmark on the digits preset: every method of delsketch.unlearn, every metric of its verify,
against real retraining, for four forget requests (a class, 1 % and 5 % random examples, the 25 most memorized
examples by the exact first-order self-influence) and a sequence of three 1 % requests.

    OMP_NUM_THREADS=1 python bench/unlearning/run.py [--sketch-dir DIR] [--plot-only]
    -> bench/results/unlearning.json, docs/figures/unlearning-digits.png, a table on stdout

Task: ``digits`` preset with ``n_test=1297`` (every image not in the 500 training ones, so the membership test has
~130 non-members per class) and ``epochs=10`` (160 SGD steps). The ``sketch`` method uses a 64-direction,
degree-3 sketch of that run (precomputed here, its time reported). The digits scenarios also report online LiRA
(16 shadow models on random halves) on the forget set. Method settings are the defaults, except
that ``synthetic`` gets ``forget_labels`` (from the request) and runs with ``available_data="none"``.

Also: a user-style model through ``Task.from_module`` (an MLP and ``torch.optim.SGD`` on 600 other digits images,
the remaining 1197 as its test set) and the ``names`` preset (character microgpt, Adam; no held-out set, so
no membership test and no test accuracy; ``newton`` not run there), every method but ``sketch``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from delsketch.audit import memorization
from delsketch.io import write_json
from delsketch.sketch import precompute
from delsketch.tasks import get_preset
from delsketch.training import retrain, train
from delsketch.unlearn import METHODS, UnlearnError, reference, unlearn, unlearn_sequence, verify
from delsketch.unlearn.verify import table_rows

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results" / "unlearning.json"
FIG = ROOT / "docs" / "figures" / "unlearning-digits.png"
DIRECTIONS, DEGREE = 64, 3
LIRA = 16  # shadow models on random halves for the LiRA level of the forget set (digits scenarios)


def labels_of(task, idx):
    return sorted({int(task.examples[i]["label"]) for i in idx})


def run_method(task, p, D, m, ref, sk, previously=()):
    kw = {}
    if m == "synthetic":
        kw = {"forget_labels": labels_of(task, D), "available_data": "none"}
    if m == "sketch":
        kw = {"sketch": sk, "available_data": "none"}
    u = unlearn(task, D, m, params=p, **kw)
    v = verify(task, u, reference=ref)
    return u, v


def sketch_degrees(task, sk, D, p, r):
    """The sketch's predicted parameters at each truncation degree: distance to the retrained parameters (next
    to the original model's distance) and test accuracy."""
    from delsketch.unlearn.access import test_data
    from delsketch.unlearn.methods.sketch import predicted_params

    X, y = test_data(task)
    dist = lambda a, b: float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))  # noqa: E731
    rows = []
    for deg in range(sk.degree + 1):
        est, _ = predicted_params(sk, D, deg)
        with torch.no_grad():
            acc = float((torch.func.functional_call(task.model, est, (X,)).argmax(-1) == y).double().mean())
        rows.append({"degree": deg, "param_distance_to_retrained": dist(est, r), "test_acc": acc})
    return {"original_distance_to_retrained": dist(p, r), "rows": rows}


def flagged_fraction(task, sk, D):
    """Fraction of the forgotten examples' own losses that the sketch's safe-size check (coherence included) flags
    as past what its series supports."""
    import warnings

    from delsketch.training.outputs import own_losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = sk.predict(own_losses(task, D), D, method="sketch")
    return float(pr.beyond_safe_size.double().mean())


def sketch_coverage(task, sk, D, p):
    """Fraction of the forget set's per-example losses, and of the parameters, that the sketch predicts within 2
    standard errors of real retraining."""
    r = retrain(task, D)
    u = unlearn(task, D, "sketch", params=p, sketch=sk, available_data="none")
    cover_p = torch.cat([((u.params[k] - r[k]).abs() <= 2 * u.stderr[k] + 1e-12).flatten() for k in r])
    ref = reference(task, D, kind="sketch", sketch=sk, original=p)
    pred = ref.predicted["forget_loss"]
    real = task.example_losses(r, torch.tensor(D))
    z = (torch.tensor(pred["per_example"]) - real) / torch.tensor(pred["per_example_stderr"])
    return {"by_degree": sketch_degrees(task, sk, D, p, r), "forget_losses_within_2se": float((z.abs() <= 2).double().mean()),
            "forget_losses_flagged": flagged_fraction(task, sk, D),
            "reference_warning": pred.get("warning"), "method_warning": u.info.get("warning"),
            "params_within_2se": float(cover_p.double().mean()),
            "forget_loss_mean_predicted": pred["mean"], "forget_loss_mean_stderr": pred["stderr"],
            "forget_loss_mean_retrained": float(real.mean()), "seconds_predict": round(u.seconds, 4),
            "sketch_reference": ref}


def compact(v):
    u, r = v["unlearned"], v["reference_metrics"]
    mia = lambda m, k: None if m["mia"] is None else m["mia"][k]  # noqa: E731
    return {"verdict": v["verdict"], "forget_acc": u["forget_acc"], "forget_acc_ref": r["forget_acc"],
            "forget_loss": u["forget_loss"], "forget_loss_ref": r["forget_loss"],
            "retain_acc": u["retain_acc"], "retain_acc_ref": r["retain_acc"],
            "test_acc": u["test_acc"], "test_acc_ref": r["test_acc"],
            "mia_advantage": mia(u, "advantage"), "mia_advantage_ref": mia(r, "advantage"),
            "mia_advantage_ci95": mia(u, "advantage_ci95"), "mia_advantage_ref_ci95": mia(r, "advantage_ci95"),
            "mia_auc": mia(u, "auc"), "mia_auc_ref": mia(r, "auc"), "ks_pvalue": v["ks"]["pvalue"],
            "mia_advantage_pvalue": mia(u, "advantage_pvalue"), "mia_advantage_ref_pvalue": mia(r, "advantage_pvalue"),
            "mia_advantage_chance95": mia(r, "advantage_chance95"),
            "param_distance_relative": v["param_distance_relative"], "relearn_steps": v["relearn_steps"],
            "relearn_steps_ref": v["relearn_steps_reference"], "seconds": v["cost"]["seconds"],
            "relative_seconds": v["cost"]["relative_seconds"], "retrain_equivalents": v["cost"]["retrain_equivalents"],
            "data_touched": v["data_touched"],
            **({"lira_member_rate": v["lira"]["unlearned"]["member_rate"],
                "lira_member_rate_ref": v["lira"]["reference"]["member_rate"],
                "lira_member_rate_original": v["lira"]["original"]["member_rate"]} if v.get("lira") else {})}


def other_task(task, p, scenarios, methods, test=None, skip=None):
    """Every method on another task (no sketch): {scenario: {"size", "methods": {method: row}}}."""
    out = {}
    for name, D in scenarios.items():
        ref = reference(task, D, original=p, test=test)
        rows = {}
        for m in methods:
            if skip and m in skip:
                rows[m] = {"not_run": skip[m]}
                continue
            labels = labels_of_module(task, D) if m == "synthetic" else None
            kw = {"forget_labels": labels, "available_data": "none"} if labels is not None else {}
            try:
                u = unlearn(task, D, m, params=p, **kw)
            except UnlearnError as e:
                rows[m] = {"refused": str(e)}
                print(f"{task.name} {name} {m}: refused: {e}", flush=True)
                continue
            v = verify(task, u, reference=ref, test=test)
            rows[m] = compact(v)
            rows[m]["settings"] = u.settings
            print(f"{task.name} {name} {v['verdict']}", flush=True)
        out[name] = {"size": len(D), "retrain_seconds": ref.seconds, "methods": rows}
    return out


def labels_of_module(task, idx):
    if task.data is not None:
        return sorted({int(task.data[1][i]) for i in idx})
    if all(isinstance(task.examples[i], dict) for i in idx):
        return labels_of(task, idx)
    return None  # text: no class labels (the method then refuses in one line)


def own_model_task():
    """A user's model through the front door: an MLP and torch.optim.SGD on the digits data, Task.from_module."""
    import torch.nn as nn
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from delsketch.training import Task

    X, y = load_digits(return_X_y=True)
    perm = torch.from_numpy(__import__("numpy").random.RandomState(7).permutation(len(y)))
    X = torch.tensor(X / 16.0, dtype=torch.float64)[perm]
    y = torch.tensor(y, dtype=torch.long)[perm]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    task = Task.from_module(model, (X[:600], y[:600]), lambda out, t: F.cross_entropy(out, t, reduction="none"),
                            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), epochs=8, batch_size=32,
                            name="own-mlp")
    return task, (X[600:], y[600:])


def on_target(c):
    return (abs(c["forget_acc"] - c["forget_acc_ref"]) <= 0.02 and abs(c["mia_advantage"] - c["mia_advantage_ref"]) <= 0.02
            and c["test_acc"] >= c["test_acc_ref"] - 0.02)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["scenarios"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.5))
    methods = [m for m in METHODS if m != "retrain"]
    colors = dict(zip(methods, plt.cm.tab10.colors))
    for j, s in enumerate(names):
        rows = results["scenarios"][s]["methods"]
        ax = axes[0, j]
        x = range(len(methods))
        ok = {m: "refused" not in rows[m] for m in methods}
        fa = [100 * (rows[m]["forget_acc"] - rows[m]["forget_acc_ref"]) if ok[m] else 0 for m in methods]
        ta = [100 * (rows[m]["test_acc"] - rows[m]["test_acc_ref"]) if ok[m] else 0 for m in methods]
        ax.axhspan(-2, 2, color="0.85")
        ax.bar([k - 0.2 for k in x], fa, width=0.4, color=[colors[m] for m in methods], label="forget acc")
        ax.bar([k + 0.2 for k in x], ta, width=0.4, color=[colors[m] for m in methods], hatch="//", alpha=0.5,
               label="test acc")
        for k, m in enumerate(methods):
            if not ok[m]:
                ax.text(k, 0, "refused", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-105, 105)
        ax.set_xticks(list(x), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{s} (|D| = {results['scenarios'][s]['size']})")
        if j == 0:
            ax.set_ylabel("unlearned - retrained (points)")
            ax.legend(fontsize=8, loc="lower left")
        ax2 = axes[1, j]
        x = range(len(methods))
        ok = {m: "refused" not in rows[m] for m in methods}
        adv = [100 * rows[m]["mia_advantage"] if ok[m] else 0 for m in methods]
        lo = [max(0.0, 100 * (rows[m]["mia_advantage"] - rows[m]["mia_advantage_ci95"][0])) if ok[m] else 0
              for m in methods]
        hi = [max(0.0, 100 * (rows[m]["mia_advantage_ci95"][1] - rows[m]["mia_advantage"])) if ok[m] else 0
              for m in methods]
        ax2.bar(x, adv, yerr=[lo, hi], color=[colors[m] for m in methods], capsize=3)
        for k, m in enumerate(methods):
            if not ok[m]:
                ax2.text(k, 1, "refused", rotation=90, ha="center", va="bottom", fontsize=7)
        ref = 100 * rows["retrain"]["mia_advantage_ref"]
        ax2.axhspan(ref - 2, ref + 2, color="0.85")
        ax2.axhline(ref, color="k", ls="--", label="retrained")
        ax2.set_xticks(list(x), methods, rotation=60, ha="right", fontsize=8)
        if j == 0:
            ax2.set_ylabel("MIA advantage on forget set (%)")
        ax2.legend(fontsize=8)
    fig.suptitle("digits: unlearning methods vs real retraining (top: accuracy gaps, solid forget set, hatched test "
                 "set; bottom: MIA advantage with bootstrap 95 % interval; grey: within 2 points)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sketch-dir", default=None, help="where the sketch goes (default: a temporary directory)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from the committed JSON")
    args = ap.parse_args()
    if args.plot_only:
        import json

        out = json.loads(OUT.read_text())
        plot(out, FIG)
        print_table(out)
        return
    t_all = time.perf_counter()
    task = get_preset("digits")(n_test=1297, epochs=10)
    t0 = time.perf_counter()
    p = train(task)
    train_seconds = time.perf_counter() - t0
    sk_dir = Path(args.sketch_dir or tempfile.mkdtemp()) / "digits-sketch"
    t0 = time.perf_counter()
    sk = precompute(task, sk_dir, DIRECTIONS, DEGREE)
    sketch_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    mem = memorization(task, route="first_order", metric="loss")
    mem_seconds = time.perf_counter() - t0
    rng = random.Random(0)
    scenarios = {
        "class 3": task.select("class:3"),
        "random 1%": sorted(rng.sample(range(task.n), task.n // 100)),
        "random 5%": sorted(rng.sample(range(task.n), task.n // 20)),
        "most memorized 25": sorted(mem.ranking()[:25]),
    }
    out = {"task": {"preset": "digits", "n_train": task.n, "n_test": 1297, "epochs": 10, "steps": task.steps,
                    "fingerprint": task.fingerprint()},
           "seconds": {"train": round(train_seconds, 4), "sketch_precompute": round(sketch_seconds, 2),
                       "memorization_first_order": round(mem_seconds, 2)},
           "sketch": {"directions": DIRECTIONS, "degree": DEGREE}, "scenarios": {}}
    for name, D in scenarios.items():
        ref = reference(task, D, original=p, lira=LIRA)
        rows = {}
        for m in METHODS:
            try:
                u, v = run_method(task, p, D, m, ref, sk)
            except UnlearnError as e:
                rows[m] = {"refused": str(e)}
                print(f"{m}: refused: {e}", flush=True)
                continue
            rows[m] = compact(v)
            rows[m]["settings"] = u.settings
            rows[m]["on_target"] = on_target(rows[m])
            print(v["verdict"], flush=True)
        cov = sketch_coverage(task, sk, D, p)
        sref = cov.pop("sketch_reference")
        vs = verify(task, unlearn(task, D, "neggrad_plus", params=p), reference=sref)
        cov["stability_test_mean"] = {k: sk.stability("test:mean")[k] for k in ("verdict", "safe_deletion_size")}
        out["scenarios"][name] = {"size": len(D), "forget": D, "retrain_seconds": ref.seconds, "methods": rows,
                                  "sketch_coverage": cov, "neggrad_plus_vs_sketch_reference": compact(vs)}
        print(f"{name}: sketch coverage {cov}", flush=True)
    # every class for the data-free method (robustness of the target, not only class 3)
    per_class = []
    for c in range(10):
        D = task.select(f"class:{c}")
        ref = reference(task, D, original=p)
        _, v = run_method(task, p, D, "synthetic", ref, sk)
        row = compact(v)
        row["class"], row["on_target"] = c, on_target(row)
        per_class.append(row)
    out["synthetic_every_class"] = {"on_target": sum(r["on_target"] for r in per_class), "rows": per_class}
    print(f"synthetic on target for {out['synthetic_every_class']['on_target']} of 10 classes", flush=True)
    # requests in sequence: three 1 % requests, each method applied cumulatively
    reqs = [sorted(rng.sample([i for i in range(task.n)], task.n // 100)) for _ in range(3)]
    seq = {}
    for m in METHODS:
        kw = {"sketch": sk, "available_data": "none"} if m == "sketch" else {}
        if m == "synthetic":
            continue  # a class method: a 1 % random request spans most classes (see the random rows)
        res = unlearn_sequence(task, reqs, m, params=p, **kw)
        seq[m] = [compact(r["verification"]) for r in res]
    out["sequence"] = {"requests": reqs, "methods": seq}
    # a user-style model through Task.from_module (held-out test data passed to verify)
    own, own_test = own_model_task()
    po = train(own)
    rng_o = random.Random(1)
    own_sc = {"class 3": [i for i in range(own.n) if int(own.data[1][i]) == 3],
              "random 5%": sorted(rng_o.sample(range(own.n), own.n // 20))}
    out["own_model"] = {"task": {"n_train": own.n, "n_test": len(own_test[1]), "steps": own.steps,
                                 "model": "Linear(64, 32) - Tanh - Linear(32, 10), torch.optim.SGD lr 0.1 momentum 0.9"},
                        "scenarios": other_task(own, po, own_sc, [m for m in METHODS if m != "sketch"], test=own_test)}
    # the names task (character microgpt, Adam): no held-out set, so no MIA and no test accuracy
    nt = get_preset("names")()
    pn = train(nt)
    rng_n = random.Random(2)
    names_sc = {"names containing 'z'": nt.select("contains:z"), "random 5%": sorted(rng_n.sample(range(nt.n), nt.n // 20))}
    out["names"] = {"task": {"preset": "names", "n": nt.n, "steps": nt.steps},
                    "scenarios": other_task(nt, pn, names_sc, [m for m in METHODS if m != "sketch"],
                                            skip={"newton": "not run: the Hessian of 4192 parameters over the names "
                                                            "took more than 600 s here (run stopped)"})}
    ref3 = reference(task, scenarios["class 3"], original=p)
    out["class_3_tables"] = {m: table_rows(run_method(task, p, scenarios["class 3"], m, ref3, sk)[1])
                             for m in ("synthetic", "neggrad_plus")}
    out["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    write_json(OUT, out)
    plot(out, FIG)
    print_table(out)


def print_table(out):
    pct = lambda x: "  -  " if x is None else f"{100 * x:5.1f}"  # noqa: E731
    print(f"\n{'task':<10} {'scenario':<22} {'method':<16} {'forget acc':>12} {'MIA adv':>12} {'test acc':>12} "
          f"{'KS p':>8} {'relearn':>8} {'retrain x':>9}  verdict")
    blocks = [("digits", out["scenarios"])]
    blocks += [(k, out[k]["scenarios"]) for k in ("own_model", "names") if k in out]
    for tname, scen in blocks:
        for s, block in scen.items():
            for m, c in block["methods"].items():
                if "refused" in c or "not_run" in c:
                    print(f"{tname:<10} {s:<22} {m:<16} {c.get('refused') or c.get('not_run')}")
                    continue
                print(f"{tname:<10} {s:<22} {m:<16} {pct(c['forget_acc'])}/{pct(c['forget_acc_ref'])} "
                      f"{pct(c['mia_advantage'])}/{pct(c['mia_advantage_ref'])} "
                      f"{pct(c['test_acc'])}/{pct(c['test_acc_ref'])} {c['ks_pvalue']:8.2g} "
                      f"{c['relearn_steps']:>3}/{c['relearn_steps_ref']:<4} {c['retrain_equivalents']:9.3g}  "
                      f"{c['verdict'].split(';')[0].split(': ')[1]}")


if __name__ == "__main__":
    main()
