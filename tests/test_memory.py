"""The memory budget of the precompute (issue 17 item 3): the per-direction estimate against the peak resident
memory measured in a fresh process, and chunks split into several ring runs with the same files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from delsketch.apps.cli import main as cli_main
from delsketch.sketch import SketchError, precompute
from delsketch.sketch.precompute import _directions_per_run
from delsketch.sketch.store import SketchConfig
from delsketch.executors import get_executor
from delsketch.tasks import get_preset
from delsketch.training import Task
from delsketch.training.memory import RESERVE_BYTES, parse_bytes, ring_bytes_per_direction, step_elements

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


def test_parse_bytes():
    assert parse_bytes("6GB") == 6 << 30
    assert parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("1.5g") == 3 << 29
    assert parse_bytes(1000) == 1000
    for bad in ("", "six GB", "5 parsecs", 0, -1, "0MB", True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def _mlp_task(width=64, n=128, steps=3):
    torch.manual_seed(0)
    X, y = torch.randn(n, 16, dtype=torch.float64), torch.randint(0, 4, (n,))
    model = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, 4)).double()
    return Task.from_module(model, (X, y), nn.CrossEntropyLoss(reduction="none"),
                            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=steps)


def test_step_elements_count_what_a_step_keeps():
    e = step_elements(_mlp_task())
    P = 16 * 64 + 64 + 64 * 4 + 4
    assert e["params"] == P
    assert e["state"] == P  # SGD momentum: one buffer per parameter
    assert e["saved"] >= 128 * 64  # at least the hidden activations of the batch


def _bench_probe() -> str:
    """The measuring script of bench/memory_estimate.py (one ring run in a fresh process, peak RSS reset before)."""
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "bench" / "memory_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PROBE


def _probe(kind: str, m: int) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-c", _bench_probe(), kind, str(m), "3"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("kind", ["mlp64", "cnn"])
def test_estimate_bounds_the_measured_memory_per_direction(kind):
    """The slope of the measured peak (8 vs 32 directions, fresh processes) lies below the estimate, and the
    estimate is not so loose that it would waste most of a budget (at most 4x the measured slope)."""
    a, b = _probe(kind, 8), _probe(kind, 32)
    slope = (b["peak_increase"] - a["peak_increase"]) / 24
    assert slope > 0
    assert slope <= a["estimate"] <= 4 * slope, (slope / 2**20, a["estimate"] / 2**20)
    assert a["peak_increase"] - 8 * slope <= RESERVE_BYTES  # what does not grow with m fits the reserve


def test_a_chunk_split_by_the_budget_gives_the_same_files(tmp_path):
    task = get_preset("digits")(steps=12)
    per = ring_bytes_per_direction(task, 2)
    budget = RESERVE_BYTES + 3 * per  # three directions per run: the chunk of 8 in runs of 3, 3, 2
    cfg = SketchConfig(directions=8, degree=2, chunk=8)
    assert _directions_per_run(task, cfg, budget, get_executor(None, None)) == 3
    assert _directions_per_run(task, cfg, None, get_executor(None, None)) == 8  # plenty of memory: the chunk
    precompute(task, tmp_path / "a", directions=8, degree=2, chunk=8)
    precompute(task, tmp_path / "b", directions=8, degree=2, chunk=8, memory_budget=budget)
    for name in ("chunk-00000.safetensors", "base.safetensors", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_split_matmul_bound_chunk_agrees_to_1e12(tmp_path):
    task = _mlp_task(width=128, steps=4)
    per = ring_bytes_per_direction(task, 3)
    precompute(task, tmp_path / "a", directions=6, degree=3, chunk=6)
    precompute(task, tmp_path / "b", directions=6, degree=3, chunk=6, memory_budget=RESERVE_BYTES + 2 * per)
    A = load_file(tmp_path / "a" / "chunk-00000.safetensors")
    B = load_file(tmp_path / "b" / "chunk-00000.safetensors")
    for k in A:
        assert torch.allclose(A[k], B[k], rtol=1e-12, atol=1e-12 * float(A[k].abs().max())), k


def test_a_budget_below_one_direction_is_refused(tmp_path, capsys):
    task = get_preset("digits")(steps=4)
    with pytest.raises(SketchError, match="memory budget"):
        precompute(task, tmp_path / "s", directions=4, degree=2, chunk=4, memory_budget=RESERVE_BYTES)
    assert cli_main(["sketch", "--preset", "digits", "--steps", "4", "--directions", "2", "--degree", "2",
                     "--out", str(tmp_path / "c"), "--memory-budget", "lots"]) == 2
    assert "--memory-budget" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# how ring runs get memory (delsketch/_alloc.py)
# ---------------------------------------------------------------------------------------------


def _env_after(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    e.update(env, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.strip()


def test_huge_pages_asked_before_torch_loads_and_user_choice_kept():
    show = "import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    assert _env_after("import delsketch; " + show) == "1"
    assert _env_after("import delsketch; " + show, THP_MEM_ALLOC_ENABLE="0") == "0"
    assert _env_after("import torch, delsketch; " + show) == "None"  # too late: torch has read it already


_HEAP_CACHE_PROBE = r"""
import ctypes, os, sys
import torch
from delsketch import _alloc

