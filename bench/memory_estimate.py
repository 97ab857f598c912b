"""The precompute's memory estimate (delsketch.training.memory) against the peak resident memory measured.

    PYTHONPATH=src python bench/memory_estimate.py [--degree 3] [--m 8,32] [--out bench/results/memory-estimate.json]

Each (task, m) runs in a fresh process: the peak RSS is reset (/proc/self/clear_refs) before a 3-step ring run of
m directions and read (VmHWM) after. The slope between the two m is the measured memory per direction; the
estimate should lie above it and not far above (a loose estimate wastes the budget). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r'''
import json, sys
import delsketch  # before torch, as a user script that imports delsketch first (huge pages on)
import torch, torch.nn as nn
torch.set_num_threads(1)
from delsketch.training import Task
from delsketch.training.memory import ring_bytes_per_direction
from delsketch.sketch.core import directions, weight_series, ring_train
kind, m, degree = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
ce = nn.CrossEntropyLoss(reduction="none")
if kind.startswith("mlp"):
    w = int(kind[3:])
    X, y = torch.randn(512, 64, dtype=torch.float64), torch.randint(0, 10, (512,))
    model = nn.Sequential(nn.Linear(64, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 10)).double()
    task = Task.from_module(model, (X, y), ce, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=3)
elif kind == "cnn":
    X, y = torch.randn(256, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (256,))
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(200, 10)).double()
    from delsketch import Adam
    task = Task.from_module(model, (X, y), ce, Adam(0.01, eps_inside_sqrt=True), epochs=1, batch_size=64, shuffle_seed=0)
else:
    from delsketch.tasks import get_preset
    task = get_preset(kind)()
est = ring_bytes_per_direction(task, degree)
psi = directions(0, range(m), task.n)
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
ring_train(task, weight_series(psi, degree), steps=3)
print(json.dumps({"estimate": est, "peak_increase": rss("VmHWM") - before}))
'''

KINDS = {"mlp64": "64-64-64-10 SiLU MLP, 512 examples full batch, SGD momentum",
         "mlp256": "64-256-256-10 SiLU MLP, 512 examples full batch, SGD momentum",
         "cnn": "conv 1->8 3x3, tanh, avg-pool, linear; 12x12 inputs, batch 64, Adam",
         "names": "names preset (microgpt, one name per step, Adam)",
         "digits": "digits preset (tanh MLP 64-32-10, batch 32, SGD momentum)"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--m", default="8,32")
    ap.add_argument("--out", default="bench/results/memory-estimate.json")
    a = ap.parse_args(argv)
    m1, m2 = (int(x) for x in a.m.split(","))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    rows = {}
    for kind, desc in KINDS.items():
        got = []
        for m in (m1, m2):
            r = subprocess.run([sys.executable, "-c", PROBE, kind, str(m), str(a.degree)], capture_output=True,
                               text=True, env=env, check=True)
            got.append(json.loads(r.stdout.strip().splitlines()[-1]))
        slope = (got[1]["peak_increase"] - got[0]["peak_increase"]) / (m2 - m1)
        fixed = got[0]["peak_increase"] - m1 * slope
        rows[kind] = {"description": desc, "estimate_mib_per_direction": got[0]["estimate"] / 2**20,
                      "measured_mib_per_direction": slope / 2**20, "measured_fixed_mib": fixed / 2**20,
                      "estimate_over_measured": got[0]["estimate"] / slope}
    res = {"degree": a.degree, "m": [m1, m2], "load_average": os.getloadavg(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"degree {a.degree}, m = {m1} vs {m2} (fresh process each)")
    print(f"{'task':<8} {'estimate MiB/dir':>17} {'measured MiB/dir':>17} {'ratio':>6} {'fixed MiB':>10}")
    for k, r in rows.items():
        print(f"{k:<8} {r['estimate_mib_per_direction']:>17.1f} {r['measured_mib_per_direction']:>17.1f} "
              f"{r['estimate_over_measured']:>6.2f} {r['measured_fixed_mib']:>10.0f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
