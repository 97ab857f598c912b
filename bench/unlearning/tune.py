"""Choose the ``synthetic`` method's settings on a split the benchmark never uses (digits preset, seed 1: another
train/test split and another initialization), over all ten forget-a-class requests. Criterion: the number of
classes where forget accuracy and MIA advantage are within 2 points of the retrained model's and test accuracy
is not more than 2 points below it; ties broken by the mean |MIA advantage gap|.

    OMP_NUM_THREADS=1 python bench/unlearning/tune.py     # writes bench/results/unlearning-tune.json
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from delsketch.io import write_json
from delsketch.tasks import get_preset
from delsketch.training import train
from delsketch.unlearn import reference, unlearn, verify

OUT = Path(__file__).resolve().parents[1] / "results" / "unlearning-tune.json"
GRID = {"impair_steps": [0, 10, 20], "noise_weight": [0.3, 1.0], "lr": [0.02, 0.05]}


def main():
    t0 = time.perf_counter()
    task = get_preset("digits")(n_test=1297, epochs=10, seed=1)
    p = train(task)
    refs = {c: reference(task, task.select(f"class:{c}"), original=p) for c in range(10)}
    rows = []
    for values in itertools.product(*GRID.values()):
        s = dict(zip(GRID, values))
        ok, gaps = 0, []
        for c in range(10):
            D = task.select(f"class:{c}")
            u = unlearn(task, D, "synthetic", params=p, forget_labels=[c], available_data="none", **s)
            v = verify(task, u, reference=refs[c])
            um, rm = v["unlearned"], v["reference_metrics"]
            d_acc = um["forget_acc"] - rm["forget_acc"]
            d_adv = um["mia"]["advantage"] - rm["mia"]["advantage"]
            d_test = um["test_acc"] - rm["test_acc"]
            ok += abs(d_acc) <= 0.02 and abs(d_adv) <= 0.02 and d_test >= -0.02
            gaps.append({"class": c, "forget_acc_gap": d_acc, "mia_advantage_gap": d_adv, "test_acc_gap": d_test})
        mean_adv = sum(abs(g["mia_advantage_gap"]) for g in gaps) / 10
        rows.append({"settings": s, "classes_on_target": ok, "mean_abs_mia_gap": mean_adv,
                     "mean_test_acc_gap": sum(g["test_acc_gap"] for g in gaps) / 10, "per_class": gaps})
        print(f"{s}: {ok}/10 on target, mean |MIA adv gap| {100 * mean_adv:.1f} pts, "
              f"mean test acc gap {100 * rows[-1]['mean_test_acc_gap']:+.1f} pts", flush=True)
    best = max(rows, key=lambda r: (r["classes_on_target"], -r["mean_abs_mia_gap"]))
    print("chosen:", best["settings"])
    write_json(OUT, {"task": "digits preset, n_test=1297, epochs=10, seed=1 (not the benchmark's seed 0)",
                     "grid": GRID, "rows": rows, "chosen": best["settings"],
                     "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
