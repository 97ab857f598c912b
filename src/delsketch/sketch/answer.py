"""The best answer delsketch has for a deletion question, chosen by cost and estimated error, and said so.

Methods (``Sketch.predict(..., method=...)``, ``delsketch predict --method``):

* ``retrain`` - real retraining, one run per deletion set: exact. ``auto``'s first choice, whenever every set
  asked retrains within the budget (``budget_s``, default 30 s, from the measured cost of one run).
* ``loo_sum`` - the exact leave-one-out effects of the examples in D, summed: exact for single deletions, keeps
  each example's own nonlinearity (what first order misses), leaves out interactions between deleted examples.
  The n leave-one-out parameter sets are computed once and kept beside the sketch, so every later output costs
  n evaluations. ``auto``'s second choice, when they are cached or cost no more than the sketch's own precompute
  (deletions with weight 1 only).
* ``first_order`` - the exact first-order term, by reverse mode through the run (cached beside the sketch).
  ``auto``'s third choice, when neither retraining the sets nor the n leave-one-out runs fit the budget. Its
  error bar is what it leaves out, the terms of degree 2..k, as the sketch estimates them (|estimate| + 1 s.e.).
* ``first_order+sketch`` - the exact degree-1 term plus the sketch's estimates of the higher terms where they
  lower the estimated error: for every set and output element the truncation degree r minimizes (sampling
  variance of the added terms 2..r) + (estimated size of the first term left out)^2, among the degrees whose
  added terms each exceed 2 standard errors. Measured (docs/answers.md) at 128 directions it was no better than
  first order alone, so ``auto``'s third choice is ``first_order``; ask for it by name.
* ``sketch`` - the sketch alone (unbiased, error bars; noisy for small deletions).
* ``exact`` - the exact Taylor series along each set (one ring run per set).

Every answer states its method, degree, error bar and cost; where retraining every set would be cheaper than
what was done, or the error bar is wider than the change could plausibly be, a note says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from typing import Optional

import torch
from safetensors.torch import load_file

from ..io import atomic_save_tensors, sha256_file, write_json
from ..training import retrain, train
from ..training.outputs import Output
from .core import StabilityWarning
from .exact import deletion_ring_run
from .predict import Prediction, check_sets, deletion_matrix, estimate as sketch_estimate, predict as sketch_predict

METHODS = ("auto", "sketch", "first_order+sketch", "first_order", "loo_sum", "exact", "retrain")
DEFAULT_BUDGET_S = 30.0


# ----------------------------------------------------------------------------------------------
# measured costs, recorded beside the sketch
# ----------------------------------------------------------------------------------------------


def costs(sketch) -> dict:
    """Seconds: one plain training run (measured once, recorded in ``costs.json``) and the precompute (the sum of
    the recorded chunk times)."""
    path = sketch.path / "costs.json"
    rec = {}
    if path.exists():
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            rec = {}
    if rec.get("fingerprint") != sketch.fingerprint or not isinstance(rec.get("retrain_s"), (int, float)):
        t0 = time.perf_counter()
        sketch._trained = train(sketch.task)
        rec = {"fingerprint": sketch.fingerprint, "retrain_s": round(time.perf_counter() - t0, 4)}
        _write(path, rec)
    tpath = sketch.path / "timings.json"
    try:
        chunks = json.loads(tpath.read_text()).get("chunks", {})
        rec["precompute_s"] = round(sum(float(v) for v in chunks.values()), 3)
    except (OSError, ValueError, AttributeError):
        rec["precompute_s"] = None
    return rec


def trained(sketch) -> dict:
    """The plain training run's parameters (once per Sketch): the reference every exact change is taken from."""
    if sketch._trained is None:
        sketch._trained = train(sketch.task)
    return sketch._trained


def _write(path, obj) -> None:
    try:
        write_json(path, obj)
    except OSError:  # a read-only sketch directory: the measurement is simply not kept
        pass


# ----------------------------------------------------------------------------------------------
# exact per-example effects, cached beside the sketch
# ----------------------------------------------------------------------------------------------


