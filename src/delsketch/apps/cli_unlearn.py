"""``delsketch unlearn``: remove training examples from a preset's trained model with one of the unlearning
methods, write the result (safetensors + manifest), and ``delsketch unlearn verify DIR`` against retraining.

Registered on the ``delsketch`` group by one line in :mod:`delsketch.apps.cli`. Bad input raises ``ValueError``
(``UnlearnError`` is one) or ``CliError``; the entry point turns them into one ``error:`` line, exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

__all__ = ["unlearn_group"]


def _value(s: str):
    from .cli import scalar_value as scalar

    if s.startswith("["):
        try:
            return json.loads(s)
        except ValueError:
            raise ValueError(f"bad list value {s!r} (expected JSON, e.g. [0,1])") from None
    return scalar(s)


def _pairs(items: tuple, flag: str) -> dict:
    from .cli import key_values

    return key_values(items, flag, value=_value)


def _spec(preset: Optional[str], data: Optional[str], steps: Optional[int], sets: tuple, task_ref: Optional[str]) -> dict:
    """The core command line's task spec (``--preset`` with ``--set``, or ``--task FILE.py:FUNCTION``)."""
    from .cli import task_spec

    return task_spec(preset, data, steps, task_ref, sets)


def _sketch(path: Optional[str], task):
    if path is None:
        return None
    from ..sketch import Sketch

    if not Path(path).is_dir():
        raise ValueError(f"sketch directory not found: {path}")
    return Sketch.load(path, task)


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def _print_verification(v: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..unlearn.verify import table_rows

    con = Console()
    t = Table(title=f"{v['method']} vs {v['reference']} without {v['forgotten']} of {v['n']} examples")
    for c in ["metric", "unlearned", v["reference"], "original"]:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for row in table_rows(v):
        t.add_row(*row)
    con.print(t)
    con.print(v["verdict"], soft_wrap=True)
    if v.get("reference_note"):
        con.print(f"note: {v['reference_note']}", soft_wrap=True)


@click.group("unlearn", invoke_without_command=True,
             help="Remove training examples from a preset's trained model (methods: retrain, finetune, "
                  "gradient_ascent, neggrad_plus, scrub, newton, synthetic, sketch) and write it to --out; "
                  "'delsketch unlearn verify DIR' compares the result with retraining.")
@click.option("--preset", default=None, help="paper | names | digits (or --task)")
@click.option("--task", "task_ref", default=None, help="your own task: FILE.py:FUNCTION returning a Task")
@click.option("--data", default=None, help="data file (paper preset)")
@click.option("--steps", type=int, default=None, help="run only the first N steps of the schedule")
@click.option("--set", "sets", multiple=True, help="preset override KEY=VALUE (e.g. n_train=100), repeatable")
@click.option("--forget", default=None, help="SPEC: 0:10,15 | @file | class:3 | contains:x")
@click.option("--method", default=None, help="unlearning method")
@click.option("--option", "options", multiple=True, help="method setting KEY=VALUE (e.g. lr=0.05), repeatable")
@click.option("--available-data", "available", type=click.Choice(["all", "forget_only", "none"]), default="all",
              show_default=True, help="what training data may be read at deletion time")
@click.option("--sketch", "sketch_dir", default=None, help="sketch directory (method sketch)")
@click.option("--out", "out_dir", default=None, help="directory for params.safetensors + manifest.json (new or empty)")
@click.option("--verify", "check", is_flag=True, help="also verify against retraining and print the table")
@click.option("--json", "json_out", is_flag=True, help="print JSON instead of a table")
@click.pass_context
def unlearn_group(ctx, preset, task_ref, data, steps, sets, forget, method, options, available, sketch_dir, out_dir,
                  check, json_out):
    if ctx.invoked_subcommand is not None:
        given = [f for f, v in (("--preset", preset), ("--task", task_ref), ("--forget", forget), ("--method", method),
                                ("--out", out_dir)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} {'belongs' if len(given) == 1 else 'belong'} to "
                                   "'delsketch unlearn', not to its subcommand")
        return
    from ..tasks import build_from_spec
    from ..training import train
    from ..unlearn import METHODS, save, unlearn, verify
    from .cli import parse_spec

    missing = [f for f, v in (("--preset or --task", preset or task_ref), ("--forget", forget), ("--method", method),
                              ("--out", out_dir)) if v is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (e.g. delsketch unlearn --preset digits --forget "
                               "class:3 --method scrub --out DIR)")
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r} (choose from: {', '.join(METHODS)})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if sketch_dir is not None and out.exists() and out.resolve() == Path(sketch_dir).resolve():
        raise ValueError("--out must not be the sketch directory")
    spec = _spec(preset, data, steps, sets, task_ref)
    task = build_from_spec(spec)
    idx = parse_spec(forget, task)
    settings = _pairs(options, "--option")
    sk = _sketch(sketch_dir, task)
    if method == "sketch" and sk is None:
        raise ValueError("method sketch needs --sketch DIR (make one with: delsketch sketch ...)")
    original = train(task)
    u = unlearn(task, idx, method, params=original, available_data=available, sketch=sk, **settings)
    save(u, out, task_spec=spec)
    res = {"out": str(out), "method": method, "forgotten": len(u.forget), "settings": u.settings, "cost": u.cost,
           "seconds": round(u.seconds, 4), "data_touched": u.info.get("data_touched")}
    v = verify(task, u, original=original) if check else None
    if json_out:
        _emit({**res, **({"verification": v} if v else {})})
        return
    click.echo(f"{method}: forgot {len(u.forget)} examples in {u.seconds:.3g} s "
               f"({u.cost['retrain_equivalents']:.3g} retrain equivalents of example evaluations); "
               f"data read: {u.info.get('data_touched')}; wrote {out}")
    if v:
        _print_verification(v)


@unlearn_group.command("verify", help="Compare an unlearned model (a directory written by 'delsketch unlearn') with "
                                      "retraining without its forget set, or with a sketch's prediction.")
@click.argument("out_dir")
@click.option("--reference", type=click.Choice(["retrain", "sketch"]), default="retrain", show_default=True)
@click.option("--sketch", "sketch_dir", default=None, help="sketch directory (--reference sketch)")
@click.option("--lira", type=int, default=0, show_default=True,
              help="shadow models on random halves for a LiRA level of the forget set (0: loss threshold only)")
@click.option("--json", "json_out", is_flag=True, help="print JSON instead of a table")
def verify_command(out_dir, reference, sketch_dir, lira, json_out):
    from ..tasks import build_from_spec
    from ..unlearn import load, verify
    from ..unlearn.core import read_manifest

    man = read_manifest(out_dir)
    spec = man.get("task_spec")
    if not isinstance(spec, dict) or not ("preset" in spec or "task" in spec):
        raise ValueError(f"{out_dir}: made from Python (no preset or task file recorded); verify it with "
                         "delsketch.unlearn.verify")
    if spec.get("data") is not None and not Path(spec["data"]).exists():
        raise ValueError(f"data file not found: {spec['data']} (the model was made from it)")
    task = build_from_spec(spec)
    u = load(out_dir, task)
    sk = _sketch(sketch_dir, task)
    if reference == "sketch" and sk is None:
        raise ValueError("--reference sketch needs --sketch DIR")
    if lira < 0 or lira == 1:
        raise ValueError("--lira must be 0 or at least 2 shadow models")
    v = verify(task, u, reference=reference, sketch=sk, lira=lira)
    if json_out:
        _emit(v)
        return
    _print_verification(v)
