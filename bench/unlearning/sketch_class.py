"""Can a deletion sketch predict the forget set's losses after deleting a whole class? Coverage (fraction of the
forgotten examples whose real retrained loss lies within 2 standard errors of the sketch's prediction) and the
mean predicted loss against the real one, at each truncation degree, for the digits preset at 3 and 10 epochs
(64 directions, degree 5), for class 3 and for 25 random examples.

    OMP_NUM_THREADS=1 python bench/unlearning/sketch_class.py   # writes bench/results/unlearning-sketch-class.json
"""

from __future__ import annotations

import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

from delsketch.io import write_json
from delsketch.sketch import precompute
from delsketch.tasks import get_preset
from delsketch.training import retrain
from delsketch.training.outputs import own_losses

OUT = Path(__file__).resolve().parents[1] / "results" / "unlearning-sketch-class.json"


def main():
    rows = []
    for epochs in (3, 10):
        task = get_preset("digits")(n_test=1297, epochs=epochs)
        t0 = time.perf_counter()
        sk = precompute(task, Path(tempfile.mkdtemp()) / "sk", 64, 5)
        seconds = time.perf_counter() - t0
        for name, D in (("class 3", task.select("class:3")), ("random 25", sorted(random.Random(5).sample(range(task.n), 25)))):
            real = task.example_losses(retrain(task, D), torch.tensor(D))
            for k in range(1, 6):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pr = sk.predict(own_losses(task, D), D, degree=k, method="sketch")
                cov = float(((pr.estimate - real).abs() <= 2 * pr.stderr).double().mean())
                rows.append({"epochs": epochs, "steps": task.steps, "request": name, "size": len(D), "degree": k,
                             "coverage_2se": cov, "mean_predicted": float(pr.estimate.mean()),
                             "mean_stderr": float(pr.stderr.mean()), "mean_retrained": float(real.mean()),
                             "sketch_seconds": round(seconds, 2)})
                print(f"epochs {epochs:>2} {name:<10} degree {k}: coverage {100 * cov:5.1f} %, mean predicted "
                      f"{rows[-1]['mean_predicted']:+.4g} (mean s.e. {rows[-1]['mean_stderr']:.3g}) vs retrained "
                      f"{rows[-1]['mean_retrained']:.4g}", flush=True)
    write_json(OUT, {"directions": 64, "max_degree": 5, "rows": rows})


if __name__ == "__main__":
    main()
