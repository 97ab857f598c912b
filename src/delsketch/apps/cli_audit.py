"""``delsketch audit``: memorization, canaries, membership inference, and a report (Markdown + PNGs).

User errors raise ``ValueError`` (the main entry point turns them into one ``error:`` line, exit status 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from ..io import write_json

__all__ = ["audit"]


@click.group(help="Memorization audit: which training examples the model memorizes, and how much.")
def audit():
    pass


def _task(preset: str, data: Optional[str], steps: Optional[int], sets: tuple):
    """The preset's task with ``--set`` overrides (the core command line's :func:`~delsketch.apps.cli.build_task`)."""
    from .cli import build_task

    return build_task(preset, data, steps, None, sets)[0]


def _indices(spec: Optional[str], n: int) -> Optional[list[int]]:
    if spec is None:
        return None
    out: list[int] = []
    for tok in spec.split(","):
        tok = tok.strip()
        try:
            if ":" in tok:
                a, b = tok.split(":", 1)
                out.extend(range(int(a), int(b)))
            else:
                out.append(int(tok))
        except ValueError:
            raise ValueError(f"bad --indices item {tok!r} (expected I or A:B)") from None
    for i in out:
        if not 0 <= i < n:
            raise ValueError(f"example index {i} out of range: the task has {n} training examples (0..{n - 1})")
    return out


def task_options(f):
    f = click.option("--set", "sets", multiple=True, help="preset override KEY=VALUE (e.g. n_train=100), repeatable")(f)
    f = click.option("--steps", type=int, default=None, help="run only the first N steps of the schedule")(f)
    f = click.option("--data", default=None, help="data file (paper preset)")(f)
    f = click.option("--preset", required=True, help="paper | names | digits")(f)
    return f


def _emit(obj, json_out: bool, out_path: Optional[str]):
    if out_path:
        write_json(out_path, obj)
    if json_out:
        sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def _example(task, i: int) -> str:
    ex = task.examples[i] if i < len(task.examples) else None
    if isinstance(ex, str):
        return ex
    if isinstance(ex, dict) and "label" in ex:
        return f"label {ex['label']}" + (" (canary)" if ex.get("canary") else "")
    return f"#{i}"


@audit.command("memorization")
@task_options
@click.option("--route", type=click.Choice(["loo", "first_order", "sketch", "subsampled"]), default="first_order",
              show_default=True)
@click.option("--metric", type=click.Choice(["loss", "margin", "token_accuracy"]), default="loss", show_default=True)
@click.option("--indices", default=None, help="examples to score: I,A:B (default: all)")
@click.option("--sketch", "sketch_dir", default=None, help="sketch directory (route sketch)")
@click.option("--models", type=int, default=8, show_default=True, help="models on random halves (route subsampled)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--top", type=int, default=10, show_default=True, help="examples listed (most memorized first)")
@click.option("--verify", type=int, default=0, show_default=True,
              help="also retrain leave-one-out for the top K examples and report the route's error there")
@click.option("--json", "json_out", is_flag=True)
@click.option("--out", "out_path", default=None, help="write the JSON result here")
def memorization_cmd(preset, data, steps, sets, route, metric, indices, sketch_dir, models, seed, top, verify,
                     json_out, out_path):
    """Self-influence of every training example (the change of its own loss/margin/accuracy when deleted)."""
    from ..audit import memorization

    task = _task(preset, data, steps, sets)
    idx = _indices(indices, task.n)
    sk = None
    if route == "sketch":
        if not sketch_dir:
            raise ValueError("route sketch needs --sketch DIR (make one with: delsketch sketch ...)")
        from ..sketch import Sketch

        if not Path(sketch_dir).is_dir():
            raise ValueError(f"sketch directory not found: {sketch_dir}")
        sk = Sketch.load(sketch_dir, task)
    if models < 2:
        raise ValueError("--models must be at least 2")
    r = memorization(task, route=route, metric=metric, indices=idx, sketch=sk, models=models, seed=seed)
    res = r.to_json()
    ranked = r.ranking()
    if verify:
        check = memorization(task, route="loo", metric=metric, indices=ranked[:verify])
        res["verification"] = {"route": "loo", "indices": check.indices, "loo": check.scores,
                               "route_scores": [r.scores[r.indices.index(i)] for i in check.indices],
                               "cost": check.cost}
    _emit(res, json_out, out_path)
    if not json_out:
        click.echo(f"{route} ({r.definition}); {r.orientation}; error bar: {r.error_bar}; cost {r.cost}")
        for i in ranked[:top]:
            k = r.indices.index(i)
            click.echo(f"{i:6d}  {_example(task, i):24s} {r.scores[k]:+.5g} ± {r.stderr[k]:.2g}")
        if verify:
            v = res["verification"]
            err = max(abs(a - b) for a, b in zip(v["loo"], v["route_scores"]))
            click.echo(f"verified against leave-one-out retraining of the top {len(v['loo'])}: largest error {err:.3g}")


@audit.command("canaries")
@task_options
@click.option("--repeats", default="1,2,4,8", show_default=True, help="copies of each canary")
@click.option("--per-repeat", type=int, default=1, show_default=True)
@click.option("--length", type=int, default=4, show_default=True, help="text canaries: secret length")
@click.option("--alphabet", default="abcdefgh", show_default=True, help="text canaries: alphabet of the secret")
@click.option("--degree", type=int, default=3, show_default=True, help="Taylor degree of the predicted exposure")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", is_flag=True)
@click.option("--out", "out_path", default=None)
def canaries_cmd(preset, data, steps, sets, repeats, per_repeat, length, alphabet, degree, seed, json_out, out_path):
    """Plant canaries, measure exposure, predict it after deleting copies and check against retraining."""
    from ..audit import canary_audit

    try:
        reps = [int(x) for x in repeats.split(",")]
    except ValueError:
        raise ValueError(f"bad --repeats {repeats!r} (expected e.g. 1,2,4,8)") from None
    if not 1 <= degree <= 20:
        raise ValueError("--degree must lie in [1, 20]")
    task = _task(preset, data, steps, sets)
    r = canary_audit(task, repeats=reps, per_repeat=per_repeat, seed=seed, degree=degree, length=length,
                     alphabet=alphabet)
    _emit(r, json_out, out_path)
    if not json_out:
        click.echo(f"canaries in {task.name} (|R| = {r['space']}): exposure as trained; after deleting copies "
                   "predicted [interval] vs retrained")
        for c in r["canaries"]:
            dl = "; ".join(f"{d['delete']}: {d['predicted']['exposure']:.3f} [{d['predicted']['interval'][0]:.3f}, "
                           f"{d['predicted']['interval'][1]:.3f}] vs {d['retrained']['exposure']:.3f}"
                           for d in c["deletions"])
            click.echo(f"{c['secret']!s:10s} x{c['copies']:<3d} {c['trained']['exposure']:.3f}   {dl}")


@audit.command("membership")
@task_options
@click.option("--models", type=int, default=16, show_default=True, help="shadow models on random halves")
@click.option("--bootstrap", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", default="delsketch-membership", show_default=True, help="roc.png, membership.json")
@click.option("--json", "json_out", is_flag=True)
def membership_cmd(preset, data, steps, sets, models, bootstrap, seed, out_dir, json_out):
    """Loss-threshold and LiRA (online, offline) membership inference with CIs; ROC on log-log axes."""
    from ..audit import membership_audit
    from .audit_plots import plot_roc

    if models < 4:
        raise ValueError("--models must be at least 4 (each target needs IN and OUT shadows)")
    task = _task(preset, data, steps, sets)
    r = membership_audit(task, models=models, seed=seed, bootstrap=bootstrap)
    out = Path(out_dir)
    plot_roc(r["attacks"], out / "roc.png")
    write_json(out / "membership.json", r)
    if json_out:
        sys.stdout.write(json.dumps(r, indent=1) + "\n")
        return
    for name, a in r["attacks"].items():
        ci = a["ci"]
        click.echo(f"{name:28s} AUC {a['auc']:.3f} [{ci['auc'][0]:.3f}, {ci['auc'][1]:.3f}]  TPR@0.1%FPR "
                   f"{a['tpr_at_fpr']['0.001']:.3f} [{ci['tpr_at_fpr']['0.001'][0]:.3f}, {ci['tpr_at_fpr']['0.001'][1]:.3f}]"
                   f"  TPR@1%FPR {a['tpr_at_fpr']['0.01']:.3f}")
    click.echo(f"Spearman(counterfactual memorization, LiRA per-example score) = {r['spearman_counterfactual_vs_lira']:.3f}")
    click.echo(f"wrote {out / 'roc.png'} and {out / 'membership.json'}")


def _int_list(s: str, option: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad {option} {s!r} (expected whole numbers separated by commas, e.g. 1,2,4,8)") from None
    if not out:
        raise ValueError(f"{option} is empty")
    return out


def run_experiment(name: str, preset, data, steps, sets, out: Path, route="loo", metric="loss", copies="1,2,4,8",
                   examples=16, neighbours=5, top=16, widths="8,16,32,64,128", width_key="hidden", sample=100,
                   models=16, seed=0) -> tuple[dict, list[Path]]:
    """Run one experiment, write ``<name>.json`` and its PNGs into ``out``; return the result and the files."""
    from ..audit import experiments as ex
    from . import audit_plots as ap

    if name == "size":
        ws = _int_list(widths, "--widths")
        sets = tuple(kv for kv in sets if kv.partition("=")[0] != width_key)
        res = ex.size(lambda w: _task(preset, data, steps, sets + (f"{width_key}={w}",)), widths=ws, sample=sample,
                      models=models, route=route, metric=metric, seed=seed, width_name=width_key)
        files = [out / "size.png"]
        ap.plot_size(res, files[0])
    else:
        task = _task(preset, data, steps, sets)
        if name == "repetition":
            res = ex.repetition(task, copies=_int_list(copies, "--copies"), examples=examples, route=route,
                                metric=metric, seed=seed)
            files = [out / "repetition.png"]
            ap.plot_repetition(res, files[0])
        else:
            res = ex.novelty(task, route=route, metric=metric, neighbours=neighbours, top=top)
            files = [out / "novelty.png", out / "novelty-examples.png"]
            ap.plot_novelty(res, files[0])
            ap.plot_most_memorized(res, files[1])
    files.append(out / f"{name}.json")
    write_json(files[-1], res)
    return res, files


def _experiment_lines(res: dict) -> list[str]:
    """A few plain lines summarizing an experiment (the CLI and the report)."""
    e = res["experiment"]
    if e == "repetition":
        L = [f"route {res['route']} ({res['definition']}); {res['orientation']}; error bar: {res['error_bar']}"]
        L += [f"{r['copies']:>3} occurrences: all deleted {r['all_copies']['mean']:+.4f} ± {r['all_copies']['stderr']:.2g}"
              f"   original only {r['one_copy']['mean']:+.4f} ± {r['one_copy']['stderr']:.2g}" for r in res["rows"]]
        return L
    if e == "novelty":
        L = [f"route {res['route']} ({res['definition']}); atypicality: {res['atypicality']['features']}"]
        L += [f"Spearman(memorization, {k}) = {v['rho']:.3f} (p = {v['p_value']:.2g}, {v['examples']} examples)"
              for k, v in res["spearman"].items()]
        return L
    w = res["width_name"]
    L = [f"route {res['route']}; self-influence over {len(res['sample'])} sampled examples; {res['models']} shadow models"]
    L += [f"{w} {r[w]:>5} ({r['parameters']} parameters): self-influence {r['self_influence']['mean']:+.4f} ± "
          f"{r['self_influence']['stderr']:.2g}, LiRA AUC {r['membership']['lira_online_fixed_variance']['auc']:.3f}, "
          f"loss-threshold AUC {r['membership']['loss_threshold']['auc']:.3f}" for r in res["rows"]]
    return L


@audit.command("experiment")
@click.argument("name", type=click.Choice(["repetition", "novelty", "size"]))
@task_options
@click.option("--route", type=click.Choice(["loo", "first_order"]), default="loo", show_default=True)
@click.option("--metric", type=click.Choice(["loss", "margin", "token_accuracy"]), default="loss", show_default=True)
@click.option("--copies", default="1,2,4,8", show_default=True, help="repetition: occurrences of each chosen example")
@click.option("--examples", type=int, default=16, show_default=True, help="repetition: examples duplicated")
@click.option("--neighbours", type=int, default=5, show_default=True, help="novelty: nearest neighbours")
@click.option("--top", type=int, default=16, show_default=True, help="novelty: most memorized examples shown")
@click.option("--widths", default="8,16,32,64,128", show_default=True, help="size: model widths")
@click.option("--width-key", default="hidden", show_default=True, help="size: the preset setting that is the width")
@click.option("--sample", type=int, default=100, show_default=True, help="size: examples scored per width")
@click.option("--models", type=int, default=16, show_default=True, help="size: shadow models per width")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", default="delsketch-experiment", show_default=True, help="PNG(s) and <name>.json")
@click.option("--json", "json_out", is_flag=True)
def experiment_cmd(name, preset, data, steps, sets, route, metric, copies, examples, neighbours, top, widths,
                   width_key, sample, models, seed, out_dir, json_out):
    """The causes of memorization: repetition (duplicate examples k times), novelty (memorization vs
    atypicality, the most memorized examples shown), size (memorization and membership inference vs width)."""
    res, files = run_experiment(name, preset, data, steps, sets, Path(out_dir), route, metric, copies, examples,
                                neighbours, top, widths, width_key, sample, models, seed)
    if json_out:
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
        return
    for line in _experiment_lines(res):
        click.echo(line)
    click.echo("wrote " + ", ".join(str(f) for f in files))


@audit.command("report")
@task_options
@click.option("--route", type=click.Choice(["first_order", "subsampled", "loo"]), default="first_order", show_default=True,
              help="memorization route for every example (a sketch route: use 'audit memorization --route sketch')")
@click.option("--verify", type=int, default=10, show_default=True, help="leave-one-out retrains of the top K")
@click.option("--models", type=int, default=16, show_default=True, help="shadow models for membership inference")
@click.option("--repeats", default="1,2,4,8", show_default=True, help="canary copies")
@click.option("--top", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--experiments", default="repetition,novelty,size", show_default=True,
              help="the causes of memorization to include (comma list, or 'none'); size needs a width setting")
@click.option("--widths", default="8,16,32,64,128", show_default=True, help="size experiment: model widths")
@click.option("--sample", type=int, default=100, show_default=True, help="size experiment: examples scored per width")
@click.option("--out", "out_dir", default="delsketch-audit", show_default=True)
def report_cmd(preset, data, steps, sets, route, verify, models, repeats, top, seed, experiments, widths, sample,
               out_dir):
    """Run the audit and write report.md + PNGs + report.json: most memorized examples (verified by
    leave-one-out retraining; digits as an image grid, text as a list), the histogram, membership inference with
    its ROC, canary exposure, and the three causes of memorization as experiments."""
    from ..audit import canary_audit, membership_audit, memorization
    from ..tasks import preset_overrides
    from .audit_plots import plot_exposure, plot_histogram, plot_most_memorized, plot_roc

    exps = [] if experiments.strip().lower() == "none" else [e.strip() for e in experiments.split(",") if e.strip()]
    for e in exps:
        if e not in ("repetition", "novelty", "size"):
            raise ValueError(f"unknown experiment {e!r} (choose from: repetition, novelty, size, or none)")
    task = _task(preset, data, steps, sets)
    reps = _int_list(repeats, "--repeats")
    out = Path(out_dir)
    mem = memorization(task, route=route, models=max(models, 2), seed=seed)
    ranked = mem.ranking()
    check = memorization(task, route="loo", indices=ranked[:verify]) if verify else None
    mia = membership_audit(task, models=models, seed=seed)
    can = canary_audit(task, repeats=reps, seed=seed)
    plot_histogram(mem.scores, out / "memorization.png", f"{task.name}: {mem.route} self-influence ({mem.metric})")
    from ..audit.experiments import _describe

    grid = {"task": task.name, "route": mem.route, "metric": mem.metric, "most_memorized": [
        {"index": i, "score": mem.scores[mem.indices.index(i)], **_describe(task, i)} for i in ranked[:top]]}
    plot_most_memorized(grid, out / "most-memorized.png")
    exp_res, skipped = {}, {}
    for e in exps:
        if e == "size" and "hidden" not in preset_overrides(preset):
            skipped[e] = f"preset {preset!r} has no width setting (hidden)"
            continue
        exp_res[e], _ = run_experiment(e, preset, data, steps, sets, out, route=route if route != "subsampled" else "loo",
                                       widths=widths, sample=sample, models=max(models, 4), seed=seed)
    plot_roc(mia["attacks"], out / "roc.png")
    plot_exposure(can["canaries"], out / "exposure.png")
    write_json(out / "report.json", {"memorization": mem.to_json(), "verification": check.to_json() if check else None,
                                     "membership": mia, "canaries": can, "experiments": exp_res,
                                     "experiments_skipped": skipped})
    L = [f"# Memorization audit: {task.name} ({task.n} training examples, {task.steps} steps)", "",
         "## Most memorized examples", "",
         f"Route `{mem.route}`: {mem.definition}. {mem.orientation}. Error bar: {mem.error_bar}. Cost: {mem.cost}.", "",
         "| rank | index | example | score | ± | leave-one-out (retrained) |", "|---|---|---|---|---|---|"]
    loo = dict(zip(check.indices, check.scores)) if check else {}
    for k, i in enumerate(ranked[:top]):
        j = mem.indices.index(i)
        L.append(f"| {k + 1} | {i} | {_example(task, i)} | {mem.scores[j]:+.4g} | {mem.stderr[j]:.2g} | "
                 f"{format(loo[i], '+.4g') if i in loo else ''} |")
    L += ["", "![most memorized](most-memorized.png)", "", "![histogram](memorization.png)", "", "## Membership inference", "",
          f"{mia['definition']}; {mia['models']} models, each in turn the target of the others (leave-one-model-out), "
          f"{mia['decisions']} decisions. 95 % bootstrap intervals.", "",
          "| attack | AUC | TPR @ 0.1 % FPR | TPR @ 1 % FPR |", "|---|---|---|---|"]
    for name, a in mia["attacks"].items():
        ci = a["ci"]
        L.append(f"| {name} | {a['auc']:.3f} [{ci['auc'][0]:.3f}, {ci['auc'][1]:.3f}] | "
                 + " | ".join(f"{a['tpr_at_fpr'][f]:.3f} [{ci['tpr_at_fpr'][f][0]:.3f}, {ci['tpr_at_fpr'][f][1]:.3f}]"
                              for f in ("0.001", "0.01")) + " |")
    L += ["", f"Spearman between the counterfactual memorization of each example (same models) and LiRA's per-example "
          f"score: {mia['spearman_counterfactual_vs_lira']:.3f}.", "", "![ROC](roc.png)", "", "## Canaries", "",
          f"{can['definition']}. |R| = {can['space']}.", "",
          "| secret | copies | exposure | deleted | predicted [interval] | retrained | agrees |", "|---|---|---|---|---|---|---|"]
    for c in can["canaries"]:
        for d in c["deletions"]:
            p = d["predicted"]
            L.append(f"| {c['secret']} | {c['copies']} | {c['trained']['exposure']:.3f} | {d['delete']} ({d['deleted']}) | "
                     f"{p['exposure']:.3f} [{p['interval'][0]:.3f}, {p['interval'][1]:.3f}] | "
                     f"{d['retrained']['exposure']:.3f} | {'yes' if d['within_error_bar'] else 'NO'} |")
    L += ["", "![exposure](exposure.png)", ""]
    if exps:
        L += ["## The causes of memorization", ""]
        titles = {"repetition": "Repetition: duplicated examples", "novelty": "Novelty: atypical examples",
                  "size": "Size: model width"}
        figs = {"repetition": ["repetition.png"], "novelty": ["novelty.png", "novelty-examples.png"], "size": ["size.png"]}
        for e in exps:
            L += [f"### {titles[e]}", ""]
            if e in skipped:
                L += [f"Not run: {skipped[e]}.", ""]
                continue
            L += [f"    {line}" for line in _experiment_lines(exp_res[e])] + [""]
            L += [f"![{e}]({f})" for f in figs[e]] + [f"", f"Every plotted number: `{e}.json`.", ""]
    from ..io import atomic_write_bytes

    atomic_write_bytes(out / "report.md", "\n".join(L).encode())
    click.echo(f"wrote {out / 'report.md'}")
