"""The ``delsketch`` command line.

Every malformed input exits with status 2 and one line on stderr beginning ``error:``; results go to
stdout as a table, or as JSON with ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

@click.group(help="Predict what a trained model would do had it never seen some training examples.")
@click.version_option(package_name="delsketch")
def app():
    pass

out = Console()
err = Console(stderr=True)


class CliError(Exception):
    """A user error: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def build_task(preset: Optional[str], data: Optional[str], steps: Optional[int], task_ref: Optional[str] = None,
               sets: tuple = ()):
    """The task of ``--preset`` (with ``--set`` overrides) or of ``--task FILE.py:FUNCTION``; ``steps`` keeps only
    the first N steps of its schedule (lr schedule unchanged). Returns (task, spec): the spec rebuilds the task
    (the sketch records it, workers call it)."""
    from ..tasks import build_from_spec

    spec = task_spec(preset, data, steps, task_ref, sets)
    return build_from_spec(spec), spec


def task_spec(preset: Optional[str], data: Optional[str], steps: Optional[int], task_ref: Optional[str] = None,
              sets: tuple = ()) -> dict:
    from ..tasks import task_file_spec

    if (preset is None) == (task_ref is None):
        raise CliError("give either --preset NAME or --task FILE.py:FUNCTION")
    if task_ref is not None:
        if data is not None or sets:
            raise CliError("--data and --set go with --preset; a --task file builds its own data")
        return {**task_file_spec(task_ref), "steps": steps}
    if data is not None and not Path(data).exists():
        raise CliError(f"data file not found: {data}")
    spec = {"preset": preset, "data": str(Path(data).resolve()) if data else None, "steps": steps}
    spec.update(key_values(sets, "--set", "n_train=100"))
    return spec


def scalar_value(s: str):
    """A command-line value: int, float, none/true/false, or the text itself."""
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(s.lower(), s)


def key_values(items, flag: str, example: str = "KEY=VALUE", value=scalar_value) -> dict:
    """Repeated ``FLAG KEY=VALUE`` options as a dict (one-line error for a malformed item)."""
    out = {}
    for kv in items:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise CliError(f"bad {flag} {kv!r} (expected KEY=VALUE, e.g. {example})")
        out[k] = value(v)
    return out


def parse_spec(spec: str, task) -> list[int]:
    """Deletion SPEC: indices and ranges ``0:10,15``, ``@file`` (one index per line), or a preset predicate."""
    spec = spec.strip()
    if not spec:
        raise CliError("empty --delete SPEC")
    idx: list[int] = []
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise CliError(f"deletion file not found: {path}" if not path.exists() else f"deletion file is not a file: {path}")
        tokens = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        for t in tokens:
            try:
                idx.append(int(t))
            except ValueError:
                raise CliError(f"{path}: not an index: {t!r}") from None
    else:
        for tok in spec.split(","):
            tok = tok.strip()
            if not tok:
                raise CliError(f"bad --delete SPEC {spec!r}: empty item")
            head = tok.split(":", 1)[0]
            if ":" in tok and head and not head.lstrip("-").isdigit():
                try:
                    idx.extend(task.select(tok))
                except ValueError as e:
                    raise CliError(str(e)) from None
            elif ":" in tok:
                a, b = tok.split(":", 1)
                try:
                    lo, hi = int(a), int(b)
                except ValueError:
                    raise CliError(f"bad range {tok!r} in --delete SPEC (expected A:B)") from None
                if hi <= lo:
                    raise CliError(f"empty range {tok!r} in --delete SPEC")
                if lo < 0 or hi > task.n:
                    raise CliError(f"range {tok!r} out of range: the task has {task.n} training examples (0..{task.n - 1})")
                idx.extend(range(lo, hi))
            else:
                try:
                    idx.append(int(tok))
                except ValueError:
                    raise CliError(
                        f"bad item {tok!r} in --delete SPEC (expected an index, A:B, @file or a predicate such as {task.select_help or 'contains:x'})"
                    ) from None
    for i in idx:
        if not 0 <= i < task.n:
            raise CliError(f"index {i} out of range: the task has {task.n} training examples (0..{task.n - 1})")
    out_idx = sorted(set(idx))
    if not out_idx:
        raise CliError(f"--delete {spec!r} selects no training example")
    return out_idx


