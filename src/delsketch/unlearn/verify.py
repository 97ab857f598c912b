"""Verification of an unlearned model against retraining without the forgotten examples (real retraining, or,
when asked, the model a deletion sketch predicts - then every reference number says so and the predicted losses
carry error bars).

Metrics (model = unlearned, reference, and the original model for scale):

* accuracy and mean loss on the forgotten set, the retained training data and the test data;
* forget quality: the KS test (``scipy.stats.ks_2samp``) between the unlearned and the reference model's
  per-example losses on the forgotten set (p-value; high = indistinguishable);
* membership inference on the forgotten set: the loss-threshold attack (:func:`delsketch.audit.mia.loss_threshold`)
  with the forgotten examples as members and held-out test examples of the same labels as non-members; AUC and
  advantage ``max_t |TPR - FPR|`` (two-sided: an abnormally *high* forget loss reveals membership too), for the
  unlearned model next to the reference model's level;
* parameter distance ``||theta_u - theta_ref||``, also relative to ``||theta_orig - theta_ref||``;
* relearn time: steps of full-batch SGD on the forgotten set until its mean loss is back at the original
  model's, for the unlearned and the reference model (ratio: < 1 means the unlearned model relearns faster);
* cost: seconds and example evaluations relative to one retraining.

Verdict (per model): *close* when forget accuracy and MIA advantage are both within ``tolerance`` (2 points) of
the reference's and test accuracy is not more than ``tolerance`` below it; otherwise *over-unlearned* when the
unlearned model does worse on the forgotten set than the reference (lower accuracy, or equal accuracy and higher
loss) or lost test accuracy, *under-unlearned* when it still does better on the forgotten set. The advantage's
bootstrap interval (``advantage_ci95``) shows how much of a gap is sampling noise; the advantage is the two-sample
KS statistic of the member and non-member losses, so ``advantage_pvalue`` (KS test: is the attack better than
chance?) and ``advantage_chance95`` (the level noise alone reaches 5 % of the time with these sample sizes) say
whether a model's membership signal is distinguishable from none at all."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..training import Task, retrain, train
from .access import UnlearnError, forward, outputs_of, test_data
from .core import Unlearned

__all__ = ["Reference", "reference", "verify", "format_table", "advantage", "TOLERANCE"]

TOLERANCE = 0.02
BOOTSTRAP = 200


def advantage(member_losses, nonmember_losses) -> float:
    """The loss-threshold attack's two-sided advantage ``max_t |TPR(t) - FPR(t)|`` over all thresholds t: the
    largest gap between the two empirical distribution functions of the losses."""
    m, o = np.sort(np.asarray(member_losses, dtype=np.float64)), np.sort(np.asarray(nonmember_losses, dtype=np.float64))
    t = np.concatenate([m, o])
    gap = np.searchsorted(m, t, side="right") / len(m) - np.searchsorted(o, t, side="right") / len(o)
    return float(np.abs(gap).max())


def _ks(x, y):
    """``scipy.stats.ks_2samp``; with ties scipy's exact p-value may fail and fall back to the asymptotic one,
    which it announces with a warning on every call: the fallback is kept, the warning silenced."""
    from scipy.stats import ks_2samp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return ks_2samp(x, y)


def _accuracy(z: Tensor, y: Tensor, mask: Optional[Tensor]) -> Tensor:
    hit = (z.argmax(-1) == y).to(torch.float64)
    if mask is None:
        return hit if hit.dim() == 1 else hit.flatten(1).mean(1)
    return (hit * mask).sum(-1) / mask.sum(-1)


class _Eval:
    """Per-example losses and accuracies of any parameters on training subsets and the test data."""

    def __init__(self, task: Task, forgotten: Sequence[int], test=None):
        self.task = task
        self.forgotten = list(forgotten)
        gone = set(self.forgotten)
        self.retain = [i for i in range(task.n) if i not in gone]
        self.out = outputs_of(task)
        self.test = test if test is not None else test_data(task)
        self.labels = None
        if self.out is not None and self.out.kind == "classifier":
            self.labels = self.out.labels(torch.tensor(self.forgotten)).tolist()

    def losses(self, params, idx) -> Tensor:
        with torch.no_grad():
            return self.task.example_losses(params, torch.as_tensor(idx, dtype=torch.long)).detach()

    def accuracy(self, params, idx) -> Optional[Tensor]:
        if self.out is None or self.out.kind == "generic":
            return None
        with torch.no_grad():
            t = torch.as_tensor(idx, dtype=torch.long)
            z, mask = self.out.logits(params, t)
            return _accuracy(z, self.out.labels(t), mask)

    def test_losses(self, params) -> Optional[Tensor]:
        if self.test is None:
            return None
        X, y = self.test
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(forward(self.task, params, X), y, reduction="none")

    def test_accuracy(self, params) -> Optional[Tensor]:
        if self.test is None:
            return None
        X, y = self.test
        with torch.no_grad():
            return (forward(self.task, params, X).argmax(-1) == y).to(torch.float64)

    def nonmember_mask(self) -> Optional[Tensor]:
        """Test examples used as non-members: those whose label occurs in the forgotten set."""
        if self.test is None:
            return None
        y = self.test[1]
        if self.labels is None:
            return torch.ones(len(y), dtype=torch.bool)
        return torch.isin(y, torch.tensor(sorted(set(self.labels))))

    def metrics(self, params) -> dict:
        fl, rl = self.losses(params, self.forgotten), self.losses(params, self.retain)
        out = {"forget_loss": float(fl.mean()), "retain_loss": float(rl.mean())}
        fa, ra = self.accuracy(params, self.forgotten), self.accuracy(params, self.retain)
        out["forget_acc"] = float(fa.mean()) if fa is not None else None
        out["retain_acc"] = float(ra.mean()) if ra is not None else None
        tl, ta = self.test_losses(params), self.test_accuracy(params)
        out["test_loss"] = float(tl.mean()) if tl is not None else None
        out["test_acc"] = float(ta.mean()) if ta is not None else None
        out["mia"] = self.mia(fl, tl)
        return out

    def mia(self, forget_losses: Tensor, test_losses: Optional[Tensor]) -> Optional[dict]:
        from ..audit.mia import loss_threshold

        if test_losses is None:
            return None
        mask = self.nonmember_mask()
        non = test_losses[mask]
        if len(non) == 0:
            return None
        mem, non = forget_losses.numpy(), non.numpy()
        r = loss_threshold(mem, non)
        # percentile bootstrap of the advantage (members and non-members resampled separately, seeded)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 0x0F6E])))
        boot = [advantage(mem[rng.integers(0, len(mem), len(mem))], non[rng.integers(0, len(non), len(non))])
                for _ in range(BOOTSTRAP)]
        # the advantage is the two-sample Kolmogorov-Smirnov statistic of the two loss samples: its p-value says
        # whether the attack does better than chance at all, and its 5 % critical value is the level that pure
        # sampling noise reaches with these sample sizes (asymptotic: 1.358 sqrt((a + b) / (a b)))
        a, b = len(mem), len(non)
        return {"auc": r["auc"], "advantage": advantage(mem, non), "advantage_ci95": np.percentile(boot, [2.5, 97.5]).tolist(),
                "advantage_pvalue": float(_ks(mem, non).pvalue),
                "advantage_chance95": float(1.358 * np.sqrt((a + b) / (a * b))),
                "members": int(a), "nonmembers": int(b)}

    def relearn_steps(self, params, target: float, lr: float, max_steps: int) -> int:
        """Full-batch SGD steps on the forgotten set until its mean loss is <= ``target`` (max_steps + 1 if never)."""
        idx = torch.tensor(self.forgotten)
        p = {k: v.detach().clone() for k, v in params.items()}
        for s in range(max_steps + 1):
            leaves = {k: v.requires_grad_(True) for k, v in p.items()}
            with torch.enable_grad():
                L = self.task.example_losses(leaves, idx).mean()
                if float(L.detach()) <= target:
                    return s
                grads = torch.autograd.grad(L, list(leaves.values()), allow_unused=True)
            p = {k: (v.detach() - lr * g if g is not None else v.detach()) for (k, v), g in zip(leaves.items(), grads)}
        return max_steps + 1


@dataclass
class Reference:
    """The model a verification compares with: ``kind`` "retrain" (real retraining) or "sketch" (predicted)."""

    kind: str
    forgotten: list[int]
    params: dict
    seconds: float
    metrics: dict
    forget_losses: Tensor
    relearn_steps: int
    original: dict
    original_metrics: dict
    predicted: dict = field(default_factory=dict)  # sketch: mean losses predicted directly, with stderr
    lira: Optional[dict] = None  # shadow statistics (lira > 0) and the reference's and original's LiRA levels


def _lira_level(task: Task, stats: dict, params: dict, forgotten: Sequence[int]) -> dict:
    """Online LiRA (:func:`delsketch.audit.mia.lira_scores`) of ``params`` as the target model, on the forgotten
    examples: median score and the fraction called members (score > 0)."""
    from ..audit.mia import lira_scores
    from ..audit.outputs import view

    with torch.no_grad():
        phi = view(task).confidence(params, torch.arange(task.n)).detach()
    sc = torch.as_tensor(lira_scores(phi, stats["phi"], stats["masks"])["online"])[torch.tensor(list(forgotten))]
    return {"median_score": float(sc.median()), "member_rate": float((sc > 0).double().mean())}


def reference(task: Task, forgotten: Sequence[int], kind: str = "retrain", sketch=None, original: Optional[dict] = None,
              test=None, relearn_lr: Optional[float] = None, relearn_max: int = 200, degree: Optional[int] = None,
              param_degree: int = 1, lira: int = 0, retrained: Optional[tuple] = None) -> Reference:
    """The reference model for deleting ``forgotten`` (computed once; pass it to :func:`verify` for every method).

    ``kind="sketch"``: the mean losses (forget, retain, test) are the sketch's own output estimates at ``degree``
    (default: the sketch's) with standard errors; the reference *parameters* (for accuracies, MIA, KS, distance,
    relearning) are the sketch's parameter prediction at ``param_degree`` (default 1, see
    :mod:`delsketch.unlearn.methods.sketch` for why).

    ``lira``: the number of shadow models on random halves (:func:`delsketch.audit.mia.shadow_statistics`, seed 0)
    for the LiRA level of the forgotten examples (0: loss threshold only). ``retrained``: ``(params, seconds)`` of a
    retraining already done (e.g. by :func:`delsketch.unlearn.parallel.references`)."""
    from .methods.sketch import predicted_params

    forgotten = sorted({int(i) for i in forgotten})
    ev = _Eval(task, forgotten, test)
    if original is None:
        original = train(task)
    t0 = time.perf_counter()
    predicted = {}
    if kind == "retrain" and retrained is not None:
        params = retrained[0]
    elif kind == "retrain":
        params = retrain(task, forgotten)
    elif kind == "sketch":
        if sketch is None:
            raise UnlearnError("a sketch reference needs a sketch of the task")
        params, _ = predicted_params(sketch, forgotten, param_degree)
        from ..training.outputs import own_losses

        fidx, ridx = torch.tensor(forgotten), torch.tensor(ev.retain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stability warning is reported by the sketch method itself
            def pred(output):  # the sketch estimator alone (method "auto" could answer by retraining)
                return sketch.predict(output, forgotten, degree=degree, method="sketch")

            per = pred(own_losses(task, forgotten))
            means = {"forget_loss": pred(lambda p: task.example_losses(p, fidx).mean()),
                     "retain_loss": pred(lambda p: task.example_losses(p, ridx).mean())}
            if ev.test is not None:
                X, y = ev.test
                means["test_loss"] = pred(lambda p: torch.nn.functional.cross_entropy(forward(task, p, X), y))
        for name, pr in means.items():
            predicted[name] = {"mean": float(pr.estimate), "stderr": float(pr.stderr)}
        predicted["forget_loss"].update(per_example=per.estimate.tolist(), per_example_stderr=per.stderr.tolist(),
                                        warning=per.warning)
    else:
        raise UnlearnError(f"unknown reference {kind!r} (choose from: retrain, sketch)")
    seconds = time.perf_counter() - t0 if retrained is None else float(retrained[1])
    orig_metrics = ev.metrics(original)
    lr = float(relearn_lr if relearn_lr is not None else getattr(task.optimizer, "lr", 0.01))
    steps = ev.relearn_steps(params, orig_metrics["forget_loss"], lr, relearn_max)
    lira_info = None
    if lira:
        from ..audit.mia import shadow_statistics

        stats = shadow_statistics(task, models=int(lira), seed=0)
        lira_info = {"stats": stats, "models": int(lira), "reference": _lira_level(task, stats, params, forgotten),
                     "original": _lira_level(task, stats, original, forgotten)}
    return Reference(kind, forgotten, params, seconds, ev.metrics(params), ev.losses(params, forgotten), steps,
                     original, orig_metrics, predicted, lira_info)


def _distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def verify(task: Task, unlearned: Unlearned, forget: Optional[Sequence[int]] = None, reference: Optional[object] = None,
           *, sketch=None, original: Optional[dict] = None, test=None, relearn_lr: Optional[float] = None,
           relearn_max: int = 200, tolerance: float = TOLERANCE, lira: int = 0) -> dict:
    """Compare ``unlearned`` with the model retrained without everything it forgot (``forget``: default
    ``unlearned.forgotten``). ``reference``: None (retrain now), ``"sketch"`` (the model ``sketch`` predicts), or a
    :class:`Reference` (shared between methods). ``test``: held-out ``(X, y)`` (default: the preset's test split).
    ``lira``: shadow models for a LiRA level of the forgotten examples (see :func:`reference`; a given Reference
    brings its own)."""
    forgotten = sorted({int(i) for i in (forget if forget is not None else unlearned.forgotten)})
    if unlearned.fingerprint != task.fingerprint():
        raise UnlearnError(f"the unlearned model was made from another task (fingerprint {unlearned.fingerprint[:12]} "
                           f"!= {task.fingerprint()[:12]})")
    if isinstance(reference, str) or reference is None:
        ref = globals()["reference"](task, forgotten, kind=reference or "retrain", sketch=sketch, original=original,
                                     test=test, relearn_lr=relearn_lr, relearn_max=relearn_max, lira=lira)
    else:
        ref = reference
        if ref.forgotten != forgotten:
            raise UnlearnError("the reference was computed for another forget set")

    ev = _Eval(task, forgotten, test)
    m = ev.metrics(unlearned.params)
    fl = ev.losses(unlearned.params, forgotten)
    ks = _ks(fl.numpy(), ref.forget_losses.numpy())
    lr = float(relearn_lr if relearn_lr is not None else getattr(task.optimizer, "lr", 0.01))
    steps = ev.relearn_steps(unlearned.params, ref.original_metrics["forget_loss"], lr, relearn_max)
    d = _distance(unlearned.params, ref.params)
    d0 = _distance(ref.original, ref.params)
    retrain_seconds = ref.seconds if ref.kind == "retrain" else None
    res = {
        "method": unlearned.method, "reference": ref.kind, "forgotten": len(forgotten), "n": task.n,
        "unlearned": m, "reference_metrics": ref.metrics, "original": ref.original_metrics,
        "ks": {"statistic": float(ks.statistic), "pvalue": float(ks.pvalue)},
        "param_distance": d, "param_distance_original": d0, "param_distance_relative": d / d0 if d0 > 0 else 0.0,
        "relearn_steps": steps, "relearn_steps_reference": ref.relearn_steps,
        "relearn_ratio": steps / ref.relearn_steps if ref.relearn_steps > 0 else (1.0 if steps == 0 else None),
        "cost": {"seconds": unlearned.seconds, "retrain_seconds": retrain_seconds,
                 "relative_seconds": unlearned.seconds / retrain_seconds if retrain_seconds else None,
                 "retrain_equivalents": unlearned.cost.get("retrain_equivalents")},
        "data_touched": unlearned.info.get("data_touched"),
    }
    if ref.lira is not None:
        res["lira"] = {"shadow_models": ref.lira["models"], "unlearned": _lira_level(task, ref.lira["stats"],
                                                                                     unlearned.params, forgotten),
                       "reference": ref.lira["reference"], "original": ref.lira["original"],
                       "definition": "online LiRA score of each forgotten example with the model as target; "
                                     "member_rate: fraction with score > 0"}
    if ref.kind == "sketch":
        res["reference_note"] = ("reference = the model a deletion sketch predicts (not a real retraining); "
                                 "predicted mean losses with standard errors in reference_predicted")
        res["reference_predicted"] = {k: {kk: v[kk] for kk in ("mean", "stderr")} for k, v in ref.predicted.items()}
        res["reference_warning"] = ref.predicted.get("forget_loss", {}).get("warning")
    res["method_warning"] = unlearned.info.get("warning")
    res["verdict"] = _verdict(res, tolerance)
    return res


def _pts(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _verdict(r: dict, tol: float) -> str:
    u, ref = r["unlearned"], r["reference_metrics"]
    parts = []
    d_acc = None if u["forget_acc"] is None else u["forget_acc"] - ref["forget_acc"]
    d_adv = None if (u["mia"] is None or ref["mia"] is None) else u["mia"]["advantage"] - ref["mia"]["advantage"]
    d_loss = u["forget_loss"] - ref["forget_loss"]
    close = (d_acc is None or abs(d_acc) <= tol + 1e-12) and (d_adv is None or abs(d_adv) <= tol + 1e-12)
    if d_acc is None and d_adv is None:
        close = abs(d_loss) <= 0.05 * max(abs(ref["forget_loss"]), 1e-12) or r["ks"]["pvalue"] >= 0.05
    utility_lost = u["test_acc"] is not None and u["test_acc"] < ref["test_acc"] - tol
    if close and not utility_lost:
        word = "close"
    elif close:
        word = "over-unlearned"  # the forgotten set looks right, but the model lost accuracy elsewhere
    elif (d_acc is not None and d_acc < -tol) or (d_acc is None and d_loss > 0) or (
            d_acc is not None and abs(d_acc) <= tol and d_loss > 0):
        word = "over-unlearned"
    else:
        word = "under-unlearned"
    parts.append(f"{r['method']}: {word}")
    if d_acc is not None:
        parts.append(f"forget acc {_pts(u['forget_acc'])} vs {_pts(ref['forget_acc'])}")
    parts.append(f"forget loss {u['forget_loss']:.3g} vs {ref['forget_loss']:.3g}")
    if d_adv is not None:
        parts.append(f"MIA adv {_pts(u['mia']['advantage'])} vs {_pts(ref['mia']['advantage'])}")
    if u["test_acc"] is not None:
        parts.append(f"test acc {_pts(u['test_acc'])} vs {_pts(ref['test_acc'])}")
        if utility_lost:
            parts.append("utility lost")
    parts.append(f"KS p {r['ks']['pvalue']:.2g}")
    if r["reference"] == "sketch":
        parts.append("reference predicted by a sketch")
        if r.get("reference_warning"):
            parts.append("the reference is UNRELIABLE for this set: " + _why(r["reference_warning"]))
    if r.get("method_warning"):
        parts.append("the method warned: " + _why(r["method_warning"]))
    return "; ".join(parts)


def _why(warning: str) -> str:
    """A stability warning in a few words, with how many output elements it concerns (the full line is in the
    JSON)."""
    import re

    count = re.search(r"(\d+) of (\d+) set-element pairs", warning)
    of = f" ({count.group(1)} of {count.group(2)} outputs)" if count else ""
    if "coherent" in warning:
        return "the sketch's series is past its safe size for this coherent set" + of
    if "do not decay" in warning:
        return "the sketch's own Taylor terms for this set do not decay" + of
    if "exceed the deletion size" in warning:
        return "the set is larger than the sketch's safe deletion size" + of
    return warning.split(";")[0][:120]


ROWS = [("forget acc %", "forget_acc", True), ("forget loss", "forget_loss", False), ("retain acc %", "retain_acc", True),
        ("retain loss", "retain_loss", False), ("test acc %", "test_acc", True), ("test loss", "test_loss", False)]


def table_rows(r: dict) -> list[list[str]]:
    """[metric, unlearned, reference, original] rows of one verification."""
    rows = []
    for label, key, pct in ROWS:
        vals = [r["unlearned"][key], r["reference_metrics"][key], r["original"][key]]
        if all(v is None for v in vals):
            continue
        rows.append([label] + [(_pts(v) if pct else ("-" if v is None else f"{v:.4g}")) for v in vals])
    for label, key in (("MIA AUC", "auc"), ("MIA advantage %", "advantage")):
        ms = [r["unlearned"]["mia"], r["reference_metrics"]["mia"], r["original"]["mia"]]
        if all(x is not None for x in ms):
            rows.append([label] + [f"{x[key]:.3f}" if key == "auc" else _pts(x[key]) for x in ms])
    if r.get("lira"):
        L = r["lira"]
        rows.append([f"LiRA member rate % ({L['shadow_models']} shadows)"] +
                    [_pts(L[k]["member_rate"]) for k in ("unlearned", "reference", "original")])
    rows.append(["KS p (forget losses)", f"{r['ks']['pvalue']:.3g}", "1", "-"])
    rows.append(["param distance to ref", f"{r['param_distance']:.4g}", "0", f"{r['param_distance_original']:.4g}"])
    rows.append(["relearn steps", str(r["relearn_steps"]), str(r["relearn_steps_reference"]), "0"])
    c = r["cost"]
    rows.append(["cost (retrain equiv.)", f"{c['retrain_equivalents']:.3g}" if c["retrain_equivalents"] is not None else "-",
                 "1" if r["reference"] == "retrain" else "-", "-"])
    return rows


def format_table(r: dict) -> str:
    head = ["metric", "unlearned", r["reference"], "original"]
    rows = [head] + table_rows(r)
    w = [max(len(row[j]) for row in rows) for j in range(4)]
    return "\n".join("  ".join(cell.ljust(w[j]) if j == 0 else cell.rjust(w[j]) for j, cell in enumerate(row))
                     for row in rows)
