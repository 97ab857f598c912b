"""The fault-injection suite's counts (one count per checked case): runs tests/test_faults.py (the case table lives there, and every case
asserts its exact outcome) and prints how many cases of each kind were tried, refused in one line, recovered to
the bytes of a clean build, or harmless. Writes bench/results/faults.json.

    python bench/faults_report.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "DELSKETCH_FAULT_REPORT": str(report),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_faults.py"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
        if not report.exists():
            print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
            return 1
        summary = json.loads(report.read_text())
    summary["pytest"] = tail
    # a storage fault is checked twice where both apply: reading the damaged sketch and rerunning `sketch` on it
    summary["distinct_faults"] = {k: len({c["case"].split(" / ")[0] for c in summary["cases"] if c["kind"] == k})
                                  for k in summary["by_kind"]}
    summary["seconds"] = round(seconds, 1)
    out = ROOT / "bench" / "results" / "faults.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    cols = ["tried", "refused", "recovered", "harmless"]
    print(f"{'kind':10}" + "".join(f"{c:>11}" for c in cols))
    for kind, counts in [*summary["by_kind"].items(), ("total", summary["total"])]:
        print(f"{kind:10}" + "".join(f"{counts.get(c, 0):>11}" for c in cols))
    print("distinct faults: " + ", ".join(f"{k} {v}" for k, v in summary["distinct_faults"].items()))
    print(f"pytest: {tail} ({seconds:.0f} s wall); cases in {out.relative_to(ROOT)}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
