"""Folding the clipping-boundary count of a DP ring run into a stability verdict. (Membership inference, the
test of whether DP protects, lives in :mod:`delsketch.audit.mia`.)"""

from __future__ import annotations

__all__ = ["fold_stability"]


def fold_stability(report: dict, diagnostics: dict) -> dict:
    """A copy of a stability report with the DP run's clipping-boundary count folded in (what
    ``Sketch.stability`` does itself for a DP task, :func:`delsketch.sketch.stability.fold_clipping`): a
    ``clipping`` entry, ``dp_near_boundary`` and, if any example-step lay within the margin of C, the verdict
    prefixed with ``"unreliable near the clipping boundary"`` (the clip's series follows one branch; a deletion that
    moves a near-boundary gradient norm across C changes the branch)."""
    from ..sketch.stability import fold_clipping

    out = fold_clipping(report, {"near_boundary": 0, **diagnostics})
    out["dp_near_boundary"] = int(diagnostics.get("near_boundary", 0))
    out["dp_near_boundary_examples"] = list(diagnostics.get("near_boundary_examples", []))
    return out
