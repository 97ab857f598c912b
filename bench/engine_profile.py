"""Where a compute-bound ring step goes: the 64-256-256-10 SiLU MLP of bench/engine.py's "mlp-256 full" row (512
examples, full batch, SGD momentum, m = 32 directions), one thread, torch profiler over 3 ring steps (0-2), self CPU time
per aten op; the per-direction ratio to a plain step measured side by side in the same process.

    OMP_NUM_THREADS=1 python bench/engine_profile.py [--degree 3]   # -> bench/results/engine-profile-K{degree}.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import delsketch  # noqa: F401  (before torch: it asks torch for huge pages, see delsketch/_alloc.py)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import compute_task  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--m", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile

    from delsketch.io import versions, write_json
    from delsketch.sketch import directions, ring_train, weight_series
    from delsketch.training import train

    task = compute_task("mlp-64-256-256-10", 512, None, "sgd", 4)
    w = weight_series(directions(0, range(a.m), task.n), a.degree)
    ring_train(task, w, steps=1)  # warm-up
    load = list(os.getloadavg())
    t0 = time.perf_counter()
    train(task, steps=4)
    plain = (time.perf_counter() - t0) / 4  # (4 steps: noisy; bench/engine.py --rows compute is the reference)
    # step 0 is cheap (the parameters are still plain there): time steps 1-2 as a 3-step run minus a 1-step run
    t0 = time.perf_counter()
    ring_train(task, w, steps=1)
    t1 = time.perf_counter()
    ring_train(task, w, steps=3)
    ring = ((time.perf_counter() - t1) - (t1 - t0)) / 2
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ring_train(task, w, steps=3)  # steps 0-2: the shares are dominated by steps 1-2
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "self_share": e.self_cpu_time_total / total, "self_s": e.self_cpu_time_total / 1e6 / 3,
            "calls_per_step": e.count / 3} for e in ops[:15]]
    res = {"degree": a.degree, "m": a.m, "plain_step_s": plain, "ring_step_s": ring,
           "ratio_per_direction": ring / a.m / plain, "loadavg_start": load, "top_ops_per_step": top,
           "versions": versions(), "command": f"OMP_NUM_THREADS=1 python bench/engine_profile.py --degree {a.degree}"}
    out = Path(__file__).resolve().parent / "results" / f"engine-profile-K{a.degree}.json"
    write_json(out, res)
    print(f"degree {a.degree}, m {a.m}: plain {plain * 1e3:.1f} ms, ring {ring:.2f} s, per direction "
          f"{res['ratio_per_direction']:.1f}x a plain step (load {load[0]:.1f})")
    for t in top:
        print(f"{100 * t['self_share']:5.1f} %  {t['self_s']:7.3f} s/step  {t['calls_per_step']:5.0f} calls  {t['op']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
