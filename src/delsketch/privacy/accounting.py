"""Privacy accounting with Opacus's accountants (RDP and PRV): the epsilon a run spends, and the noise
multiplier that reaches a target epsilon. Opacus is an optional dependency (``pip install delsketch[privacy]``);
it is imported here and nowhere else."""

from __future__ import annotations

import contextlib
import math
import warnings

__all__ = ["ACCOUNTANTS", "PrivacyError", "epsilon", "noise_multiplier_for", "check_delta"]

ACCOUNTANTS = ("rdp", "prv")


class PrivacyError(ValueError):
    """Bad privacy settings or a task that cannot be trained with the privacy asked for (one-line message)."""


def _opacus_accountant(name: str):
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {name!r} (choose from: {', '.join(ACCOUNTANTS)})")
    try:
        from opacus.accountants import create_accountant
    except ImportError:
        raise PrivacyError("privacy accounting needs opacus: pip install 'delsketch[privacy]'") from None
    return create_accountant(name)


@contextlib.contextmanager
def _quiet(accountant: str):
    """PRV bounds its domain with an RDP computation whose 'largest alpha' warning is irrelevant to PRV's answer."""
    with warnings.catch_warnings():
        if accountant == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def check_delta(delta: float, n: int) -> None:
    """delta must lie in (0, 1/n): a delta of 1/n or more allows releasing one example outright."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1.0 / n):
        raise PrivacyError(f"delta must lie in (0, 1/n) = (0, {1.0 / n:.3g}) for n = {n} training examples, got {delta}")


def _check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise PrivacyError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise PrivacyError(f"steps must be a whole number >= 0, got {steps}")


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """The epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (Opacus's accountant).

    ``inf`` without noise; ``0`` for zero steps."""
    _check_run(noise_multiplier, sample_rate, steps)
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must lie in (0, 1), got {delta}")
    acc = _opacus_accountant(accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    # the accountants keep (noise, rate, count) histories; one entry for the whole run
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with _quiet(accountant):
        return float(acc.get_epsilon(delta=float(delta)))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "prv", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose run spends at most ``target_epsilon``
    (Opacus's ``get_noise_multiplier``)."""
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise PrivacyError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    _check_run(1.0, sample_rate, steps)
    if steps == 0:
        raise PrivacyError("a run of zero steps needs no noise: nothing to calibrate")
    _opacus_accountant(accountant)  # the one-line error if opacus is missing
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet(accountant):
            sigma = get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                         sample_rate=float(sample_rate), steps=int(steps), accountant=accountant,
                                         epsilon_tolerance=float(tolerance))
    except ValueError as e:
        raise PrivacyError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta}: "
                           f"{str(e).splitlines()[0]}") from None
    return float(sigma)
