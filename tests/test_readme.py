"""The README's Python example runs as written, and its two commands are the ones .ci/run uses."""

from __future__ import annotations

import re
import warnings

from conftest import REPO

from delsketch import StabilityWarning


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_python_example_runs_twice(tmp_path, monkeypatch):
    """The first example is about ten lines on Task.from_module, and seeded: a second run in the same
    directory finds the same sketch (it would fail with "holds a different sketch" otherwise)."""
    code = _python_blocks()[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 12 and "Task.from_module" in code
    monkeypatch.chdir(tmp_path)
    preds = []
    for _ in range(2):
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)
        preds.append(ns["pred"])
    assert preds[0].directions == 128 and preds[0].degree == 3 and preds[0].stderr > 0
    assert preds[0].estimate == preds[1].estimate
    assert (tmp_path / "my-sketch" / "manifest.json").exists()


def test_readme_adam_example_runs(tmp_path, monkeypatch):
    code = _python_blocks()[1]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)  # the example's deletion is one the sketch supports
        exec(compile(code, "README.md", "exec"), ns)
    assert ns["pred"].directions == 32 and ns["task"].optimizer.describe()["name"] == "adam"
    assert ns["pred"].change.shape == (2, 4, 3) and ns["pred"].sets == 2  # a vector output, two deletion sets


def test_readme_test_command_is_ci_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[1].strip() == ci.strip()
    assert blocks[0].strip().endswith("delsketch demo")
    assert readme.index(blocks[0]) < 400
