"""Markdown tables from bench/results/own-model-*.json (pasted into docs/answers.md and docs/own-model.md).

    python bench/own_model/report.py [bench/results/own-model-fullbatch.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLS = ("spearman_per_output", "spearman_pooled", "median_relative_error", "coverage_2se")


def table(res: dict) -> str:
    fams = list(res["families"])
    methods = list(res["families"][fams[0]])
    lines = [f"**{res['variant']}**: n = {res['n']}, {res['steps']} steps, {sum(res['deletion_sets'].values())} deletion "
             f"sets x {res['outputs']} test losses; sketch {res['directions']} directions, degree {res['degree']}; "
             f"auto answered with `{res.get('auto (default budget) method')}`.", "",
             "| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for m in methods:
        cells = []
        for f in fams:
            v = res["families"][f][m]
            cov = v.get("coverage_2se")
            cells.append(f"{v['spearman_per_output']:.2f} / {v['median_relative_error']:.2f}"
                         + (f" / {cov:.2f}" if cov is not None else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    c = res["cost_s"]
    lines += ["", "Cells: per-output Spearman / median relative error / 2-s.e. coverage (where the method has an error "
              "bar). Costs (s): " + ", ".join(f"{k} {v:.3g}" for k, v in c.items() if v is not None)
              + f"; one predict call for every set x output {res['predict_s_all_sets_all_outputs']:.2f} s "
              f"({res['predict_s_again_cached']:.2f} s again, coefficients cached). Load average at start "
              f"{', '.join(f'{x:.1f}' for x in res['load_average_at_start'])}."]
    return "\n".join(lines)


def main(argv=None):
    paths = [Path(p) for p in (argv or sys.argv[1:])] or sorted(Path("bench/results").glob("own-model-*.json"))
    print("\n\n".join(table(json.loads(p.read_text())) for p in paths))


if __name__ == "__main__":
    main()
