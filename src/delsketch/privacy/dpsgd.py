"""The DP-SGD gradient transform (:class:`DPGradient`), called by the training loop through ``Task.gradient``.

Each step: per-example gradients g_i of the unweighted per-example losses; clip factor
``f_i = min(1, C / (||g_i|| + clip_eps))``; the step's gradient is
``(sum_i (1 - w_i) f_i g_i + sigma C xi_s) / denominator`` (computed as ``sum_i c_i g_i + (sigma C / denominator)
xi_s`` with ``c_i = (1 - w_i) f_i / denominator``) with ``xi_s`` standard Gaussian noise drawn from a
generator seeded by (seed, step) alone, and the denominator the expected batch size (Poisson sampling) or the
batch's size (fixed schedule). The weight multiplies the *clipped* gradient, so ``w_i = 1`` removes example i and
every example's contribution stays within C (|1 - w_i| <= 1).

Per-example gradients: ``torch.func.vmap(grad(...))`` on plain tensors; on power series (ring runs, where vmap
cannot trace the ``Series`` subclass) and when vmap fails, one forward and backward pass per example.

The clip is not analytic where ||g_i|| + clip_eps = C. In a ring run it follows the branch of the degree-0 value
(clipped or not), like the engine's other non-analytic ops. Examples whose degree-0 norm lies within
``boundary_margin`` (relative) of C are counted: :meth:`DPGradient.diagnostics` reports the last run's counts.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .. import series as taylor
from .accounting import PrivacyError

__all__ = ["DPGradient", "PerExampleGradientError", "step_noise"]

Params = dict[str, Tensor]


class PerExampleGradientError(PrivacyError):
    """The task's per-example gradients cannot be computed (or an example's loss depends on other examples)."""


def step_noise(seed: int, step: int, shapes: dict[str, torch.Size], scale: float = 1.0) -> dict[str, Tensor]:
    """Standard Gaussian noise for one step, a function of (seed, step) alone (float64, parameter order): one
    draw of all the step's numbers from NumPy's PCG64 seeded by (seed, step), split into the shapes. (NumPy's
    ziggurat sampler takes half the time of torch's float64 ``randn`` here, which is a visible part of a small
    model's DP step.) ``scale`` multiplies all of it (one pass)."""
    sizes = [math.prod(s) for s in shapes.values()]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(step), 0xD95])))
    flat = torch.from_numpy(rng.standard_normal(sum(sizes)))
    if scale != 1.0:
        flat.mul_(scale)
    return {k: v.view(tuple(s)) for (k, s), v in zip(shapes.items(), flat.split(sizes))}


def _degree0(x: Tensor) -> Tensor:
    """The real degree-0 value of a plain tensor or a Series (detached; all directions share it)."""
    if taylor.is_series(x):
        return taylor.coefficients(x)[0, 0].real.detach()
    return x.detach()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"


def _linear_layers(model) -> Optional[dict]:
    """``{param name: (module, kind)}`` when every parameter of ``model`` belongs to an ``nn.Linear`` (the
    Linear-only fast path applies), else ``None``."""
    if not isinstance(model, torch.nn.Module):
        return None
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            for kind in ("weight", "bias"):
                if getattr(mod, kind, None) is not None:
                    out[f"{name}.{kind}" if name else kind] = (mod, kind)
    names = {k for k, _ in model.named_parameters()}
    return out if out and set(out) == names else None


#: (model, example_losses) pairs whose Linear-only path has been checked against vmap in this process: the check
#: is a property of the model and its loss, so a later run of the same task (retraining, leave-one-out) skips it
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _was_checked(model, example_losses) -> bool:
    try:
        return example_losses in _CHECKED.get(model, ())
    except TypeError:  # not weak-referenceable
        return False


def _mark_checked(model, example_losses) -> None:
    try:
        _CHECKED.setdefault(model, weakref.WeakSet()).add(example_losses)
    except TypeError:
        pass


class _NotRankOne(Exception):
    """The Linear-only fast path does not apply to this call (a layer used twice, inputs with extra dims...)."""


