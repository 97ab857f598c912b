"""Functional optimizers and learning-rate schedules.

Every optimizer here is *functional*: parameters and state are explicit dicts of tensors and
``step`` returns new dicts instead of mutating anything.  The update is written as ordinary
out-of-place tensor arithmetic (``+``, ``*``, ``/``, ``torch.sqrt``) with the learning rate,
betas and bias corrections as Python floats, so the very same code runs on plain float64
tensors (training, retraining) and on :class:`delsketch.series.Series` parameters (a ring run).

Nothing here inspects tensor values: no ``.item()``, no branching on data, no in-place ops,
no ``torch.optim``.

Schedules are small callables ``step -> multiplier``; the learning rate at 0-based step ``s`` is
``lr * schedule(s)``, a Python float.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "constant",
    "linear_decay",
    "cosine",
    "warmup",
    "schedule_from_config",
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "optimizer_from_config",
]

Params = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------


class Schedule:
    """A learning-rate multiplier as a function of the 0-based step index."""

    def __call__(self, step: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{self.describe()['name']}({args})"


class _Constant(Schedule):
    def __call__(self, step: int) -> float:
        return 1.0

    def describe(self) -> dict[str, Any]:
        return {"name": "constant"}


class _LinearDecay(Schedule):
    def __init__(self, total_steps: int):
        if total_steps <= 0:
            raise ValueError(f"linear_decay: total_steps must be positive, got {total_steps}")
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        return 1 - step / self.total_steps

    def describe(self) -> dict[str, Any]:
        return {"name": "linear_decay", "total_steps": self.total_steps}


class _Cosine(Schedule):
    def __init__(self, total_steps: int, final: float = 0.0):
        if total_steps <= 0:
            raise ValueError(f"cosine: total_steps must be positive, got {total_steps}")
        self.total_steps = int(total_steps)
        self.final = float(final)

    def __call__(self, step: int) -> float:
        frac = min(step, self.total_steps) / self.total_steps
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def describe(self) -> dict[str, Any]:
        return {"name": "cosine", "total_steps": self.total_steps, "final": self.final}


class _Warmup(Schedule):
    def __init__(self, steps: int, then: Schedule | None = None):
        if steps < 0:
            raise ValueError(f"warmup: steps must be >= 0, got {steps}")
        self.steps = int(steps)
        self.then = then if then is not None else _Constant()

    def __call__(self, step: int) -> float:
        if step < self.steps:
            return (step + 1) / self.steps
        return self.then(step - self.steps)

    def describe(self) -> dict[str, Any]:
        return {"name": "warmup", "steps": self.steps, "then": self.then.describe()}


def constant() -> Schedule:
    """Multiplier 1 at every step."""
    return _Constant()


def linear_decay(total_steps: int) -> Schedule:
    """Multiplier ``1 - step / total_steps`` (the reference microgpt's schedule)."""
    return _LinearDecay(total_steps)


def cosine(total_steps: int, final: float = 0.0) -> Schedule:
    """Half-cosine from 1 at step 0 to ``final`` at ``total_steps`` (held there afterwards)."""
    return _Cosine(total_steps, final)


def warmup(steps: int, then: Schedule | None = None) -> Schedule:
    """Linear warm-up ``(step + 1) / steps`` for the first ``steps`` steps, then ``then``.

    ``then`` is evaluated at ``step - steps`` (its own step 0 is the first step after the
    warm-up), so give it the number of steps that remain, e.g.
    ``warmup(100, then=cosine(total - 100))``.  Default ``then``: constant.
    """
    return _Warmup(steps, then)


def schedule_from_config(cfg: dict[str, Any] | None) -> Schedule:
    """Rebuild a schedule from its ``describe()`` dict (``None`` -> constant)."""
    if cfg is None:
        return _Constant()
    name = cfg.get("name")
    if name == "constant":
        return _Constant()
    if name == "linear_decay":
        return _LinearDecay(cfg["total_steps"])
    if name == "cosine":
        return _Cosine(cfg["total_steps"], cfg.get("final", 0.0))
    if name == "warmup":
        return _Warmup(cfg["steps"], schedule_from_config(cfg.get("then")))
    raise ValueError(f"unknown schedule {name!r} (choose from: constant, linear_decay, cosine, warmup)")


# --------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------


def _zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(p) for k, p in params.items()}


def _check_keys(params: Params, grads: Params) -> None:
    if list(params.keys()) != list(grads.keys()):
        missing = [k for k in params if k not in grads]
        raise KeyError(f"grads do not match params (missing: {missing})")


