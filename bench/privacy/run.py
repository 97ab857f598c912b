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

Memorization (delsketch.audit.memorization, route loo: exact leave-one-out retraining of this run, same Poisson
schedule and noise) of a fixed set of examples (the most memorized of the non-private model and a random sample),
per epsilon; canary exposure (delsketch.audit canaries: random binary 8x8 inputs with random labels, planted
1..16 times, |R| = 10 labels) per epsilon. Cost: the DP step by the Linear-only path (per-example norms from the
layer inputs and output gradients) and by vmapped per-example gradients, side by side.

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

DELTA, CLIP, N_TEST = 1e-5, 1.0, 1297  # every digit not in the training set is a non-member


def base_task(epochs: int, seed: int):
    from delsketch.tasks import get_preset

    return get_preset("digits")(epochs=epochs, n_test=N_TEST, seed=0)


def sigma_for(eps: float, task) -> float:
    from delsketch.privacy import noise_multiplier_for

    q = sum(map(len, task.schedule)) / len(task.schedule) / task.n
    return noise_multiplier_for(eps, DELTA, q, len(task.schedule), "prv")


def private(task, sigma, seed=0, path="linear", sample_rate=None):
    from delsketch.privacy import DP, make_private

    t = make_private(task, DP(noise_multiplier=sigma, max_grad_norm=CLIP, seed=seed, delta=DELTA,
                              sample_rate=sample_rate))
    if path == "vmap":
        t.gradient._linear = None
    return t


def ours(task, sigma, seed, path="linear"):
    """delsketch: the preset's task made private (Poisson schedule and noise seeded by ``seed``)."""
    from delsketch import train

    t = task if sigma is None else private(task, sigma, seed, path)
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
        mia = loss_threshold(loss[member].tolist(), loss[~member].tolist(), fprs=(0.001, 0.01, 0.1))
        lb = one_run_epsilon_lower_bound((-loss).tolist(), member.tolist(), k_in=guesses, k_out=guesses)
        out.append({"epsilon": None if math.isinf(eps) else eps, "canaries": m, "members": int(member.sum()),
                    "mia_auc": mia["auc"], "mia_tpr_at_fpr": mia["tpr_at_fpr"], **lb})
        print(f"canaries, eps {eps}: AUC {mia['auc']:.3f}, lower bound {lb['epsilon_lower_bound']:.2f} "
              f"({lb['correct']}/{lb['guesses']})", file=sys.stderr, flush=True)
    return out


def memorization_vs_eps(task, eps_grid, top: int = 10, random: int = 10, seed: int = 0) -> dict:
    """Exact leave-one-out self-influence (own loss after deletion - as trained) of the ``top`` examples the
    non-private model memorizes most (all n scored by LOO) and ``random`` seeded others, at every epsilon."""
    import numpy as np

    from delsketch.audit import memorization

    t0 = time.perf_counter()
    full = memorization(task, route="loo")
    ranked = full.ranking()
    rng = np.random.default_rng(seed)
    others = [int(i) for i in rng.permutation([i for i in range(task.n) if i not in ranked[:top]])[:random]]
    chosen = ranked[:top] + others
    rows = [{"epsilon": None, "all_examples": {"mean": float(np.mean(full.scores)), "max": float(np.max(full.scores))}}]
    for eps in [math.inf] + eps_grid:
        t = task if math.isinf(eps) else private(task, sigma_for(eps, task))
        r = memorization(t, route="loo", indices=chosen)
        sc = np.asarray(r.scores)
        row = {"epsilon": None if math.isinf(eps) else eps, "scores": r.scores,
               "top": {"mean": float(sc[:top].mean()), "max": float(sc[:top].max()),
                       "stderr": float(sc[:top].std(ddof=1) / math.sqrt(top))},
               "random": {"mean": float(sc[top:].mean()), "max": float(sc[top:].max()),
                          "stderr": float(sc[top:].std(ddof=1) / math.sqrt(max(1, len(others))))}}
        if math.isinf(eps):
            rows[0].update(row)
        else:
            rows.append(row)
        print(f"memorization, eps {eps}: top-{top} mean {row['top']['mean']:.4f} max {row['top']['max']:.4f}, "
              f"random mean {row['random']['mean']:.4f}", file=sys.stderr, flush=True)
    return {"route": "loo", "definition": full.definition + " (DP: the same Poisson schedule and noise)",
            "orientation": full.orientation, "examples": chosen, "top": top, "random": len(others), "rows": rows,
            "seconds": round(time.perf_counter() - t0, 2)}


