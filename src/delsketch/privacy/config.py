"""The settings of a differentially private run (:class:`DP`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from .accounting import ACCOUNTANTS, PrivacyError

__all__ = ["DP"]


@dataclass(frozen=True)
class DP:
    """DP-SGD settings. Give either ``noise_multiplier`` or ``target_epsilon`` (with ``target_delta``).

    noise_multiplier: sigma; each step adds Gaussian noise of standard deviation ``sigma * max_grad_norm`` to the
        sum of clipped per-example gradients. ``0`` switches the noise off (no privacy: epsilon is infinite).
    max_grad_norm: C, the clipping bound of every example's gradient (its L2 norm over all parameters).
    sample_rate: q, the probability that an example is in a step's batch (Poisson sampling); default: the task's
        mean batch size / n.
    seed: seeds the Poisson schedule and the noise (a DP run is a deterministic function of the example weights).
    target_epsilon, target_delta: calibrate sigma so that the run spends at most this epsilon at this delta.
    delta: the delta at which epsilon is reported when sigma is given (default ``target_delta`` or 1e-5).
    accountant: ``"prv"`` (Opacus's default) or ``"rdp"``.
    poisson: ``True`` (default) - a seeded Poisson schedule with the task's number of steps, variable batch
        sizes, empty batches allowed (noise only); the accountant's epsilon is a guarantee. ``False`` - keep the
        task's fixed schedule; the epsilon reported is what the accountant gives for Poisson sampling at the same
        rate, which is NOT a proven guarantee for shuffled fixed-size batches (the run's config says so).
    clip_eps: stabilizer in the clip factor ``min(1, C / (||g_i|| + clip_eps))`` (Opacus's convention, 1e-6).
    boundary_margin: an example whose gradient norm lies within this relative distance of C counts as near the
        clipping boundary (where the non-analytic clip makes a ring run's series unreliable).
    """

    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    sample_rate: Optional[float] = None
    seed: int = 0
    target_epsilon: Optional[float] = None
    target_delta: Optional[float] = None
    delta: Optional[float] = None
    accountant: str = "prv"
    poisson: bool = True
    clip_eps: float = 1e-6
    boundary_margin: float = 0.01

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (0 <= self.noise_multiplier < math.inf):
            raise PrivacyError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None:
            if not (isinstance(self.target_epsilon, (int, float)) and 0 < self.target_epsilon < math.inf):
                raise PrivacyError(f"target epsilon must be a positive finite number, got {self.target_epsilon}")
            if self.target_delta is None:
                raise PrivacyError("target_epsilon needs target_delta")
        if not (0 < self.max_grad_norm < math.inf):
            raise PrivacyError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {self.accountant!r} (choose from: {', '.join(ACCOUNTANTS)})")
        if not 0 <= self.clip_eps < self.max_grad_norm:
            raise PrivacyError(f"clip_eps must lie in [0, max_grad_norm), got {self.clip_eps}")
        if not 0 <= self.boundary_margin < 1:
            raise PrivacyError(f"boundary_margin must lie in [0, 1), got {self.boundary_margin}")

    @property
    def report_delta(self) -> float:
        if self.target_delta is not None:
            return float(self.target_delta)
        return 1e-5 if self.delta is None else float(self.delta)

    def to_json(self) -> dict:
        return asdict(self)

    def apply(self, task):
        """``make_private(task, self)``: what ``Task.from_module(..., privacy=DP(...))`` calls."""
        from .private import make_private

        return make_private(task, self)