def check_weight(weight: float) -> float:
    import math

    if not math.isfinite(weight):
        raise CliError(f"--weight must be a finite number, got {weight}")
    return weight


def check_plot(path: Optional[str]) -> Optional[str]:
    """A PNG path that can be written: ends in .png and is not a directory (checked before any work)."""
    if path is None:
        return None
    if not path.lower().endswith(".png"):
        raise CliError(f"--plot must name a .png file, got {path!r}")
    if Path(path).is_dir():
        raise CliError(f"--plot {path} is a directory")
    return path


def progress_bar(description: str):
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def fmt(x: float) -> str:
    return f"{x:.6g}"


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------

def preset_options(f):
    f = click.option("--set", "sets", multiple=True, help="preset override KEY=VALUE (e.g. n_train=100), repeatable")(f)
    f = click.option("--steps", type=int, default=None, help="run only the first N steps of the schedule")(f)
    f = click.option("--data", default=None, help="data file (required by the paper preset: names.txt)")(f)
    f = click.option("--task", "task_ref", default=None,
                     help="your own task: FILE.py:FUNCTION returning a Task (or (task, {name: output}))")(f)
    f = click.option("--preset", default=None, help="paper | names | digits (or --task)")(f)
    return f


json_option = click.option("--json", "json_out", is_flag=True, help="print JSON instead of a table")
query_option = click.option("--query", "query", multiple=True, help="output to evaluate (repeatable)")


@app.command()
@preset_options
@click.option("--directions", type=int, required=True, help="number of random directions m")
@click.option("--degree", type=int, required=True, help="truncation degree k")
@click.option("--out", "out_dir", required=True, help="sketch directory (resumed if it holds a partial sketch)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk", type=int, default=64, show_default=True, help="directions per chunk (unit of work and of resumption)")
@click.option("--workers", type=int, default=None,
              help="processes computing chunks at once (2 on a 2-core machine halves the time); 0: one per core "
              "[default: 1, or one per core with --executor process]")
@click.option("--executor", default=None, help="local | process | ray | ray://HOST:PORT (default: local, or process "
              "with --workers > 1; 'ray' joins RAY_ADDRESS if set, else starts a local Ray runtime)")
@click.option("--device", default=None, help="where the ring training runs, e.g. cuda (default: cpu)")
@click.option("--memory-budget", default=None, help="memory one ring run may use, e.g. 6GB; a chunk that needs more "
              "is trained in several runs (same files) [default: half the available memory, shared by the workers]")
@json_option
def sketch(preset, task_ref, data, steps, sets, directions, degree, out_dir, seed, chunk, workers, executor, device,
           memory_budget, json_out):
    """Precompute a deletion sketch: m ring training runs at degree k."""
    from ..sketch import precompute
    from ..tasks import factory

    if workers is not None and workers < 0:
        raise CliError("--workers must be 0 (one per core) or more")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise CliError(f"--out {out_dir} exists and is not a directory")
    if memory_budget is not None:
        from ..training.memory import parse_bytes

        try:
            parse_bytes(memory_budget)
        except ValueError as e:
            raise CliError(f"--memory-budget: {e}") from None
    task, spec = build_task(preset, data, steps, task_ref, sets)
    t0 = time.perf_counter()
    with progress_bar("sketch") as bar:
        tid = bar.add_task("sketch", total=None)

        def cb(done, total):
            bar.update(tid, completed=done, total=total)

        sk = precompute(task, out_dir, directions, degree, seed=seed, chunk=chunk, steps=None,
                        progress=cb, task_spec=spec, task_factory=factory(spec), workers=(os.cpu_count() or 1) if workers == 0 else workers,
                        executor=executor, device=device, memory_budget=memory_budget)
    wall = time.perf_counter() - t0
    info = {"out": str(out_dir), "directions": sk.m, "degree": sk.degree, "n": sk.n, "steps": sk.manifest["steps"],
            "seconds": round(wall, 3)}
    if json_out:
        emit_json(info)
    else:
        out.print(f"sketch of {sk.m} directions at degree {sk.degree} ({sk.n} examples, {info['steps']} steps) "
                  f"written to {out_dir} in {wall:.1f} s")


