"""A user's own task, from a Python file: ``--task path/to/file.py:function``.

The function takes no arguments and returns a :class:`~delsketch.training.Task` (usually built with
``Task.from_module``), or ``(task, {name: output})`` to name outputs the CLI can ask for with ``--query NAME``
(each output a callable ``params -> Tensor`` of any shape, or a :class:`~delsketch.training.outputs.Output`).
The file is imported as a fresh module each time (worker processes rebuild the task the same way), so it must
build the same task every time: seed it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from ..training import Task

__all__ = ["load_task_file", "task_file_spec"]


def _split(ref: str) -> tuple[Path, str]:
    path, sep, fn = str(ref).rpartition(":")
    if not sep or not path or not fn:
        raise ValueError(f"--task must be FILE.py:FUNCTION, got {ref!r}")
    if not fn.isidentifier():
        raise ValueError(f"--task {ref!r}: {fn!r} is not a function name")
    return Path(path), fn


def task_file_spec(ref: str) -> dict:
    """The JSON spec a sketch records for a task file (an absolute path, so the CLI finds it again)."""
    path, fn = _split(ref)
    if not path.is_file():
        raise ValueError(f"task file not found: {path}" if not path.exists() else f"task file is not a file: {path}")
    return {"task": f"{path.resolve()}:{fn}"}


def load_task_file(ref: str) -> Task:
    """Import ``FILE.py`` and call ``FUNCTION()``; named outputs it returns are set as ``task.outputs``."""
    path, fn = _split(ref)
    if not path.is_file():
        raise ValueError(f"task file not found: {path}" if not path.exists() else f"task file is not a file: {path}")
    name = "delsketch_user_task_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]  # same in every process
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--task {ref!r}: cannot import {path} (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"--task {ref!r}: importing {path.name} failed: {type(e).__name__}: {e}") from e
    make = getattr(module, fn, None)
    if not callable(make):
        raise ValueError(f"--task {ref!r}: {path.name} defines no function {fn!r}")
    got = make()
    outputs = {}
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        got, outputs = got
    if not isinstance(got, Task):
        raise ValueError(f"--task {ref!r}: {fn}() must return a delsketch Task (or (task, {{name: output}})), "
                         f"got {type(got).__name__}")
    for k, v in outputs.items():
        if not (isinstance(k, str) and callable(v) or hasattr(v, "flat_coefficients")):
            raise ValueError(f"--task {ref!r}: output {k!r} must be named by a string and be callable")
    got.outputs = {**(got.outputs or {}), **outputs}
    if outputs and not got.default_queries:
        got.default_queries = list(outputs)
    return got
