"""The package's import rules: one direction of flow, checked on the source (every import, lazy ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import delsketch

ROOT = Path(delsketch.__file__).parent

# what each top-level part of the package may import (besides itself)
ALLOWED = {
    "version": set(),
    "_alloc": set(),  # memory settings for ring runs; imports nothing (it must run before torch loads)
    "io": {"version"},
    "series": set(),
    "training": {"series", "io", "version"},
    "tasks": {"series", "training", "io", "version"},
    "sketch": {"series", "training", "io", "version", "executors", "_alloc"},
    "executors": {"io", "version"},
}
# the workbench packages may use the library, never the applications
for _pkg in ("audit", "unlearn", "privacy"):
    ALLOWED[_pkg] = {"series", "training", "tasks", "sketch", "io", "version", "executors", "audit", "privacy",
                     "_alloc"} - {_pkg}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Top-level delsketch parts imported by a file (absolute and relative, at any depth of the code)."""
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(root).parent.parts  # the file's package inside delsketch
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("delsketch."):
                    found.add(a.name.split(".")[1])
                elif a.name == "delsketch":
                    found.add("<root>")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("delsketch"):
                    parts = node.module.split(".")
                    found.update([parts[1]] if len(parts) > 1 else [f"<root:{a.name}>" for a in node.names])
                continue
            base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
            if node.level - 1 > len(pkg):
                raise AssertionError(f"{path}: relative import above the package")
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0])
            else:  # "from .. import x" at the top: x is a part
                found.update(a.name for a in node.names)
    return found


def test_every_part_is_known():
    parts = {_part(p) for p in ROOT.rglob("*.py")} - {"__init__", "__main__"}
    assert parts <= set(ALLOWED) | {"apps"}, parts - set(ALLOWED) - {"apps"}


def test_import_direction():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        part = _part(path)
        if part in ("__init__", "__main__", "apps"):
            continue
        for dep in _imports(path) - {part}:
            if dep not in ALLOWED[part]:
                bad.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_violations(tmp_path):
    # the checker must be able to fail: lazy relative and absolute imports of higher layers are found
    pkg = tmp_path / "delsketch" / "sketch"
    pkg.mkdir(parents=True)
    (pkg / "y.py").write_text("def f():\n    from ..tasks import get_preset\n    import delsketch.apps.cli\n"
                              "    from . import store\n")
    assert _imports(pkg / "y.py", tmp_path / "delsketch") == {"tasks", "apps", "sketch"}
