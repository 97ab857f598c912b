"""Membership inference: ROC metrics, the loss-threshold attack and LiRA (online, offline), with bootstrap
confidence intervals. Higher score = "member" everywhere.

LiRA (Carlini et al. 2022): shadow models on random halves give, for every example, the logit-scaled confidence
``phi = log p - log(1 - p)`` of models trained with it (IN) and without it (OUT); fit a Gaussian to each side.
Online score: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)``; offline: ``log P_out[Phi <= phi]``
(one-sided, OUT models only). ``fix_variance`` uses one variance per side pooled over all examples.
Evaluation: each model in turn is the target and the others are its shadows (leave-one-model-out), which pools
``models x n`` (member or non-member) decisions - enough for a TPR at 0.1 % FPR.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from ..training import Task
from .outputs import view
from .runs import half_masks, map_jobs, train_with_members

__all__ = ["roc_metrics", "loss_threshold", "bootstrap_metrics", "lira_scores", "shadow_statistics", "lira_attack"]

FPRS = (0.001, 0.01)


def roc_metrics(member_scores, nonmember_scores, fprs=FPRS) -> dict:
    """AUC, TPR at each FPR (the largest TPR whose FPR is at most the target), and the ROC curve.

    Returns ``{"auc", "tpr_at_fpr": {str(fpr): tpr}, "fpr": [...], "tpr": [...]}``; higher score = member."""
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    o = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size == 0 or o.size == 0:
        raise ValueError("roc_metrics needs at least one member and one non-member score")
    if not (np.isfinite(m).all() and np.isfinite(o).all()):
        raise ValueError("roc_metrics: scores must be finite")
    y = np.concatenate([np.ones(m.size), np.zeros(o.size)])
    s = np.concatenate([m, o])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out = {"auc": float(roc_auc_score(y, s)), "tpr_at_fpr": {}}
    for f in fprs:
        ok = fpr <= f
        out["tpr_at_fpr"][str(f)] = float(tpr[ok].max()) if ok.any() else 0.0
    out["fpr"], out["tpr"] = fpr.tolist(), tpr.tolist()
    return out


def loss_threshold(member_losses, nonmember_losses, fprs=FPRS) -> dict:
    """The global loss-threshold attack: lower loss = member (roc_metrics of -loss)."""
    return roc_metrics(-np.asarray(member_losses, dtype=np.float64), -np.asarray(nonmember_losses, dtype=np.float64),
                       fprs=fprs)


def bootstrap_metrics(member_scores, nonmember_scores, fprs=FPRS, samples: int = 200, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Percentile bootstrap intervals for the AUC and each TPR at FPR (members and non-members resampled
    separately). Returns ``{"auc": [lo, hi], "tpr_at_fpr": {str(fpr): [lo, hi]}, "samples", "level"}``."""
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    o = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0xB007])))
    aucs, tprs = [], {str(f): [] for f in fprs}
    for _ in range(samples):
        r = roc_metrics(m[rng.integers(0, m.size, m.size)], o[rng.integers(0, o.size, o.size)], fprs)
        aucs.append(r["auc"])
        for f in fprs:
            tprs[str(f)].append(r["tpr_at_fpr"][str(f)])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"auc": np.percentile(aucs, q).tolist(), "tpr_at_fpr": {k: np.percentile(v, q).tolist() for k, v in tprs.items()},
            "samples": samples, "level": level}


def lira_scores(target_phi: torch.Tensor, shadow_phi: torch.Tensor, shadow_in: torch.Tensor,
                fix_variance: bool = False, min_std: float = 1e-6) -> dict:
    """LiRA scores of one target model's examples from shadow models.

    ``target_phi [n]``, ``shadow_phi [S, n]``, ``shadow_in [S, n]`` bool. Returns ``{"online", "offline"}`` [n]
    numpy arrays (needs >= 2 IN and >= 2 OUT shadows per example for per-example variances)."""
    phi = shadow_phi.numpy()
    inside = shadow_in.numpy().astype(bool)
    x = target_phi.numpy()
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    if (n_in < 1).any() or (n_out < 1).any():
        raise ValueError("LiRA needs at least one IN and one OUT shadow model for every example")
    mu_in = np.where(inside, phi, 0).sum(0) / n_in
    mu_out = np.where(~inside, phi, 0).sum(0) / n_out
    if fix_variance:
        s_in = np.full_like(mu_in, np.sqrt(np.where(inside, (phi - mu_in) ** 2, 0).sum() / max(1, inside.sum() - 1)))
        s_out = np.full_like(mu_out, np.sqrt(np.where(~inside, (phi - mu_out) ** 2, 0).sum() / max(1, (~inside).sum() - 1)))
    else:
        s_in = np.sqrt(np.where(inside, (phi - mu_in) ** 2, 0).sum(0) / np.maximum(1, n_in - 1))
        s_out = np.sqrt(np.where(~inside, (phi - mu_out) ** 2, 0).sum(0) / np.maximum(1, n_out - 1))
    s_in, s_out = np.maximum(s_in, min_std), np.maximum(s_out, min_std)
    online = norm.logpdf(x, mu_in, s_in) - norm.logpdf(x, mu_out, s_out)
    offline = norm.logcdf(x, mu_out, s_out)
    return {"online": online, "offline": offline}


