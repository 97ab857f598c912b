"""The helpers of bench/engine.py's compute rows (timing, peak memory, the figure-3 extrapolation), and one tiny
row measured in this process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_durations_and_median(engine):
    assert engine.step_durations(1.0, [1.5, 2.5, 2.75]) == [0.5, 1.0, 0.25]
    assert engine.median([3.0, 1.0, 2.0]) == 2.0 and engine.median([4.0, 1.0]) == 2.5


def test_fig3_sample_and_extrapolation(engine):
    assert engine.fig3_schedule_sample(1000, 4) == [0, 250, 500, 750]
    assert engine.fig3_schedule_sample(3, 6) == [0, 1, 2]
    workers = [{"step0_s": 2.0, "step1_s": 1.5, "steps_s": [0.5, 0.7], "wall_start": 0.0, "wall_end": 5.0},
               {"step0_s": 1.0, "step1_s": 0.9, "steps_s": [0.4, 0.4], "wall_start": 1.0, "wall_end": 4.0}]
    r = engine.fig3_extrapolate(workers, 1000, 500)  # the warm-up steps 0 and 1 once, the mean for the other 998
    assert r["per_worker_s"] == pytest.approx([2.0 + 1.5 + 998 * 0.6, 1.0 + 0.9 + 998 * 0.4])
    assert r["extrapolated_s"] == pytest.approx(2.0 + 1.5 + 998 * 0.6)  # the slower worker
    assert r["per_direction_step_s"] == pytest.approx(0.6 / 500) and r["overlap_s"] == 3.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_peak_memory_reset(engine):
    import numpy as np

    a = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
    del a
    if not engine.reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    m = engine.memory_mib()
    assert m["VmHWM"] < m["VmRSS"] + 32  # the 64 MiB peak is gone


def test_tiny_row(engine):
    rows = engine.measure_row({"name": "t", "model": "mlp-30-32-32-2", "n": 40, "batch": 8, "opt": "sgd", "m": 2,
                               "m_by_degree": {"3": 1}, "degrees": [1, 3], "steps": 1, "plain_steps": 2})
    assert [(r["degree"], r["m"]) for r in rows] == [(1, 2), (3, 1)]
    for r in rows:
        assert r["ring_step_s"] > 0 and r["plain_step_s"] > 0 and len(r["ring_steps_s"]) == 1
        assert r["ratio_per_direction"] == pytest.approx(r["ring_step_s"] / r["m"] / r["plain_step_s"])
        assert len(r["loadavg_start"]) == 3 and len(r["loadavg_end"]) == 3
