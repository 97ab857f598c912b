"""Plots (matplotlib, headless). Every function writes one PNG atomically."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_write  # noqa: E402


def save_figure(fig, path) -> None:
    """Write ``fig`` as a PNG atomically (see :func:`delsketch.io.atomic_write`) and close it."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"), suffix=".png")
    finally:
        plt.close(fig)


def plot_stability(reports: dict, path) -> None:
    """log2 size of the degree-r Taylor term per degree, with confidence intervals, one line per output."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, rep in reports.items():
        rs = [row["degree"] for row in rep["degrees"]]
        y = [row["log2_size"] for row in rep["degrees"]]
        lo = [row["log2_size"] - row["log2_lo"] for row in rep["degrees"]]
        hi = [row["log2_hi"] - row["log2_size"] for row in rep["degrees"]]
        ax.errorbar(rs, y, yerr=[lo, hi], marker="o", capsize=3, label=f"{q} ({rep['verdict'].split(':')[0]})")
    ax.set_xlabel("degree r")
    ax.set_ylabel("log2 estimated size of the degree-r Taylor term")
    ax.set_title("stability: Taylor terms should decay with r")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_predicted_vs_actual(rows: list[dict], path, title: str) -> None:
    """Bars of predicted change (± 2 standard errors) beside the retrained change, per output."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    xs = range(len(rows))
    pred = [r["predicted_change"] for r in rows]
    err = [2 * r["stderr"] for r in rows]
    act = [r["actual_change"] for r in rows]
    has_exact = all("exact_series_change" in r for r in rows)
    w = 0.27 if has_exact else 0.4
    ax.bar([x - w for x in xs] if has_exact else [x - 0.2 for x in xs], pred, width=w, yerr=err, capsize=4,
           label="sketch prediction ± 2 s.e.")
    if has_exact:
        ax.bar(list(xs), [r["exact_series_change"] for r in rows], width=w, label="exact series (same degree)")
    ax.bar([x + w for x in xs] if has_exact else [x + 0.2 for x in xs], act, width=w, label="real retraining")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["query"] for r in rows])
    ax.set_ylabel("change of the output")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