def lira_vs_eps(task, eps_grid, models: int = 16, bootstrap: int = 200) -> list[dict]:
    """LiRA (delsketch.audit.mia.lira_attack) against DP: ``models`` models on random halves (every example IN for
    half of them), each a DP run with its own seed (its own Poisson schedule and noise, as an attacker's shadow
    models would be), each in turn the target of the others: ``models`` x n decisions."""
    from delsketch import train
    from delsketch.audit.mia import lira_attack
    from delsketch.audit.outputs import view
    from delsketch.audit.runs import half_masks

    masks = half_masks(task.n, models, 0)
    idx = torch.arange(task.n)
    out = []
    for eps in [math.inf] + eps_grid:
        t0 = time.perf_counter()
        loss, phi = [], []
        for k, mk in enumerate(masks):
            t = task if math.isinf(eps) else private(task, sigma_for(eps, task), seed=100 + k)
            p = train(t, w=(~mk).to(torch.float64))
            with torch.no_grad():
                loss.append(t.example_losses(p, idx).detach())
                phi.append(view(t).confidence(p, idx).detach())
        res = lira_attack({"masks": masks, "loss": torch.stack(loss), "phi": torch.stack(phi)}, bootstrap=bootstrap)
        row = {"epsilon": None if math.isinf(eps) else eps, "models": models, "decisions": res["decisions"],
               "seconds": round(time.perf_counter() - t0, 2), "attacks": {}}
        for name in ("lira_online_fixed_variance", "lira_online", "lira_offline", "loss_threshold"):
            a = res["attacks"][name]
            row["attacks"][name] = {"auc": a["auc"], "auc_ci": a["ci"]["auc"], "tpr_at_fpr": a["tpr_at_fpr"],
                                    "tpr_ci": a["ci"]["tpr_at_fpr"], "nonmembers": a["nonmembers"]}
        out.append(row)
        f = row["attacks"]["lira_online_fixed_variance"]
        print(f"LiRA, eps {eps}: AUC {f['auc']:.3f}, TPR@0.1% {f['tpr_at_fpr']['0.001']:.4f} {f['tpr_ci']['0.001']}",
              file=sys.stderr, flush=True)
    return out


def exposure_vs_eps(task, eps_grid, repeats=(1, 2, 4, 8, 16), per_repeat: int = 4, seed: int = 0) -> list[dict]:
    """Canary exposure (delsketch.audit: marked inputs with random labels, |R| = 10) of canaries planted 1..16
    times, trained without DP and with DP at the same sample rate and steps as the task."""
    from delsketch import train
    from delsketch.audit import exposure, make_canaries, plant

    canaries = make_canaries(task, repeats, per_repeat, seed)
    ptask, planted = plant(task, canaries, seed)
    q = sum(map(len, task.schedule)) / len(task.schedule) / task.n
    out = []
    for eps in [math.inf] + eps_grid:
        t = ptask if math.isinf(eps) else private(ptask, sigma_for(eps, task), sample_rate=q)
        p = train(t)
        ex = [exposure(ptask, p, c)["exposure"] for c in planted]
        row = {"epsilon": None if math.isinf(eps) else eps, "copies": [c.copies for c in planted], "exposure": ex,
               "mean_by_copies": {str(r): float(sum(e for c, e in zip(planted, ex) if c.copies == r) / per_repeat)
                                  for r in repeats}}
        out.append(row)
        print(f"exposure, eps {eps}: {row['mean_by_copies']}", file=sys.stderr, flush=True)
    return out


