"""What a fresh block of memory costs a ring run, and what delsketch/_alloc.py's two remedies buy.

Each configuration runs in its own process (torch reads THP_MEM_ALLOC_ENABLE once, when it first allocates), one
torch thread, alternating configurations over ``--rounds`` rounds; the table gives the median per configuration:

* ``mul fresh`` / ``mul into``: a complex128 product of two 67 MB tensors (32 x 512 x 256), into a new tensor /
  into an existing one (the arithmetic alone);
* ``silu_backward``: the series kernel on [32, 4, 512, 256] (degree 3), about 40 passes and a dozen fresh blocks;
* ``cauchy matmul``: a degree-3 Cauchy matmul [32, 4, 512, 256] @ [32, 4, 256, 256] (real degree-0 parts);
* ``zgemm / dgemm``: one complex128 batched matmul against the float64 one of the same shapes (32 x 512 x 256 x
  256): the measured price of a complex product in real ones (4 if complex arithmetic cost four real products).

    python bench/alloc.py [--rounds 3]   # -> bench/results/engine-alloc.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # name, THP_MEM_ALLOC_ENABLE, DELSKETCH_HEAP_CACHE
    ("neither", "0", "0"),
    ("huge pages", "1", "0"),
    ("heap cache", "0", "1"),
    ("both (default)", "1", "1"),
]


def child() -> dict:
    import delsketch  # noqa: F401  (before torch)
    import torch

    from delsketch import _alloc
    from delsketch.series import kernels as R

    torch.set_num_threads(1)

    def t(f, n=3):
        f()
        s = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - s) / n

    def ser(m, K, *shape):
        x = torch.randn(m, K, *shape, dtype=torch.complex128)
        x[:, 0] = x[:1, 0].real.to(torch.complex128).expand(m, *shape)
        return x

    out = {"huge_pages": _alloc.huge_pages(), "heap_cache": _alloc.heap_cache_available()}
    with _alloc.heap_cache():
        n = 32 * 512 * 256
        a, b = torch.randn(n, dtype=torch.complex128), torch.randn(n, dtype=torch.complex128)
        c = torch.empty_like(a)
        out["mul fresh"] = t(lambda: torch.mul(a, b))
        out["mul into"] = t(lambda: torch.mul(a, b, out=c))
        del a, b, c
        x, g = ser(32, 4, 512, 256), ser(32, 4, 512, 256)
        out["silu_backward"] = t(lambda: R.silu_backward(g, x))
        w = ser(32, 4, 256, 256)
        out["cauchy matmul"] = t(lambda: R.bilinear(torch.matmul, x, w), 2)
        del x, g, w
    A, B = torch.randn(32, 512, 256, dtype=torch.float64), torch.randn(32, 256, 256, dtype=torch.float64)
    Ac, Bc = A.to(torch.complex128), B.to(torch.complex128)
    out["dgemm"] = t(lambda: torch.matmul(A, B))
    out["zgemm"] = t(lambda: torch.matmul(Ac, Bc))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child()))
        return 0
    src = str(Path(__file__).resolve().parents[1] / "src")
    load0 = list(os.getloadavg())
    runs = {name: [] for name, _, _ in CONFIGS}
    for _ in range(a.rounds):
        for name, thp, cache in CONFIGS:
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp, "DELSKETCH_HEAP_CACHE": cache, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
            p = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    keys = ["mul fresh", "mul into", "silu_backward", "cauchy matmul", "dgemm", "zgemm"]
    table = {}
    print(f"{'configuration':16}" + "".join(f"{k:>15}" for k in keys) + f"{'zgemm/dgemm':>13}")
    for name, _, _ in CONFIGS:
        med = {k: statistics.median(r[k] for r in runs[name]) for k in keys}
        med["zgemm/dgemm"] = med["zgemm"] / med["dgemm"]
        table[name] = {**med, "huge_pages": runs[name][0]["huge_pages"], "heap_cache": runs[name][0]["heap_cache"]}
        print(f"{name:16}" + "".join(f"{med[k] * 1e3:13.1f}ms" for k in keys) + f"{med['zgemm/dgemm']:13.2f}")
    res = {"what": __doc__.split("\n\n")[0], "command": "python bench/alloc.py --rounds %d" % a.rounds,
           "seconds_median": table, "runs": runs, "rounds": a.rounds, "loadavg_start": load0,
           "loadavg_end": list(os.getloadavg()), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    out = Path(__file__).resolve().parent / "results" / "engine-alloc.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
