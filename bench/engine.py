"""Engine speed: time per training step in the ring vs plain training, measured side by side in one run.

Models
  (a) microgpt: the paper's model (4,192 parameters), documents of exactly 16 tokens, Adam (eps inside sqrt)
  (b) mlp: 64-256-256-10 GELU MLP, batch 32, SGD with momentum 0.9
Grid: m in {1, 64, 500} directions x K in {2, 4, 7} coefficients (degree K-1).

Prints a table and writes bench/results/engine.json. Configurations whose parameter-sized series state alone
would exceed --mem-gb are skipped and recorded as such.

    python bench/engine.py [--steps 3] [--mem-gb 6] [--models microgpt,mlp] [--m 1,64,500] [--K 2,4,7]

Compute-bound rows (``--rows compute``, issue 17 item 4), written to bench/results/engine-compute.json:

  * MLPs (SiLU) of three widths, a small CNN (two 3x3 conv + SiLU + 2x2 average pooling, then a linear layer, on
    12x12 images), each full batch and in minibatches; SGD with momentum 0.9, and Adam (eps inside the sqrt) for
    one row. Tasks come from ``Task.from_module``.
  * Degrees 1, 3, 6 (K = 2, 4, 7). Per row one fresh process (one torch thread); per degree it times plain
    steps, then a ring run of m directions (``sketch.ring_train``), then plain steps again; step times come from the
    training callback (real steps of one run, optimizer state included); ring steps 0 (parameters still plain,
    broadcast to m directions) and 1 (the ring's heap cache grows to its working set, delsketch/_alloc.py) are
    the warm-up, reported apart and excluded from the median. The ring's peak memory: VmHWM reset
    (/proc/self/clear_refs = 5) after step 0 and read after the measured steps, reported in MiB as the peak total
    RSS and as the peak above the RSS just before step 1. The JSON records whether torch allocates in huge pages
    and whether the heap cache is on (delsketch turns both on; this script imports delsketch before torch).
  * ``fig3``: the paper task (``--data``), 2 worker processes side by side with 250 directions each at degree 3,
    one thread each (what ``precompute(workers=2, chunk=250)`` runs), timing a stride sample of the 1000-step
    schedule after two warm-up steps (0 and 1, as for the ring rows); the 1000-step precompute is *extrapolated*
    from those steps.
  * ``memory``: 500 directions of the 64-256-256-10 MLP at degree 3, in chunks of directions as ``precompute``
    computes them (the largest chunk whose estimated peak fits in --mem-gb), peak measured for one chunk.

    python bench/engine.py --rows compute --data ../shared/data/names.txt [--steps 2] [--only NAME,...]

(the committed bench/results/engine-compute.json: exactly that, with the defaults; about 8-9 minutes on the project's
2-core VM when it is otherwise idle, longer while other processes share the cores). A smoke run: add ``--steps 1 --directions 2 --mem-directions 20
--fig3-directions 8 --fig3-steps 2`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import delsketch  # noqa: F401  (before torch: it asks torch for huge pages, see delsketch/_alloc.py)
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from delsketch import __version__, _alloc
from delsketch.series import native
from delsketch.series import tensor as taylor
from delsketch.training.optim import SGD, Adam, linear_decay
from delsketch.tasks.microgpt import MicroGPT, MicroGPTConfig, TextCorpus, gauss_init
from delsketch.training import Task, train
from delsketch.sketch import directions, ring_train, weight_series


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


# ------------------------------------------------------------------------------------------------
# compute-bound rows (--rows compute): one fresh process per measurement
# ------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


class WideMLP(nn.Module):
    """An MLP with SiLU between its linear layers; ``widths`` = [inputs, hidden..., outputs]."""

    def __init__(self, widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.silu(x)
        return x


class SmallCNN(nn.Module):
    """conv 3x3 (1 -> c1) + SiLU + avgpool 2, conv 3x3 (c1 -> c2) + SiLU + avgpool 2, linear -> classes."""

    def __init__(self, side=12, c1=8, c2=16, classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(1, c1, 3, padding=1)
        self.c2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (side // 4) ** 2, classes)

    def forward(self, x):
        x = F.avg_pool2d(F.silu(self.c1(x)), 2)
        x = F.avg_pool2d(F.silu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


#: model name -> (module factory, input shape, classes)
COMPUTE_MODELS = {
    "mlp-30-32-32-2": (lambda: WideMLP([30, 32, 32, 2]), (30,), 2),
    "mlp-64-256-256-10": (lambda: WideMLP([64, 256, 256, 10]), (64,), 10),
    "mlp-64-512-512-10": (lambda: WideMLP([64, 512, 512, 10]), (64,), 10),
    "cnn-12x12": (lambda: SmallCNN(12, 8, 16, 10), (1, 12, 12), 10),
}

#: the compute row set: name, model, n examples, batch (None = full batch), optimizer, directions m (and m at
#: some degrees). m is smaller for the costlier rows so that the whole set runs in ~10 minutes on 2 cores; at
#: these sizes the per-direction cost of a compute-bound model depends little on m (every op is already large)
COMPUTE_ROWS = [
    {"name": "mlp-small full", "model": "mlp-30-32-32-2", "n": 400, "batch": None, "opt": "sgd", "m": 32},
    {"name": "mlp-small mb40", "model": "mlp-30-32-32-2", "n": 400, "batch": 40, "opt": "sgd", "m": 32},
    {"name": "mlp-256 full", "model": "mlp-64-256-256-10", "n": 512, "batch": None, "opt": "sgd", "m": 32,
     "m_by_degree": {"6": 8}},
    {"name": "mlp-256 mb64", "model": "mlp-64-256-256-10", "n": 512, "batch": 64, "opt": "sgd", "m": 32},
    {"name": "mlp-256 full adam", "model": "mlp-64-256-256-10", "n": 512, "batch": None, "opt": "adam", "m": 8},
    {"name": "mlp-512 full", "model": "mlp-64-512-512-10", "n": 256, "batch": None, "opt": "sgd", "m": 4},
    {"name": "mlp-512 mb64", "model": "mlp-64-512-512-10", "n": 256, "batch": 64, "opt": "sgd", "m": 4},
    {"name": "cnn full", "model": "cnn-12x12", "n": 128, "batch": None, "opt": "sgd", "m": 8},
    {"name": "cnn mb32", "model": "cnn-12x12", "n": 128, "batch": 32, "opt": "sgd", "m": 8},
]

TARGETS = {
    "mlp-256 full (64-256-256-10 SiLU, 512 examples, SGD momentum, m=32, one thread): per direction / plain at degree 3": 30,
    "the same at degree 1": 8,
    "figure-3 precompute (500 directions, degree 3, 1000 steps of the paper task, 2 workers), seconds": 180,
}


def compute_task(model: str, n: int, batch, opt: str, steps: int) -> Task:
    make, shape, classes = COMPUTE_MODELS[model]
    torch.manual_seed(0)
    net = make().double()
    X = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (n,))
    if opt == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    elif opt == "adam":
        optimizer = Adam(1e-3, eps=1e-8, eps_inside_sqrt=True)
    else:
        raise ValueError(f"unknown optimizer {opt!r}")
    return Task.from_module(net, (X, y), lambda out, t: F.cross_entropy(out, t, reduction="none"), optimizer,
                            steps=steps, batch_size=batch, name=model)


def memory_mib() -> dict:
    """Current and peak resident set size of this process (MiB), from /proc/self/status (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_durations(t0: float, stamps: list) -> list:
    """Per-step seconds from the start time and the time stamps the training callback took after each step."""
    return [b - a for a, b in zip([t0] + stamps[:-1], stamps)]


def median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2


def timed_run(run, reset_after=None) -> dict:
    """``run(callback)`` trains; returns its per-step seconds and, with ``reset_after = s``, the peak memory of
    the steps after step s (VmHWM reset right after step s finishes)."""
    stamps, mem = [], {}

    def cb(s, loss):
        stamps.append(time.perf_counter())
        if reset_after is not None and s == reset_after:
            mem["reset"] = reset_peak()
            mem["rss_before_mib"] = memory_mib()["VmRSS"]
            stamps[-1] = time.perf_counter()  # the reset is not part of the next step

    t0 = time.perf_counter()
    run(cb)
    if reset_after is not None:
        mem["peak_total_mib"] = memory_mib()["VmHWM"]
        mem["peak_above_before_mib"] = mem["peak_total_mib"] - mem["rss_before_mib"]
    return {"steps_s": step_durations(t0, stamps), **mem}


def measure_row(spec: dict) -> list:
    """One row at each of ``spec["degrees"]`` (ascending), in this process: per degree, plain steps, a ring run of
    m directions, plain steps again. Run by the ``--child`` process, which has one torch thread."""
    # ring steps 0 (parameters still m = 1, broadcast to m) and 1 (the heap cache grows to its working set) are
    # warm-up: timed and reported, not in the median; the memory peak counts from step 1 on
    warm, steps, plain_steps = 2, spec["steps"], spec.get("plain_steps", 10)
    task = compute_task(spec["model"], spec["n"], spec["batch"], spec["opt"], max(warm + steps, plain_steps))
    rows = []
    for degree in spec["degrees"]:
        m = int(spec.get("m_by_degree", {}).get(str(degree), spec["m"]))
        row = {k: spec[k] for k in ("name", "model", "batch", "opt")}
        row.update(m=m, degree=degree, loadavg_start=list(os.getloadavg()), n=task.n, batch_size=len(task.schedule[0]),
                   params=sum(p.numel() for p in task.init_params().values()))
        plain_a = timed_run(lambda cb: train(task, steps=plain_steps, callback=cb))["steps_s"][1:]
        w = weight_series(directions(0, range(m), task.n), degree)
        gc.collect()
        row["rss_before_ring_mib"] = memory_mib()["VmRSS"]
        ring = timed_run(lambda cb: ring_train(task, w, steps=warm + steps, callback=cb), reset_after=0)
        plain_b = timed_run(lambda cb: train(task, steps=plain_steps, callback=cb))["steps_s"][1:]
        plain = median(plain_a + plain_b)
        t = median(ring["steps_s"][warm:])
        row.update(plain_step_s=plain, plain_before_s=median(plain_a), plain_after_s=median(plain_b),
                   ring_step0_s=ring["steps_s"][0], ring_step1_s=ring["steps_s"][1], ring_steps_s=ring["steps_s"][warm:], ring_step_s=t,
                   per_direction_s=t / m, ratio_per_direction=t / m / plain,
                   peak_reset_ok=ring.get("reset"), rss_before_step_mib=ring.get("rss_before_mib"),
                   peak_total_mib=ring.get("peak_total_mib"), peak_above_before_mib=ring.get("peak_above_before_mib"))
        row["loadavg_end"] = list(os.getloadavg())
        rows.append(row)
    return rows


def fig3_schedule_sample(total: int, k: int) -> list:
    """k steps spread evenly over a schedule of ``total`` steps (0, total/k, 2 total/k, ...)."""
    return sorted({min(total - 1, round(i * total / k)) for i in range(k)})


def measure_fig3_worker(spec: dict) -> dict:
    """One of the figure-3 workers: ``count`` directions from ``first`` at ``degree`` on the paper task, timing
    step 0 (warm-up, also the m = 1 -> m broadcast) and then the sampled steps of the 1000-step schedule, with
    the optimizer's state carried from step to step (the cost of a step depends on its document's length, not
    on the state's values)."""
    from delsketch.tasks import get_preset

    torch.set_num_threads(1)
    task = get_preset("paper")(data=spec["data"])
    sample = fig3_schedule_sample(task.steps, spec["steps"])
    # two warm-up steps: step 0 (plain parameters broadcast to m directions) and step 1 (the first with all m, where
    # the heap cache grows to its working set); a real run pays each once in its 1000 steps
    timed = dataclasses.replace(task, schedule=task.schedule[:2] + [task.schedule[s] for s in sample])
    lengths = [len(task.examples[task.schedule[s][0]]) + 1 for s in range(task.steps)]  # predictions per document
    w = weight_series(directions(0, range(spec["first"], spec["first"] + spec["count"]), task.n), spec["degree"])
    ready = Path(spec["barrier"]) / f"ready-{spec['first']}"
    ready.write_text("")
    deadline = time.time() + 120
    while len(list(Path(spec["barrier"]).glob("ready-*"))) < spec["workers"] and time.time() < deadline:
        time.sleep(0.01)  # start the ring runs together: the workers share the machine as precompute's do
    load0 = list(os.getloadavg())
    wall0 = time.time()
    ring = timed_run(lambda cb: ring_train(timed, w, steps=len(timed.schedule), callback=cb), reset_after=0)
    return {"first": spec["first"], "count": spec["count"], "degree": spec["degree"], "schedule_steps": task.steps,
            "sampled_steps": sample, "sampled_lengths": [lengths[s] for s in sample],
            "mean_length_sampled": sum(lengths[s] for s in sample) / len(sample),
            "mean_length_all": sum(lengths) / len(lengths), "step0_s": ring["steps_s"][0],
            "step1_s": ring["steps_s"][1], "steps_s": ring["steps_s"][2:], "wall_start": wall0, "wall_end": time.time(),
            "peak_total_mib": ring["peak_total_mib"], "loadavg_start": load0, "loadavg_end": list(os.getloadavg())}


def fig3_extrapolate(workers: list, total_steps: int, directions_total: int) -> dict:
    """The 1000-step precompute from the sampled steps: per worker its warm-up steps 0 and 1 + (total - 2) x its
    mean sampled step; the workers run side by side, so the precompute takes the slowest worker's time."""
    per = [w["step0_s"] + w.get("step1_s", 0.0) + (total_steps - 2) * (sum(w["steps_s"]) / len(w["steps_s"]))
           for w in workers]
    mean_step = max(sum(w["steps_s"]) / len(w["steps_s"]) for w in workers)
    return {"extrapolated_s": max(per), "per_worker_s": per, "mean_step_s": mean_step,
            "per_direction_step_s": mean_step / directions_total,
            "overlap_s": min(w["wall_end"] for w in workers) - max(w["wall_start"] for w in workers)}


def run_child(spec: dict, threads: int = 1, popen: bool = False):
    """Run ``spec`` in a fresh ``python bench/engine.py --child`` process (PYTHONPATH and the environment are
    passed on, so the bench measures whatever delsketch that path gives)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return p if popen else child_result(p)


def child_result(p) -> dict:
    out, err = p.communicate()
    if p.returncode != 0:
        return {"error": (err.strip().splitlines() or ["exit %d" % p.returncode])[-1], "stderr_tail": err[-2000:]}
    return json.loads(out.strip().splitlines()[-1])


def fig3_row(data: str, steps: int, per_worker: int, workers: int, degree: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as barrier:
        specs = [{"kind": "fig3", "data": data, "steps": steps, "first": i * per_worker, "count": per_worker,
                  "degree": degree, "workers": workers, "barrier": barrier} for i in range(workers)]
        load0 = list(os.getloadavg())
        procs = [run_child(s, popen=True) for s in specs]
        res = [child_result(p) for p in procs]
    row = {"name": "fig3", "what": (f"EXTRAPOLATED: {workers} processes x {per_worker} directions at degree {degree}, "
                                    f"one thread each, side by side; {steps} sampled steps of the 1000-step schedule "
                                    "timed after the warm-up steps 0 and 1; precompute = steps 0 + 1 + 998 x the mean "
                                    "sampled step of the slower worker (spawn, task build and chunk writing not "
                                    "included)"),
           "workers": workers, "directions": workers * per_worker, "degree": degree, "loadavg_start": load0}
    if any("error" in r for r in res):
        row["error"] = next(r["error"] for r in res if "error" in r)
        row["workers_detail"] = res
    else:
        row.update(fig3_extrapolate(res, res[0]["schedule_steps"], workers * per_worker), workers_detail=res)
    row["loadavg_end"] = list(os.getloadavg())
    return row


CHUNKS = (500, 250, 125, 100, 50, 25, 10)


def memory_row(reference: dict, directions_total: int, degree: int, mem_gb: float, steps: int) -> dict:
    """Peak memory of ``directions_total`` directions of the reference row's model, run in chunks of directions
    (as precompute does) of the largest size whose linear estimate from the reference row fits in ``mem_gb``."""
    base = reference["rss_before_ring_mib"]
    per_dir = (reference["peak_total_mib"] - base) / reference["m"]
    est = lambda m: base + per_dir * m
    chunk = next((c for c in CHUNKS if c <= directions_total and est(c) <= 0.8 * mem_gb * 1024), min(CHUNKS))
    spec = {k: reference[k] for k in ("model", "n", "batch", "opt")}
    spec.update(name="memory", m=chunk, degrees=[degree], steps=steps, plain_steps=3)
    r = run_child({"kind": "ring", **spec})
    r = r if isinstance(r, dict) else r[0]
    row = {"name": "memory", "model": reference["model"], "degree": degree, "directions": directions_total,
           "chunk": chunk, "chunks": math.ceil(directions_total / chunk),
           "what": (f"{directions_total} directions in chunks of {chunk} (one chunk in memory at a time, as "
                    f"precompute(chunk={chunk}) with one worker); peak measured for one chunk; one-batch "
                    f"estimate = linear in m through the m={reference['m']} row and this chunk"),
           "estimate_from_reference_mib": est(chunk), "chunk_row": r,
           "reference": {k: reference.get(k) for k in ("name", "m", "degree", "rss_before_ring_mib", "peak_total_mib",
                                                       "peak_above_before_mib")}}
    if "error" not in r:
        dm = chunk - reference["m"]
        slope = (r["peak_total_mib"] - reference["peak_total_mib"]) / dm if dm else None
        row.update(peak_total_mib=r["peak_total_mib"], peak_above_before_mib=r["peak_above_before_mib"],
                   ring_step_s_per_chunk=r["ring_step_s"],
                   ring_step_s_all=r["ring_step_s"] * math.ceil(directions_total / chunk),
                   one_batch_estimate_mib=(r["peak_total_mib"] + slope * (directions_total - chunk)
                                           if slope is not None else None),
                   parameter_series_mib=reference["params"] * directions_total * (degree + 1) * 16 / MiB)
    return row


def print_compute(r: dict) -> None:
    if r.get("name") == "fig3":
        if "error" in r:
            print(f"fig3: error: {r['error']}", flush=True)
            return
        print(f"fig3 (EXTRAPOLATED from {len(r['workers_detail'][0]['steps_s'])} sampled steps): {r['workers']} workers "
              f"x {r['directions'] // r['workers']} directions, degree {r['degree']}: mean step {r['mean_step_s']:.3f} s, "
              f"{r['per_direction_step_s'] * 1e3:.2f} ms per direction-step, 1000 steps ~ {r['extrapolated_s']:.0f} s "
              f"(target 180 s); peak {max(w['peak_total_mib'] for w in r['workers_detail']):.0f} MiB per worker",
              flush=True)
        return
    if r.get("name") == "memory":
        if "peak_total_mib" not in r:
            print(f"memory: error: {r.get('error') or r.get('chunk_row', {}).get('error')}", flush=True)
            return
        est = r["one_batch_estimate_mib"]
        print(f"memory: {r['directions']} directions of {r['model']} at degree {r['degree']} in {r['chunks']} chunks of "
              f"{r['chunk']}: peak {r['peak_total_mib']:.0f} MiB total ({r['peak_above_before_mib']:.0f} above the "
              f"pre-step RSS), {r['ring_step_s_all']:.1f} s per step for all chunks"
              + (f"; in one batch ~{est:.0f} MiB (linear estimate)" if est is not None else ""), flush=True)
        return
    if "error" in r:
        print(f"{r['name']:18} degrees {r.get('degrees')}: error: {r['error']}", flush=True)
        return
    print(f"{r['name']:18} {r['params']:>7} {r['batch_size']:>5} {r['m']:>4} {r['degree']:>3} {r['plain_step_s'] * 1e3:9.2f} "
          f"{r['ring_step_s'] * 1e3:10.1f} {r['per_direction_s'] * 1e3:8.2f} {r['ratio_per_direction']:8.1f} "
          f"{r['peak_total_mib']:8.0f} {r['peak_above_before_mib']:8.0f} {r['loadavg_start'][0]:5.2f}", flush=True)


def main_compute(a) -> int:
    out_path = a.out or str(Path(__file__).parent / "results" / "engine-compute.json")
    only = set(a.only.split(",")) if a.only else None
    degrees = sorted(int(d) for d in a.degrees.split(","))
    steps = a.steps or 2
    load0, t_start = list(os.getloadavg()), time.perf_counter()
    rows = []
    print(f"{'row':18} {'params':>7} {'batch':>5} {'m':>4} {'deg':>3} {'plain ms':>9} {'ring ms':>10} {'ms/dir':>8} "
          f"{'/plain':>8} {'peakMiB':>8} {'+MiB':>8} {'load':>5}")
    reference = None
    for spec in COMPUTE_ROWS:
        if only is not None and spec["name"] not in only:
            continue
        s = {**spec, "kind": "ring", "degrees": degrees, "steps": steps}
        if a.directions:
            s["m"] = a.directions
            s.pop("m_by_degree", None)
        res = run_child(s)
        if isinstance(res, dict):  # the child failed
            res = [{**spec, "degrees": degrees, **res}]
        for r in res:
            rows.append(r)
            print_compute(r)
            if spec["name"] == "mlp-256 full" and r.get("degree") == 3 and "error" not in r:
                reference = r
    if (only is None or "memory" in only) and a.mem_directions:
        if reference is None:
            ref = run_child({**COMPUTE_ROWS[2], "kind": "ring", "degrees": [3], "steps": 1, "plain_steps": 3,
                             **({"m": a.directions} if a.directions else {})})  # m_by_degree: not at degree 3
            reference = ref if isinstance(ref, dict) else ref[0]
        if "error" in reference:
            rows.append({"name": "memory", "error": reference["error"]})
        else:
            r = memory_row(reference, a.mem_directions, 3, a.mem_gb, 1)
            rows.append(r)
            print_compute(r)
    if only is None or "fig3" in only:
        if a.data and Path(a.data).is_file():
            r = fig3_row(a.data, a.fig3_steps, a.fig3_directions // a.fig3_workers, a.fig3_workers)
        else:
            r = {"name": "fig3", "error": f"no data file {a.data!r} (pass --data ../shared/data/names.txt)"}
        rows.append(r)
        print_compute(r)
    out = {
        "what": ("compute-bound rows (issue 17 item 4): seconds per training step; ring = one step of all m directions "
                 "at degree d (K = d + 1 coefficients); plain = the same task, real arithmetic, same process (before "
                 "and after the ring run); each row in a fresh process with one torch thread (its degrees in turn); memory in MiB "
                 "(VmHWM of the ring's measured steps; 'above' = over the RSS just before them)"),
        "command": "python bench/engine.py " + " ".join(a.argv),
        "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "threads_per_process": 1, "platform": platform.platform(),
                    "python": sys.version.split()[0], "torch": torch.__version__, "delsketch": __version__,
                    "huge_pages": _alloc.huge_pages(), "heap_cache": _alloc.heap_cache_available(),
                    "native_kernels": native.status()},
        "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {out_path} ({out['wall_s']:.0f} s; load {load0[0]:.2f} -> {out['loadavg_end'][0]:.2f})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 3 for grid, 2 for compute)")
    ap.add_argument("--mem-gb", type=float, default=6.0)
    ap.add_argument("--models", default="microgpt,mlp")
    ap.add_argument("--m", default="1,64,500")
    ap.add_argument("--K", default="2,4,7")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: bench/results/engine.json (grid) or engine-compute.json")
    ap.add_argument("--rows", choices=("grid", "compute"), default="grid")
    ap.add_argument("--degrees", default="1,3,6", help="compute rows: degrees (K = degree + 1)")
    ap.add_argument("--only", default=None, help="compute rows: comma-separated row names (and 'memory', 'fig3')")
    ap.add_argument("--directions", type=int, default=None, help="compute rows: override every row's m")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "names.txt"), help="names.txt (fig3)")
    ap.add_argument("--fig3-steps", type=int, default=10, help="sampled steps timed per fig3 worker")
    ap.add_argument("--fig3-directions", type=int, default=500)
    ap.add_argument("--fig3-workers", type=int, default=2)
    ap.add_argument("--mem-directions", type=int, default=500, help="memory row: directions (0: no memory row)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.child is not None:
        spec = json.loads(a.child)
        torch.set_num_threads(1)
        print(json.dumps(measure_fig3_worker(spec) if spec["kind"] == "fig3" else measure_row(spec)))
        return 0
    if a.rows == "compute":
        return main_compute(a)
    a.out = a.out or str(Path(__file__).parent / "results" / "engine.json")
    a.steps = a.steps or 3
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
