"""``delsketch train``: train a preset, optionally with DP-SGD, and report the privacy spent and the accuracy.

Registered on the ``delsketch`` group by one line in :mod:`delsketch.apps.cli`. Bad input raises ``ValueError``
(``PrivacyError`` is one), which the CLI's entry point turns into one ``error:`` line and exit status 2."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

__all__ = ["train_command"]


def _task(preset: str, data, steps, epochs):
    from ..tasks import build_from_spec, preset_overrides

    if data is not None and not Path(data).exists():
        raise ValueError(f"data file not found: {data}")
    spec = {"preset": preset, "data": str(Path(data).resolve()) if data else None, "steps": steps}
    if epochs is not None:
        if "epochs" not in preset_overrides(preset):
            raise ValueError(f"preset {preset!r} has no --epochs")
        if epochs < 1:
            raise ValueError("--epochs must be at least 1")
        spec["epochs"] = epochs
    return build_from_spec(spec)


@click.command("train", help="Train a preset, with DP-SGD when --dp-epsilon or --dp-noise is given; print the "
                             "privacy spent (epsilon at delta) and the test accuracy.")
@click.option("--preset", required=True, help="paper | names | digits")
@click.option("--data", default=None, help="data file (required by the paper preset: names.txt)")
@click.option("--steps", type=int, default=None, help="run only the first N steps of the preset's schedule")
@click.option("--epochs", type=int, default=None, help="the preset's number of epochs (digits)")
@click.option("--dp-epsilon", "dp_epsilon", type=float, default=None, help="target epsilon (calibrates the noise)")
@click.option("--dp-delta", "dp_delta", type=float, default=None, help="delta, in (0, 1/n)")
@click.option("--dp-noise", "dp_noise", type=float, default=None, help="noise multiplier sigma (instead of --dp-epsilon)")
@click.option("--dp-clip", "dp_clip", type=float, default=1.0, show_default=True, help="per-example clipping norm C")
@click.option("--dp-sample-rate", "dp_rate", type=float, default=None,
              help="Poisson sample rate (default: the preset's batch size / n)")
@click.option("--dp-fixed-batches", "fixed", is_flag=True,
              help="keep the preset's fixed batches (epsilon is then not a proven guarantee)")
@click.option("--accountant", type=click.Choice(["prv", "rdp"]), default="prv", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the Poisson schedule and the noise")
@click.option("--json", "json_out", is_flag=True, help="print JSON instead of a table")
def train_command(preset, data, steps, epochs, dp_epsilon, dp_delta, dp_noise, dp_clip, dp_rate, fixed, accountant,
                  seed, json_out):
    from ..privacy import DP, accuracy, diagnostics, digits_test_data, make_private, privacy_of, shifted
    from ..training import train

    private = dp_epsilon is not None or dp_noise is not None
    others = [name for name, v in (("--dp-delta", dp_delta), ("--dp-sample-rate", dp_rate)) if v is not None]
    others += ["--dp-fixed-batches"] if fixed else []
    if not private and others:
        raise ValueError(f"{', '.join(others)} given without --dp-epsilon or --dp-noise: refusing to train without "
                         "the privacy asked for")
    if dp_epsilon is not None and dp_noise is not None:
        raise ValueError("give --dp-epsilon or --dp-noise, not both")
    if dp_epsilon is not None and dp_delta is None:
        raise ValueError("--dp-epsilon needs --dp-delta")
    task = _task(preset, data, steps, epochs)
    if private:
        if dp_epsilon is not None:
            dp = DP(target_epsilon=dp_epsilon, target_delta=dp_delta, max_grad_norm=dp_clip, sample_rate=dp_rate,
                    seed=seed, accountant=accountant, poisson=not fixed)
        else:
            dp = DP(noise_multiplier=dp_noise, delta=dp_delta, max_grad_norm=dp_clip, sample_rate=dp_rate, seed=seed,
                    accountant=accountant, poisson=not fixed)
        task = make_private(task, dp)
    t0 = time.perf_counter()
    params = train(task)
    seconds = time.perf_counter() - t0
    res = {"preset": preset, "steps": len(task.schedule), "seconds": seconds, "private": private}
    if private:
        spent = privacy_of(task)
        res.update({k: spent[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "accountant",
                                         "sampling", "caveat")})
        d = diagnostics(task)
        res["max_grad_norm"] = dp_clip
        res["clipped_fraction"] = d["clipped"] / d["examples"] if d["examples"] else None
        res["near_clip_boundary"] = d["near_boundary"]
    else:
        res.update({"epsilon": math.inf, "delta": None})
    if task.config.get("preset") == "digits" and task.config["split"]["n_test"] > 0:
        X, y = digits_test_data(task)
        res["test_accuracy"] = accuracy(task, params, X, y)
        res["shifted_test_accuracy"] = accuracy(task, params, shifted(X), y)
        res["test_loss"] = float(task.query(params, "test:mean"))
    if json_out:
        out = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in res.items()}
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
        return
    lines = []
    if private:
        lines.append(f"privacy: epsilon {res['epsilon']:.4g} at delta {res['delta']:g} ({res['accountant']} accountant; "
                     f"noise multiplier {res['noise_multiplier']:.4g}, clip {dp_clip:g}, sample rate "
                     f"{res['sample_rate']:.4g}, {res['steps']} steps, {res['sampling']} sampling)")
        if res["caveat"]:
            lines.append(f"caveat: {res['caveat']}")
        lines.append(f"clipped: {100 * (res['clipped_fraction'] or 0):.1f}% of example-steps; "
                     f"{res['near_clip_boundary']} within the boundary margin")
    else:
        lines.append(f"privacy: none (epsilon = inf), {res['steps']} steps")
    if "test_accuracy" in res:
        lines.append(f"test accuracy {100 * res['test_accuracy']:.1f}% (shifted: {100 * res['shifted_test_accuracy']:.1f}%), "
                     f"test loss {res['test_loss']:.4f}")
    lines.append(f"trained in {seconds:.2f} s")
    click.echo("\n".join(lines))