class DPGradient:
    """``Task.gradient`` for DP-SGD (see the module docstring). ``denominator``: a number (the expected batch
    size) or ``None`` (each step's batch size)."""

    def __init__(self, max_grad_norm: float, noise_multiplier: float, seed: int, denominator: Optional[float],
                 clip_eps: float = 1e-6, boundary_margin: float = 0.01, task_name: str = "task",
                 model: Optional[torch.nn.Module] = None):
        self.C = float(max_grad_norm)
        self.sigma = float(noise_multiplier)
        self.seed = int(seed)
        self.denominator = None if denominator is None else float(denominator)
        self.clip_eps = float(clip_eps)
        self.margin = float(boundary_margin)
        self.task_name = task_name
        self._use_vmap = True
        self._model = model
        self._linear = _linear_layers(model)  # {param name: (module, "weight"|"bias")} or None
        self._layers = [] if self._linear is None else [
            (m, n, next((k for k, (m2, kd) in self._linear.items() if m2 is m and kd == "bias"), None))
            for n, (m, kind) in self._linear.items() if kind == "weight"]
        self._linear_checked = False  # the first use is compared with vmap; a mismatch switches the path off
        self.path = "vmap"  # the per-example path the last plain step took: "linear", "vmap" or "loop"
        self._reset()

    def describe(self) -> dict:
        return {"kind": "dp-sgd", "max_grad_norm": self.C, "noise_multiplier": self.sigma, "seed": self.seed,
                "denominator": self.denominator, "clip_eps": self.clip_eps, "boundary_margin": self.margin}

    # ---------------------------------------------------------------- diagnostics
    def _reset(self) -> None:
        self._rec = {"steps": 0, "examples": 0, "clipped": 0, "near_boundary": 0, "near_boundary_examples": set(),
                     "min_relative_gap": math.inf, "empty_batches": 0}

    def diagnostics(self) -> dict:
        """Counts over the last run in this process (reset at its step 0): steps, example-steps, how many were
        clipped, how many lay within ``boundary_margin`` of C (``near_boundary``, and which examples), the smallest
        relative gap |(||g_i|| + clip_eps) / C - 1| seen, and the number of empty batches."""
        r = dict(self._rec)
        r["near_boundary_examples"] = sorted(r["near_boundary_examples"])
        r["min_relative_gap"] = None if math.isinf(r["min_relative_gap"]) else r["min_relative_gap"]
        r["boundary_margin"] = self.margin
        return r

    # ---------------------------------------------------------------- per-example gradients
    def _vmap_grads(self, params: Params, example_losses: Callable, idx: Tensor, create_graph: bool):
        from torch.func import grad_and_value, vmap

        def one(p, i):
            return example_losses(p, i.unsqueeze(0)).squeeze(0)

        p = params if create_graph else {k: v.detach() for k, v in params.items()}
        g, losses = vmap(grad_and_value(one), in_dims=(None, 0))(p, idx)
        return g, losses

    def _linear_grads(self, params: Params, example_losses: Callable, idx: Tensor, create_graph: bool):
        """Per-example gradient norms of a Linear-only model without per-example gradients: one batch forward
        recording every Linear's input ``a`` [b, in] and output (a plain ``nn.Linear`` through an instance-level
        ``forward``, removed afterwards; a subclass through a forward hook), one backward to the outputs giving ``g`` [b, out]
        (``g_i = d loss_i / d out_i`` for batch-independent losses). Example i's weight gradient is the rank-1
        ``g_i a_i^T`` with norm ``||g_i|| ||a_i||``, its bias gradient ``g_i``. Returns (norms [b], losses [b],
        ``combine(coef) -> {name: sum_i coef_i grad_i}``, computed as ``(coef * g)^T a``)."""
        if set(params) != set(self._linear):
            raise _NotRankOne("parameters other than Linear layers")
        b = len(idx)
        layers = self._layers  # [(module, weight name, bias name or None)]
        seen: dict[int, tuple[Tensor, Tensor]] = {}

        def record(mod, inp, output):
            if id(mod) in seen:
                raise _NotRankOne("a Linear layer is applied more than once")
            seen[id(mod)] = (inp, output)

        def recording_forward(mod):
            def forward(inp):
                out = torch.nn.functional.linear(inp, mod.weight, mod.bias)
                record(mod, inp, out)
                return out
            return forward

        # a plain nn.Linear records through an instance-level forward (a forward hook would put every module call
        # on torch's slow path, a visible part of a small model's step); a subclass with its own forward, through
        # a hook
        plain = [m for m, _, _ in layers if type(m).forward is torch.nn.Linear.forward and "forward" not in vars(m)]
        handles = [m.register_forward_hook(lambda mod, i, o: record(mod, i[0], o))
                   for m, _, _ in layers if not any(m is q for q in plain)]
        for m in plain:
            m.forward = recording_forward(m)
        try:
            p = params if create_graph else {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with torch.enable_grad():
                losses = example_losses(p, idx)
        finally:
            for m in plain:
                del m.forward
            for h in handles:
                h.remove()
        if tuple(losses.shape) != (b,) or len(seen) != len(layers):
            raise _NotRankOne("losses are not one per example or a Linear layer is unused")
        acts = []
        for m, _, _ in layers:
            a, out = seen[id(m)]
            if a.dim() != 2 or a.shape[0] != b or out.dim() != 2 or not out.requires_grad:
                raise _NotRankOne("a Linear layer's input is not [batch, features]")
            acts.append(a)
        with torch.enable_grad():
            gs = torch.autograd.grad(losses.sum(), [seen[id(m)][1] for m, _, _ in layers], create_graph=create_graph)
        sq = None
        for (m, _, bias), a, g in zip(layers, acts, gs):
            # ||g_i a_i^T||^2 + ||g_i||^2 = ||g_i||^2 (||a_i||^2 + 1)
            a2 = (a * a).sum(1)
            term = (g * g).sum(1) * (a2 + 1 if bias is not None else a2)
            sq = term if sq is None else sq + term
        if create_graph:
            pos = sq > 0
            norms = torch.where(pos, sq, torch.ones_like(sq)).sqrt() * pos  # a zero gradient: norm 0, derivative 0
        else:
            norms = sq.sqrt()

        def combine(coef: Tensor) -> Params:
            out = {}
            for (m, weight, bias), a, g in zip(layers, acts, gs):
                cg = coef[:, None] * g
                out[weight] = cg.T @ a
                if bias is not None:
                    out[bias] = cg.sum(0)
            return out

        if not create_graph:
            losses = losses.detach()
        return norms, losses, combine

    def _fast(self, params: Params, example_losses: Callable, idx: Tensor, create_graph: bool):
        """The Linear-only path, or ``None`` where it does not apply. Its first use is checked against vmapped
        per-example gradients (norms and a weighted sum); on a mismatch it is switched off."""
        if self._linear is None:
            return None
        try:
            norms, losses, combine = self._linear_grads(params, example_losses, idx, create_graph)
        except _NotRankOne:
            self._linear = None
            return None
        if not self._linear_checked and _was_checked(self._model, example_losses):
            self._linear_checked = True
        if not self._linear_checked:
            try:
                per, ref_losses = self._vmap_grads(params, example_losses, idx, create_graph)
            except Exception:
                return norms, losses, combine  # nothing to compare with; the loop would agree or fail alike
            names = list(params)
            ref = torch.stack([per[k].reshape(len(idx), -1).norm(2, dim=1) for k in names], 1).norm(2, dim=1)
            coef = torch.linspace(0.5, 1.5, len(idx), dtype=torch.float64)
            mine = combine(coef)
            ok = torch.allclose(norms.detach(), ref.detach(), rtol=1e-9, atol=1e-12) and torch.allclose(
                losses.detach(), ref_losses.detach(), rtol=1e-12, atol=1e-14) and all(
                torch.allclose(mine[k].detach(), torch.einsum("b,b...->...", coef, per[k]).detach(), rtol=1e-9,
                               atol=1e-12) for k in names)
            if not ok:
                self._linear = None
                return None
            self._linear_checked = True
            _mark_checked(self._model, example_losses)
        return norms, losses, combine

    def _loop_grads(self, params: Params, example_losses: Callable, idx: Tensor, create_graph: bool):
        names = list(params)
        per, losses = {k: [] for k in names}, []
        with torch.enable_grad():
            for j in range(len(idx)):
                loss = example_losses(params, idx[j : j + 1])
                if tuple(loss.shape) != (1,):
                    raise PerExampleGradientError(
                        f"task {self.task_name!r}: example_losses must return per-example losses of shape [1] "
                        f"for a batch of one, got {list(loss.shape)}")
                gs = torch.autograd.grad(loss[0], [params[k] for k in names], allow_unused=True,
                                         create_graph=create_graph)
                for k, g in zip(names, gs):
                    per[k].append(g if g is not None else torch.zeros_like(params[k]))
                losses.append(loss[0] if create_graph else loss[0].detach())
        return per, losses

    def per_example(self, params: Params, example_losses: Callable, idx: Tensor, create_graph: bool = False):
        """Per-example gradients and losses: ``({name: [b, *shape] tensor}, [b])`` on plain tensors, or
        ``({name: list of b Series}, list of b Series)`` in a ring run."""
        ring = any(taylor.is_series(v) for v in params.values())
        if not ring and self._use_vmap:
            try:
                return self._vmap_grads(params, example_losses, idx, create_graph)
            except Exception:
                self._use_vmap = False  # e.g. an op without a batching rule: fall back for the rest of the run
        try:
            per, losses = self._loop_grads(params, example_losses, idx, create_graph)
        except PerExampleGradientError:
            raise
        except Exception as e:
            raise PerExampleGradientError(f"task {self.task_name!r}: cannot compute per-example gradients "
                                          f"({_first_line(e)})") from None
        if not ring:
            per = {k: torch.stack(v) for k, v in per.items()}
            losses = torch.stack(losses)
        return per, losses

    # ---------------------------------------------------------------- the step
    def __call__(self, params: Params, example_losses: Callable, w: Optional[Tensor], idx: Tensor, step: int,
                 create_graph: bool = False) -> tuple[Tensor, Params]:
        if step == 0:
            self._reset()
        rec = self._rec
        rec["steps"] += 1
        b = len(idx)
        denom = self.denominator if self.denominator is not None else float(max(b, 1))
        # the noise arrives scaled, sigma C / denominator (one pass over one buffer)
        noise = step_noise(self.seed, step, {k: v.shape for k, v in params.items()}, self.sigma * self.C / denom) \
            if self.sigma > 0 else None
        if b == 0:
            rec["empty_batches"] += 1
            grads = {k: noise[k] if noise is not None else torch.zeros(v.shape, dtype=torch.float64)
                     for k, v in params.items()}
            return torch.zeros((), dtype=torch.float64), grads

        names = list(params)
        ring = any(taylor.is_series(v) for v in params.values())
        fast = None if ring else self._fast(params, example_losses, idx, create_graph)
        if fast is not None:
            norms, losses, combine = fast
            norm0 = norms.detach()
            self.path = "linear"
        else:
            per, losses = self.per_example(params, example_losses, idx, create_graph)
            ring = isinstance(losses, list)
            if not ring:
                self.path = "vmap" if self._use_vmap else "loop"
        if fast is not None:
            pass  # norms, norm0 and combine come from the Linear-only path
        elif ring:
            sq = [sum((per[k][j] * per[k][j]).sum() for k in names) for j in range(b)]
            norms = [s.sqrt() if bool(_degree0(s) > 0) else s for s in sq]  # a zero gradient is never clipped
            norm0 = torch.stack([_degree0(v).reshape(()) for v in norms])
        else:
            norms = torch.stack([per[k].reshape(b, -1).norm(2, dim=1) for k in names], dim=1).norm(2, dim=1)
            norm0 = norms.detach()
        shifted = norm0.numpy() + self.clip_eps  # (numpy: these few small ops cost less than in torch)
        clipped_np = shifted > self.C
        ratio = shifted / self.C
        clipped = torch.from_numpy(clipped_np)  # the branch of the degree-0 value
        gap = np.abs(ratio - 1)
        near = gap < self.margin
        rec["examples"] += b
        rec["clipped"] += int(clipped_np.sum())
        n_near = int(near.sum())
        rec["near_boundary"] += n_near
        if n_near:
            rec["near_boundary_examples"].update(int(i) for i in idx.numpy()[near])
        rec["min_relative_gap"] = min(rec["min_relative_gap"], float(gap.min()))

        weights = None if w is None else 1 - w[idx]
        inv = 1.0 / denom  # folded into the per-example coefficients: the gradient is sum_i coef_i g_i + noise
        if ring:
            factors = [self.C / (norms[j] + self.clip_eps) if bool(clipped[j]) else 1.0 for j in range(b)]
            coef = [(factors[j] if weights is None else factors[j] * weights[j]) * inv for j in range(b)]
            grads = {k: sum(coef[j] * per[k][j] for j in range(b)) for k in names}
            loss = sum(losses[j] if weights is None else losses[j] * weights[j] for j in range(b)) / denom
        else:
            factors = torch.where(clipped, self.C / (norms + self.clip_eps), torch.ones_like(norms))
            coef = (factors if weights is None else factors * weights) * inv
            grads = combine(coef) if fast is not None else {k: torch.einsum("b,b...->...", coef, per[k]) for k in names}
            loss = (losses if weights is None else losses * weights).sum() / denom
        out = grads if noise is None else {k: grads[k] + noise[k] for k in names}
        return loss.detach(), out
