"""Plots of the memorization audit (headless; one PNG per function, written atomically)."""

from __future__ import annotations

import numpy as np

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


def plot_repetition(res: dict, path) -> None:
    """Memorization vs the number of occurrences (mean ± s.e. over the chosen examples)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    k = [r["copies"] for r in res["rows"]]
    for key, label in (("all_copies", "delete every occurrence"), ("one_copy", "delete the original only")):
        ax.errorbar(k, [r[key]["mean"] for r in res["rows"]], yerr=[r[key]["stderr"] for r in res["rows"]],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(k)
    ax.set_xticklabels([str(x) for x in k])
    ax.minorticks_off()
    ax.set_xlabel("occurrences of the example in the training data")
    ax.set_ylabel(f"memorization ({res['metric']} change, route {res['route']})")
    ax.set_title(f"{res['task']}: repetition ({len(res['examples'])} examples, mean ± s.e.)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_novelty(res: dict, path) -> None:
    """Memorization against atypicality: every example, and the mean per quantile bin."""
    keys = [k for k in ("knn_distance", "knn_distance_same_class") if k in res["atypicality"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        a = res["atypicality"][key]
        ax.scatter(a, res["scores"], s=6, alpha=0.5, label="examples")
        b = res["binned"][key]
        ax.errorbar([0.5 * (x["atypicality_lo"] + x["atypicality_hi"]) for x in b], [x["mean"] for x in b],
                    yerr=[x["stderr"] for x in b], color="C3", marker="s", capsize=3, label="bin mean ± s.e.")
        sp = res["spearman"][key]
        k = res["atypicality"]["neighbours"]
        ax.set_xlabel(f"mean distance to {k} nearest " + ("same-class " if key.endswith("class") else "")
                      + "training examples")
        ax.set_ylabel(f"memorization ({res['metric']} change, route {res['route']})")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"{res['task']}: Spearman {sp['rho']:.3f} (p = {sp['p_value']:.1g})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_most_memorized(res: dict, path, columns: int = 8) -> None:
    """The most memorized examples themselves: 8x8 images with label and score, or the texts with scores."""
    top = res["most_memorized"]
    if top and "image" in top[0]:
        rows = (len(top) + columns - 1) // columns
        fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.75 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, e in zip(axes.ravel(), top):
            ax.imshow(np.asarray(e["image"]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
            ax.set_title(f"#{e['index']} label {e['label']}\n{e['score']:+.3f}", fontsize=7)
        fig.suptitle(f"{res['task']}: most memorized training examples (route {res['route']}, {res['metric']} change)",
                     fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(5, 0.19 * len(top) + 0.4))
        ax.axis("off")
        lines = [f"{k + 1:>2}. #{e['index']:<5} {e.get('text', '?'):<16} {e['score']:+.4f}" for k, e in enumerate(top)]
        ax.text(0, 1, "\n".join(lines), family="monospace", fontsize=9, va="top", transform=ax.transAxes)
        ax.set_title(f"{res['task']}: most memorized (route {res['route']}, {res['metric']} change)", fontsize=9)
    save_figure(fig, path)


def plot_size(res: dict, path) -> None:
    """Memorization and membership inference against the number of parameters."""
    rows = res["rows"]
    p = [r["parameters"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.errorbar(p, [r["self_influence"]["mean"] for r in rows], yerr=[r["self_influence"]["stderr"] for r in rows],
               marker="o", capsize=3, label=f"self-influence ({res['route']}, this run)")
    a.errorbar(p, [r["counterfactual_memorization"]["mean"] for r in rows],
               yerr=[r["counterfactual_memorization"]["stderr"] for r in rows], marker="s", capsize=3,
               label="counterfactual memorization (random halves)")
    a.set_ylabel(f"mean memorization ({res['metric']} change)")
    for name, a_ in rows[0]["membership"].items():
        b.errorbar(p, [r["membership"][name]["auc"] for r in rows],
                   yerr=[[r["membership"][name]["auc"] - r["membership"][name]["auc_ci"][0] for r in rows],
                         [r["membership"][name]["auc_ci"][1] - r["membership"][name]["auc"] for r in rows]],
                   marker="o", capsize=3, label=name)
    b.axhline(0.5, color="gray", ls=":", lw=1)
    b.set_ylabel("membership-inference AUC (95 % CI)")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel(f"parameters ({res['width_name']} = " + ", ".join(str(r[res['width_name']]) for r in rows) + ")")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res['task']}: model size", fontsize=9)
    save_figure(fig, path)