def _effects_cached(sketch, out: Output, kind: str, compute) -> torch.Tensor:
    """``[n, P]`` effects of ``kind`` for ``out``: from memory (:meth:`Sketch.memo`), from ``effects/`` (adopted
    only when the file hashes to its record and carries this task's fingerprint), or computed and stored."""
    def from_disk_or_compute():
        fp = sketch.fingerprint
        if out.cache_key is None:  # a plain callable has no stable name to file it under
            return compute()
        digest = hashlib.sha256(f"{kind}\0{out.cache_key}\0{fp}".encode()).hexdigest()[:24]
        path = sketch.path / "effects" / f"{kind}-{digest}.safetensors"
        got = _adopt(path, fp, lambda t: set(t) == {"effects"} and t["effects"].shape[0] == sketch.n)
        if got is not None:
            return got["effects"]
        E = compute()
        _keep(path, {"effects": E.contiguous()}, fp, kind, {"output": out.cache_key})
        return E

    return sketch.memo(kind, out, from_disk_or_compute)


def _adopt(path, fp: str, fits) -> Optional[dict]:
    """Tensors of a cache file beside the sketch, adopted only when the file hashes to the sha256 recorded in its
    ``.json`` index, carries this task's fingerprint and ``fits(tensors)``; else None (it is recomputed)."""
    index = path.with_suffix(".json")
    if not (path.exists() and index.exists()):
        return None
    try:
        rec = json.loads(index.read_text())
        if rec.get("sha256") != sha256_file(path) or rec.get("fingerprint") != fp:
            return None
        got = load_file(path)
        return got if fits(got) else None
    except (OSError, ValueError, AttributeError):
        return None


def _keep(path, tensors: dict, fp: str, kind: str, extra: dict) -> None:
    """Write a cache file and its index atomically (a read-only sketch directory keeps nothing)."""
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_save_tensors(path, tensors, {"fingerprint": fp, "kind": kind})
        write_json(path.with_suffix(".json"), {"sha256": sha256_file(path), "fingerprint": fp, "kind": kind, **extra})
    except OSError:
        pass


def first_order_effects(sketch, out: Output) -> torch.Tensor:
    """Exact d f / d w_i for every example, ``[n, P]``."""
    from .exact import first_order

    def compute():
        E = first_order(sketch.task, out)
        flat = torch.cat([E[k].reshape(sketch.n, -1) for k in sorted(E)], 1) if isinstance(E, dict) else E
        return flat.reshape(sketch.n, -1)

    return _effects_cached(sketch, out, "first_order", compute)


#: leave-one-out parameters up to this many bytes are kept beside the sketch (then any later output's exact
#: leave-one-out effects cost n evaluations, no retraining); larger models retrain n times per output
LOO_PARAMS_BUDGET = 1 << 30


def loo_params(sketch) -> Optional[dict]:
    """The parameters of all n leave-one-out retrains, ``{name: [n, *shape]}``, from ``effects/loo-params`` (adopted
    only when it hashes to its record and carries this task's fingerprint) or computed and stored; None when they
    would exceed :data:`LOO_PARAMS_BUDGET`."""
    if sketch._loo_params is not None:
        return sketch._loo_params
    base = sketch.base_params()  # names and shapes of the parameters
    size = sketch.n * sum(v.numel() * 8 for v in base.values())
    if size > LOO_PARAMS_BUDGET:
        return None
    fp = sketch.fingerprint
    path = sketch.path / "effects" / f"loo-params-{fp[:24]}.safetensors"
    got = _adopt(path, fp, lambda t: set(t) == set(base) and all(t[k].shape == (sketch.n, *base[k].shape) for k in base))
    if got is None:
        t0 = time.perf_counter()
        runs = [retrain(sketch.task, [i]) for i in range(sketch.n)]
        got = {k: torch.stack([r[k].detach() for r in runs]).contiguous() for k in base}
        _keep(path, got, fp, "loo-params", {"seconds": round(time.perf_counter() - t0, 3)})
    sketch._loo_params = got
    return got


