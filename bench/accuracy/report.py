"""Markdown tables and scatter plots from the benchmark results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _f(x, nd=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}"


def _short(name: str) -> str:
    if name.startswith("sketch m="):
        m, d = name[len("sketch m="):].split(" d=")
        return f"sk{m}·d{d}"
    return {"first-order": "1st-order (exact)", "captum TracInCP": "captum TracInCP", "dattri IF-CG": "dattri IF",
            "dattri TracIn": "dattri TracIn", "dattri TRAK": "dattri TRAK",
            "kronfluence EK-FAC": "kfac EK-FAC"}.get(name, name)


def best_peer(methods: dict, peers: list[str], key="spearman") -> str | None:
    vals = [(methods[p].get(key, float("nan")), p) for p in peers if p in methods]
    vals = [(v, p) for v, p in vals if v is not None and math.isfinite(v)]
    return max(vals)[1] if vals else None


def table(res: dict, metric: str, fmt_nd=2) -> list[str]:
    names = res["methods"]
    lines = ["| deletion | size | sets | " + " | ".join(_short(m) for m in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for fam, row in res["families"].items():
        cells = []
        vals = {m: row["methods"][m].get(metric) for m in names}
        finite = [v for v in vals.values() if v is not None and math.isfinite(v)]
        best = None
        if finite:
            best = max(finite) if metric in ("spearman", "coverage_2se", "sign_agreement") else min(finite)
        for m in names:
            v = vals[m]
            s = _f(v, fmt_nd)
            if v is not None and best is not None and math.isfinite(v) and v == best and metric != "coverage_2se":
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {fam} | {row['size']} | {row['sets']} | " + " | ".join(cells) + " |")
    return lines


def _columns(res: dict) -> tuple[list[str], int, str, str]:
    """The peers, the largest sketch size and that sketch's degree-1 and full-degree method names."""
    names = res["methods"]
    peers = [m for m in names if not m.startswith("sketch") and m != "first-order"]
    sk = [m for m in names if m.startswith("sketch")]
    mmax = max(int(m.split("m=")[1].split()[0]) for m in sk)
    return peers, mmax, f"sketch m={mmax} d=1", [m for m in sk if m.startswith(f"sketch m={mmax} ")][-1]


def _best_scaled_peer(res: dict, M: dict, peers: list[str]) -> str | None:
    """The peer with the smallest median relative error among those with a scale (not rank-only)."""
    scal = [p for p in peers if not res["rank_only"].get(p) and p in M]
    return min(scal, key=lambda p: M[p].get("median_relative_error", math.inf)) if scal else None


def _pair(M: dict, m: str) -> str:
    return f"{_f(M[m]['spearman'])} / {_f(M[m].get('median_relative_error'))}"


def headline(res: dict) -> list[str]:
    peers, _, d1, dk = _columns(res)
    cols = [d1, dk, "first-order"]
    lines = ["| deletion | " + " | ".join(f"{_short(c)} ρ / rel.err" for c in cols)
             + " | best peer by ρ | its ρ / rel.err | best peer by rel.err | its rel.err |",
             "|---|" + "---:|" * len(cols) + "---|---:|---|---:|"]
    for fam, row in res["families"].items():
        M = row["methods"]
        bp = best_peer(M, peers)
        be = _best_scaled_peer(res, M, peers)
        lines.append(
            f"| {fam} | " + " | ".join(_pair(M, c) for c in cols) + " | "
            + (f"{_short(bp)} | {_pair(M, bp)}" if bp else "– | –")
            + " | " + (f"{_short(be)} | {_f(M[be].get('median_relative_error'))}" if be else "– | –") + " |")
    return lines


