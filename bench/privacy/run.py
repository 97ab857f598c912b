"""The price of privacy on digits: DP-SGD (delsketch.privacy) at several epsilon against no DP and against Opacus
training the same model with the same settings.

Task: the ``digits`` preset (tanh MLP 64-32-10, 500 training examples; here 500 held-out examples so the
membership-inference check has as many non-members as members), SGD lr 0.1 momentum 0.9, ``--epochs`` epochs of
batch 32 (sample rate 1/16), clip C = 1, delta = 1e-5, PRV accountant.
Per epsilon and seed: test accuracy, accuracy on a noise-shifted test set (Gaussian noise std 0.3, clipped to
[0, 1]), a loss-threshold membership-inference attack (train members vs held-out non-members: AUC, TPR at 0.1 % and
1 % FPR). Opacus: PrivacyEngine.make_private with the same initial weights, noise multiplier, clip, sample rate
(Poisson) and steps. Time per step and peak memory (growth of the resident set's high-water mark during the run) for no DP, delsketch DP and
Opacus DP. Canaries: 200 mislabeled training examples, each kept with probability 1/2; membership inference on them
and the one-run epsilon lower bound (delsketch.privacy.one_run_epsilon_lower_bound), one run per epsilon.

    python bench/privacy/run.py [--epochs 15] [--seeds 3] [--eps 8,4,3,2,1,0.5] [--out bench/results/privacy.json]
    python bench/privacy/run.py --plot-only      # redraw docs/figures/privacy-digits.png from the JSON
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=UserWarning)

DELTA, CLIP, N_TEST = 1e-5, 1.0, 500


def base_task(epochs: int, seed: int):
    from delsketch.tasks import get_preset

    return get_preset("digits")(epochs=epochs, n_test=N_TEST, seed=0)


def sigma_for(eps: float, task) -> float:
    from delsketch.privacy import noise_multiplier_for

    q = sum(map(len, task.schedule)) / len(task.schedule) / task.n
    return noise_multiplier_for(eps, DELTA, q, len(task.schedule), "prv")


def ours(task, sigma, seed):
    """delsketch: the preset's task made private (Poisson schedule and noise seeded by ``seed``)."""
    from delsketch import train
    from delsketch.privacy import DP, make_private

    t = task if sigma is None else make_private(task, DP(noise_multiplier=sigma, max_grad_norm=CLIP, seed=seed,
                                                        delta=DELTA))
    t0 = time.perf_counter()
    p = train(t)
    return p, (time.perf_counter() - t0) / len(t.schedule)


def opacus_run(task, sigma, seed):
    """Opacus: the same model, initial weights, optimizer, clip, noise multiplier, sample rate and steps."""
    import copy

    from opacus import PrivacyEngine
    from torch.func import functional_call  # noqa: F401

    torch.manual_seed(1000 + seed)
    model = copy.deepcopy(task.model)
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(task.init_params()[k])
    X = torch.stack([torch.tensor(e["image"], dtype=torch.float64) / 16.0 for e in task.examples])
    y = torch.tensor([e["label"] for e in task.examples])
    batch = task.config["batch"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = PrivacyEngine(accountant="prv")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                             max_grad_norm=CLIP, poisson_sampling=True)
    steps, t0 = 0, time.perf_counter()
    while steps < len(task.schedule):
        for xb, yb in loader:
            if steps == len(task.schedule):
                break
            opt.zero_grad()
            if len(xb):
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            steps += 1
    dt = (time.perf_counter() - t0) / steps
    params = {k.removeprefix("_module."): v.detach().clone() for k, v in model.named_parameters()}
    return params, dt, engine.get_epsilon(DELTA)


def measure(task, params):
    from delsketch.audit.mia import loss_threshold
    from delsketch.privacy import accuracy, digits_test_data, losses, shifted

    X, y = digits_test_data(task)
    Xtr = torch.stack([torch.tensor(e["image"], dtype=torch.float64) / 16.0 for e in task.examples])
    ytr = torch.tensor([e["label"] for e in task.examples])
    mia = loss_threshold(losses(task, params, Xtr, ytr).tolist(), losses(task, params, X, y).tolist())
    return {"test_accuracy": accuracy(task, params, X, y), "shifted_accuracy": accuracy(task, params, shifted(X), y),
            "mia_auc": mia["auc"], "mia_tpr_at_0.1%": mia["tpr_at_fpr"]["0.001"],
            "mia_tpr_at_1%": mia["tpr_at_fpr"]["0.01"]}


