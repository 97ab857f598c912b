"""The DP-SGD gradient transform (:class:`DPGradient`), called by the training loop through ``Task.gradient``.

Each step: per-example gradients g_i of the unweighted per-example losses; clip factor
``f_i = min(1, C / (||g_i|| + clip_eps))``; the step's gradient is
``(sum_i (1 - w_i) f_i g_i + sigma C xi_s) / denominator`` with ``xi_s`` standard Gaussian noise drawn from a
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


def step_noise(seed: int, step: int, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Standard Gaussian noise for one step, a function of (seed, step) alone (float64, parameter order)."""
    state = np.random.SeedSequence([int(seed), int(step), 0xD95]).generate_state(2, dtype=np.uint64)
    gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return {k: torch.randn(tuple(s), generator=gen, dtype=torch.float64) for k, s in shapes.items()}


def _degree0(x: Tensor) -> Tensor:
    """The real degree-0 value of a plain tensor or a Series (detached; all directions share it)."""
    if taylor.is_series(x):
        return taylor.coefficients(x)[0, 0].real.detach()
    return x.detach()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"


class DPGradient:
    """``Task.gradient`` for DP-SGD (see the module docstring). ``denominator``: a number (the expected batch
    size) or ``None`` (each step's batch size)."""

    def __init__(self, max_grad_norm: float, noise_multiplier: float, seed: int, denominator: Optional[float],
                 clip_eps: float = 1e-6, boundary_margin: float = 0.01, task_name: str = "task"):
        self.C = float(max_grad_norm)
        self.sigma = float(noise_multiplier)
        self.seed = int(seed)
        self.denominator = None if denominator is None else float(denominator)
        self.clip_eps = float(clip_eps)
        self.margin = float(boundary_margin)
        self.task_name = task_name
        self._use_vmap = True
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
        noise = step_noise(self.seed, step, {k: v.shape for k, v in params.items()}) if self.sigma > 0 else None
        if b == 0:
            rec["empty_batches"] += 1
            grads = {k: (self.sigma * self.C / denom) * noise[k] if noise is not None
                     else torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}
            return torch.zeros((), dtype=torch.float64), grads

        per, losses = self.per_example(params, example_losses, idx, create_graph)
        names = list(params)
        ring = isinstance(losses, list)
        if ring:
            sq = [sum((per[k][j] * per[k][j]).sum() for k in names) for j in range(b)]
            norms = [s.sqrt() if bool(_degree0(s) > 0) else s for s in sq]  # a zero gradient is never clipped
            norm0 = torch.stack([_degree0(v).reshape(()) for v in norms])
        else:
            norms = torch.stack([per[k].reshape(b, -1).norm(2, dim=1) for k in names], dim=1).norm(2, dim=1)
            norm0 = norms.detach()
        clipped = (norm0 + self.clip_eps) > self.C  # the branch of the degree-0 value
        gap = ((norm0 + self.clip_eps) / self.C - 1).abs()
        near = gap < self.margin
        rec["examples"] += b
        rec["clipped"] += int(clipped.sum())
        rec["near_boundary"] += int(near.sum())
        rec["near_boundary_examples"].update(int(i) for i in idx[near].tolist())
        rec["min_relative_gap"] = min(rec["min_relative_gap"], float(gap.min()))

        weights = None if w is None else 1 - w[idx]
        if ring:
            factors = [self.C / (norms[j] + self.clip_eps) if bool(clipped[j]) else 1.0 for j in range(b)]
            coef = [factors[j] if weights is None else factors[j] * weights[j] for j in range(b)]
            grads = {k: sum(coef[j] * per[k][j] for j in range(b)) for k in names}
            loss = sum(losses[j] if weights is None else losses[j] * weights[j] for j in range(b)) / denom
        else:
            factors = torch.where(clipped, self.C / (norms + self.clip_eps), torch.ones_like(norms))
            coef = factors if weights is None else factors * weights
            grads = {k: torch.einsum("b,b...->...", coef, per[k]) for k in names}
            loss = (losses if weights is None else losses * weights).sum() / denom
        out = {}
        for k in names:
            g = grads[k]
            if noise is not None:
                g = g + self.sigma * self.C * noise[k]
            out[k] = g / denom
        return loss.detach(), out
