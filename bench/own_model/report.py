"""Markdown tables from bench/results/own-model-*.json (pasted into docs/answers.md and docs/own-model.md).

    python bench/own_model/report.py [--plot docs/figures/own-model.png] [bench/results/own-model-fullbatch.json ...]

delsketch's methods (bench/own_model/run.py) come first; the first-order peers (bench/own_model/peers.py, rows
``peer: NAME`` in the JSON), where they were run, below them, with a line comparing the best peer per family
with exact first order and the summed exact leave-one-out effects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLS = ("spearman_per_output", "spearman_pooled", "median_relative_error", "coverage_2se")


PEER = "peer: "
FIRST, LOO = "first_order (exact)", "summed exact leave-one-out"


def cell(v: dict) -> str:
    cov = v.get("coverage_2se")
    rel = "rank only" if v.get("rank_only") else f"{v['median_relative_error']:.2f}"
    return f"{v['spearman_per_output']:.2f} / {rel}" + (f" / {cov:.2f}" if cov is not None else "")


def peers_lines(res: dict, fams: list[str], peers: list[str]) -> list[str]:
    info = res["peers"]
    ro = [m[len(PEER):] for m in peers if info["rank_only"].get(m[len(PEER):])]
    best = []
    for f in fams:
        b = max(peers, key=lambda m: res["families"][f][m]["spearman_per_output"])
        r = res["families"][f]
        best.append(f"{f} {b[len(PEER):]} {r[b]['spearman_per_output']:.2f} vs {r[FIRST]['spearman_per_output']:.2f} "
                    f"/ {r[LOO]['spearman_per_output']:.2f}")
    v = info["versions"]
    out = ["", "Peers (`bench/own_model/peers.py`, bench/accuracy's adapters and venv: "
           + ", ".join(f"{k} {v[k]}" for k in sorted(v) if k != "python" and v[k]) + "), seconds each (one thread): "
           + ", ".join(f"{k} {t:.1f}" for k, t in info["seconds"].items())
           + (f". Rank only (scores not in units of the loss change, so no relative error): {', '.join(ro)}" if ro else "")
           + ". Self-deletion orientation (share of training examples 0-4 whose deletion is predicted to raise their "
           "own loss): " + ", ".join(f"{k} {x:.1f}" for k, x in info["orientation_self_deletion_positive"].items())
           + "." + (f" Failed: {info['failures']}." if info.get("failures") else ""),
           "", "Best peer per family (per-output Spearman) vs exact first order / summed exact leave-one-out: "
           + "; ".join(best) + "."]
    return out


def table(res: dict) -> str:
    fams = list(res["families"])
    allm = list(res["families"][fams[0]])
    methods = [m for m in allm if not m.startswith(PEER)]
    peers = [m for m in allm if m.startswith(PEER)]
    lines = [f"**{res['variant']}**: n = {res['n']}, {res['steps']} steps, {sum(res['deletion_sets'].values())} deletion "
             f"sets x {res['outputs']} test losses; sketch {res['directions']} directions, degree {res['degree']}; "
             f"auto answered with `{res.get('auto (default budget) method')}`.", "",
             "| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for m in methods + peers:
        label = f"*{m}*" if m.startswith(PEER) else m
        lines.append(f"| {label} | " + " | ".join(cell(res["families"][f][m]) for f in fams) + " |")
    c = res["cost_s"]
    lines += ["", "Cells: per-output Spearman / median relative error / 2-s.e. coverage (where the method has an error "
              "bar). Costs (s): " + ", ".join(f"{k} {v:.3g}" for k, v in c.items() if v is not None)
              + f"; one predict call for every set x output {res['predict_s_all_sets_all_outputs']:.2f} s "
              f"({res['predict_s_again_cached']:.2f} s again, coefficients cached). Load average at start "
              f"{', '.join(f'{x:.1f}' for x in res['load_average_at_start'])}."]
    if peers:
        lines += peers_lines(res, fams, peers)
    return "\n".join(lines)


PLOT_METHODS = ("auto (default budget)", LOO, FIRST, "first_order+sketch")


def plot(results: list[dict], path: Path) -> None:
    """Per family, per-output Spearman of auto, the exact baselines, the hybrid, the best sketch degree and the best
    peer, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        fams = list(res["families"])
        rows = {m: [res["families"][f][m]["spearman_per_output"] for f in fams] for m in PLOT_METHODS}
        rows["sketch (best degree)"] = [max(v["spearman_per_output"] for m, v in res["families"][f].items()
                                            if m.startswith("sketch degree")) for f in fams]
        if any(m.startswith(PEER) for m in res["families"][fams[0]]):
            rows["best peer"] = [max(v["spearman_per_output"] for m, v in res["families"][f].items()
                                     if m.startswith(PEER)) for f in fams]
        w = 0.8 / len(rows)
        for j, (m, ys) in enumerate(rows.items()):
            ax.bar([i + (j - (len(rows) - 1) / 2) * w for i in range(len(fams))], ys, w, label=m)
        ax.set_xticks(range(len(fams)), fams, fontsize=8)
        ax.set_ylim(-0.2, 1.05)
        ax.set_ylabel("per-output Spearman vs retraining")
        ax.set_title(f"{res['variant']} (auto = {res.get('auto (default budget) method')})")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = list(argv or sys.argv[1:])
    png = None
    if "--plot" in args:
        k = args.index("--plot")
        png = Path(args[k + 1])
        del args[k : k + 2]
    paths = [Path(p) for p in args] or sorted(Path("bench/results").glob("own-model-*.json"))
    results = [json.loads(p.read_text()) for p in paths]
    print("\n\n".join(table(r) for r in results))
    if png is not None:
        plot(results, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
