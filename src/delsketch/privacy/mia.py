"""Does it protect? A loss-threshold membership-inference attack (members have lower loss), and folding the
clipping-boundary count of a DP ring run into a stability verdict."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["loss_threshold_mia", "fold_stability"]


def loss_threshold_mia(member_losses: Sequence[float], nonmember_losses: Sequence[float],
                       fprs: Sequence[float] = (0.001, 0.01, 0.1)) -> dict:
    """ROC of the score ``-loss`` separating training members from non-members: AUC and the largest TPR at each
    FPR <= f (the empirical ROC; with N non-members FPRs below 1/N can only be met at FPR 0, reported as
    ``fpr_resolution``). One model, global threshold: the weakest standard attack (LiRA-style per-example
    calibration with shadow models is stronger and is not implemented here)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    mem = np.asarray(member_losses, dtype=np.float64)
    non = np.asarray(nonmember_losses, dtype=np.float64)
    if mem.size == 0 or non.size == 0:
        raise ValueError("membership inference needs at least one member and one non-member loss")
    if not (np.isfinite(mem).all() and np.isfinite(non).all()):
        raise ValueError("membership inference: a loss is not finite")
    y = np.concatenate([np.ones(mem.size), np.zeros(non.size)])
    score = -np.concatenate([mem, non])
    fpr, tpr, _ = roc_curve(y, score)
    out = {"auc": float(roc_auc_score(y, score)), "members": int(mem.size), "nonmembers": int(non.size),
           "fpr_resolution": 1.0 / non.size, "tpr_at_fpr": {}}
    for f in fprs:
        ok = fpr <= f + 1e-15
        out["tpr_at_fpr"][str(f)] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def fold_stability(report: dict, diagnostics: dict) -> dict:
    """A copy of a stability report (``Sketch.stability``) with the DP run's clipping-boundary count folded in:
    ``dp_near_boundary`` and, if any example-step lay within the margin of C, the verdict prefixed with
    ``"unreliable near the clipping boundary"`` (the clip's series follows one branch; a deletion that moves a
    near-boundary gradient norm across C changes the branch)."""
    out = dict(report)
    near = int(diagnostics.get("near_boundary", 0))
    out["dp_near_boundary"] = near
    out["dp_near_boundary_examples"] = list(diagnostics.get("near_boundary_examples", []))
    if near > 0:
        out["verdict"] = (f"unreliable near the clipping boundary ({near} example-steps within "
                          f"{diagnostics.get('boundary_margin')} of C); {report.get('verdict', '')}").rstrip("; ")
    return out