def canaries(task, eps_grid, m: int = 200, guesses: int = 20, seed: int = 0) -> list[dict]:
    """Mislabeled canaries: ``m`` training examples get a random wrong label; each is kept with probability 1/2
    (the others deleted: weight 1); score = minus the loss of the wrong label after training. Membership inference
    on the canaries (AUC, TPR at low FPR) and the one-run epsilon lower bound (``guesses`` "in" + ``guesses``
    "out"), per epsilon (one run each)."""
    import dataclasses

    import numpy as np
    from torch.func import functional_call

    from delsketch import train
    from delsketch.audit.mia import loss_threshold
    from delsketch.privacy import DP, make_private, one_run_epsilon_lower_bound

    rng = np.random.default_rng(seed)
    X = torch.stack([torch.tensor(e["image"], dtype=torch.float64) / 16.0 for e in task.examples])
    y = torch.tensor([e["label"] for e in task.examples])
    can = torch.tensor(np.sort(rng.choice(task.n, m, replace=False)))
    y = y.clone()
    y[can] = (y[can] + torch.tensor(rng.integers(1, 10, m))) % 10
    member = torch.tensor(rng.random(m) < 0.5)
    w = torch.zeros(task.n, dtype=torch.float64)
    w[can[~member]] = 1.0
    model = task.model

    def example_losses(p, idx):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (X[idx],)), y[idx], reduction="none")

    ctask = dataclasses.replace(task, example_losses=example_losses, config={**task.config, "canaries": m})
    out = []
    for eps in [math.inf] + eps_grid:
        sigma = None if math.isinf(eps) else sigma_for(eps, task)
        t = ctask if sigma is None else make_private(ctask, DP(noise_multiplier=sigma, max_grad_norm=CLIP, delta=DELTA))
        p = train(t, w=w)
        with torch.no_grad():
            loss = example_losses({k: v.detach() for k, v in p.items()}, can)
        mia = loss_threshold(loss[member].tolist(), loss[~member].tolist())
        lb = one_run_epsilon_lower_bound((-loss).tolist(), member.tolist(), k_in=guesses, k_out=guesses)
        out.append({"epsilon": None if math.isinf(eps) else eps, "canaries": m, "members": int(member.sum()),
                    "mia_auc": mia["auc"], "mia_tpr_at_fpr": mia["tpr_at_fpr"], **lb})
        print(f"canaries, eps {eps}: AUC {mia['auc']:.3f}, lower bound {lb['epsilon_lower_bound']:.2f} "
              f"({lb['correct']}/{lb['guesses']})", file=sys.stderr, flush=True)
    return out


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _one_cost(method: str, task, sigma) -> dict:
    """Time per step and the growth of the resident set's high-water mark during one training run (Linux: the
    mark is reset through /proc/self/clear_refs first)."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    if method == "opacus":
        _, dt, _ = opacus_run(task, sigma, 0)
    else:
        _, dt = ours(task, sigma if method == "dp" else None, 0)
    return {"s_per_step": dt, "peak_rss_growth_mib": (_status_kib("VmHWM") - base) / 1024}


def cost(task, sigma: float) -> dict:
    out = {}
    for method in ("plain", "dp", "opacus") * 2:  # alternate (the machine is shared); keep the faster of two
        r = _one_cost(method, task, sigma)
        if method not in out or r["s_per_step"] < out[method]["s_per_step"]:
            out[method] = r
    return out


def mean_sd(xs):
    return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eps", default="8,4,3,2,1,0.5")
    ap.add_argument("--out", default="bench/results/privacy.json")
    ap.add_argument("--plot", default="docs/figures/privacy-digits.png")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        import json

        saved = json.loads(Path(args.out).read_text())
        _plot(saved["rows"], saved["canaries"], args.plot)
        return 0
    torch.set_num_threads(1)
    from delsketch.io import versions, write_json

    t_start = time.perf_counter()
    task = base_task(args.epochs, 0)
    eps_grid = [float(e) for e in args.eps.split(",")]
    rows = []
    for eps in [math.inf] + eps_grid:
        sigma = None if math.isinf(eps) else sigma_for(eps, task)
        ms, os_, spent = [], [], []
        for seed in range(args.seeds):
            p, _ = ours(task, sigma, seed)
            ms.append(measure(task, p))
            if sigma is not None:
                po, _, e_op = opacus_run(task, sigma, seed)
                os_.append(measure(task, po))
                spent.append(e_op)
        row = {"epsilon": None if math.isinf(eps) else eps, "noise_multiplier": sigma}
        for key in ms[0]:
            row[key] = mean_sd([m[key] for m in ms])
            if os_:
                row["opacus_" + key] = mean_sd([m[key] for m in os_])
        if sigma is not None:
            from delsketch.privacy import epsilon

            q = sum(map(len, task.schedule)) / len(task.schedule) / task.n
            row["epsilon_spent"] = epsilon(sigma, q, len(task.schedule), DELTA, "prv")
            row["opacus_epsilon_spent"] = spent[0]
        rows.append(row)
        print(f"eps {row['epsilon']}: acc {row['test_accuracy'][0]:.3f} ± {row['test_accuracy'][1]:.3f}"
              + (f" (opacus {row['opacus_test_accuracy'][0]:.3f} ± {row['opacus_test_accuracy'][1]:.3f})" if os_ else ""),
              file=sys.stderr, flush=True)
    canary_rows = canaries(task, eps_grid)
    sigma3 = sigma_for(3.0, task)
    costs = cost(task, sigma3)
    result = {
        "config": {"task": "digits (tanh MLP 64-32-10, 500 train, 500 held out)", "epochs": args.epochs,
                   "steps": len(task.schedule), "batch": 32, "sample_rate": 1 / 16, "clip": CLIP, "delta": DELTA,
                   "accountant": "prv", "seeds": args.seeds, "shift": "Gaussian noise std 0.3, clipped to [0, 1]",
                   "cost_at_epsilon": 3.0},
        "rows": rows, "canaries": canary_rows, "cost": costs, "versions": versions(), "seconds": time.perf_counter() - t_start,
    }
    write_json(args.out, result)
    # table
    hdr = f"{'eps':>5} {'sigma':>6} {'test acc':>13} {'opacus acc':>13} {'shifted acc':>13} {'MIA AUC':>7} {'TPR@1%':>7}"
    print(hdr)
    for r in rows:
        f = lambda v: f"{100 * v[0]:5.1f} ± {100 * v[1]:4.1f}"  # noqa: E731
        print(f"{'none' if r['epsilon'] is None else r['epsilon']:>5} {r['noise_multiplier'] or 0:6.3f} "
              f"{f(r['test_accuracy']):>13} {f(r['opacus_test_accuracy']) if 'opacus_test_accuracy' in r else '-':>13} "
              f"{f(r['shifted_accuracy']):>13} {r['mia_auc'][0]:7.3f} {r['mia_tpr_at_1%'][0]:7.3f}")
    print(f"{'eps':>5} {'canary MIA AUC':>14} {'TPR@10%':>8} {'one-run eps lower bound':>24}")
    for r in canary_rows:
        print(f"{'none' if r['epsilon'] is None else r['epsilon']:>5} {r['mia_auc']:14.3f} "
              f"{r['mia_tpr_at_fpr']['0.1']:8.3f} {r['epsilon_lower_bound']:17.2f} ({r['correct']}/{r['guesses']})")
    for m, c in costs.items():
        print(f"{m:>7}: {1e3 * c['s_per_step']:.2f} ms/step, peak RSS growth {c['peak_rss_growth_mib']:.1f} MiB")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    _plot(rows, canary_rows, args.plot)
    return 0


def _plot(rows, canary_rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["epsilon"] is not None]
    none = next(r for r in rows if r["epsilon"] is None)
    x = [r["epsilon"] for r in dp]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("test_accuracy", "delsketch DP-SGD"), ("opacus_test_accuracy", "Opacus"),
                       ("shifted_accuracy", "delsketch, shifted test set")):
        a.errorbar(x, [r[key][0] for r in dp], yerr=[r[key][1] for r in dp], marker="o", capsize=3, label=label)
    a.axhline(none["test_accuracy"][0], color="k", ls="--", lw=1, label="no DP")
    a.axhline(none["shifted_accuracy"][0], color="gray", ls=":", lw=1, label="no DP, shifted")
    a.set_xscale("log"); a.set_xlabel("epsilon (delta = 1e-5)"); a.set_ylabel("accuracy"); a.legend(fontsize=8)
    a.set_title("digits MLP: accuracy vs epsilon (mean ± sd over seeds)")
    b.errorbar(x, [r["mia_auc"][0] for r in dp], yerr=[r["mia_auc"][1] for r in dp], marker="o", capsize=3,
               label="loss-threshold MIA AUC")
    b.axhline(none["mia_auc"][0], color="k", ls="--", lw=1, label="no DP")
    b.axhline(0.5, color="gray", ls=":", lw=1, label="chance")
    b.set_xscale("log"); b.set_xlabel("epsilon"); b.set_ylabel("AUC"); b.legend(fontsize=8)
    b.set_title("membership inference (500 members vs 500 held out)")
    cdp = [r for r in canary_rows if r["epsilon"] is not None]
    cx = [r["epsilon"] for r in cdp]
    c.plot(cx, cx, "k--", lw=1, label="accountant epsilon")
    c.plot(cx, [r["epsilon_lower_bound"] for r in cdp], "o-", label="one-run lower bound (canaries)")
    cnone = next(r for r in canary_rows if r["epsilon"] is None)
    c.axhline(cnone["epsilon_lower_bound"], color="gray", ls=":", lw=1, label="lower bound, no DP")
    c.plot(cx, [r["mia_auc"] for r in cdp], "s-", label="canary MIA AUC")
    c.set_xscale("log"); c.set_xlabel("epsilon"); c.legend(fontsize=8)
    c.set_title(f"{cnone['canaries']} mislabeled canaries, half trained on")
    for ax in (a, b, c):
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.minorticks_off()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