def shadow_statistics(task: Task, models: int = 16, seed: int = 0, masks: Optional[torch.Tensor] = None,
                      progress=None, executor=None, task_factory=None, store=None) -> dict:
    """Train ``models`` models on random halves; return masks ``[K, n]`` and every model's per-example loss and
    logit-scaled confidence ``[K, n]`` (all examples). ``executor`` / ``task_factory``: where the shadow models
    train (:func:`delsketch.audit.runs.map_jobs`); ``store``: a directory keeping each shadow model's statistics,
    so an interrupted run resumes."""
    view(task)  # a one-line error now if the task has no confidence to attack, not in a worker
    if masks is None:
        masks = half_masks(task.n, models, seed)
    res = map_jobs(_shadow_job, [(mk,) for mk in masks], progress, task, executor, task_factory, store)
    return {"masks": masks, "loss": torch.stack([r[0] for r in res]), "phi": torch.stack([r[1] for r in res])}


def _shadow_job(task: Task, members: torch.Tensor):
    """One shadow model: every example's loss and logit-scaled confidence."""
    p = train_with_members(task, members)
    idx = torch.arange(task.n)
    with torch.no_grad():
        return task.example_losses(p, idx).detach(), view(task).confidence(p, idx).detach()


def lira_attack(stats: dict, fprs: Sequence[float] = FPRS, bootstrap: int = 200, seed: int = 0) -> dict:
    """Leave-one-model-out evaluation of LiRA (online, online with fixed variance, offline) and the loss
    threshold on shadow statistics. Also the per-example LiRA score (mean online score over the models that
    trained on the example)."""
    masks, phi, loss = stats["masks"].to(torch.bool), stats["phi"], stats["loss"]
    K, n = masks.shape
    pooled = {a: ([], []) for a in ("lira_online", "lira_online_fixed_variance", "lira_offline", "loss_threshold")}
    per_example = np.zeros(n)
    for t in range(K):
        others = torch.tensor([s for s in range(K) if s != t])
        sc = lira_scores(phi[t], phi[others], masks[others])
        scf = lira_scores(phi[t], phi[others], masks[others], fix_variance=True)
        mem = masks[t].numpy()
        for name, s in (("lira_online", sc["online"]), ("lira_online_fixed_variance", scf["online"]),
                        ("lira_offline", sc["offline"]), ("loss_threshold", -loss[t].numpy())):
            pooled[name][0].append(s[mem])
            pooled[name][1].append(s[~mem])
        per_example += np.where(mem, sc["online"], 0)
    per_example /= masks.sum(0).numpy()
    out = {"models": K, "n": n, "decisions": K * n, "attacks": {}}
    for name, (mem, non) in pooled.items():
        mem, non = np.concatenate(mem), np.concatenate(non)
        r = roc_metrics(mem, non, fprs)
        r["ci"] = bootstrap_metrics(mem, non, fprs, samples=bootstrap, seed=seed)
        r["members"], r["nonmembers"] = int(mem.size), int(non.size)
        out["attacks"][name] = r
    out["per_example_lira"] = per_example.tolist()
    return out


def membership_audit(task: Task, models: int = 16, seed: int = 0, bootstrap: int = 200, progress=None,
                     executor=None, task_factory=None, store=None) -> dict:
    """Shadow models on random halves, every attack evaluated leave-one-model-out, and beside LiRA's per-example
    score the counterfactual memorization of each example's loss from the same models (white-box risk ranking)
    with its Spearman correlation against LiRA's."""
    import time

    from scipy.stats import spearmanr

    from .memorization import DEFINITIONS, counterfactual

    t0 = time.perf_counter()
    stats = shadow_statistics(task, models=models, seed=seed, progress=progress, executor=executor,
                              task_factory=task_factory, store=store)
    out = lira_attack(stats, bootstrap=bootstrap, seed=seed)
    cf, se, _ = counterfactual(stats["loss"], stats["masks"], +1)
    out["counterfactual"] = {"definition": DEFINITIONS["subsampled"], "metric": "loss", "scores": cf.tolist(),
                             "stderr": se.tolist()}
    rho = spearmanr(cf.numpy(), np.asarray(out["per_example_lira"])).statistic
    out["spearman_counterfactual_vs_lira"] = float(rho)
    out["definition"] = ("over training randomness: target and shadow models trained on random halves of the "
                         "training set (same initialization and schedule; non-members weighted 0)")
    out["cost"] = {"retrains": models, "seconds": round(time.perf_counter() - t0, 3)}
    return out
