"""Differentially private training: DP-SGD as a gradient transform for any :class:`~delsketch.training.Task`
(:func:`make_private`, or ``Task.from_module(..., privacy=DP(...))``) and accounting with Opacus's accountants
(optional dependency ``delsketch[privacy]``). Membership inference (does it protect?) is :mod:`delsketch.audit.mia`.

A sketch of a DP run: the clip follows the branch of each example's degree-0 gradient norm;
``diagnostics(task)`` (or ``task.gradient.diagnostics()``, a duck-typed method the sketch layer may read
without importing this package) counts example-steps within ``boundary_margin`` of the clipping bound after a
run, and :func:`fold_stability` folds that count into a stability report's verdict."""

from .accounting import ACCOUNTANTS, PrivacyError, epsilon, noise_multiplier_for
from .audit import one_run_epsilon_lower_bound
from .config import DP
from .dpsgd import DPGradient, PerExampleGradientError, step_noise
from .boundary import fold_stability
from .evaluate import accuracy, digits_test_data, losses, shifted
from .private import (FIXED_SCHEDULE_CAVEAT, diagnostics, make_private, poisson_schedule, privacy_of,
                      private_factory)

__all__ = [
    "DP", "make_private", "private_factory", "privacy_of", "diagnostics", "poisson_schedule", "epsilon", "noise_multiplier_for",
    "ACCOUNTANTS", "PrivacyError", "PerExampleGradientError", "DPGradient", "step_noise", "FIXED_SCHEDULE_CAVEAT",
    "fold_stability", "accuracy", "digits_test_data", "shifted", "losses",
    "one_run_epsilon_lower_bound",
]