def load_sketch(path: str):
    from ..sketch import Sketch, SketchError, read_manifest

    p = Path(path)
    if not p.is_dir():
        raise CliError(f"sketch directory not found: {path}")
    man = read_manifest(p)
    spec = man.get("task_spec") or {}
    if "preset" not in spec and "task" not in spec:
        raise SketchError(f"{path}: sketch was built from Python with no task spec recorded; load it with the Python "
                          "API, or build it with precompute(..., task_spec={'task': 'FILE.py:FUNCTION'})")
    from ..tasks import build_from_spec

    if spec.get("data") is not None and not Path(spec["data"]).exists():
        raise CliError(f"data file not found: {spec['data']} (the sketch was built from it)")
    return Sketch.load(p, build_from_spec(spec))


def flat_values(v):
    """A prediction field (tensor or dict of tensors) as one flat list of floats, in the output's element order."""
    import torch

    if isinstance(v, dict):
        return torch.cat([v[k].reshape(-1) for k in sorted(v)]).tolist()
    return v.reshape(-1).tolist()


MAX_ROWS = 20


def print_rows(title: str, columns: list[str], names: list[str], values: list[list[float]]) -> None:
    """A table of per-element rows (the first MAX_ROWS; the JSON has all)."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == "output" else "right")
    for i, name in enumerate(names[:MAX_ROWS]):
        t.add_row(name, *[fmt(v[i]) for v in values])
    out.print(t)
    if len(names) > MAX_ROWS:
        out.print(f"({len(names) - MAX_ROWS} more elements: see --json)")


def resolve_outputs(task, queries: list[str]) -> list:
    """``--query`` names: the task's named outputs (a --task file's) or its query strings, each an Output."""
    from ..training.outputs import as_output

    if not queries:
        raise CliError("give at least one --query" + (f" (named outputs: {', '.join(task.outputs)})" if task.outputs else ""))
    outs = []
    for q in queries:
        try:
            outs.append(as_output(task, q))
        except ValueError as e:
            named = f"; named outputs: {', '.join(task.outputs)}" if task.outputs else ""
            raise CliError(f"{e}{named}") from None
    return outs


@app.command()
@click.argument("sketch_dir")
@click.option("--delete", required=True, help="SPEC: 0:10,15 | @file | contains:x | class:3")
@click.option("--weight", type=float, default=1.0, show_default=True, help="1 deletes; 0<W<1 downweights; W<0 upweights (-1 = counted twice)")
@query_option
@click.option("--delta", type=float, default=0.05, show_default=True, help="failure probability of the median-of-means estimate")
@click.option("--degree", type=int, default=None, help="truncate at this degree (default: the sketch's)")
@click.option("--control-variates", "control", is_flag=True,
              help="remove the scatter explained by each direction's lean towards D (unbiased; smaller error bars)")
@click.option("--by-degree", "by_degree", is_flag=True,
              help="also show the change and its stderr truncated at every degree (bias vs noise; the sketch's terms)")
@click.option("--method", default="auto", show_default=True,
              type=click.Choice(["auto", "sketch", "first_order+sketch", "first_order", "loo_sum", "exact", "retrain"]),
              help="auto: retrain when every set retrains within --budget, else summed exact leave-one-out effects "
                   "when n retrains cost no more than the precompute, else exact first order; the answer says which")
@click.option("--budget", "budget_s", type=float, default=30.0, show_default=True,
              help="seconds of retraining auto may spend to answer exactly")
@json_option
def predict(sketch_dir, delete, weight, query, delta, degree, control, by_degree, method, budget_s, json_out):
    """Predict outputs after deleting (or reweighting) a set of training examples.

    JSON: {"predictions": [one object per --query, see delsketch.sketch.Prediction.to_json]}."""
    import math

    if not 0 < delta < 1:
        raise CliError("--delta must lie in (0, 1)")
    if not (math.isfinite(budget_s) and budget_s >= 0):
        raise CliError(f"--budget must be a non-negative number of seconds, got {budget_s}")
    check_weight(weight)
    if method == "auto" and (by_degree or control):
        method = "sketch"  # the sketch's own terms and control variates: the sketch estimator
    if by_degree and method != "sketch":
        raise CliError(f"--by-degree shows the sketch's per-degree terms: use --method sketch, not {method}")
    sk = load_sketch(sketch_dir)
    if degree is not None and not 0 <= degree <= sk.degree:
        raise CliError(f"--degree must lie in [0, {sk.degree}] (the sketch's degree)")
    idx = parse_spec(delete, sk.task)
    outs = resolve_outputs(sk.task, list(query))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds = [sk.predict(o, idx, weight=weight, delta=delta, degree=degree, control_variates=control, method=method,
                            budget_s=budget_s) for o in outs]
    if json_out:
        emit_json({"predictions": [p.to_json() for p in preds]})
        return
    for o, p in zip(outs, preds):
        names = o.element_names()
        print_rows(f"{p.output}: deleting {len(idx)} examples (weight {weight}); method {p.method}"
                   + (f", {sk.m} directions, degree {p.degree}" if p.method in ("sketch", "first_order+sketch") else "")
                   + (", control variates" if control else ""),
                   ["output", "base", "estimate", "change", "± stderr", "median of means"], names,
                   [flat_values(getattr(p, f)) for f in ("base", "estimate", "change", "stderr", "median_of_means")])
        K = p.degree + 1
        chg = [flat_values(_take(p.by_degree_change, r)) for r in range(K)]
        se = [flat_values(_take(p.by_degree_stderr, r)) for r in range(K)]
        if by_degree:
            terms = [flat_values(_take(p.terms, r)) for r in range(K)]
            tse = [flat_values(_take(p.term_stderr, r)) for r in range(K)]
            rows = [(f"{nm} r={r}", chg[r][i], se[r][i], terms[r][i], tse[r][i])
                    for i, nm in enumerate(names[:MAX_ROWS]) for r in range(1, K)]
            print_rows("change truncated at each degree (low degree: truncation bias; high degree: noise)",
                       ["output", "change", "± stderr", "term", "± term stderr"], [r[0] for r in rows],
                       [[r[j] for r in rows] for j in range(1, 5)])
        elif p.method == "sketch" and p.degree > 1:
            noisy = [i for i in range(len(names)) if se[p.degree][i] > 2 * se[1][i]]
            if noisy:
                i = noisy[0]
                more = f" ({len(noisy)} of {len(names)} elements)" if len(names) > 1 else ""
                err.print(f"note: {names[i]}: the stderr at degree {p.degree} is {se[p.degree][i] / se[1][i]:.3g}x that at "
                          f"degree 1{more}; degree 1 alone gives {fmt(chg[1][i])} ± {fmt(se[1][i])} but leaves out the "
                          "higher-degree terms (see --by-degree)", soft_wrap=True)
        for note in p.notes:
            err.print(f"note: {p.output}: {note}", soft_wrap=True)
    for w in sorted({str(c.message) for c in caught}):
        err.print(f"warning: {w}", soft_wrap=True)


def _take(v, r: int):
    """Degree r of a per-degree field (one set: degree axis first)."""
    return {k: x[r] for k, x in v.items()} if isinstance(v, dict) else v[r]


@app.command()
@preset_options
@click.option("--delete", required=True, help="SPEC: 0:10,15 | @file | contains:x | class:3")
@click.option("--weight", type=float, default=1.0, show_default=True)
@query_option
@json_option
def retrain(preset, task_ref, data, steps, sets, delete, weight, query, json_out):
    """Ground truth: retrain for real with the deletion applied and evaluate the outputs.

    JSON: {"predictions": [...]} with method "retrain" (the same shape as predict's)."""
    import torch

    from ..sketch import Prediction
    from ..training import deletion_weights, train

    check_weight(weight)
    task, _ = build_task(preset, data, steps, task_ref, sets)
    idx = parse_spec(delete, task)
    outs = resolve_outputs(task, list(query))
    t0 = time.perf_counter()
    with progress_bar("train") as bar:
        tid = bar.add_task("train", total=2 * task.steps)
        cb = lambda s, loss: bar.advance(tid)
        base_params = train(task, callback=cb)
        new_params = train(task, w=deletion_weights(task.n, idx, weight), callback=cb)
    cost = {"seconds": round(time.perf_counter() - t0, 3), "retrains": 2}
    with torch.no_grad():
        preds = [Prediction.exact(o, "retrain", o.flat(base_params), o.flat(new_params)[None], [idx], True, weight,
                                  cost=cost) for o in outs]
    if json_out:
        emit_json({"predictions": [p.to_json() for p in preds]})
        return
    for o, p in zip(outs, preds):
        print_rows(f"{p.output}: retrained without {len(idx)} examples (weight {weight})",
                   ["output", "base", "value", "change"], o.element_names(),
                   [flat_values(getattr(p, f)) for f in ("base", "estimate", "change")])


@app.command()
@preset_options
@click.option("--delete", required=True, help="SPEC: 0:10,15 | @file | contains:x | class:3")
@click.option("--degree", type=int, required=True)
@click.option("--weight", type=float, default=1.0, show_default=True)
@query_option
@json_option
def series(preset, task_ref, data, steps, sets, delete, degree, weight, query, json_out):
    """Exact Taylor series of t -> output(t W 1_D) from one ring run (no sketch variance).

    JSON: {"results": [one object per --query: coefficients [K, *out], partial_sums, value_at_1, ...]}."""
    if not 1 <= degree <= 100:
        raise CliError("--degree must lie in [1, 100]")
    check_weight(weight)
    task, _ = build_task(preset, data, steps, task_ref, sets)
    idx = parse_spec(delete, task)
    outs = resolve_outputs(task, list(query))
    with progress_bar("ring run") as bar:
        tid = bar.add_task("ring run", total=task.steps)
        res = exact_series_many(task, idx, degree, outs, weight, callback=lambda s, l: bar.advance(tid))
    if json_out:
        emit_json({"results": [r.to_json() for r in res]})
        return
    for o, r in zip(outs, res):
        names = o.element_names()
        coef = [flat_values(_take(r.coefficients, i)) for i in range(degree + 1)]
        part = [flat_values(_take(r.partial_sums, i)) for i in range(degree + 1)]
        rows = [(f"{nm} r={i}", coef[i][j], part[i][j]) for j, nm in enumerate(names[:MAX_ROWS]) for i in range(degree + 1)]
        print_rows(f"{r.output}: Taylor series of t -> output(t·{weight}·1_D), |D| = {len(idx)}",
                   ["output", "coefficient", "partial sum at t=1"], [x[0] for x in rows],
                   [[x[1] for x in rows], [x[2] for x in rows]])


def exact_series_many(task, idx, degree, outs, weight, callback=None):
    """One ring run for several outputs: the exact series of each."""
    from ..sketch.exact import deletion_ring_run, series_result

    params = deletion_ring_run(task, idx, degree, weight, callback=callback)
    return [series_result(o, params, degree, weight, len(idx)) for o in outs]


@app.command()
@preset_options
@query_option
@click.option("--top", type=int, default=10, show_default=True, help="examples listed per output (largest |effect|)")
@json_option
def influence(preset, task_ref, data, steps, sets, query, top, json_out):
    """Exact first-order effect of deleting each training example on each output (reverse mode through the run).

    JSON: {"results": [one object per scalar output element: effects [n], top, sum_of_effects]}."""
    import torch

    from ..sketch import first_order
    from ..training.outputs import _stack_outputs

    if top < 1:
        raise CliError("--top must be at least 1")
    task, _ = build_task(preset, data, steps, task_ref, sets)
    outs = resolve_outputs(task, list(query))
    both = _stack_outputs(outs) if len(outs) > 1 and all(_scalar_guess(task, o) for o in outs) else None
    with progress_bar("train (recorded)") as bar:
        tid = bar.add_task("train (recorded)", total=task.steps * (1 if both or len(outs) == 1 else len(outs)))
        cb = lambda s, l: bar.advance(tid)
        if both is not None:
            E = first_order(task, both, callback=cb)  # [n, Q]: one recorded run for all outputs
            cols = [(o.name, E[:, j]) for j, o in enumerate(outs)]
        else:
            cols = []
            for o in outs:
                e = first_order(task, o, callback=cb)
                flat = torch.cat([e[k].reshape(task.n, -1) for k in sorted(e)], 1) if isinstance(e, dict) else e.reshape(task.n, -1)
                cols.extend(zip(o.element_names(), flat.T))
    rows = []
    for name, e in cols:
        order = torch.argsort(e.abs(), descending=True, stable=True)[:top].tolist()
        rows.append({"output": name, "query": name, "effects": e.tolist(), "n": task.n,
                     "top": [{"index": i, "example": _example_text(task, i), "effect": float(e[i])} for i in order],
                     "sum_of_effects": float(e.sum())})
    if json_out:
        from ..io import jsonable

        emit_json({"method": "first_order", "results": jsonable(rows)})
        return
    for r in rows[:MAX_ROWS]:
        t = Table(title=f"{r['output']}: change if one example is deleted (exact first order; top "
                        f"{len(r['top'])} of {r['n']} by |effect|)")
        for c in ["index", "example", "effect"]:
            t.add_column(c, justify="left" if c == "example" else "right")
        for x in r["top"]:
            t.add_row(str(x["index"]), x["example"], fmt(x["effect"]))
        out.print(t)


def _scalar_guess(task, o) -> bool:
    """Query strings of the built-in tasks are scalars; anything else is evaluated for its shape later."""
    return (o.cache_key or "").startswith("query:")


def _example_text(task, i: int) -> str:
    ex = task.examples[i] if i < len(task.examples) else None
    if isinstance(ex, str):
        return ex
    if isinstance(ex, dict) and "label" in ex:
        return f"label {ex['label']}"
    return f"#{i}"


@app.command()
@click.argument("sketch_dir")
@click.option("--query", multiple=True, help="outputs to diagnose (default: the preset's default queries)")
@click.option("--tolerance", type=float, default=0.05, show_default=True, help="truncation error tolerance for the safe deletion size")
@click.option("--plot", default=None, help="write a PNG of the per-degree term sizes")
@json_option
def stability(sketch_dir, query, tolerance, plot, json_out):
    """Stability diagnostics: do the Taylor terms decay with degree?"""
    import math

    if not (math.isfinite(tolerance) and tolerance > 0):
        raise CliError(f"--tolerance must be a positive number, got {tolerance}")
    check_plot(plot)
    sk = load_sketch(sketch_dir)
    outs = resolve_outputs(sk.task, list(query or sk.task.default_queries))
    reports = {o.name: sk.stability(o, tolerance=tolerance) for o in outs}
    if plot:
        from .report import plot_stability

        scalar = {q: r for q, r in reports.items() if "degrees" in r}
        if not scalar:
            raise CliError("--plot draws per-degree term sizes of scalar outputs; these outputs are vectors (see --json)")
        plot_stability(scalar, plot)
    if json_out:
        from ..io import jsonable

        emit_json(jsonable(reports))
        return
    for q, rep in reports.items():
        if "degrees" not in rep:  # a vector output: one summarized line
            safe = [x for x in rep.get("safe_deletion_size", []) if x == x]
            out.print(f"{q}: {rep['verdict']}" + (f"; smallest safe deletion size (tolerance {tolerance}): "
                                                  f"{min(safe):.3g} examples" if safe else ""))
            continue
        t = Table(title=f"{q}: {rep['verdict']}")
        t.add_column("degree")
        t.add_column("log2 size")
        t.add_column("95% interval")
        for row in rep["degrees"]:
            t.add_row(str(row["degree"]), f"{row['log2_size']:.2f}", f"[{row['log2_lo']:.2f}, {row['log2_hi']:.2f}]")
        out.print(t)
        if rep.get("decay_per_degree") is not None:
            out.print(f"decay per degree {rep['decay_per_degree']:.3g}; safe deletion size (tolerance {tolerance}): "
                      f"{rep['safe_deletion_size']:.3g} examples")


@app.command()
@click.option("--out", "out_dir", default="delsketch-demo", show_default=True, help="where the sketch, JSON and PNG go")
@click.option("--directions", type=int, default=64, show_default=True)
@click.option("--degree", type=int, default=3, show_default=True)
@json_option
def demo(out_dir, directions, degree, json_out):
    """Train on census names, sketch, predict a deletion, retrain to check, print and plot the comparison."""
    from .demo import run_demo

    if directions < 1:
        raise CliError("--directions must be at least 1")
    if not 1 <= degree <= 100:
        raise CliError("--degree must lie in [1, 100]")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise CliError(f"--out {out_dir} exists and is not a directory")

    run_demo(out_dir, directions=directions, degree=degree, json_out=json_out, console=out, err=err,
             progress_factory=progress_bar)


@app.command()
@click.argument("figure", type=click.Choice(["fig1", "fig2", "fig3"]))
@click.option("--data", default=None, help="the paper's names.txt (required)")
@click.option("--out", "out_dir", default="delsketch-figures", show_default=True,
              help="where figN.png, figN.json and the sketches go (sketches resume)")
@click.option("--directions", type=int, default=None, help="random directions (fig1: 12, fig3: 500; not fig2)")
@click.option("--degree", type=int, default=None, help="truncation degree (fig1: 100, fig2: 6, fig3: 3)")
@click.option("--steps", type=int, default=None, help="train only the first N of the 1000 steps (smaller, faster runs)")
@click.option("--workers", type=int, default=0, show_default=True,
              help="processes computing directions at once (fig1, fig3); 0: one per core")
@json_option
def reproduce(figure, data, out_dir, directions, degree, steps, workers, json_out):
    """Reproduce one of the paper's microgpt figures (PNG + JSON of every plotted number)."""
    from .reproduce import PAPER, run_figure

    if data is None:
        raise CliError("reproduce needs the paper's data: pass --data PATH to names.txt (e.g. ../shared/data/names.txt)")
    if not Path(data).is_file():
        raise CliError(f"data file not found: {data}")
    if figure == "fig2" and directions is not None:
        raise CliError("fig2 uses the exact series (one ring run): it takes no --directions")
    if directions is not None and directions < 1:
        raise CliError("--directions must be at least 1")
    if degree is not None and not 1 <= degree <= 100:
        raise CliError("--degree must lie in [1, 100]")
    if steps is not None and not 1 <= steps <= 1000:
        raise CliError("--steps must lie in [1, 1000]")
    if workers < 0:
        raise CliError("--workers must be 0 (one per core) or more")
    with progress_bar(figure) as bar:
        tid = bar.add_task(figure, total=None)

        def cb(phase, done, total):
            bar.update(tid, description=f"{figure}: {phase}", completed=done, total=total)

        kw = {"degree": degree, "steps": steps}
        if figure != "fig2":
            kw["directions"] = directions
            kw["workers"] = workers or None
        res = run_figure(figure, data, out_dir, progress=cb, **kw)
    if json_out:
        emit_json(res)
        return
    cfg = res["config"]
    if figure == "fig2":
        t = Table(title=f"fig2: exact series vs retraining, '{res['query']}', |D| = {res['deletion_size']}, {cfg['steps']} steps")
        for c in ["degree r", "partial sum at t=1", "retrained at t=1", "error", "|error| / |change|"]:
            t.add_column(c, justify="right")
        for e in res["errors_at_1"]:
            rel = e["relative_to_change"]
            t.add_row(str(e["degree"]), fmt(e["partial_sum"]), fmt(e["retrained"]), f"{e['error']:+.3e}",
                      f"{rel:.3e}" if rel is not None else "-")
        out.print(t)
    elif figure == "fig3":
        a = res["at_1"]
        z = a["error_in_stderr"]
        out.print(f"fig3: {cfg['directions']} directions, degree {cfg['degree']}, {cfg['steps']} steps: predicted change "
                  f"{a['predicted_change']:+.5f} ± {a['stderr']:.5f} vs retrained {a['true_change']:+.5f}; error "
                  f"{a['error']:+.2e} = {z:+.2f} standard errors" if z is not None else "fig3: no standard error (1 direction)")
    else:
        f = res["fit"]
        out.print(f"fig1: '{res['query']}', {cfg['directions']} directions, degree {cfg['degree']}, {cfg['steps']} steps: "
                  f"{f['log2_decay_per_degree']:+.3f} bits per degree ({f['verdict']}); safe deletion size "
                  f"{f['safe_deletion_size']:.3g} (worst case {f['safe_deletion_size_worst_case']:.3g})"
                  if f["log2_decay_per_degree"] is not None else f"fig1: {f['verdict']}")
    out.print(f"wrote {Path(out_dir) / (figure + '.png')} and {Path(out_dir) / (figure + '.json')} "
              f"in {res['timings']['total_s']:.1f} s (defaults are the paper's sizes: {PAPER[figure]})")

from .cli_audit import audit as _audit; app.add_command(_audit)  # noqa: E402,E702 (the audit command group)


from .cli_privacy import train_command; app.add_command(train_command)  # noqa: E402,E702  (delsketch train)
from .cli_unlearn import unlearn_group; app.add_command(unlearn_group)  # noqa: E402,E702  (delsketch unlearn)


# ----------------------------------------------------------------------------------------------
# entry point with the exit-2 contract
# ----------------------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread so that every ``finally`` and atomic write unwinds)."""


#: signals received during this ``main`` call. An exception raised by a signal handler inside C code (torch
#: building a tensor from a list, say) can come out converted to another type; the record decides the status.
_signals: list[int] = []


def _on_signal(signum, frame):
    import signal

    _signals.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip()
    sys.stderr.write(f"warning: {text.splitlines()[0] if text else category.__name__}\n")


RESUME_HINT = "a sketch resumes where it stopped: run the same command again"


def main(argv: Optional[list] = None) -> int:
    """Run the CLI; the return value is the exit status: 0 success, 2 a user-facing failure (one ``error:`` line
    on stderr), 130 SIGINT, 143 SIGTERM (with the resume hint). Warnings are one ``warning:`` line each."""
    import signal
    import threading

    torch_threads()
    in_main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
    old_show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    _signals.clear()
    try:
        try:
            rv = app.main(args=argv, standalone_mode=False, prog_name="delsketch")
            return rv if isinstance(rv, int) and rv else 0
        except BaseException as e:  # noqa: BLE001 - mapped to an exit status below, or re-raised
            return _exit_status(e)
    finally:
        warnings.showwarning = old_show
        for s, h in old.items():
            signal.signal(s, h)


def _exit_status(e: BaseException) -> int:
    """Report ``e`` as one ``error:`` line and return the exit status; exceptions that are not a user-facing
    failure (programming errors) are re-raised with their traceback."""
    import signal

    from safetensors import SafetensorError

    from ..sketch import SketchError
    from ..series import SeriesDomainError, UnsupportedOpError
    from ..training import NonFiniteError

    def fail(msg: str, code: int = 2) -> int:
        msg = msg.strip()
        sys.stderr.write(f"error: {msg.splitlines()[0] if msg else 'failed'}\n")
        return code

    if signal.SIGTERM in _signals or isinstance(e, Terminated):
        return fail(f"terminated by SIGTERM ({RESUME_HINT})", 143)
    if _signals or isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
        return fail(f"interrupted ({RESUME_HINT})", 130)
    if isinstance(e, click.exceptions.Exit):
        return e.exit_code
    if isinstance(e, click.UsageError):
        return fail(e.format_message().replace("\n", " "))
    if isinstance(e, click.ClickException):
        return fail(e.format_message())
    if isinstance(e, (CliError, SketchError, ValueError, UnsupportedOpError, SeriesDomainError, NonFiniteError)):
        return fail(str(e) or type(e).__name__)
    if isinstance(e, OSError):  # read-only filesystem, disk full, a path of the wrong kind, permissions
        where = f"{e.filename}: " if e.filename else ""
        return fail(f"{where}{e.strerror or e}")
    if isinstance(e, SafetensorError):
        return fail(f"safetensors: {e}")
    if isinstance(e, MemoryError):
        return fail("out of memory")
    raise e


def torch_threads() -> None:
    """One intra-op thread: the models are small, and on a busy 2-core machine two threads stall."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def entry() -> None:  # console script
    sys.exit(main())


if __name__ == "__main__":
    entry()
