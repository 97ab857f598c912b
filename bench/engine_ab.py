"""In-process A/B of the engine's speed paths on the paper task (figure 3's ring run): degree 3, m directions,
one thread, configurations alternated round by round in one process, so that load and memory state hit all alike.

Configurations: everything on; session 11's kernels (4-lane vectors, one compilation for every K, built with
``DELSKETCH_NATIVE_CFLAGS``); without the frozen garbage collector (every collection walks all objects); without
the native elementwise kernels (products and exp in torch); without the native small-matrix kernel (torch's
stacked matmuls); without all three (session 10's engine); without any native kernel, stacked matmul or frozen
collector (session 9's). Each run times steps spread over the
1000-step schedule (the first two steps of a run, where the state is still plain and the heap cache grows, are
left out), and the time inside ``Adam.step`` separately.

    PYTHONPATH=src python bench/engine_ab.py [--m 250] [--rounds 4] [--steps 9]   # -> bench/results/engine-ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import delsketch  # noqa: F401  (before torch: it asks torch for huge pages, see delsketch/_alloc.py)
import torch

ROOT = Path(__file__).resolve().parents[1]

_ON = {"native": True, "native_matmul": True, "native_elementwise": True, "small": True, "gc": True, "cflags": ""}
#: session 11's kernels: 4-lane vectors, one compilation for every K, GCC's loop vectorizer on
_S11_CFLAGS = "-DDELSKETCH_LANES4 -DDELSKETCH_GENERIC_K -ftree-vectorize"
CONFIGS = {
    "all on": _ON,
    "session 11 kernels": {**_ON, "cflags": _S11_CFLAGS},
    "no frozen gc": {**_ON, "gc": False},
    "no native elementwise": {**_ON, "native_elementwise": False},
    "no native matmul": {**_ON, "native_matmul": False},
    "session 10": {**_ON, "native_matmul": False, "native_elementwise": False, "gc": False, "cflags": _S11_CFLAGS},
    "neither (session 9)": {"native": False, "native_matmul": False, "native_elementwise": False, "small": False,
                            "gc": False, "cflags": ""},
}
BASE = "neither (session 9)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=250)
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=9, help="timed steps per run (spread over the schedule)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "names.txt"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine-ab.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from delsketch import _alloc
    from delsketch.io import versions, write_json
    from delsketch.series import kernels, native
    from delsketch.sketch import directions, ring_train, weight_series
    from delsketch.tasks import get_preset

    task = get_preset("paper")(data=a.data)
    sample = sorted({round(i * task.steps / a.steps) for i in range(a.steps)})
    timed = dataclasses.replace(task, schedule=[task.schedule[0], task.schedule[1]] + [task.schedule[s] for s in sample])
    w = weight_series(directions(0, range(a.m), task.n), a.degree)
    opt_cls = type(task.optimizer)
    step_fn = opt_cls.step
    small_fn = kernels._matmul_small
    gc_fn = _alloc.frozen_gc
    inside = {"opt": 0.0}

    def timed_step(self, *args, **kw):
        t = time.perf_counter()
        try:
            return step_fn(self, *args, **kw)
        finally:
            inside["opt"] += time.perf_counter() - t

    def configure(cfg: dict) -> None:
        os.environ["DELSKETCH_NATIVE"] = "1" if cfg["native"] else "0"
        os.environ[native.CFLAGS_VARIABLE] = cfg["cflags"]
        native._reset()
        kernels._matmul_small = small_fn if cfg["small"] else (lambda x, y: kernels._bilinear_generic(torch.matmul, x, y))
        kernels._NATIVE_SMALL = cfg["native_matmul"]
        kernels._NATIVE_ELEMENTWISE = cfg["native_elementwise"]
        _alloc.frozen_gc = gc_fn if cfg["gc"] else contextlib.nullcontext

    opt_cls.step = timed_step
    results = {name: {"step_s": [], "step_cpu_s": [], "optimizer_s": []} for name in CONFIGS}
    load0 = list(os.getloadavg())
    try:
        for r in range(a.rounds):
            for name, cfg in CONFIGS.items():
                configure(cfg)
                if cfg["native"] and not native.available():
                    print(f"native kernels not available: {native.status()['reason']}", file=sys.stderr)
                    return 1
                stamps, cpu, opt_at = [], [], []

                def cb(s, loss):
                    stamps.append(time.perf_counter())
                    cpu.append(time.process_time())
                    opt_at.append(inside["opt"])

                ring_train(timed, w, steps=len(timed.schedule), callback=cb)
                steps = [b - c for c, b in zip(stamps[1:], stamps[2:])]
                opts = [b - c for c, b in zip(opt_at[1:], opt_at[2:])]
                results[name]["step_cpu_s"].extend(b - c for c, b in zip(cpu[1:], cpu[2:]))
                results[name]["step_s"].extend(steps)
                results[name]["optimizer_s"].extend(opts)
                print(f"round {r}: {name:26s} step {statistics.mean(steps):.3f} s, Adam {statistics.mean(opts):.3f} s"
                      f", CPU {statistics.median(results[name]['step_cpu_s'][-len(steps):]):.3f} s",
                      flush=True)
    finally:
        opt_cls.step = step_fn
        kernels._matmul_small = small_fn
        kernels._NATIVE_SMALL = kernels._NATIVE_ELEMENTWISE = True
        _alloc.frozen_gc = gc_fn
        os.environ.pop("DELSKETCH_NATIVE", None)
        os.environ.pop(native.CFLAGS_VARIABLE, None)
        native._reset()
    base = statistics.mean(results[BASE]["step_s"])
    table = {}
    print(f"\npaper task, degree {a.degree}, m = {a.m}, one thread, {a.rounds} rounds x {len(sample)} steps "
          f"(load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    print(f"{'configuration':28s} {'step (mean)':>12s} {'CPU (median)':>12s} {'Adam.step':>10s} {'vs session 9':>12s}")
    for name, r in results.items():
        st, op = statistics.mean(r["step_s"]), statistics.mean(r["optimizer_s"])
        cpu = statistics.median(r["step_cpu_s"])
        table[name] = {"step_mean_s": st, "step_median_s": statistics.median(r["step_s"]), "step_cpu_median_s": cpu,
                       "optimizer_mean_s": op, "speedup_vs_session9": base / st, **r}
        print(f"{name:28s} {st:10.3f} s {cpu:10.3f} s {op:8.3f} s {base / st:11.2f}x")
    write_json(Path(a.out), {"task": "paper", "degree": a.degree, "m": a.m, "rounds": a.rounds,
                             "sampled_steps": sample, "configs": CONFIGS, "results": table,
                             "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
                             "native": native.status(), "versions": versions(),
                             "command": "PYTHONPATH=src python bench/engine_ab.py " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
