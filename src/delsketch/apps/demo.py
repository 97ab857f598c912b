"""``delsketch demo``: the whole product on census names in a few minutes.

Trains the microgpt model of the ``names`` preset, precomputes a sketch, predicts how a few outputs
change when every training name containing a rare letter is deleted, retrains for real to check, and
prints and plots predicted against actual changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

DEMO_DELETE = "contains:z"
DEMO_QUERIES = ["liz", "zoe", "suzanne", "ezra", "anna"]


def run_demo(out_dir, directions=64, degree=3, json_out=False, console=None, err=None, progress_factory=None,
             preset_kwargs=None):
    from ..tasks import get_preset
    from .report import plot_predicted_vs_actual, plot_stability
    from ..training import deletion_weights, train
    from ..sketch import evaluate, exact_series, precompute

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = get_preset("names")(**(preset_kwargs or {}))
    D = task.select(DEMO_DELETE)
    timings = {}

    t0 = time.perf_counter()
    with progress_factory("sketch") as bar:
        tid = bar.add_task(f"sketch ({directions} directions, degree {degree})", total=None)
        sk = precompute(task, out_dir / "sketch", directions, degree, seed=0,
                        progress=lambda d, t: bar.update(tid, completed=d, total=t),
                        task_spec={"preset": "names", "data": None, "steps": None, **(preset_kwargs or {})})
    timings["sketch_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pred = sk.predict(DEMO_QUERIES, D, method="sketch")  # the queries stacked: fields of shape [len(DEMO_QUERIES)]
    timings["predict_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with progress_factory("series") as bar:
        tid = bar.add_task(f"exact degree-{degree} series (one ring run)", total=task.steps)
        exact = exact_series(task, D, degree, DEMO_QUERIES, callback=lambda s, l: bar.advance(tid))  # [K, Q]
    timings["exact_series_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with progress_factory("retrain") as bar:
        tid = bar.add_task("retrain (ground truth)", total=2 * task.steps)
        base = train(task, callback=lambda s, l: bar.advance(tid))
        new = train(task, w=deletion_weights(task.n, D), callback=lambda s, l: bar.advance(tid))
    timings["retrain_s"] = time.perf_counter() - t0

    rows = []
    for j, q in enumerate(DEMO_QUERIES):
        b = float(evaluate(task, base, q))
        a = float(evaluate(task, new, q))
        change, se = float(pred.change[j]), float(pred.stderr[j])
        rows.append({
            "query": q, "base": b, "predicted": float(pred.estimate[j]), "predicted_change": change, "stderr": se,
            "exact_series_change": float(exact.value_at_1[j] - exact.coefficients[0, j]),
            "actual": a, "actual_change": a - b,
            "within_2se": abs(change - (a - b)) <= 2 * se,
        })
    t0 = time.perf_counter()
    best = sk.predict(DEMO_QUERIES, D)  # the default answer (method="auto") to the same question
    timings["default_answer_s"] = time.perf_counter() - t0
    default = {"method": best.method, "change": best.change.tolist(), "stderr": best.stderr.tolist(), "why": best.notes[0]}
    stab = sk.stability(DEMO_QUERIES[0])
    plot_path = out_dir / "demo.png"
    plot_predicted_vs_actual(rows, plot_path, f"names preset: delete the {len(D)} training names with '{DEMO_DELETE.split(':')[1]}' "
                             f"({directions} directions, degree {degree})")
    plot_stability({DEMO_QUERIES[0]: stab}, out_dir / "stability.png")
    result = {"deleted": len(D), "n": task.n, "directions": directions, "degree": degree, "rows": rows,
              "stability": {k: stab[k] for k in ("verdict", "decay_per_degree", "safe_deletion_size")},
              "default_answer": default,
              "timings": {k: round(v, 2) for k, v in timings.items()}, "plot": str(plot_path)}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    if json_out:
        print(json.dumps(result, indent=1))
        return result
    t = Table(title=f"Deleting the {len(D)} of {task.n} training names containing "
                    f"'{DEMO_DELETE.split(':')[1]}': predicted vs real retraining")
    for c in ["query", "base loss", "sketch: change ± 2 s.e.", f"exact degree-{degree} series", "retrained: change",
              "within 2 s.e."]:
        t.add_column(c, justify="left" if c == "query" else "right")
    for r in rows:
        t.add_row(r["query"], f"{r['base']:.4f}", f"{r['predicted_change']:+.4f} ± {2 * r['stderr']:.4f}",
                  f"{r['exact_series_change']:+.4f}", f"{r['actual_change']:+.4f}", "yes" if r["within_2se"] else "NO")
    console.print(t)
    console.print("sketch: the prediction from the precomputed sketch (any deletion set, any output); exact series: one "
                  "extra ring run for this deletion set alone (no sketch noise, only truncation error); retrained: "
                  "real retraining without the deleted names.")
    console.print(f"stability of '{DEMO_QUERIES[0]}': {stab['verdict']}")
    console.print(f"the default answer (sketch.predict, method='auto') to this question: {best.method}; {best.notes[0]}")
    console.print(f"sketch {timings['sketch_s']:.1f} s, predict {timings['predict_s']:.2f} s, exact series "
                  f"{timings['exact_series_s']:.1f} s, retrain {timings['retrain_s']:.1f} s; plot {plot_path}, "
                  f"numbers {out_dir / 'demo.json'}")
    return result
