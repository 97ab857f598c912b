"""``make_private(task, DP(...)) -> Task``: the one entry point that turns any task into a DP-SGD run."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import numpy as np
import torch

from ..training import Task
from .accounting import PrivacyError, check_delta, epsilon, noise_multiplier_for
from .config import DP
from .dpsgd import DPGradient, PerExampleGradientError

__all__ = ["make_private", "private_factory", "poisson_schedule", "privacy_of", "diagnostics",
           "FIXED_SCHEDULE_CAVEAT"]

FIXED_SCHEDULE_CAVEAT = ("fixed (shuffled) batches: epsilon is the accountant's value for Poisson sampling at the "
                         "same rate, not a proven guarantee for this schedule")

# layers whose output for one example depends on the other examples of the batch: no per-example gradient
_BATCH_COUPLED = ("BatchNorm", "SyncBatchNorm")


def poisson_schedule(n: int, sample_rate: float, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches, each example in each batch independently with probability ``sample_rate`` (seeded)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x9015])))
    return [np.flatnonzero(rng.random(n) < sample_rate).tolist() for _ in range(steps)]


def _check_model(task: Task) -> None:
    model = task.model
    if model is None or not isinstance(model, torch.nn.Module):
        return
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if any(kind.startswith(b) for b in _BATCH_COUPLED) and getattr(mod, "training", True):
            raise PerExampleGradientError(
                f"task {task.name!r}: layer {name or '<model>'} ({kind}) mixes the examples of a batch, so per-example "
                "gradients are undefined; use GroupNorm or LayerNorm, or put the layer in eval mode")


def _check_per_example(task: Task, hook: DPGradient, schedule: list[list[int]]) -> None:
    """Probe the first batch of two or more examples: per-example gradients must be computable, and each example's
    loss in the batch must equal its loss alone (else the 'per-example' losses couple examples)."""
    batch = next((b for b in schedule if len(b) >= 2), None) or next((b for b in schedule if b), None)
    if batch is None:
        return
    idx = torch.tensor(batch[:4], dtype=torch.long)
    params = task.init_params()
    with torch.no_grad():
        try:
            together = task.example_losses(params, idx)
            alone = torch.cat([task.example_losses(params, idx[j : j + 1]) for j in range(len(idx))])
        except Exception as e:
            raise PerExampleGradientError(f"task {task.name!r}: example_losses fails on a batch "
                                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if together.shape != alone.shape or not torch.allclose(together, alone, rtol=1e-9, atol=1e-12):
        raise PerExampleGradientError(f"task {task.name!r}: an example's loss depends on the other examples of its "
                                      "batch (batch statistics?), so per-example gradients are undefined")
    hook.per_example({k: v.requires_grad_(True) for k, v in params.items()}, task.example_losses, idx)


def make_private(task: Task, dp: DP) -> Task:
    """A new task: ``task`` trained with DP-SGD (``dp``); see :class:`DP` and :mod:`delsketch.privacy.dpsgd`.

    Keeps the model, losses, optimizer (with its learning-rate schedule) and number of steps; replaces the schedule
    by a seeded Poisson schedule (unless ``dp.poisson`` is false) and sets ``task.gradient`` to the DP-SGD
    transform. ``task.config["privacy"]`` records the settings, sigma, sample rate, steps, delta, the epsilon spent
    (accountant) and the sampling caveat; the fingerprint covers them. Raises :class:`PrivacyError` (a one-line
    message) for bad settings or a task whose per-example gradients cannot be computed."""
    if not isinstance(dp, DP):
        raise PrivacyError(f"make_private needs a DP(...) configuration, got {type(dp).__name__}")
    if task.gradient is not None:
        raise PrivacyError(f"task {task.name!r} already has a gradient transform; make_private takes a plain task")
    if task.normalization != "fixed":
        raise PrivacyError(f"task {task.name!r}: DP-SGD divides by the expected batch size; normalization "
                           f"{task.normalization!r} would leak batch composition (use 'fixed')")
    n, steps = task.n, len(task.schedule)
    if steps == 0:
        raise PrivacyError(f"task {task.name!r} has no steps")
    mean_batch = sum(len(b) for b in task.schedule) / steps
    q = float(dp.sample_rate) if dp.sample_rate is not None else mean_batch / n
    if not 0 < q <= 1:
        raise PrivacyError(f"sample rate must lie in (0, 1], got {q}")
    delta = dp.report_delta
    check_delta(delta, n)
    _check_model(task)

    if dp.target_epsilon is not None:
        sigma = noise_multiplier_for(dp.target_epsilon, delta, q, steps, dp.accountant)
    else:
        sigma = float(dp.noise_multiplier)
    eps = epsilon(sigma, q, steps, delta, dp.accountant)

    if dp.poisson:
        schedule = poisson_schedule(n, q, steps, dp.seed)
        denominator: Optional[float] = q * n
    else:
        schedule = [list(b) for b in task.schedule]
        denominator = None
    hook = DPGradient(dp.max_grad_norm, sigma, dp.seed, denominator, dp.clip_eps, dp.boundary_margin, task.name,
                      model=task.model)
    _check_per_example(task, hook, schedule)
    privacy = {
        **dp.to_json(),
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps": steps,
        "delta": delta,
        "epsilon": eps if math.isfinite(eps) else None,
        "sampling": "poisson" if dp.poisson else "fixed",
        "caveat": None if dp.poisson else FIXED_SCHEDULE_CAVEAT,
        "denominator": denominator,
    }
    return dataclasses.replace(task, schedule=schedule, gradient=hook, config={**task.config, "privacy": privacy})


def _build_private(base: Callable[[], Task], dp: DP) -> Task:
    return make_private(base(), dp)


def private_factory(base: Callable[[], Task], dp: DP) -> Callable[[], Task]:
    """A picklable zero-argument callable that rebuilds ``make_private(base(), dp)``, for worker processes:
    ``precompute(private_task, ..., task_factory=private_factory(tasks.factory(spec), dp))``. (A worker given
    only the plain task's factory would rebuild the non-private task, whose fingerprint the precompute refuses.)"""
    if not isinstance(dp, DP):
        raise PrivacyError(f"private_factory needs a DP(...) configuration, got {type(dp).__name__}")
    return functools.partial(_build_private, base, dp)


def privacy_of(task: Task, steps: Optional[int] = None, delta: Optional[float] = None,
               accountant: Optional[str] = None) -> dict:
    """The privacy a DP task's run spends: ``{epsilon, delta, noise_multiplier, sample_rate, steps, accountant,
    sampling, caveat}``; ``steps`` (default: the whole schedule) and ``delta``/``accountant`` may be changed.
    Raises :class:`PrivacyError` for a task made without :func:`make_private`."""
    p = task.config.get("privacy")
    if p is None or task.gradient is None:
        raise PrivacyError(f"task {task.name!r} is not a private task (use make_private)")
    steps = len(task.schedule) if steps is None else int(steps)
    delta = p["delta"] if delta is None else float(delta)
    check_delta(delta, task.n)
    accountant = accountant or p["accountant"]
    eps = epsilon(p["noise_multiplier"], p["sample_rate"], steps, delta, accountant)
    return {"epsilon": eps, "delta": delta, "noise_multiplier": p["noise_multiplier"], "sample_rate": p["sample_rate"],
            "steps": steps, "accountant": accountant, "sampling": p["sampling"], "caveat": p["caveat"]}


def diagnostics(task: Task) -> dict:
    """The clipping counts of the task's last run in this process (:meth:`DPGradient.diagnostics`)."""
    if not isinstance(task.gradient, DPGradient):
        raise PrivacyError(f"task {task.name!r} is not a private task (use make_private)")
    return task.gradient.diagnostics()
