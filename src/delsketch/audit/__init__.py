"""The memorization audit: which training examples a model memorizes, why, and how much.

Modules: ``outputs`` (per-example loss, margin, per-token accuracy, confidence), ``runs`` (many trainings behind
one map function), ``memorization`` (self-influence by four routes), ``canaries`` (planting and exposure),
``mia`` (ROC metrics, loss threshold, LiRA), ``experiments`` (repetition, novelty, size).
"""

from .canaries import Canary, candidate_losses, canary_audit, exposure, make_canaries, plant, predicted_exposure
from .experiments import atypicality, duplicate, novelty, repetition, size
from .memorization import ROUTES, MemorizationResult, memorization, sketch_self_influence
from .mia import bootstrap_metrics, lira_attack, lira_scores, loss_threshold, membership_audit, roc_metrics, shadow_statistics
from .outputs import view
from .runs import half_masks, map_jobs

__all__ = [
    "Canary", "candidate_losses", "canary_audit", "exposure", "make_canaries", "plant", "predicted_exposure",
    "ROUTES", "MemorizationResult", "memorization", "sketch_self_influence", "bootstrap_metrics", "lira_attack",
    "lira_scores", "loss_threshold", "membership_audit", "roc_metrics", "shadow_statistics", "view", "half_masks",
    "map_jobs", "atypicality", "duplicate", "novelty", "repetition", "size",
]
