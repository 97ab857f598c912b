"""Engine speed: time per training step in the ring vs plain training, measured side by side in one run.

Models
  (a) microgpt: the paper's model (4,192 parameters), documents of exactly 16 tokens, Adam (eps inside sqrt)
  (b) mlp: 64-256-256-10 GELU MLP, batch 32, SGD with momentum 0.9
Grid: m in {1, 64, 500} directions x K in {2, 4, 7} coefficients (degree K-1).

Prints a table and writes bench/results/engine.json. Configurations whose parameter-sized series state alone
would exceed --mem-gb are skipped and recorded as such.

    python bench/engine.py [--steps 3] [--mem-gb 6] [--models microgpt,mlp] [--m 1,64,500] [--K 2,4,7]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from delsketch import __version__
from delsketch.series import tensor as taylor
from delsketch.training.optim import SGD, Adam, linear_decay
from delsketch.tasks.microgpt import MicroGPT, MicroGPTConfig, TextCorpus, gauss_init
from delsketch.training import Task, train
from delsketch.sketch import directions, weight_series


def microgpt_task(steps: int) -> Task:
    rng = random.Random(0)
    chars = list(string.ascii_lowercase)
    docs = ["".join(rng.choice(chars) for _ in range(15)) for _ in range(64)]  # [BOS]+15+[BOS]: 16 predictions
    cfg = MicroGPTConfig()
    model = MicroGPT(cfg)
    init = gauss_init(cfg, random.Random(1))
    corpus = TextCorpus(docs, chars, model)
    assert all(n == 16 for n in corpus.lengths)
    return Task(name="microgpt", n=len(docs), init_params=lambda: {k: v.clone() for k, v in init.items()},
                example_losses=corpus.example_losses, schedule=[[s % len(docs)] for s in range(steps)],
                optimizer=Adam(0.01, betas=(0.85, 0.99), eps=1e-3, eps_inside_sqrt=True, schedule=linear_decay(1000)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.l3(F.gelu(self.l2(F.gelu(self.l1(x)))))


def mlp_task(steps: int) -> Task:
    torch.manual_seed(0)
    model = MLP().double()
    n, b = 256, 32
    X = torch.randn(n, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (n,))
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    return Task(name="mlp", n=n, init_params=lambda: {k: v.clone() for k, v in init.items()},
                example_losses=lambda p, idx: F.cross_entropy(functional_call(model, p, (X[idx],)), y[idx], reduction="none"),
                schedule=[[(s * b + i) % n for i in range(b)] for s in range(steps)], optimizer=SGD(0.05, momentum=0.9))


MODELS = {"microgpt": microgpt_task, "mlp": mlp_task}


def time_steps(fn, steps: int) -> float:
    """Median seconds per step over `steps` steps, after one warm-up step."""
    times = []
    fn(1)  # warm-up
    for _ in range(steps):
        t = time.perf_counter()
        fn(1)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def bench_one(model: str, m: int, K: int, steps: int, mem_gb: float) -> dict:
    task = MODELS[model](steps + 2)
    nparams = sum(p.numel() for p in task.init_params().values())
    state_gb = nparams * m * K * 16 * 5 / 1e9  # params, grads, 2 optimizer moments, one temporary
    row = {"model": model, "params": nparams, "m": m, "K": K}
    plain = time_steps(lambda s: train(task, steps=s), max(steps, 5))
    row["plain_step_s"] = plain
    if state_gb > mem_gb:
        row.update(skipped=f"needs ~{state_gb:.1f} GB of series state (> --mem-gb {mem_gb})")
        return row
    w = weight_series(directions(0, range(m), task.n), K - 1)
    # each timed call is a fresh run of s steps from lifted parameters; step 0 also broadcasts m=1 -> m
    p0 = {k: taylor.lift(v, K - 1) for k, v in task.init_params().items()}
    params = train(task, w=w, params=p0, steps=1)  # parameters now carry m directions

    def ring(s):
        train(task, w=w, params=params, steps=s, check_finite=False)

    t = time_steps(ring, steps)
    row.update(ring_step_s=t, per_direction_s=t / m, ratio_per_direction=t / m / plain, ratio=t / plain)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mem-gb", type=float, default=6.0)
    ap.add_argument("--models", default="microgpt,mlp")
    ap.add_argument("--m", default="1,64,500")
    ap.add_argument("--K", default="2,4,7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    print(f"{'model':9} {'m':>4} {'K':>2} {'plain ms':>9} {'ring ms':>10} {'ms/dir':>8} {'x plain/dir':>11}")
    for model in a.models.split(","):
        for m in map(int, a.m.split(",")):
            for K in map(int, a.K.split(",")):
                r = bench_one(model, m, K, a.steps, a.mem_gb)
                rows.append(r)
                if "skipped" in r:
                    print(f"{model:9} {m:>4} {K:>2} {r['plain_step_s']*1e3:9.2f}   skipped: {r['skipped']}", flush=True)
                else:
                    print(f"{model:9} {m:>4} {K:>2} {r['plain_step_s']*1e3:9.2f} {r['ring_step_s']*1e3:10.1f} "
                          f"{r['per_direction_s']*1e3:8.2f} {r['ratio_per_direction']:11.1f}", flush=True)
    out = {
        "what": "seconds per training step; ring = one step of all m directions at K coefficients; plain = same model, real arithmetic, same run",
        "targets": {"microgpt m=500 K=4 ring_step_s": 0.300, "mlp per-direction ratio": 40},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "delsketch": __version__},
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