class _RefAdam(torch.optim.Optimizer):
    """The names preset's Adam as a torch optimizer (betas 0.85/0.99, eps 1e-3 inside the square root, bias
    corrected, linear decay to 0 over ``total`` steps), so Opacus's DPOptimizer can wrap the same update."""

    def __init__(self, params, lr, total, betas=(0.85, 0.99), eps=1e-3):
        super().__init__(params, {"lr": lr})
        self.total, self.betas, self.eps, self.t = total, betas, eps, 0

    @torch.no_grad()
    def step(self, closure=None):
        b1, b2 = self.betas
        self.t += 1
        lr_t = self.param_groups[0]["lr"] * (1 - (self.t - 1) / self.total)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mhat, vhat = st["m"] / (1 - b1**self.t), st["v"] / (1 - b2**self.t)
                p.sub_(lr_t * mhat / (vhat + self.eps).sqrt())


class _OneLeaf(torch.nn.Module):
    """The same model with all its parameters on one leaf module (forward: ``functional_call`` of the original),
    which Opacus's functorch sampler differentiates per sample as a whole. (Opacus refuses MicroGPT itself: it
    holds a buffer, the causal mask, and keeps parameters on non-leaf modules.)"""

    def __init__(self, model, init):
        super().__init__()
        self.keys = list(init)
        self._model = [model]  # not a submodule
        for i, k in enumerate(self.keys):
            self.register_parameter(f"p{i}", torch.nn.Parameter(init[k].clone()))

    def forward(self, tokens):
        from torch.func import functional_call

        return functional_call(self._model[0], {k: getattr(self, f"p{i}") for i, k in enumerate(self.keys)}, (tokens,))

    def named_original(self):
        return {k: getattr(self, f"p{i}").detach().clone() for i, k in enumerate(self.keys)}


def opacus_names_run(task, corpus, sigma, q, steps, seed):
    """Opacus on the names task: the same MicroGPT module, initial weights, optimizer (``_RefAdam``), clip, noise
    multiplier, Poisson sample rate and steps; per-sample gradients by Opacus's functorch sampler."""
    import copy

    from opacus import PrivacyEngine

    torch.manual_seed(2000 + seed)
    model = _OneLeaf(task.model, task.init_params())
    lengths = torch.tensor(corpus.lengths)
    ds = torch.utils.data.TensorDataset(corpus.inputs, corpus.targets, lengths)
    loader = torch.utils.data.DataLoader(ds, batch_size=max(1, round(q * task.n)))
    opt = _RefAdam(model.parameters(), lr=task.config["lr"], total=steps)
    engine = PrivacyEngine(accountant="prv")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                             max_grad_norm=CLIP, poisson_sampling=True, grad_sample_mode="functorch")
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for xb, yb, lb in loader:
            if done == steps:
                break
            opt.zero_grad()
            if len(xb):
                logp = torch.log_softmax(model(xb), dim=-1)
                nll = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
                mask = (torch.arange(xb.shape[1])[None, :] < lb[:, None]).to(nll.dtype)
                ((nll * mask).sum(-1) / lb).mean().backward()  # per-name mean token loss, as the task's
            else:  # an empty Poisson batch: no samples, noise only (functorch cannot run a batch of 0)
                for p in model.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            opt.step()
            done += 1
    dt = (time.perf_counter() - t0) / steps
    return model._module.named_original(), dt, engine.get_epsilon(DELTA)


def shifted_names(docs, chars, rate: float = 0.1, seed: int = 7):
    """The held-out names with each character replaced, with probability ``rate``, by a random other one."""
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice([x for x in chars if x != c]) if rng.random() < rate else c for c in d) for d in docs]