class Optimizer:
    """Base class of the functional optimizers.

    ``init(params)`` returns the initial state; ``step(params, grads, state, step)`` returns
    ``(new_params, new_state)`` computed out of place under ``torch.no_grad()``; ``step`` is the
    0-based index of the training step (it drives the schedule and bias corrections).

    Inside :func:`differentiable` the built-in optimizers compute the same update with autograd
    recording (for reverse mode through a whole run, :func:`delsketch.sketch.first_order`); a subclass
    supports that by entering ``self._grad_mode()`` instead of ``torch.no_grad()``.
    """

    lr: float
    schedule: Schedule
    _differentiable: bool = False

    def _grad_mode(self):
        return contextlib.nullcontext() if self._differentiable else torch.no_grad()

    def init(self, params: Params) -> dict[str, Any]:
        return {}

    def step(self, params: Params, grads: Params, state: dict[str, Any], step: int):
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        """The learning rate (a Python float) at 0-based step ``step``."""
        return self.lr * self.schedule(step)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        d = self.describe()
        args = ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "name")
        return f"{type(self).__name__}({args})"


@contextlib.contextmanager
def differentiable(opt: Optimizer):
    """Within this context ``opt.step`` records autograd history (built-in optimizers, plain tensors)."""
    old = opt._differentiable
    opt._differentiable = True
    try:
        yield opt
    finally:
        opt._differentiable = old


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball or Nesterov) momentum.

    Matches ``torch.optim.SGD`` (``maximize=False``)::

        g   = grad + weight_decay * p
        buf = g                                              at step 0
        buf = momentum * buf + (1 - dampening) * g           afterwards
        d   = g + momentum * buf  if nesterov else  buf   (d = g when momentum == 0)
        p   = p - lr_t * d

    (torch applies no dampening at the first step; with ``dampening=0`` the zero-initialized buffer gives the
    same ``buf_0 = g_0``.)

    The update is a polynomial in the gradients: it is analytic everywhere, the most benign
    choice for ring runs.
    """

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        schedule: Schedule | None = None,
        dampening: float = 0.0,
    ):
        if lr < 0:
            raise ValueError(f"SGD: lr must be >= 0, got {lr}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum requires momentum > 0 and dampening 0")
        self.dampening = float(dampening)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.schedule = schedule if schedule is not None else constant()

    def init(self, params: Params) -> dict[str, Any]:
        if self.momentum != 0.0:
            return {"momentum": _zeros_like(params)}
        return {}

    def step(self, params: Params, grads: Params, state: dict[str, Any], step: int):
        _check_keys(params, grads)
        lr_t = self.lr_at(step)
        new_params: Params = {}
        new_buf: Params = {}
        with self._grad_mode():
            for name, p in params.items():
                g = grads[name]
                if self.weight_decay != 0.0:
                    g = g + self.weight_decay * p
                if self.momentum != 0.0:
                    if self.dampening == 0.0:
                        buf = self.momentum * state["momentum"][name] + g
                    elif step == 0:
                        buf = g
                    else:
                        buf = self.momentum * state["momentum"][name] + (1 - self.dampening) * g
                    new_buf[name] = buf
                    d = g + self.momentum * buf if self.nesterov else buf
                else:
                    d = g
                new_params[name] = p - lr_t * d
        new_state = {"momentum": new_buf} if self.momentum != 0.0 else {}
        return new_params, new_state

    def describe(self) -> dict[str, Any]:
        return {
            "name": "sgd",
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
            **({"dampening": self.dampening} if self.dampening != 0.0 else {}),
            "schedule": self.schedule.describe(),
        }


class Adam(Optimizer):
    """Adam, functional.  Moments start at zero; bias corrections use ``1 - beta ** (step + 1)``.

    Standard form (``eps_inside_sqrt=False``, as ``torch.optim.Adam``)::

        p = p - lr_t * m_hat / (sqrt(v_hat) + eps)

    The paper's variant (``eps_inside_sqrt=True``)::

        p = p - lr_t * m_hat / sqrt(v_hat + eps)

    ``weight_decay`` here is L2 regularisation added to the gradient (``torch.optim.Adam``);
    see :class:`AdamW` for decoupled decay.

    Caveat for ring runs: ``sqrt`` is not analytic at 0.  With the standard form, a parameter
    whose gradient has been exactly zero so far (``v_hat == 0`` in the degree-0 coefficient,
    e.g. an embedding row never used) makes the series of ``sqrt(v_hat)`` blow up and the run
    fill with NaN/inf coefficients.  ``eps_inside_sqrt=True`` keeps the argument >= eps > 0,
    so the update stays analytic; prefer it for anything that will be sketched.
    """

    name = "adam"

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        schedule: Schedule | None = None,
    ):
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{type(self).__name__}: betas must lie in [0, 1), got {betas}")
        if eps <= 0 and eps_inside_sqrt:
            raise ValueError(f"{type(self).__name__}: eps must be > 0 with eps_inside_sqrt")
        self.lr = float(lr)
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.eps_inside_sqrt = bool(eps_inside_sqrt)
        self.weight_decay = float(weight_decay)
        self.schedule = schedule if schedule is not None else constant()

    def init(self, params: Params) -> dict[str, Any]:
        return {"m": _zeros_like(params), "v": _zeros_like(params)}

    # decoupled decay hook (AdamW overrides)
    def _decay(self, p: Tensor, lr_t: float) -> Tensor:
        return p

    def _grad(self, g: Tensor, p: Tensor) -> Tensor:
        if self.weight_decay != 0.0:
            return g + self.weight_decay * p
        return g

    def step(self, params: Params, grads: Params, state: dict[str, Any], step: int):
        from ..series import SeriesDomainError

        try:
            return self._step(params, grads, state, step)
        except SeriesDomainError as e:
            if self.eps_inside_sqrt:
                raise
            raise SeriesDomainError(
                f"{e}; standard Adam takes sqrt of a second moment that is exactly zero where a gradient is zero "
                f"(ReLU, unused rows): use {type(self).__name__}(..., eps_inside_sqrt=True) (the paper's variant) "
                "for ring runs") from None

    def _step(self, params: Params, grads: Params, state: dict[str, Any], step: int):
        _check_keys(params, grads)
        b1, b2 = self.betas
        lr_t = self.lr_at(step)
        bc1 = 1 - b1 ** (step + 1)
        bc2 = 1 - b2 ** (step + 1)
        new_params: Params = {}
        new_m: Params = {}
        new_v: Params = {}
        with self._grad_mode():
            for name, p in params.items():
                g = self._grad(grads[name], p)
                if _is_series(p) and _is_series(g):
                    new_params[name], new_m[name], new_v[name] = self._series_step(
                        p, g, state["m"][name], state["v"][name], lr_t, bc1, bc2
                    )
                    continue
                m = b1 * state["m"][name] + (1 - b1) * g
                v = b2 * state["v"][name] + (1 - b2) * (g * g)
                m_hat = m / bc1
                v_hat = v / bc2
                if self.eps_inside_sqrt:
                    denom = torch.sqrt(v_hat + self.eps)
                else:
                    denom = torch.sqrt(v_hat) + self.eps
                new_params[name] = self._decay(p, lr_t) - lr_t * m_hat / denom
                new_m[name] = m
                new_v[name] = v
        return new_params, {"m": new_m, "v": new_v}

    def _series_step(self, p, g, m, v, lr_t, bc1, bc2):
        """The same update on series coefficients, with fewer full passes (same formulas), done in slices of
        directions small enough to stay in cache (the update is elementwise, so slicing changes no number)."""
        from ..series import coefficients, native, variable

        pc = coefficients(self._decay(p, lr_t))
        gc = coefficients(g)
        mc0 = coefficients(m) if _is_series(m) else None
        vc0 = coefficients(v) if _is_series(v) else None
        M = max(pc.shape[0], gc.shape[0], *(x.shape[0] for x in (mc0, vc0) if x is not None))
        shape = (M, *gc.shape[1:])
        out_p = torch.empty(shape, dtype=gc.dtype)
        out_m = torch.empty(shape, dtype=gc.dtype)
        out_v = torch.empty(shape, dtype=gc.dtype)
        if native.adam_update(pc, gc, mc0, vc0, *self.betas, -lr_t / bc1, bc2, self.eps, self.eps_inside_sqrt,
                              out_p, out_m, out_v):  # one fused pass; else the eager slices below
            return variable(out_p), variable(out_m), variable(out_v)
        per = max(1, _SLICE_ELEMENTS // max(1, gc[0].numel()))
        for j in range(0, M, per):
            sl = slice(j, min(M, j + per))
            take = lambda x: x if x.shape[0] == 1 else x[sl]
            self._series_update(take(pc), take(gc), None if mc0 is None else take(mc0),
                                None if vc0 is None else take(vc0), lr_t, bc1, bc2, out_p[sl], out_m[sl], out_v[sl])
        return variable(out_p), variable(out_m), variable(out_v)

    def _series_update(self, pc, gc, mc, vc, lr_t, bc1, bc2, out_p, out_m, out_v):
        """One slice of the update, written for few passes over the coefficients: g*g by its symmetric
        Cauchy products, 1/bc2 folded into the normalization of the power recurrence, the final Cauchy
        product accumulated straight into the new parameters. Degree-0 work follows the plain formulas."""
        from ..series import kernels as ring

        b1, b2 = self.betas
        K = gc.shape[1]
        mc = torch.add(mc * b1, gc, alpha=1 - b1, out=out_m) if mc is not None else torch.mul(gc, 1 - b1, out=out_m)
        g2 = torch.empty(gc.shape, dtype=gc.dtype)
        for k in range(K):
            terms = [(gc[:, j], gc[:, k - j], 2.0) for j in range((k + 1) // 2)]
            if k % 2 == 0:
                terms.append((gc[:, k // 2], gc[:, k // 2], 1.0))
            ring.accumulate(g2[:, k], terms)
        vc = torch.add(vc * b2, g2, alpha=1 - b2, out=out_v) if vc is not None else torch.mul(g2, 1 - b2, out=out_v)
        del g2
        # d = (v / bc2 + eps)^(-1/2)  (eps inside)  or  1 / (sqrt(v / bc2) + eps): power recurrences on
        # uh = u / u_0 with u = v / bc2 (+ eps): uh_k = v_k / (bc2 u_0) for k >= 1
        u0 = vc[:, 0] / bc2
        if self.eps_inside_sqrt:
            u0 = u0 + self.eps
        if bool((u0 == 0).any()):
            raise ring.SeriesDomainError(
                "adam: degree-0 coefficient of the second moment is zero (a gradient exactly 0 so far): standard "
                "Adam's sqrt is not analytic there; use delsketch.Adam/AdamW(..., eps_inside_sqrt=True)")
        d = torch.empty(gc.shape, dtype=gc.dtype)
        (d0,) = ring.apply0(u0, torch.rsqrt if self.eps_inside_sqrt else torch.sqrt, positive=True)
        d[:, 0] = d0
        if K > 1:
            (inv0,) = ring.apply0(u0 * bc2, torch.reciprocal)
            uh = vc[:, 1:] * inv0.unsqueeze(1)  # uh_1 .. uh_{K-1}
            r = -0.5 if self.eps_inside_sqrt else 0.5
            for k in range(1, K):
                ring.accumulate(d[:, k], [(uh[:, j - 1], d[:, k - j], ((r + 1.0) * j - k) / k) for j in range(1, k + 1)])
            del uh
            if not self.eps_inside_sqrt:  # d = 1 / (sqrt(u) + eps)
                d[:, 0] += self.eps
                d = ring.reciprocal(d)
        elif not self.eps_inside_sqrt:
            d = 1.0 / (d + self.eps)
        # p - lr_t / bc1 * (m * d), the Cauchy product accumulated into p
        f = -lr_t / bc1
        out_p.copy_(pc)
        for k in range(K):
            ok = out_p[:, k]
            for j in range(k + 1):
                ok.addcmul_(mc[:, j], d[:, k - j], value=f)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "eps_inside_sqrt": self.eps_inside_sqrt,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule.describe(),
        }


class AdamW(Adam):
    """Adam with decoupled weight decay (as ``torch.optim.AdamW``)::

        p = p * (1 - lr_t * weight_decay) - lr_t * m_hat / denom

    ``denom`` as in :class:`Adam` (``eps_inside_sqrt`` selects the paper's variant).
    Default ``weight_decay`` 1e-2 as in torch.
    """

    name = "adamw"

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 1e-2,
        schedule: Schedule | None = None,
    ):
        super().__init__(lr, betas, eps, eps_inside_sqrt, weight_decay, schedule)

    def _grad(self, g: Tensor, p: Tensor) -> Tensor:
        return g

    def _decay(self, p: Tensor, lr_t: float) -> Tensor:
        if self.weight_decay != 0.0:
            return p * (1 - lr_t * self.weight_decay)
        return p


#: complex elements per slice of the fused series update (~2 MB): keeps the temporaries in cache
_SLICE_ELEMENTS = 1 << 17


def _is_series(x) -> bool:
    return type(x).__name__ == "Series" and hasattr(x, "coeffs")


def optimizer_from_config(cfg: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer from its ``describe()`` dict."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    sched = schedule_from_config(cfg.pop("schedule", None))
    if name == "sgd":
        return SGD(schedule=sched, **cfg)
    if name in ("adam", "adamw"):
        cls = Adam if name == "adam" else AdamW
        betas = tuple(cfg.pop("betas", (0.9, 0.999)))
        return cls(betas=betas, schedule=sched, **cfg)  # type: ignore[arg-type]
    raise ValueError(f"unknown optimizer {name!r} (choose from: sgd, adam, adamw)")

