"""In-process A/B of two builds of the native kernels: delsketch/series/native.py's C source at a git revision (A)
against the working tree's (B), on the shapes of a paper-task ring step (degree 3, m = 250: the small Cauchy
matmuls of the forward and backward passes, Adam's update of the largest parameter, the elementwise products).

Both libraries are loaded into one process and called alternately, round by round, on the same operands: four
operand sets cycled, so that each call reads operands that are not in the caches (the weight series of a step
exceed them). One torch thread. The table gives the median per call and A / B; results are checked equal to
rounding (1e-12 relative).

    PYTHONPATH=src python bench/native_ab.py [--rev 98053d6] [--rounds 7]   # -> bench/results/native-ab.json
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import delsketch  # noqa: F401  (before torch: it asks torch for huge pages, see delsketch/_alloc.py)
import torch

ROOT = Path(__file__).resolve().parents[1]
M, K = 250, 4
#: (a, b, b column-major): x @ W^T of the Linear layers, dy @ W, dy^T @ x, and attention's per-head products
MATMULS = [((7, 16), (16, 16), True), ((7, 16), (16, 64), True), ((7, 64), (64, 16), True),
           ((7, 16), (16, 27), True), ((7, 16), (16, 64), False), ((7, 64), (64, 16), False),
           ((16, 7), (7, 16), False), ((27, 7), (7, 16), False), ((4, 7, 4), (4, 4, 7), False),
           ((4, 7, 7), (4, 7, 4), False)]


def source_at(rev: str) -> str:
    text = subprocess.run(["git", "show", f"{rev}:src/delsketch/series/native.py"], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_SOURCE":
            return node.value.value
    raise SystemExit(f"no _SOURCE in native.py at {rev}")


def run_cases(cases: dict, builds: dict, use, times: dict, rounds: int) -> None:
    for case, (fn, sets) in cases.items():
        for name in builds:  # warm-up
            use(name)
            fn(sets[0])
        use("A")
        ra = fn(sets[1])
        use("B")
        rb = fn(sets[1])
        err = ((ra - rb).abs().max() / ra.abs().max()).item()
        assert err < 1e-12, (case, err)  # the two builds agree to rounding
        for _ in range(rounds):
            for name in builds:
                use(name)
                t = time.perf_counter()
                for r in range(8):
                    fn(sets[r % 4])
                times[name][case].append((time.perf_counter() - t) / 8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="98053d6", help="git revision of build A (default: session 11's last commit)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "native-ab.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from delsketch import _alloc
    from delsketch.io import versions, write_json
    from delsketch.series import native

    builds = {}
    here = native._SOURCE
    try:
        for name, src in (("A", source_at(a.rev)), ("B", here)):
            native._SOURCE = src
            native._reset()
            if not native.available():
                print(f"native kernels not available: {native.status()['reason']}", file=sys.stderr)
                return 1
            builds[name] = dict(native._state)
    finally:
        native._SOURCE = here

    def use(name):
        native._state.clear()
        native._state.update(builds[name])

    gen = torch.Generator().manual_seed(0)

    def series(shape, col_major=False, positive0=False):
        x = torch.randn(M, K, *shape, generator=gen, dtype=torch.complex128) * 0.3
        x[:, 0] = x[:1, 0].real.abs() + 0.5 if positive0 else x[:1, 0].real  # real, shared degree-0 parts
        return x.mT.contiguous().mT if col_major else x

    cases = {}
    for sa, sb, tb in MATMULS:
        sets = [(series(sa), series(sb, tb)) for _ in range(4)]
        cases[f"matmul {sa} @ {sb}{'^T' if tb else ''}"] = (lambda s: native.cauchy_matmul(*s), sets)
    N = 64 * 16  # the largest parameter (the MLP's 64 x 16 weights)
    adam_sets = [(series((N,)), series((N,)), series((N,)), series((N,), positive0=True)) for _ in range(4)]

    def adam(s):
        out = [torch.empty_like(s[0]) for _ in range(3)]
        assert native.adam_update(*s, 0.85, 0.99, -0.01, 0.01, 1e-8, False, *out)
        return torch.stack(out)

    cases[f"adam [{M}, {K}, {N}]"] = (adam, adam_sets)
    for shape in [(1, 7, 16), (1, 7, 64)]:
        mul_sets = [(series(shape), series(shape)) for _ in range(4)]

        def mul(s):
            out = torch.empty_like(s[0])
            assert native.series_mul(out, *s)
            return out

        cases[f"mul {shape}"] = (mul, mul_sets)

    times = {name: {c: [] for c in cases} for name in builds}
    load0 = list(os.getloadavg())
    with _alloc.heap_cache():  # as in a ring run: freed outputs are reused, not mapped anew
        run_cases(cases, builds, use, times, a.rounds)
    native._reset()
    table, tot = {}, {"A": 0.0, "B": 0.0}
    print(f"native kernels, A = {a.rev}, B = working tree; m = {M}, K = {K}, one thread, {a.rounds} rounds "
          f"(load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    print(f"{'case':40s} {'A ms':>8s} {'B ms':>8s} {'A / B':>6s}")
    for case in cases:
        ta, tb = statistics.median(times["A"][case]), statistics.median(times["B"][case])
        tot["A"] += ta
        tot["B"] += tb
        table[case] = {"A_s": ta, "B_s": tb, "A_over_B": ta / tb, "A_all_s": times["A"][case],
                       "B_all_s": times["B"][case]}
        print(f"{case:40s} {ta * 1e3:8.3f} {tb * 1e3:8.3f} {ta / tb:6.2f}")
    print(f"{'all cases':40s} {tot['A'] * 1e3:8.3f} {tot['B'] * 1e3:8.3f} {tot['A'] / tot['B']:6.2f}")
    write_json(Path(a.out), {"rev_A": a.rev, "B": "working tree", "m": M, "K": K, "rounds": a.rounds,
                             "cases": table, "total_A_s": tot["A"], "total_B_s": tot["B"],
                             "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
                             "flags": native._flags(), "versions": versions(),
                             "command": "PYTHONPATH=src python bench/native_ab.py " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
