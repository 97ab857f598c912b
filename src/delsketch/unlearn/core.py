"""One interface for every unlearning method: :func:`unlearn` returns an :class:`Unlearned` (the parameters and a
record of the method, its settings, the forget set and the cost); :func:`save` / :func:`load` store it as
``params.safetensors`` + ``manifest.json`` (checksummed, atomic) beside ``timings.json`` (wall time, kept out
of the manifest so a rerun gives the same bytes).

Methods register themselves in :data:`METHODS` (one entry per module of :mod:`delsketch.unlearn.methods`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..io import atomic_save_tensors, sha256_file, versions, write_json
from ..training import Task, train
from .access import AVAILABLE, Access, UnlearnError, check_forget, check_params

__all__ = ["Method", "METHODS", "register", "Unlearned", "unlearn", "save", "load", "FORMAT", "run_cost"]

FORMAT = "delsketch-unlearned/1"
Params = dict[str, Tensor]


@dataclass(frozen=True)
class Method:
    """``run(task, params, access, sketch, **settings) -> (params, info)``; ``needs``: the data it reads at
    deletion time ("retain+forget", "forget" or "none"); ``defaults``: its settings."""

    name: str
    run: Callable[..., tuple]
    needs: str
    defaults: dict
    summary: str
    data_touched: str
    exact: bool = False


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _methods() -> dict[str, Method]:
    from . import methods  # noqa: F401  (fills METHODS)

    return METHODS


@dataclass
class Unlearned:
    """An unlearned model: ``params`` and its record. ``stderr``: per-parameter error bars (``sketch`` only)."""

    params: Params
    method: str
    settings: dict
    forget: list[int]
    previously_forgotten: list[int]
    fingerprint: str
    cost: dict
    info: dict = field(default_factory=dict)
    stderr: Optional[Params] = None
    seconds: float = 0.0

    @property
    def forgotten(self) -> list[int]:
        return sorted(set(self.forget) | set(self.previously_forgotten))

    def record(self) -> dict:
        return {"format": FORMAT, "method": self.method, "settings": self.settings, "forget": self.forget,
                "previously_forgotten": self.previously_forgotten, "fingerprint": self.fingerprint,
                "cost": self.cost, "info": self.info}


def run_cost(task: Task) -> int:
    """Example evaluations (forward + backward) of one training run: the unit of "retrain equivalents"."""
    return sum(len(b) for b in task.schedule)


def _settings(method: Method, settings: dict) -> dict:
    unknown = sorted(set(settings) - set(method.defaults))
    if unknown:
        raise UnlearnError(f"method {method.name!r} has no setting {', '.join(map(repr, unknown))} "
                           f"(choose from: {', '.join(method.defaults) or 'none'})")
    out = {**method.defaults, **settings}
    try:
        json.dumps(out)
    except TypeError:
        raise UnlearnError(f"settings of {method.name!r} must be JSON values (numbers, strings, lists)") from None
    return out


def unlearn(task: Task, forget: Sequence[int], method: str, *, params: Optional[Params] = None,
            available_data: str = "all", sketch: Any = None, previously_forgotten: Sequence[int] = (),
            fingerprint: Optional[str] = None, **settings) -> Unlearned:
    """Remove ``forget`` (training indices) from the model trained by ``task`` with ``method``.

    ``params``: the trained model (default: ``train(task)``; after earlier requests, their result).
    ``available_data``: what the user can still read: "all" (default), "forget_only" (only the forget set's
        examples) or "none"; a method needing more is refused with one line.
    ``sketch``: a loaded :class:`delsketch.Sketch` of ``task`` (method ``sketch``).
    ``previously_forgotten``: indices forgotten by earlier requests (excluded from the retained data; the
        ``retrain`` and ``sketch`` methods delete their union with ``forget`` from the original run).
    ``fingerprint``: the fingerprint of the task ``params`` were trained by, for a caller who can no longer read
        the training data (the task's own :meth:`Task.fingerprint` hashes it); default ``task.fingerprint()``.
    ``settings``: the method's settings (see ``METHODS[name].defaults``).
    """
    table = _methods()
    if method not in table:
        raise UnlearnError(f"unknown unlearning method {method!r} (choose from: {', '.join(table)})")
    m = table[method]
    forget = check_forget(task, forget)
    previous = sorted({int(i) for i in previously_forgotten})
    if previous:
        check_forget(task, previous)
        if len(set(previous) | set(forget)) == task.n:
            raise UnlearnError(f"after this request all {task.n} training examples would be forgotten")
    if available_data not in AVAILABLE:
        raise UnlearnError(f"unknown available_data {available_data!r} (choose from: {', '.join(AVAILABLE)})")
    s = _settings(m, settings)
    access = Access(task, forget, available_data, method, previous)
    if m.needs == "retain+forget":
        access.need("retain")
    elif m.needs == "forget":
        access.need("forget")
    if method == "sketch":
        if sketch is None:
            raise UnlearnError("method 'sketch' needs a sketch of the task (precompute one: delsketch sketch ...)")
        if getattr(sketch, "n", None) != task.n:
            raise UnlearnError(f"the sketch has n = {getattr(sketch, 'n', None)} examples, the task {task.n}")
    if params is None:
        if available_data != "all":
            raise UnlearnError(f"available_data={available_data!r}: pass the trained model's params (training it "
                               "again would read the training data)")
        params = train(task)
    check_params(task, params)
    params = {k: v.detach().clone() for k, v in params.items()}
    fp = task.fingerprint() if fingerprint is None else str(fingerprint)
    t0 = time.perf_counter()
    new, info = m.run(task, params, access, sketch=sketch, **s)
    seconds = time.perf_counter() - t0
    stderr = info.pop("stderr", None)
    unit = run_cost(task)
    cost = {"example_evaluations": access.examples, "synthetic_evaluations": access.synthetic,
            **info.pop("cost", {}),
            "retrain_equivalents": round((access.examples + access.synthetic) / unit, 6) if method != "retrain" else 1.0}
    info.setdefault("data_touched", m.data_touched)
    return Unlearned(params={k: v.detach().to(torch.float64).contiguous() for k, v in new.items()}, method=method,
                     settings=s, forget=forget, previously_forgotten=previous, fingerprint=fp,
                     cost=cost, info=info, stderr=stderr, seconds=seconds)


# ----------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------

PARAMS_FILE, MANIFEST_FILE, TIMINGS_FILE = "params.safetensors", "manifest.json", "timings.json"


def _tensors(u: Unlearned) -> dict[str, Tensor]:
    t = {f"param.{k}": v for k, v in u.params.items()}
    if u.stderr is not None:
        t.update({f"stderr.{k}": v.detach().to(torch.float64) for k, v in u.stderr.items()})
    return t


def save(unlearned: Unlearned, out_dir: Union[str, Path], task_spec: Optional[dict] = None) -> Path:
    """Write ``params.safetensors``, ``manifest.json`` and ``timings.json`` into ``out_dir``.

    An existing non-empty ``out_dir`` is refused unless it holds the same request (same method, settings, forget
    sets and task fingerprint: the files are then rewritten to the same bytes); nothing else is overwritten.
    ``task_spec``: how to rebuild the task (the command line records its preset spec, for ``unlearn verify``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UnlearnError(f"{out} exists and is not a directory")
    rec = unlearned.record()
    if out.is_dir() and any(out.iterdir()):
        try:
            old = json.loads((out / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            old = None
        same = isinstance(old, dict) and all(old.get(k) == rec[k] for k in
                                             ("format", "method", "settings", "forget", "previously_forgotten",
                                              "fingerprint"))
        extra = sorted(p.name for p in out.iterdir() if p.name not in (PARAMS_FILE, MANIFEST_FILE, TIMINGS_FILE))
        if not same or extra:
            raise UnlearnError(f"{out} is not empty and does not hold this request: refusing to overwrite it "
                               "(choose a new --out directory)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out / PARAMS_FILE, _tensors(unlearned), {"format": FORMAT, "fingerprint": unlearned.fingerprint})
    man = {**rec, "params": {"file": PARAMS_FILE, "sha256": sha256_file(out / PARAMS_FILE),
                             "shapes": {k: list(v.shape) for k, v in sorted(unlearned.params.items())},
                             "stderr": unlearned.stderr is not None},
           "task_spec": task_spec, "versions": versions()}
    write_json(out / MANIFEST_FILE, man)
    write_json(out / TIMINGS_FILE, {"seconds": round(unlearned.seconds, 6)})
    return out


def read_manifest(path: Union[str, Path]) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise UnlearnError(f"unlearned-model directory not found: {p}")
    try:
        man = json.loads((p / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise UnlearnError(f"{p}: no {MANIFEST_FILE} (not an unlearned-model directory)") from None
    except ValueError:
        raise UnlearnError(f"{p / MANIFEST_FILE}: not valid JSON (file corrupted)") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise UnlearnError(f"{p / MANIFEST_FILE}: not a {FORMAT} manifest")
    for k, kind in (("method", str), ("settings", dict), ("forget", list), ("fingerprint", str), ("params", dict)):
        if not isinstance(man.get(k), kind):
            raise UnlearnError(f"{p / MANIFEST_FILE}: field {k!r} missing or of the wrong type")
    return man


def load(path: Union[str, Path], task: Optional[Task] = None) -> Unlearned:
    """Load and verify an unlearned model: the params file's sha256 against the manifest, and (given ``task``)
    the task's fingerprint against the recorded one. Any mismatch is one line."""
    from safetensors.torch import load_file

    p = Path(path)
    man = read_manifest(p)
    f = p / PARAMS_FILE
    if not f.is_file():
        raise UnlearnError(f"{f}: file missing")
    if sha256_file(f) != man["params"].get("sha256"):
        raise UnlearnError(f"{f}: checksum mismatch (file corrupted, truncated or replaced)")
    if task is not None and task.fingerprint() != man["fingerprint"]:
        raise UnlearnError(f"{p}: unlearned from another task (fingerprint {man['fingerprint'][:12]} != "
                           f"{task.fingerprint()[:12]}): the model does not match the task")
    t = load_file(f)
    params = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    stderr = {k[len("stderr."):]: v for k, v in t.items() if k.startswith("stderr.")} or None
    try:
        seconds = float(json.loads((p / TIMINGS_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        seconds = 0.0
    return Unlearned(params=params, method=man["method"], settings=man["settings"], forget=man["forget"],
                     previously_forgotten=man.get("previously_forgotten", []), fingerprint=man["fingerprint"],
                     cost=man.get("cost", {}), info=man.get("info", {}), stderr=stderr, seconds=seconds)