def plot(key: str, res: dict, pdata: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in res["families"] if f in pdata]  # the table's order (the stored plot data is unordered)
    fams = [f for f in fams if not f.startswith("top") or "by sketch" in f or "first-order" in f]
    fams = [f for f in fams if f in ("loo", "random 1%", "random 5%", "random 10%", "random 50%", "groups")
            or f.startswith("top") or "nearest" in f][:8]
    peers, _, sk1, sk = _columns(res)
    cols = 4
    rows = math.ceil(len(fams) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        T = np.asarray(pdata[fam]["true"]).ravel()
        M = res["families"][fam]["methods"]
        show = [(sk1, "C0", "o"), (sk, "C9", "."), ("first-order", "C1", "^")]
        bp = best_peer(M, [p for p in peers if not res["rank_only"].get(p)])
        if bp:
            show.append((bp, "C2", "s"))
        lo, hi = T.min(), T.max()
        pad = 0.3 * (hi - lo + 1e-12)
        lo, hi = lo - pad, hi + pad
        for name, c, mk in show:
            P = np.clip(np.asarray(pdata[fam]["pred"][name]).ravel(), lo, hi)
            ax.scatter(T, P, s=8, alpha=0.45, c=c, marker=mk,
                       label=f"{_short(name)} ρ={_f(M[name]['spearman'])}")
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{key}: {fam}", fontsize=9)
        ax.set_xlabel("actual change (retraining)", fontsize=8)
        ax.set_ylabel("predicted change (clipped to frame)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5, loc="upper left")
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


INTRO = Path(__file__).with_name("intro.md")
READING = Path(__file__).with_name("reading.md")

SIZES = ["loo", "random 1%", "random 2%", "random 5%", "random 10%", "random 50%"]


def summary(out: dict) -> list[str]:
    """One row per task and random deletion size: the largest sketch (degree 1 and full degree), the exact first
    order term and the best peer (by ρ; by relative error among the peers with a scale). Nothing is chosen on the
    truth except the 'best peer' (which favours the peers)."""
    lines = ["| task | deletion | sketch d=1 ρ / rel.err | sketch full degree ρ / rel.err | best peer ρ | "
             "best peer rel.err | first-order (exact) ρ / rel.err |",
             "|---|---|---:|---:|---|---|---:|"]
    for key, res in out["tasks"].items():
        peers, mmax, d1, dk = _columns(res)
        for fam in SIZES:
            if fam not in res["families"]:
                continue
            M = res["families"][fam]["methods"]
            bp = best_peer(M, peers)
            be = _best_scaled_peer(res, M, peers)
            lines.append(f"| {key} (m={mmax}) | {fam if fam != 'random 50%' else 'random 50% (LDS)'} | {_pair(M, d1)} | "
                         f"{_pair(M, dk)} | " + (f"{_f(M[bp]['spearman'])} ({_short(bp)})" if bp else "–") + " | "
                         + (f"{_f(M[be]['median_relative_error'])} ({_short(be)})" if be else "–")
                         + f" | {_pair(M, 'first-order')} |")
    return lines


def auto_rows(out: dict, m: int = 256) -> list[str]:
    """What ``Sketch.predict(method="auto")`` (default budget) answers for each task and family, by the library's own
    rule (:func:`delsketch.sketch.answer.auto_choice`) applied to this run's recorded costs (one retrain per set,
    the precompute of the m-direction sketch), and the accuracy of that answer in this run: retraining is exact;
    first order is its own column; loo_sum is exact for single deletions and was not measured here otherwise."""
    from delsketch.sketch.answer import DEFAULT_BUDGET_S, auto_choice

    lines = [f"| task | family | sets | auto's answer (m = {m} sketch) | its ρ / rel.err | first-order ρ | best sketch ρ | "
             "best peer ρ |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for key, res in out["tasks"].items():
        r = res["timing"]["retrain"]["per_set_s"]
        pre = res["timing"].get(f"sketch m={m}", {}).get("precompute_s")
        peers, *_ = _columns(res)
        for fam in SIZES + ["groups"]:
            if fam not in res["families"]:
                continue
            row = res["families"][fam]
            M = row["methods"]
            S = row["sets"] if isinstance(row.get("sets"), int) else len(row.get("sets", []))
            method, _ = auto_choice(S, res["n"], r, pre, DEFAULT_BUDGET_S)
            if method == "retrain" or (method == "loo_sum" and fam == "loo"):
                acc = "1.00 / 0.00 (exact)"
            elif method == "first_order":
                acc = _pair(M, "first-order")
            else:
                acc = "not measured here"
            sk = max((M[x]["spearman"] for x in M if x.startswith("sketch") and M[x].get("spearman") is not None),
                     default=None)
            bp = best_peer(M, peers)
            lines.append(f"| {key} | {fam} | {S} | {method} | {acc} | {_f(M['first-order']['spearman'])} | {_f(sk)} | "
                         + (f"{_f(M[bp]['spearman'])}" if bp else "–") + " |")
    return lines


def write(out: dict, plots: dict, md: Path, figdir: Path) -> None:
    lines: list[str] = []
    if INTRO.exists():
        lines += INTRO.read_text().rstrip().splitlines() + [""]
    lines += ["## Results", "", f"Generated by `{out['generated_by']}` "
              f"(Python {out['machine']['python']}, torch {out['machine']['torch']}, 1 thread, "
              f"{out['machine']['cores']}-core machine; total {out['wall_s'] / 60:.1f} min).", ""]
    lines += ["**Summary: the sketch against the best peer at each deletion size** (random sets; ρ = Spearman between "
              "predicted and actual change, mean over queries — at 50% the LDS; rel.err = median |pred − actual| / "
              "|actual|; full degree = the sketch's precompute degree; per-task tables below):", ""]
    lines += summary(out) + [""]
    lines += ["**What the default answer (`method=\"auto\"`) gives here.** Every row below is a question a user could "
              "ask with one `predict` call (one family of sets, default 30 s budget); the method is what "
              "`delsketch.sketch.answer.auto_choice` picks from this run's recorded cost of one retrain and of the "
              "256-direction sketch's precompute (added after the run, from its JSON; `--report-only` regenerates it). "
              "Retraining is exact; the first-order column is the measured line; 'best sketch' is the best of every "
              "sketch size and degree, chosen on the truth (which favours it):", ""]
    lines += auto_rows(out) + [""]
    if out["peers_not_run"]:
        lines += ["Peers not run: " + "; ".join(f"{k} ({v})" for k, v in out["peers_not_run"].items()) + ".", ""]
    for key, res in out["tasks"].items():
        lines += [f"### {key}", "", res["description"] + ".", ""]
        lines += [f"Checks: peers' loss = task loss to {res['loss_consistency']:.1e}; reverse-mode first order vs "
                  f"`exact_series` degree-1 term: max relative difference {res['first_order_check']['max_relative_difference']:.1e}; "
                  f"bench predictions vs `Sketch.predict`: max |difference| {res['sketch_predict_check_max_abs_diff']:.1e}.", ""]
        if res.get("peer_failures"):
            lines += ["Peer failures on this task: " + "; ".join(f"{k}: {v}" for k, v in res["peer_failures"].items()), ""]
        lines += ["**Headline** (ρ = Spearman between predicted and actual change; rel.err = median |pred − actual| / |actual|):", ""]
        lines += headline(res) + [""]
        lines += ["**Spearman ρ** (random sets, LOO and groups: mean over queries of ρ across the sets — at 50% this is the "
                  "LDS; 'top k by X' and 'nearest': one set per query, ρ across the queries):", ""]
        lines += table(res, "spearman") + [""]
        lines += ["**Median relative error** (rank-only peers: –):", ""] + table(res, "median_relative_error") + [""]
        lines += ["**Coverage of the sketch's ±2 standard errors** (fraction of actual changes inside):", ""]
        cov_methods = [m for m in res["methods"] if m.startswith("sketch")]
        sub = dict(res, methods=cov_methods)
        lines += table(sub, "coverage_2se") + [""]
        lines += ["**Median |actual change|** per family: " + ", ".join(
            f"{fam} {row['methods']['first-order']['median_abs_change']:.2e}" for fam, row in res["families"].items()) + ".", ""]
        st = res["stability"]
        verdicts = {}
        for s in st:
            verdicts[s["verdict"].split(":")[0]] = verdicts.get(s["verdict"].split(":")[0], 0) + 1
        safe = [s["safe_deletion_size"] for s in st if s["safe_deletion_size"] is not None]
        decay = [s["decay_per_degree"] for s in st if s["decay_per_degree"] is not None]
        lines += [f"**Stability** (`sketch.stability(query)`, largest sketch, per query): verdicts "
                  + ", ".join(f"{k} ×{v}" for k, v in verdicts.items())
                  + (f"; decay per degree median {np.median(decay):.2f}; safe deletion size median {np.median(safe):.0f} "
                     f"(range {min(safe):.0f}–{max(safe):.0f}) of n = {res['n']}"
                     + (f" (the run visits {res['visited']} of them)" if res.get("visited", res["n"]) != res["n"] else "")
                     + "." if safe else "."), ""]
        o = res["orientation_self_deletion_positive"]
        lines += ["**Orientation check** (fraction of 5 training examples whose own loss each method predicts to rise "
                  "when the example is deleted; truth: " + _f(o["truth_positive"]) + "): "
                  + ", ".join(f"{_short(k)} {_f(v)}" for k, v in o.items() if k != "truth_positive") + ".", ""]
        lines += ["**Cost** (1 thread):", "", "| method | precompute / setup (s) | per query (s) | peak RSS (MB) |",
                  "|---|---:|---:|---:|"]
        for name, t in res["timing"].items():
            if name == "retrain":
                continue
            if name.startswith("sketch"):
                pq = t["coef_per_query_s"] + t.get("predict_per_set_query_s", 0)
                lines.append(f"| {name} (degree {res['config']['degree']}) | {t['precompute_s']:.1f} | {pq:.3f} "
                             f"(+{t.get('predict_per_set_query_s', 0) * 1e6:.0f} µs per set) | {t['peak_rss_mb']:.0f} |")
            else:
                lines.append(f"| {name} | {t['setup_s']:.1f} (all {len(res['queries']) + 5} queries) | "
                             f"{t['per_query_s']:.3f} | {t['peak_rss_mb']:.0f} |")
        lines.append(f"| retraining (truth) | – | {res['timing']['retrain']['per_set_s']:.2f} per set | – |")
        lines += [""]
        if res.get("peer_settings"):
            lines += ["Peer settings: " + "; ".join(
                f"**{k}**: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in res["peer_settings"].items()), ""]
        fig = figdir / f"accuracy-{key}.png"
        plot(key, res, plots[key], fig)
        try:
            rel = Path("figures") / fig.name if fig.parent.resolve() == (md.parent / "figures").resolve() else fig
        except OSError:
            rel = fig
        lines += [f"![predicted vs actual change, {key}]({rel})", ""]
    if READING.exists():
        lines += READING.read_text().rstrip().splitlines() + [""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
