"""The command-line contract: JSON keys, exit status 2 with one line for every malformed input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from delsketch.apps.cli import main

from conftest import NAMES_TXT


@pytest.fixture(scope="module")
def sketch_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "sk"
    assert main(["sketch", "--preset", "digits", "--directions", "24", "--degree", "2", "--out", str(d), "--chunk", "8"]) == 0
    return d


def run(capsys, *args):
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _pred(out: str, k: int = 0) -> dict:
    """The k-th prediction of predict's JSON (always {"predictions": [...]}, arrays with a leading sets axis)."""
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))["predictions"][k]


def test_predict_json_keys(sketch_dir, capsys):
    rc, out, _ = run(capsys, "predict", str(sketch_dir), "--delete", "0:10,15", "--query", "test:5", "--json")
    assert rc == 0
    obj = _pred(out)
    for k in ["schema", "method", "output", "estimate", "base", "change", "stderr", "terms", "directions", "degree",
              "shape", "sets", "deletion_sizes", "nulls", "notes"]:
        assert k in obj
    assert obj["directions"] == 24 and obj["degree"] == 2 and obj["shape"] == [] and obj["sets"] == 1
    assert len(obj["estimate"]) == 1 and len(obj["terms"][0]) == 3 and obj["deletion_sizes"] == [11]
    assert obj["method"] == "sketch"
    rc, out, _ = run(capsys, "predict", str(sketch_dir), "--delete", "class:3", "--query", "test:5", "--query", "test:mean", "--json")
    assert rc == 0 and [o["output"] for o in json.loads(out)["predictions"]] == ["test:5", "test:mean"]


def test_predict_degree_and_control_variates(sketch_dir, capsys):
    """--degree truncates (the degree-1 estimate is the degree-2 one minus its degree-2 term); --control-variates
    is recorded and keeps the per-degree terms; a degree above the sketch's is a one-line exit-2 error."""
    args = ["predict", str(sketch_dir), "--delete", "0:10", "--query", "test:5", "--json"]
    full = _pred(run(capsys, *args)[1])
    rc, out, _ = run(capsys, *args, "--degree", "1")
    low = _pred(out)
    assert rc == 0 and low["degree"] == 1 and len(low["terms"][0]) == 2
    assert low["estimate"][0] == pytest.approx(full["estimate"][0] - full["terms"][0][2], rel=1e-12, abs=1e-12)
    rc, out, _ = run(capsys, *args, "--control-variates")
    cv = _pred(out)
    assert rc == 0 and cv["control_variates"] and not full["control_variates"] and cv["terms"] == full["terms"]
    rc, _, err = run(capsys, *args, "--degree", "3")
    assert rc == 2 and err.count("\n") == 1 and "--degree" in err


def test_predict_by_degree(sketch_dir, capsys):
    """--by-degree prints one row per degree >= 1 with the JSON's by_degree numbers; without it, a note about
    degree 1 appears exactly when the full-degree stderr is more than twice the degree-1 stderr."""
    for spec in ("0:5", "0:250"):
        args = ["predict", str(sketch_dir), "--delete", spec, "--query", "test:5"]
        obj = _pred(run(capsys, *args, "--json")[1])
        change, se = obj["by_degree_change"][0], obj["by_degree_stderr"][0]
        assert len(change) == 3 and se[2] == pytest.approx(obj["stderr"][0], rel=1e-12)
        rc, out, err = run(capsys, *args, "--by-degree")
        assert rc == 0 and "change truncated at each degree" in out
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│ test:5 r=")]
        rows = {int(c[0].split("r=")[1]): float(c[1]) for c in cells}
        assert sorted(rows) == [1, 2], out
        for r, ch in rows.items():
            assert ch == pytest.approx(change[r], rel=1e-5, abs=1e-9)
        rc, out, err = run(capsys, *args)
        noisy = obj["stderr"][0] > 2 * se[1]
        assert rc == 0 and ("degree 1 alone gives" in err) == noisy, (spec, obj["stderr"], se)


