"""Cost of a sketch as a function of n (training examples), P (parameters), m (directions) and k (degree).

Model: the digits MLP 64-h-10 (P = 75 h + 10), batch 32, SGD with momentum; one factor varied at a time around
a centre (n = 400, h = 64, m = 16, k = 3). Measured in this process with one torch thread, in CPU seconds of
that thread (``time.thread_time``: the machine is shared, and wall time there measures the neighbours):

* precompute: seconds per ring step of one chunk of m directions (median of the steps after the first), and
  beside it one plain training step of the same model (the ring's cost in plain steps);
* storage: bytes of the sketch directory (chunk files, base, manifest) against the formula
  16 (k P + n) m + 8 P + manifest (complex128 coefficients of degrees 1..k and the directions psi);
* prediction: seconds for a first prediction of an output (``test:mean``, 100 test examples: the chunks are
  read and the output evaluated on the series-valued parameters) and for another deletion set of the same output
  (the coefficients are kept: a projection of the directions), fastest of 3.

Then a least-squares fit of log time = a + sum_f e_f log f over the varied factors (the exponents e_f), written
with the raw rows to bench/results/scaling.json. docs/scaling.md quotes it and extrapolates.

    OMP_NUM_THREADS=1 python bench/scaling.py [--steps 12] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from delsketch import __version__
from delsketch.sketch import Sketch, directions, precompute, ring_train, weight_series
from delsketch.sketch.core import StabilityWarning
from delsketch.tasks import get_preset
from delsketch.training import train

CENTRE = {"n": 400, "h": 64, "m": 16, "k": 3}
GRID = {"n": [100, 400, 1600], "h": [16, 64, 256, 1024], "m": [4, 16, 64, 256], "k": [1, 2, 3, 5]}
QUICK = {"n": [100, 400], "h": [16, 64], "m": [4, 16], "k": [1, 3]}


def task_for(n: int, h: int, steps: int):
    return get_preset("digits")(n_train=n, hidden=h, steps=steps)


def params_of(task) -> int:
    return sum(v.numel() for v in task.init_params().values())


def per_step(task, m: int, k: int, steps: int) -> tuple[float, float]:
    """(seconds per ring step with m directions at degree k, seconds per plain step): CPU seconds of this thread,
    median over the steps after the first (a short last batch of an epoch is one of them at most)."""
    stamps: list[float] = []
    psi = directions(0, range(m), task.n)
    t0 = time.thread_time()
    ring_train(task, weight_series(psi, k), steps=steps, callback=lambda s, loss: stamps.append(time.thread_time()))
    ring = statistics.median(np.diff([t0, *stamps])[1:])
    pst: list[float] = []
    t0 = time.thread_time()
    train(task, steps=steps, callback=lambda s, loss: pst.append(time.thread_time()))
    plain = statistics.median(np.diff([t0, *pst])[1:])
    return float(ring), float(plain)


def sketch_costs(task, m: int, k: int, steps: int, work: Path) -> tuple[int, int, tuple[float, float]]:
    """(bytes on disk, formula bytes, (seconds for a first prediction of an output, seconds for another deletion
    set of the same output)) of a sketch of m directions (one chunk)."""
    d = work / f"s-{task.n}-{params_of(task)}-{m}-{k}"
    shutil.rmtree(d, ignore_errors=True)
    precompute(task, d, directions=m, degree=k, chunk=m, steps=min(steps, 2))
    disk = sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.name != "timings.json")
    P = params_of(task)
    formula = 16 * (k * P + task.n) * m + 8 * P + (d / "manifest.json").stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StabilityWarning)
        cold, warm = [], []
        for rep in range(3):
            sk = Sketch.load(d, task)
            t0 = time.thread_time()
            sk.predict("test:mean", [0, 1, 2])  # a new output: chunks read, the output evaluated on the series
            cold.append(time.thread_time() - t0)
            t0 = time.thread_time()
            sk.predict("test:mean", [rep + 3, 7])  # the same output, another deletion set
            warm.append(time.thread_time() - t0)
    pred = (min(cold), min(warm))
    shutil.rmtree(d, ignore_errors=True)
    return disk, formula, pred


def fit(rows: list[dict], y: str) -> dict:
    """Exponents of log y = a + e_n log n + e_P log P + e_m log m + e_K log (k+1) by least squares."""
    X = np.array([[1.0, np.log(r["n"]), np.log(r["P"]), np.log(r["m"]), np.log(r["k"] + 1)] for r in rows])
    Y = np.log(np.array([r[y] for r in rows]))
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    pred = X @ coef
    return {"log_a": float(coef[0]), "a": float(np.exp(coef[0])), "e_n": float(coef[1]), "e_P": float(coef[2]),
            "e_m": float(coef[3]), "e_K": float(coef[4]),
            "max_rel_residual": float(np.max(np.abs(np.exp(Y - pred) - 1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="ring steps timed per configuration (the first is dropped)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid (for a smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scaling.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    grid = QUICK if a.quick else GRID
    configs = []
    for f, values in grid.items():
        for v in values:
            c = {**CENTRE, f: v}
            if c not in configs:
                configs.append(c)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="delsketch-scaling-"))
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    print(f"{'n':>5} {'h':>4} {'P':>6} {'m':>3} {'k':>2} | {'ring step':>10} {'plain step':>10} {'/dir/plain':>10} | "
          f"{'bytes':>10} {'formula':>10} | {'predict':>8} {'again':>8}")
    try:
        for c in configs:
            task = task_for(c["n"], c["h"], a.steps)
            P = params_of(task)
            ring, plain = per_step(task, c["m"], c["k"], a.steps)
            disk, formula, pred = sketch_costs(task, c["m"], c["k"], a.steps, work)
            r = {**c, "P": P, "ring_step_s": ring, "plain_step_s": plain,
                 "ring_per_direction_over_plain": ring / c["m"] / plain, "bytes": disk, "formula_bytes": formula,
                 "predict_s": pred[0], "predict_again_s": pred[1]}
            rows.append(r)
            print(f"{c['n']:>5} {c['h']:>4} {P:>6} {c['m']:>3} {c['k']:>2} | {ring * 1e3:>8.1f}ms {plain * 1e3:>8.2f}ms "
                  f"{r['ring_per_direction_over_plain']:>10.1f} | {disk:>10,} {formula:>10,} | {pred[0] * 1e3:>6.1f}ms {pred[1] * 1e3:>6.2f}ms",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fits = {"ring_step_s": fit(rows, "ring_step_s"), "predict_s": fit(rows, "predict_s"),
            "predict_again_s": fit(rows, "predict_again_s")}
    # the slope between the two largest values of each factor (the others at the centre): the regime the
    # arithmetic, not the per-op overhead, dominates
    top = {}
    for f, col in (("n", "n"), ("h", "P"), ("m", "m"), ("k", "k")):
        pts = sorted((r for r in rows if all(r[g] == CENTRE[g] for g in CENTRE if g != f)), key=lambda r: r[f])
        if len(pts) >= 2:
            a_, b_ = pts[-2], pts[-1]
            x = np.log((b_[col] + (col == "k")) / (a_[col] + (col == "k")))
            top[col] = {y: float(np.log(b_[y] / a_[y]) / x) for y in ("ring_step_s", "predict_s")}
    fits["top_slopes"] = top
    storage_error = max(abs(r["bytes"] / r["formula_bytes"] - 1) for r in rows)
    print()
    for name, f in fits.items():
        if name == "top_slopes":
            print("slopes between the two largest values: " + ", ".join(
                f"{c}: ring {v['ring_step_s']:.2f} / predict {v['predict_s']:.2f}" for c, v in f.items()))
            continue
        print(f"{name:>12}: {f['a']:.3g} * n^{f['e_n']:.2f} * P^{f['e_P']:.2f} * m^{f['e_m']:.2f} * (k+1)^{f['e_K']:.2f}"
              f"   (max residual {f['max_rel_residual']:.0%})")
    print(f"     storage: 16 (k P + n) m + 8 P + manifest bytes, within {storage_error:.2%} of the files "
          "(the rest: safetensors headers)")
    result = {
        "command": "OMP_NUM_THREADS=1 python bench/scaling.py" + (" --quick" if a.quick else "") +
                   (f" --steps {a.steps}" if a.steps != 12 else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "delsketch": __version__, "threads": torch.get_num_threads(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "model": "digits MLP 64-h-10, batch 32, SGD momentum 0.9; P = 75 h + 10",
        "centre": CENTRE, "rows": rows, "fits": fits, "storage_formula_max_rel_error": storage_error, "seconds": round(time.perf_counter() - t_start, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {a.out} ({result['seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())
