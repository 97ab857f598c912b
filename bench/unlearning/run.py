"""Unlearning benchmark on the digits preset: every method of delsketch.unlearn, every metric of its verify,
against real retraining, for four forget requests (a class, 1 % and 5 % random examples, the 25 most memorized
examples by the exact first-order self-influence) and a sequence of three 1 % requests.

    OMP_NUM_THREADS=1 python bench/unlearning/run.py [--sketch-dir DIR]
    -> bench/results/unlearning.json, docs/figures/unlearning-digits.png, a table on stdout

Task: ``digits`` preset with ``n_test=1297`` (every image not in the 500 training ones, so the membership test has
~130 non-members per class) and ``epochs=10`` (160 SGD steps). The ``sketch`` method uses a 64-direction,
degree-3 sketch of that run (precomputed here, its time reported). Method settings are the defaults, except
that ``synthetic`` gets ``forget_labels`` (from the request) and runs with ``available_data="none"``.
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
from delsketch.sketch import Sketch, precompute
from delsketch.tasks import get_preset
from delsketch.training import retrain, train
from delsketch.unlearn import METHODS, UnlearnError, reference, unlearn, unlearn_sequence, verify
from delsketch.unlearn.verify import table_rows

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results" / "unlearning.json"
FIG = ROOT / "docs" / "figures" / "unlearning-digits.png"
DIRECTIONS, DEGREE = 64, 3


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
            "params_within_2se": float(cover_p.double().mean()),
            "forget_loss_mean_predicted": pred["mean"], "forget_loss_mean_stderr": pred["stderr"],
            "forget_loss_mean_retrained": float(real.mean()), "seconds_predict": round(u.seconds, 4),
            "sketch_reference": ref}


def compact(v):
    u, r = v["unlearned"], v["reference_metrics"]
    return {"verdict": v["verdict"], "forget_acc": u["forget_acc"], "forget_acc_ref": r["forget_acc"],
            "forget_loss": u["forget_loss"], "forget_loss_ref": r["forget_loss"],
            "retain_acc": u["retain_acc"], "retain_acc_ref": r["retain_acc"],
            "test_acc": u["test_acc"], "test_acc_ref": r["test_acc"],
            "mia_advantage": u["mia"]["advantage"], "mia_advantage_ref": r["mia"]["advantage"],
            "mia_advantage_ci95": u["mia"]["advantage_ci95"], "mia_advantage_ref_ci95": r["mia"]["advantage_ci95"],
            "mia_auc": u["mia"]["auc"], "mia_auc_ref": r["mia"]["auc"], "ks_pvalue": v["ks"]["pvalue"],
            "param_distance_relative": v["param_distance_relative"], "relearn_steps": v["relearn_steps"],
            "relearn_steps_ref": v["relearn_steps_reference"], "seconds": v["cost"]["seconds"],
            "relative_seconds": v["cost"]["relative_seconds"], "retrain_equivalents": v["cost"]["retrain_equivalents"],
            "data_touched": v["data_touched"]}


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
        ref = reference(task, D, original=p)
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
    ref3 = reference(task, scenarios["class 3"], original=p)
    out["class_3_tables"] = {m: table_rows(run_method(task, p, scenarios["class 3"], m, ref3, sk)[1])
                             for m in ("synthetic", "neggrad_plus")}
    out["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    write_json(OUT, out)
    plot(out, FIG)
    print_table(out)


def print_table(out):
    print(f"\n{'scenario':<18} {'method':<16} {'forget acc':>12} {'MIA adv':>12} {'test acc':>12} {'KS p':>8} "
          f"{'relearn':>8} {'cost x':>8}  verdict")
    for s, block in out["scenarios"].items():
        for m, c in block["methods"].items():
            if "refused" in c:
                print(f"{s:<18} {m:<16} refused: {c['refused']}")
                continue
            print(f"{s:<18} {m:<16} {100 * c['forget_acc']:5.1f}/{100 * c['forget_acc_ref']:5.1f} "
                  f"{100 * c['mia_advantage']:5.1f}/{100 * c['mia_advantage_ref']:5.1f} "
                  f"{100 * c['test_acc']:5.1f}/{100 * c['test_acc_ref']:5.1f} {c['ks_pvalue']:8.2g} "
                  f"{c['relearn_steps']:>3}/{c['relearn_steps_ref']:<4} {c['relative_seconds']:8.3g}  "
                  f"{c['verdict'].split(';')[0].split(': ')[1]}")


if __name__ == "__main__":
    main()
