"""Plots of the memorization audit (headless; one PNG per function, written atomically)."""

from __future__ import annotations

from .report import plt, save_figure


def plot_roc(attacks: dict, path) -> None:
    """ROC curves of every attack on log-log axes (the low-FPR regime is what matters)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, a in attacks.items():
        ax.plot(a["fpr"], a["tpr"], label=f"{name} (AUC {a['auc']:.3f}, TPR@0.1% {a['tpr_at_fpr']['0.001']:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_histogram(scores: list, path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores, bins=40)
    ax.set_xlabel("self-influence (change of own loss when deleted)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_exposure(rows: list, path) -> None:
    """Exposure vs copies, with predicted (± interval) and retrained exposure after deleting all copies."""
    fig, ax = plt.subplots(figsize=(6, 4))
    r = [c["copies"] for c in rows]
    ax.plot(r, [c["trained"]["exposure"] for c in rows], "o-", label="trained with the canary")
    d = [c["deletions"][0] for c in rows]
    p = [x["predicted"]["exposure"] for x in d]
    lo = [x["predicted"]["exposure"] - x["predicted"]["interval"][0] for x in d]
    hi = [x["predicted"]["interval"][1] - x["predicted"]["exposure"] for x in d]
    ax.errorbar(r, p, yerr=[lo, hi], fmt="s", capsize=3, label="predicted after deleting all copies")
    ax.plot(r, [x["retrained"]["exposure"] for x in d], "x", ms=9, label="retrained without the copies")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copies of the canary")
    ax.set_ylabel("exposure (bits)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