def names_rows(eps_grid, n: int = 100, steps: int = 100, sample_rate: float = 0.1, held: int = 500, seeds: int = 8):
    """The names task (microgpt, n names, Adam) without DP and with DP-SGD at a Poisson sample rate (the preset
    trains on one name per step, which under DP would mean a batch of ~1 and noise sigma C per step): held-out
    mean per-name loss and per-token accuracy of ``held`` names after the training ones, the same on those names
    with 10 % of their characters replaced (the shifted set), the loss-threshold attack (the n training names
    against the held-out ones), and Opacus training the same model with the same settings."""
    import random

    from delsketch import train
    from delsketch.audit.mia import loss_threshold
    from delsketch.audit.outputs import token_accuracy
    from delsketch.privacy import noise_multiplier_for
    from delsketch.tasks import get_preset
    from delsketch.tasks.microgpt import TextCorpus
    from delsketch.tasks.names import census_names

    task = get_preset("names")(n=n, steps=steps)
    docs = list(census_names()[0])
    random.Random(42).shuffle(docs)  # the preset's own shuffle (seed 42)
    corpus = task.example_losses.__self__
    test = TextCorpus(docs[n : n + held], corpus.chars, corpus.model)
    shift = TextCorpus(shifted_names(docs[n : n + held], corpus.chars), corpus.chars, corpus.model)
    idx, tr = torch.arange(held), torch.arange(n)
    q = float(sample_rate)

    def evaluate(p):
        with torch.no_grad():
            p = {k: v.detach() for k, v in p.items()}
            lt = test.example_losses(p, idx)
            mia = loss_threshold(corpus.example_losses(p, tr).tolist(), lt.tolist())
            return {"heldout_loss": float(lt.mean()), "heldout_token_accuracy": float(token_accuracy(test, p, idx).mean()),
                    "shifted_loss": float(shift.example_losses(p, idx).mean()),
                    "shifted_token_accuracy": float(token_accuracy(shift, p, idx).mean()),
                    "mia_auc": mia["auc"], "mia_tpr_at_1%": mia["tpr_at_fpr"]["0.01"]}

    out = []
    for eps in [math.inf] + eps_grid:
        ms, os_, t0, sigma, path, spent, dts, ours_dts = [], [], time.perf_counter(), None, None, None, [], []
        for seed in range(1 if math.isinf(eps) else seeds):
            if math.isinf(eps):
                t = task
            else:
                sigma = noise_multiplier_for(eps, DELTA, q, steps, "prv")
                t = private(task, sigma, seed, sample_rate=q)
            t1 = time.perf_counter()
            p = train(t)
            ours_dts.append((time.perf_counter() - t1) / len(t.schedule))
            ms.append(evaluate(p))
            if sigma is not None:
                path = t.gradient.path
                try:
                    po, dt, spent = opacus_names_run(task, corpus, sigma, q, steps, seed)
                    os_.append(evaluate(po))
                    dts.append(dt)
                except Exception as e:  # recorded, not hidden
                    os_ = None
                    spent = f"Opacus failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    break
        row = {"epsilon": None if math.isinf(eps) else eps, "noise_multiplier": sigma, "seeds": len(ms),
               "seconds_per_run": (time.perf_counter() - t0) / len(ms), "path": path,
               "s_per_step": min(ours_dts)}  # training alone, fastest seed (seconds_per_run includes Opacus)
        for key in ms[0]:
            row[key] = mean_sd([m[key] for m in ms])
            if os_:
                row["opacus_" + key] = mean_sd([m[key] for m in os_])
        if sigma is not None:
            row["opacus_epsilon_spent"] = spent
            row["opacus_s_per_step"] = min(dts) if dts else None
        out.append(row)
        print(f"names, eps {eps}: held-out loss {row['heldout_loss'][0]:.3f} ± {row['heldout_loss'][1]:.3f}, token "
              f"accuracy {row['heldout_token_accuracy'][0]:.3f}"
              + (f" (opacus {row['opacus_heldout_token_accuracy'][0]:.3f})" if os_ else ""), file=sys.stderr, flush=True)
    return {"config": {"n": n, "steps": steps, "optimizer": "the preset's Adam (lr 0.01, linear decay)",
                       "dp_sample_rate": q, "no_dp_schedule": "the preset's: one name per step", "clip": CLIP,
                       "delta": DELTA, "heldout": held, "shift": "10 % of each held-out name's characters replaced"},
            "rows": out}


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
        _, dt = ours(task, None if method == "plain" else sigma, 0, "vmap" if method == "dp_vmap" else "linear")
    return {"s_per_step": dt, "peak_rss_growth_mib": (_status_kib("VmHWM") - base) / 1024}


