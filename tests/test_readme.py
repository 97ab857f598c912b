"""The README's Python example runs as written, and its two commands are the ones .ci/run uses."""

from __future__ import annotations

import re

from conftest import REPO


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    pred = ns["pred"]
    assert pred.directions == 128 and pred.degree == 3 and pred.stderr > 0
    assert (tmp_path / "my-sketch" / "manifest.json").exists()


def test_readme_test_command_is_ci_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[1].strip() == ci.strip()
    assert blocks[0].strip().endswith("delsketch demo")
    assert readme.index(blocks[0]) < 400
