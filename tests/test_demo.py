"""A miniature of `delsketch demo` runs end to end and its numbers agree with independent runs."""

from __future__ import annotations

import json

from rich.console import Console

from delsketch.apps.cli import progress_bar
from delsketch.apps.demo import DEMO_DELETE, DEMO_QUERIES, run_demo
from delsketch.tasks import get_preset
from delsketch.training import retrain, train


def test_demo_small(tmp_path):
    kw = {"n": 60}
    task = get_preset("names")(**kw)
    D = task.select(DEMO_DELETE)
    assert D, "the small demo needs at least one name with the demo's letter"
    con = Console(record=True, width=140)
    res = run_demo(tmp_path, directions=8, degree=2, console=con, err=con, progress_factory=progress_bar, preset_kwargs=kw)
    assert (tmp_path / "demo.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["deleted"] == len(D) and [r["query"] for r in saved["rows"]] == DEMO_QUERIES
    # the default answer is stated with its method; a cheap demo model is answered by retraining, exactly
    assert saved["default_answer"]["method"] == "retrain" and "auto chose retrain" in saved["default_answer"]["why"]
    assert saved["default_answer"]["change"] == [r["actual_change"] for r in saved["rows"]]
    text = con.export_text()
    assert "predicted" not in text or "retrained" in text
    # the 'actual' column is real retraining
    base, new = train(task), retrain(task, D)
    for r in res["rows"]:
        assert r["actual_change"] == float(task.query(new, r["query"]) - task.query(base, r["query"]))
        assert r["base"] == float(task.query(base, r["query"]))