lib = _alloc._glibc()
if lib is None or not hasattr(lib, "mallinfo2"):
    print("skip")
    sys.exit(0)


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


lib.mallinfo2.restype = Mallinfo2
nbytes = 64 << 20


def mmapped_while_alive() -> tuple:
    # more than all free heap memory: only a new mmap block (glibc's defaults) or a grown heap (the cache) can
    # serve it; a smaller block could reuse a chunk that an earlier cached run freed in the middle of the heap
    info = lib.mallinfo2()
    size = nbytes + info.fordblks
    x = torch.empty(size, dtype=torch.uint8)
    grew = lib.mallinfo2().hblkhd - info.hblkhd
    del x
    return grew, size


grew, size = mmapped_while_alive()
assert grew >= size
with _alloc.heap_cache():
    with _alloc.heap_cache():  # nested: still on after the inner one ends
        assert mmapped_while_alive()[0] == 0
    assert mmapped_while_alive()[0] == 0
grew, size = mmapped_while_alive()
assert grew >= size
for var, value in [("DELSKETCH_HEAP_CACHE", "0"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                   ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=65536")]:
    os.environ[var] = value  # turned off, or the user tuned malloc: left alone
    assert not _alloc.heap_cache_available()
    with _alloc.heap_cache():
        grew, size = mmapped_while_alive()
        assert grew >= size
    del os.environ[var]
print("ok")
"""


def test_heap_cache_keeps_large_blocks_in_the_heap():
    """Outside the cache a large tensor (64 MB more than the heap's free memory) is its own mmap block (hblkhd grows
    by its size while it lives); inside it comes from the heap (no mmap block), and after the outermost context the
    defaults are back. In a fresh process, so that the heap's state does not depend on the tests run before."""
    out = _env_after(_HEAP_CACHE_PROBE)
    if out == "skip":
        pytest.skip("needs glibc >= 2.33")
    assert out == "ok"


def test_frozen_gc_during_a_ring_run_and_undone_after(names_txt):
    """Inside a ring run the objects made before it are frozen out of the collector's walks (nested contexts
    count once); after the run nothing is frozen, and cyclic garbage made inside is still collected. A freeze
    of the user's own is left as it is."""
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    from delsketch import _alloc  # noqa: PLC0415
    from delsketch.sketch import directions, ring_train, weight_series  # noqa: PLC0415

    assert gc.get_freeze_count() == 0
    seen = []
    task = get_preset("paper")(steps=2, data=str(names_txt))
    ring_train(task, weight_series(directions(0, range(2), task.n), 1),
               callback=lambda s, loss: seen.append(gc.get_freeze_count()))
    assert len(seen) == 2 and min(seen) > 1000
    assert gc.get_freeze_count() == 0

    class Cycle:
        pass

    with _alloc.frozen_gc():
        with _alloc.frozen_gc():
            c = Cycle()
            c.me = c
            ref = weakref.ref(c)
            del c
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert ref() is None  # made inside: collected inside
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the user's own freeze
    try:
        n = gc.get_freeze_count()
        with _alloc.frozen_gc():
            pass
        assert gc.get_freeze_count() == n
    finally:
        gc.unfreeze()