def loo_effects(sketch, out: Output) -> torch.Tensor:
    """Exact leave-one-out changes f(1_{i}) - f(0) for every example, ``[n, P]``: read off the cached leave-one-out
    parameters (n retrains once per sketch), or n retrains for this output when those would not fit."""
    def compute():
        with torch.no_grad():
            base = out.flat(trained(sketch))
            stacked = loo_params(sketch)
            if stacked is None:
                return torch.stack([out.flat(retrain(sketch.task, [i])) - base for i in range(sketch.n)])
            return torch.stack([out.flat({k: v[i] for k, v in stacked.items()}) - base for i in range(sketch.n)])

    return _effects_cached(sketch, out, "loo", compute)


def _loo_cached(sketch) -> bool:
    if sketch._loo_params is not None:
        return True
    return any((sketch.path / "effects").glob(f"loo-params-{sketch.fingerprint[:24]}.safetensors"))


# ----------------------------------------------------------------------------------------------
# answers
# ----------------------------------------------------------------------------------------------


def _cost_note(method: str, seconds: float, S: int, rc: dict) -> list[str]:
    notes = []
    r = rc.get("retrain_s")
    if r:
        notes.append(f"cost: {method} {seconds:.3g} s; retraining the {S} set{'s' if S > 1 else ''} would take about "
                     f"{S * r:.3g} s ({r:.3g} s each)" + (f"; the sketch's precompute took {rc['precompute_s']:.3g} s "
                     f"(about {rc['precompute_s'] / r:.3g} retrains)" if rc.get("precompute_s") else ""))
    return notes


#: a sketch term is added to the exact degree-1 term only where its estimate exceeds this many standard errors
SIGNIFICANCE = 2.0