def test_retrain_and_series_json(capsys, tmp_path):
    spec = tmp_path / "del.txt"
    spec.write_text("3\n4\n# comment\n10\n")
    rc, out, _ = run(capsys, "retrain", "--preset", "digits", "--steps", "10", "--delete", f"@{spec}", "--query", "test:1", "--json")
    assert rc == 0
    r = _pred(out)
    assert r["method"] == "retrain" and r["deletion_sizes"] == [3] and r["stderr"] == [0.0]
    rc, out, _ = run(capsys, "series", "--preset", "digits", "--steps", "10", "--delete", f"@{spec}", "--degree", "3", "--query", "test:1", "--json")
    (s,) = json.loads(out)["results"]
    assert rc == 0 and len(s["coefficients"]) == 4 and s["method"] == "exact"
    # the exact series at t=1 is close to the real retrain on this tiny deletion
    assert abs(s["value_at_1"] - r["estimate"][0]) < 0.1 * abs(r["estimate"][0] - r["base"]) + 1e-6
    assert s["coefficients"][0] == pytest.approx(r["base"], rel=1e-12)


def test_stability_json_and_plot(sketch_dir, capsys, tmp_path):
    png = tmp_path / "s.png"
    rc, out, _ = run(capsys, "stability", str(sketch_dir), "--query", "test:1", "--plot", str(png), "--json")
    assert rc == 0 and png.stat().st_size > 1000
    rep = json.loads(out)["test:1"]
    assert "verdict" in rep and len(rep["degrees"]) == 2


BAD = [
    ("predict", "{d}", "--delete", "0:x", "--query", "test:5"),
    ("predict", "{d}", "--delete", "99999", "--query", "test:5"),
    ("predict", "{d}", "--delete", "-1", "--query", "test:5"),
    ("predict", "{d}", "--delete", "5:5", "--query", "test:5"),
    ("predict", "{d}", "--delete", "", "--query", "test:5"),
    ("predict", "{d}", "--delete", "1,,2", "--query", "test:5"),
    ("predict", "{d}", "--delete", "class:11", "--query", "test:5"),
    ("predict", "{d}", "--delete", "contains:x", "--query", "test:5"),
    ("predict", "{d}", "--delete", "@/nonexistent/file", "--query", "test:5"),
    ("predict", "{d}", "--delete", "1", "--query", "bogus"),
    ("predict", "{d}", "--delete", "1"),
    ("predict", "{d}", "--delete", "1", "--query", "test:1", "--weight", "abc"),
    ("predict", "{d}", "--delete", "1", "--query", "test:1", "--delta", "2"),
    ("predict", "/nonexistent/sketch", "--delete", "1", "--query", "test:1"),
    ("predict", "{d}", "--query", "test:1"),
    ("sketch", "--preset", "nope", "--directions", "2", "--degree", "2", "--out", "{d}x"),
    ("sketch", "--preset", "digits", "--directions", "0", "--degree", "2", "--out", "{d}x"),
    ("sketch", "--preset", "digits", "--directions", "4", "--degree", "2", "--out", "{d}"),
    ("series", "--preset", "paper", "--delete", "1", "--degree", "2", "--query", "max"),
    ("series", "--preset", "paper", "--data", "/nonexistent.txt", "--delete", "1", "--degree", "2", "--query", "max"),
    ("series", "--preset", "digits", "--delete", "1", "--degree", "0", "--query", "test:1"),
    ("retrain", "--preset", "digits", "--delete", "1", "--query", "test:1", "--steps", "100000"),
    ("stability", "/nonexistent/sketch"),
    ("frobnicate",),
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a)[:60] for a in BAD])
def test_bad_input_exits_2_with_one_line(sketch_dir, capsys, args):
    rc, out, err = run(capsys, *[a.format(d=sketch_dir) for a in args])
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_corrupted_sketch_exits_2(sketch_dir, capsys, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(sketch_dir, d)
    p = d / "chunk-00001.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    rc, _, err = run(capsys, "predict", str(d), "--delete", "1", "--query", "test:1")
    assert rc == 2 and "checksum" in err and len(err.strip().splitlines()) == 1


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "delsketch.apps.cli", "predict", "/nonexistent", "--delete", "1", "--query", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_interrupted_sketch_resumes_from_the_cli(tmp_path):
    """Kill a CLI precompute mid-way (SIGINT), then run the same command: it finishes and equals a clean build."""
    import signal
    import time

    out = tmp_path / "sk"
    cmd = [sys.executable, "-m", "delsketch.apps.cli", "sketch", "--preset", "digits", "--directions", "64", "--degree", "2",
           "--chunk", "8", "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("chunk-00001.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("precompute finished before the interrupt arrived")
    assert proc.returncode == 130 and "resumes" in err and "Traceback" not in err
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    assert main(["sketch", "--preset", "digits", "--directions", "64", "--degree", "2", "--chunk", "8", "--out", str(clean)]) == 0
    for p in clean.glob("*.safetensors"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