def cost(task, sigma: float) -> dict:
    out = {}
    for method in ("plain", "dp", "dp_vmap", "opacus") * 5:  # alternate (the machine is shared); keep the fastest of five
        r = _one_cost(method, task, sigma)
        if method not in out or r["s_per_step"] < out[method]["s_per_step"]:
            out[method] = r
    return out


def compare_at(task, eps: float, seeds: int = 20) -> dict:
    """The accuracy target, resolved: delsketch and Opacus at one epsilon over ``seeds`` seeds each (the 3-seed
    table cannot resolve a 1-point gap: its sd is 1-2 points), mean ± standard error and the difference."""
    sigma = sigma_for(eps, task)
    a, b = [], []
    for seed in range(seeds):
        a.append(measure(task, ours(task, sigma, seed)[0])["test_accuracy"])
        b.append(measure(task, opacus_run(task, sigma, seed)[0])["test_accuracy"])
    se = lambda x: statistics.stdev(x) / math.sqrt(len(x))  # noqa: E731
    return {"epsilon": eps, "seeds": seeds, "delsketch": [statistics.mean(a), se(a)], "opacus": [statistics.mean(b), se(b)],
            "difference": [statistics.mean(a) - statistics.mean(b), math.sqrt(se(a) ** 2 + se(b) ** 2)]}


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
    ap.add_argument("--names", action="store_true", help="only the names rows -> bench/results/privacy-names.json")
    args = ap.parse_args(argv)
    if args.names:
        torch.set_num_threads(1)
        from delsketch.io import versions, write_json

        t0 = time.perf_counter()
        res = names_rows([float(e) for e in args.eps.split(",")])
        res.update({"versions": versions(), "seconds": time.perf_counter() - t0,
                    "command": "python bench/privacy/run.py --names --eps " + args.eps})
        write_json("bench/results/privacy-names.json", res)
        print(f"{'eps':>5} {'held-out loss':>15} {'token acc':>15} {'Opacus token acc':>17} {'shifted token acc':>17} "
              f"{'MIA AUC':>8} {'ms/step ours':>12} {'Opacus':>7}")
        for r in res["rows"]:
            f = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
            op = f(r["opacus_heldout_token_accuracy"]) if "opacus_heldout_token_accuracy" in r else "-"
            ms = f"{1e3 * r['s_per_step']:.1f}"
            oms = "-" if not r.get("opacus_s_per_step") else f"{1e3 * r['opacus_s_per_step']:.1f}"
            print(f"{'none' if r['epsilon'] is None else r['epsilon']:>5} {f(r['heldout_loss']):>15} "
                  f"{f(r['heldout_token_accuracy']):>15} {op:>17} {f(r['shifted_token_accuracy']):>17} "
                  f"{r['mia_auc'][0]:8.3f} {ms:>12} {oms:>7}")
            if isinstance(r.get("opacus_epsilon_spent"), str):
                print("      " + r["opacus_epsilon_spent"])
        return 0
    if args.plot_only:
        import json

        saved = json.loads(Path(args.out).read_text())
        _plot(saved["rows"], saved["canaries"], args.plot, saved.get("memorization"), saved.get("exposure"),
              saved.get("cost"), saved.get("lira"))
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
    mem_eps = [e for e in eps_grid if e in (8.0, 2.0, 0.5)] or eps_grid[:1]
    memo = memorization_vs_eps(task, mem_eps)
    expo = exposure_vs_eps(task, eps_grid)
    lira = lira_vs_eps(task, [e for e in eps_grid if e in (8.0, 1.0)] or eps_grid[:1])
    sigma3 = sigma_for(3.0, task)
    at3 = compare_at(task, 3.0)
    costs = cost(task, sigma3)
    result = {
        "config": {"task": f"digits (tanh MLP 64-32-10, 500 train, {N_TEST} held out)", "epochs": args.epochs,
                   "steps": len(task.schedule), "batch": 32, "sample_rate": 1 / 16, "clip": CLIP, "delta": DELTA,
                   "accountant": "prv", "seeds": args.seeds, "shift": "Gaussian noise std 0.3, clipped to [0, 1]",
                   "cost_at_epsilon": 3.0},
        "rows": rows, "canaries": canary_rows, "memorization": memo, "exposure": expo, "lira": lira, "accuracy_at_eps3": at3, "cost": costs, "versions": versions(), "seconds": time.perf_counter() - t_start,
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
    print(f"{'eps':>5} {'LOO self-influence: top-10 mean':>32} {'max':>7} {'random-10 mean':>15}")
    for r in memo["rows"]:
        print(f"{'none' if r['epsilon'] is None else r['epsilon']:>5} {r['top']['mean']:32.4f} {r['top']['max']:7.4f} "
              f"{r['random']['mean']:15.4f}")
    print(f"{'eps':>5} exposure (bits, |R| = 10) by copies " + " ".join(f"{k:>5}" for k in expo[0]["mean_by_copies"]))
    for r in expo:
        print(f"{'none' if r['epsilon'] is None else r['epsilon']:>5} {'':34}" + " ".join(
            f"{v:5.2f}" for v in r["mean_by_copies"].values()))
    print(f"{'eps':>5} {'LiRA (fixed var.) AUC':>22} {'TPR@0.1% FPR [95% CI]':>28} {'loss-thr. AUC':>14}")
    for r in lira:
        a, l_ = r["attacks"]["lira_online_fixed_variance"], r["attacks"]["loss_threshold"]
        print(f"{'none' if r['epsilon'] is None else r['epsilon']:>5} {a['auc']:22.3f} {a['tpr_at_fpr']['0.001']:12.4f} "
              f"[{a['tpr_ci']['0.001'][0]:.4f}, {a['tpr_ci']['0.001'][1]:.4f}] {l_['auc']:14.3f}")
    print(f"epsilon 3 over {at3['seeds']} seeds: delsketch {100 * at3['delsketch'][0]:.2f} ± {100 * at3['delsketch'][1]:.2f}, "
          f"Opacus {100 * at3['opacus'][0]:.2f} ± {100 * at3['opacus'][1]:.2f}, difference "
          f"{100 * at3['difference'][0]:.2f} ± {100 * at3['difference'][1]:.2f} points")
    for m, c in costs.items():
        print(f"{m:>7}: {1e3 * c['s_per_step']:.2f} ms/step ({c['s_per_step'] / costs['plain']['s_per_step']:.2f}x plain), "
              f"peak RSS growth {c['peak_rss_growth_mib']:.1f} MiB")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    _plot(rows, canary_rows, args.plot, memo, expo, costs, lira)
    return 0


def _plot(rows, canary_rows, path, memo=None, expo=None, costs=None, lira=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["epsilon"] is not None]
    none = next(r for r in rows if r["epsilon"] is None)
    x = [r["epsilon"] for r in dp]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (a, b, c), (d, e, f) = axes
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
    if lira:
        ld = [r for r in lira if r["epsilon"] is not None]
        a_ = [r["attacks"]["lira_online_fixed_variance"] for r in ld]
        b.errorbar([r["epsilon"] for r in ld], [v["auc"] for v in a_],
                   yerr=[[v["auc"] - v["auc_ci"][0] for v in a_], [v["auc_ci"][1] - v["auc"] for v in a_]],
                   marker="s", capsize=3, label=f"LiRA AUC ({lira[0]['models']} DP models, each the target)")
        b.axhline(lira[0]["attacks"]["lira_online_fixed_variance"]["auc"], color="C1", ls="--", lw=1,
                  label="LiRA, no DP")
        bt = b.twinx()
        bt.errorbar([r["epsilon"] for r in ld], [v["tpr_at_fpr"]["0.001"] for v in a_],
                    yerr=[[v["tpr_at_fpr"]["0.001"] - v["tpr_ci"]["0.001"][0] for v in a_],
                          [v["tpr_ci"]["0.001"][1] - v["tpr_at_fpr"]["0.001"] for v in a_]],
                    color="C2", marker="^", capsize=3, label="LiRA TPR @ 0.1 % FPR (right)")
        bt.axhline(0.001, color="C2", ls=":", lw=1, label="TPR = FPR = 0.1 %")
        bt.set_ylabel("TPR at 0.1 % FPR")
        bt.legend(fontsize=7, loc="lower right")
    b.set_xscale("log"); b.set_xlabel("epsilon"); b.set_ylabel("AUC"); b.legend(fontsize=7, loc="upper left")
    b.set_title(f"membership inference (500 members vs {N_TEST} held out)")
    cdp = [r for r in canary_rows if r["epsilon"] is not None]
    cx = [r["epsilon"] for r in cdp]
    c.plot(cx, cx, "k--", lw=1, label="accountant epsilon")
    c.plot(cx, [r["epsilon_lower_bound"] for r in cdp], "o-", label="one-run lower bound (canaries)")
    cnone = next(r for r in canary_rows if r["epsilon"] is None)
    c.axhline(cnone["epsilon_lower_bound"], color="gray", ls=":", lw=1, label="lower bound, no DP")
    c.plot(cx, [r["mia_auc"] for r in cdp], "s-", label="canary MIA AUC")
    c.set_xscale("log"); c.set_xlabel("epsilon"); c.legend(fontsize=8)
    c.set_title(f"{cnone['canaries']} mislabeled canaries, half trained on")
    if memo:
        mr = [r for r in memo["rows"] if r["epsilon"] is not None]
        mx = [r["epsilon"] for r in mr]
        mn = memo["rows"][0]
        for key, label in (("top", f"the {memo['top']} most memorized without DP"), ("random", f"{memo['random']} random")):
            d.errorbar(mx, [r[key]["mean"] for r in mr], yerr=[r[key]["stderr"] for r in mr], marker="o", capsize=3,
                       label=f"{label}: mean")
            d.axhline(mn[key]["mean"], ls="--", lw=1, color="C0" if key == "top" else "C1", label=f"{label}, no DP")
        d.plot(mx, [r["top"]["max"] for r in mr], "^:", color="C0", label="max")
        d.set_yscale("symlog", linthresh=1e-3)
        d.set_xscale("log"); d.set_xlabel("epsilon"); d.set_ylabel("leave-one-out self-influence (loss change)")
        d.legend(fontsize=7); d.set_title("memorization (exact LOO of this run)")
    if expo:
        ks = sorted(expo[0]["mean_by_copies"], key=int)
        for k in ks:
            e.plot([r["epsilon"] for r in expo if r["epsilon"] is not None],
                   [r["mean_by_copies"][k] for r in expo if r["epsilon"] is not None], "o-", label=f"{k} copies")
        e.axhline(math.log2(10), color="gray", ls=":", lw=1, label="maximum (log2 10)")
        e.set_xscale("log"); e.set_xlabel("epsilon"); e.set_ylabel("exposure (bits)")
        e.legend(fontsize=7); e.set_title("canary exposure (no DP: " + ", ".join(
            f"{expo[0]['mean_by_copies'][k]:.2f}" for k in ks) + ")", fontsize=9)
    if costs:
        names = [m for m in ("plain", "dp", "dp_vmap", "opacus") if m in costs]
        label = {"plain": "no DP", "dp": "delsketch DP\n(Linear path)", "dp_vmap": "delsketch DP\n(vmap)",
                 "opacus": "Opacus DP"}
        f.bar([label[m] for m in names], [1e3 * costs[m]["s_per_step"] for m in names])
        f.set_ylabel("ms per step (epsilon 3)"); f.set_title("cost per step (fastest of five runs)")
    for ax in (a, b, c, d, e):
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.minorticks_off()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
