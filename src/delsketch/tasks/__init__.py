"""Ready-made training tasks.

``get_preset(name)`` returns a builder ``(data=None, steps=None, **overrides) -> Task``:

* ``paper``  - the paper's reference microgpt run on names.txt (``data`` = path, required);
* ``names``  - the same model and recipe on census first names from the ``names`` package;
* ``digits`` - an MLP on scikit-learn's digits.

See each module's docstring for its overrides, queries and predicates.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable

from ..training import Task
from .user import load_task_file, task_file_spec

__all__ = ["PRESETS", "get_preset", "preset_overrides", "build_from_spec", "factory", "load_task_file", "task_file_spec"]

PRESETS: tuple[str, ...] = ("paper", "names", "digits")


def _builder(name: str) -> Callable[..., Task]:
    if name == "paper":
        from .paper import build
    elif name == "names":
        from .names import build
    elif name == "digits":
        from .digits import build
    else:  # pragma: no cover - guarded by get_preset
        raise AssertionError(name)
    return build


def get_preset(name: str) -> Callable[..., Task]:
    """The builder ``(data: str | None = None, steps: int | None = None, **overrides) -> Task``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    build = _builder(name)

    def make(data: str | None = None, steps: int | None = None, **overrides) -> Task:
        allowed = preset_overrides(name)
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(
                f"preset {name!r} has no override {', '.join(map(repr, unknown))} "
                f"(choose from: {', '.join(allowed) or 'none'})"
            )
        return build(data=data, steps=steps, **overrides)

    make.__name__ = f"build_{name}"
    make.__doc__ = importlib.import_module(build.__module__).__doc__
    return make


def preset_overrides(name: str) -> dict[str, object]:
    """The overrides a preset accepts (besides ``data`` and ``steps``) and their defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    sig = inspect.signature(_builder(name))
    return {
        k: p.default for k, p in sig.parameters.items() if k not in ("data", "steps")
    }


def build_from_spec(spec: dict) -> Task:
    """The task a sketch's ``task_spec`` records: ``{"preset", "data", "steps", "preset_steps", **overrides}``, or
    ``{"task": "FILE.py:FUNCTION", "steps"}`` for a user's task file (:mod:`delsketch.tasks.user`)
    (``steps`` keeps the first N steps of the schedule, as the CLI's ``--steps``; ``preset_steps`` is the
    builder's own ``steps``, which sets the length of the run and of its schedules)."""
    from ..training import first_steps

    spec = dict(spec)
    if "task" in spec:  # a user's task file (--task FILE.py:FUNCTION)
        from .user import load_task_file

        return first_steps(load_task_file(spec["task"]), spec.get("steps"))
    name = spec.pop("preset")
    data, steps, preset_steps = spec.pop("data", None), spec.pop("steps", None), spec.pop("preset_steps", None)
    return first_steps(get_preset(name)(data=data, steps=preset_steps, **spec), steps)


def factory(spec: dict) -> Callable[[], Task]:
    """A picklable zero-argument callable that rebuilds the task of ``spec`` (what worker processes call)."""
    return functools.partial(build_from_spec, dict(spec))
