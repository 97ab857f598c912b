"""Where a DP-SGD step's time goes on the digits MLP (Linear-only path), next to the plain step, in one process.

    OMP_NUM_THREADS=1 python bench/privacy/step_parts.py    # -> bench/results/privacy-step-parts.json

Each part is timed on its own (steady state, one batch of the run's schedule, microseconds per call, best of 5
repeats of 2,000 calls); ``plain`` and ``dp`` are whole training runs per step, fastest of 7 alternated runs."""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import base_task, ours, private, sigma_for  # noqa: E402


def best(f, number=2000, repeat=5):
    return min(timeit.repeat(f, number=number, repeat=repeat)) / number * 1e6


def main() -> int:
    torch.set_num_threads(1)
    from delsketch.io import versions, write_json
    from delsketch.privacy import step_noise

    task = base_task(15, 0)
    sigma = sigma_for(3.0, task)
    t = private(task, sigma, 0)
    G, el = t.gradient, task.example_losses
    params = {k: v.requires_grad_(True) for k, v in task.init_params().items()}
    idx = torch.tensor(t.schedule[3])
    G(params, el, None, idx, 3)  # the first call checks the Linear-only path against vmap
    shapes = {k: v.shape for k, v in params.items()}
    norms, losses, combine = G._fast(params, el, idx, False)
    denom = G.denominator

    def bookkeeping():
        shifted = norms.detach().numpy() + G.clip_eps
        gap = np.abs(shifted / G.C - 1)
        return torch.from_numpy(shifted > G.C), int((gap < G.margin).sum()), float(gap.min())

    clipped = bookkeeping()[0]

    def weighted_sum():
        factors = torch.where(clipped, G.C / (norms + G.clip_eps), torch.ones_like(norms))
        return combine(factors / denom), losses.sum() / denom

    grads = weighted_sum()[0]
    noise = step_noise(0, 3, shapes, sigma * G.C / denom)
    parts = {
        "linear path: forward recording the Linear layers, backward to their outputs, per-example norms": best(
            lambda: G._fast(params, el, idx, False)),
        "clip factors and weighted sum (coef * g)^T a": best(weighted_sum),
        "noise (one PCG64 draw, scaled)": best(lambda: step_noise(0, 3, shapes, sigma * G.C / denom)),
        "boundary bookkeeping": best(bookkeeping),
        "adding the noise": best(lambda: {k: grads[k] + noise[k] for k in grads}),
        "whole DP gradient transform (__call__)": best(lambda: G(params, el, None, idx, 3)),
    }
    runs = {"plain": [], "dp": []}
    for _ in range(7):
        runs["plain"].append(ours(task, None, 0)[1])
        runs["dp"].append(ours(task, sigma, 0)[1])
    steps = {k: 1e6 * min(v) for k, v in runs.items()}
    res = {"parts_us": parts, "step_us": steps, "ratio": steps["dp"] / steps["plain"], "batch": len(idx),
           "versions": versions(), "command": "OMP_NUM_THREADS=1 python bench/privacy/step_parts.py"}
    write_json("bench/results/privacy-step-parts.json", res)
    for k, v in parts.items():
        print(f"{v:8.1f} us  {k}")
    print(f"plain step {steps['plain']:.0f} us, DP step {steps['dp']:.0f} us: {res['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