def choose_degrees(terms: torch.Tensor, term_se: torch.Tensor, cum_se: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (set, element), the truncation degree r in 1..k that minimizes the estimated squared error when the
    degree-1 term is exact and terms 2..r come from the sketch.

    ``terms``/``term_se`` [S, K, P]: the sketch's per-degree term estimates and their standard errors;
    ``cum_se`` [S, K, P]: the standard error of the sum of terms 2..r (0 at r = 1). The error at degree r is
    cum_se[r]^2 + B_r^2, B_r^2 = max(0, T_{r+1}^2 - se_{r+1}^2) (an unbiased estimate of the next term's square)
    for r < k, and for r = k that term extrapolated geometrically from the last two. Returns (degree [S, P],
    error bar [S, P]: the same error with every left-out term taken as |T| + se, so it is not zero where the next
    term is lost in the noise)."""
    S, K, P = terms.shape
    k = K - 1

    def errors(size):  # [S, K, P] sizes of the terms -> [S, k, P] squared error at each truncation degree
        err = torch.full((S, k, P), math.inf, dtype=torch.float64)
        for r in range(1, k + 1):
            if r < k:
                bias2 = size[:, r + 1] ** 2
            else:
                last = size[:, k]
                prev = size[:, k - 1] if k >= 2 else torch.zeros_like(last)
                q = torch.where(prev > 0, last / prev.clamp_min(1e-300), torch.ones_like(last))
                bias2 = torch.where(q < 1, (last * q / (1 - q).clamp_min(1e-12)) ** 2,
                                    torch.where(last > 0, torch.full_like(last, math.inf), torch.zeros_like(last)))
            err[:, r - 1] = cum_se[:, r] ** 2 + bias2
        return err

    err = errors((terms**2 - term_se**2).clamp_min(0).sqrt())  # unbiased sizes choose the degree ...
    for r in range(2, k + 1):  # ... among the degrees whose added terms are each distinguishable from noise (2 s.e.)
        significant = (terms[:, 2 : r + 1].abs() > SIGNIFICANCE * term_se[:, 2 : r + 1]).all(1)
        err[:, r - 1] = torch.where(significant, err[:, r - 1], torch.full_like(err[:, r - 1], math.inf))
    err[:, 0] = torch.where(torch.isfinite(err[:, 0]), err[:, 0], torch.full_like(err[:, 0], 1e300))
    best = err.argmin(1)
    bar = errors(terms.abs() + term_se)  # the error bar: each left-out term as large as its estimate plus 1 s.e.
    return best + 1, bar.gather(1, best[:, None]).squeeze(1).sqrt()


def _left_out_bar(sketch, out: Output, sets, weight: float, sketch_kw: dict):
    """The error bar of the exact first-order answer: what it leaves out, the terms of degree 2..k, as the sketch
    estimates them (their sum in absolute value plus one standard error over the directions). None (with a note
    that says so) for a degree-1 sketch or a single direction."""
    K = sketch.degree if sketch_kw.get("degree") is None else sketch_kw["degree"]
    if K < 2 or sketch.m < 2:
        return None, ("exact first-order term; higher-order terms left out (not bounded: the sketch has degree 1 or "
                      "a single direction)")
    est = sketch_estimate(sketch, out, sets, weight, K, sketch_kw.get("tolerance", 0.05))
    if est.warning is not None:
        warnings.warn(est.warning, StabilityWarning, stacklevel=4)
    hi = est.per_direction[:, :, 2:].sum(2)  # [S, m, P]: each direction's estimate of terms 2..K
    bar = hi.mean(1).abs() + hi.std(1, unbiased=True) / math.sqrt(est.directions)
    return bar, (f"exact first-order term; stderr is the size of the left-out terms of degree 2..{K} as the sketch "
                 f"estimates them (|estimate| + 1 s.e., {est.directions} directions)")


def auto_choice(S: int, n: int, retrain_s: Optional[float], precompute_s: Optional[float], budget_s: float,
                loo_cached: bool = False, weight: float = 1.0) -> tuple[str, str]:
    """``auto``'s rule, as (method, the reason stated in the answer): ``retrain`` when the S sets retrain within
    ``budget_s``; else ``loo_sum`` (deletions only) when the n leave-one-out runs are cached or cost no more than
    ``max(budget_s, precompute_s)`` (a one-time cost every later question reuses); else ``first_order``."""
    r = retrain_s or math.inf
    once = max(budget_s, precompute_s or 0.0)
    if S * r <= budget_s:
        sets_do = "the set retrains" if S == 1 else f"the {S} sets retrain"
        return "retrain", (f"auto chose retrain: {sets_do} in about {S * r:.3g} s, within the budget of {budget_s:g} s, "
                           "and retraining is exact")
    if weight == 1.0 and (loo_cached or n * r <= once):
        return "loo_sum", (f"auto chose loo_sum: retraining the {S} sets would take about {S * r:.3g} s (budget "
                           f"{budget_s:g} s); the n = {n} leave-one-out retrains "
                           + ("are cached beside the sketch" if loo_cached else
                              f"(about {n * r:.3g} s, once, cached beside the sketch) cost no more than the sketch's "
                              "own precompute") + "; their sum keeps each example's own nonlinearity, which first order "
                           "misses (interactions between deleted examples are left out)")
    return "first_order", (f"auto chose first_order: retraining the {S} sets would take about {S * r:.3g} s (budget "
                           f"{budget_s:g} s) and the n leave-one-out retrains about {n * r:.3g} s; the exact "
                           "first-order term was the most accurate of the remaining methods in docs/answers.md "
                           "(method='first_order+sketch' adds the sketch's higher terms where they exceed 2 s.e.)")


def answer(sketch, output, delete, method: str = "auto", weight: float = 1.0, budget_s: float = DEFAULT_BUDGET_S,
           **sketch_kw) -> Prediction:
    """The answer to "what would ``output`` be had ``delete`` never been seen?" by ``method`` (see the module)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
    if not (isinstance(budget_s, (int, float)) and budget_s >= 0 and math.isfinite(budget_s)):
        raise ValueError(f"budget_s must be a non-negative number of seconds, got {budget_s}")
    out = sketch.output(output)
    if method == "sketch":
        return sketch_predict(sketch, out, delete, weight=weight, **sketch_kw)
    if method in ("retrain", "loo_sum", "first_order") and (sketch_kw.get("control_variates") or sketch_kw.get("degree") is not None):
        raise ValueError(f"degree and control_variates apply to the sketch's terms, not to method {method!r}")
    sets, single = check_sets(delete, sketch.n)
    S = len(sets)
    rc = costs(sketch)
    why = []
    if method == "auto":
        method, reason = auto_choice(S, sketch.n, rc.get("retrain_s"), rc.get("precompute_s"), budget_s,
                                     _loo_cached(sketch), weight)
        why.append(reason)
    t0 = time.perf_counter()
    if method == "retrain":
        with torch.no_grad():
            base = out.flat(trained(sketch))
            vals = torch.stack([out.flat(retrain(sketch.task, d, weight=weight)) for d in sets])
        p = Prediction.exact(out, "retrain", base, vals, sets, single, weight, notes=why)
    elif method == "exact":
        K = sketch.degree if sketch_kw.get("degree") is None else sketch_kw["degree"]
        rows, last = [], []
        for d in sets:
            c = out.flat_coefficients(deletion_ring_run(sketch.task, d, K, weight), K)[0].real  # [K+1, P]
            rows.append(c.sum(0))
            last.append(c[-1].abs())
        base = sketch.coefficients(out)[0, 0].real
        p = Prediction.exact(out, "exact", base, torch.stack(rows), sets, single, weight, degree=K, notes=why + [
            f"exact Taylor series to degree {K} along each set; truncation error not bounded (largest last term "
            f"{float(torch.stack(last).max()):.3g})"])
    else:
        D = deletion_matrix(sets, sketch.n, weight)
        base = sketch.coefficients(out)[0, 0].real
        if method in ("first_order", "first_order+sketch"):
            E = first_order_effects(sketch, out)  # [n, P]
            lin = D @ E  # [S, P]: the exact degree-1 term (W 1_D . grad)
        else:  # loo_sum
            if weight != 1.0:
                raise ValueError("loo_sum answers deletions (weight 1) only")
            lin = D @ loo_effects(sketch, out)
        if method != "first_order+sketch":
            bar = None
            if method == "first_order":
                bar, note = _left_out_bar(sketch, out, sets, weight, sketch_kw)
            else:
                note = "exact leave-one-out effects summed: each example's own nonlinearity kept, interactions left out"
            p = Prediction.exact(out, method, base, base + lin, sets, single, weight, degree=1, notes=why + [note],
                                 stderr=bar)
        else:
            K = sketch.degree if sketch_kw.get("degree") is None else sketch_kw["degree"]
            est = sketch_estimate(sketch, out, sets, weight, K, sketch_kw.get("tolerance", 0.05))
            if est.warning is not None:
                warnings.warn(est.warning, StabilityWarning, stacklevel=3)
            terms, m = est.terms, est.directions  # [S, K+1, P]
            hi = est.per_direction[:, :, 2:].cumsum(2)  # each direction's sums of terms 2..r
            cum_se = torch.zeros_like(terms)
            if hi.shape[2] and m > 1:
                cum_se[:, 2:] = hi.std(1, unbiased=True) / math.sqrt(m)
            deg, rmse = choose_degrees(terms, est.term_stderr, cum_se)
            hsum = torch.zeros_like(lin)
            for r in range(2, K + 1):
                hsum = hsum + torch.where(deg >= r, terms[:, r], torch.zeros_like(lin))
            vals = base + lin + hsum
            p = Prediction.exact(out, method, base, vals, sets, single, weight, degree=K, notes=why, stderr=rmse)
            p.directions = m
            counts = {r: int((deg == r).sum()) for r in range(1, K + 1)}
            p.notes = why + [
                "degree 1 exact; sketch terms added up to the degree shown per element: "
                + ", ".join(f"degree {r}: {c}" for r, c in counts.items() if c) + f" of {deg.numel()} set-element pairs",
                "stderr is the estimated root-mean-square error: the sketch's sampling error of the added terms and "
                "the estimated size of the first term left out (infinite where the sketch's terms grow)"]
            p.chosen_degree = out.unflatten(deg[0] if single else deg)
            p.warning = est.warning
    seconds = time.perf_counter() - t0
    p.cost = {"seconds": round(seconds, 4), "retrain_s": rc.get("retrain_s"), "precompute_s": rc.get("precompute_s")}
    if method != "retrain":
        p.notes += _cost_note(method, seconds, S, rc)
        if rc.get("retrain_s") and S * rc["retrain_s"] < max(seconds, 1e-9) * 0.5:
            p.notes.append("retraining would have been cheaper than this answer and exact: use method='retrain'")
    return p

