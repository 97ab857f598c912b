"""Outputs of a trained model, of any shape: what every question about a deletion is asked about.

An output is any function ``params -> Tensor`` (of any shape) or ``params -> {name: Tensor}``; a task's query
string (``"test:3"``, ``"emma"``) and a list of outputs (stacked on a leading axis) are outputs too.
:class:`Output` flattens whatever the function returns to one vector of ``P`` numbers, so the estimators
(sketch, first order, exact series, retraining) work on ``[..., P]`` and hand back the output's own shape:
``unflatten(x [..., P]) -> Tensor [..., *shape]`` or ``{name: Tensor [..., *shape_name]}``.

Ready-made outputs: :func:`parameters` (the trained parameters themselves: what unlearning needs),
:func:`own_losses` (every training example's own loss: what a memorization audit needs), :func:`losses`
(the per-example losses of tensors the user passes, e.g. a test set or a membership candidate set),
:func:`loss` (their mean) and :func:`predictions` (the model's outputs on given inputs).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import series as taylor
from .task import Task, describe_callable

__all__ = ["Output", "as_output", "parameters", "own_losses", "losses", "loss", "predictions"]


@dataclass(frozen=True)
class _Part:
    key: Optional[str]  # None for a plain tensor output
    shape: tuple


class Output:
    """One output: a function of the parameters, with a name and the structure of its value.

    ``fn(params)`` may return a Tensor of any shape or a dict of Tensors; the structure is learned on the
    first evaluation (or given) and every later value must have it."""

    def __init__(self, fn: Callable[[dict], Any], name: Optional[str] = None, key: Optional[str] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or "output"
        if self.name == "<lambda>":
            self.name = "output"
        self._key = key  # a stable identity for caching (a query string, a ready-made output's description)
        self.parts: Optional[tuple[_Part, ...]] = None

    # -- structure ---------------------------------------------------------------------------------
    def _learn(self, value) -> list[Tensor]:
        if isinstance(value, dict):
            if not value or not all(isinstance(v, Tensor) for v in value.values()):
                raise ValueError(f"output {self.name!r} must return a Tensor or a non-empty dict of Tensors")
            items = [(str(k), value[k]) for k in sorted(value)]
            parts = tuple(_Part(k, tuple(v.shape)) for k, v in items)
            tensors = [v for _, v in items]
        elif isinstance(value, Tensor):
            parts, tensors = (_Part(None, tuple(value.shape)),), [value]
        else:
            raise ValueError(f"output {self.name!r} must return a Tensor or a dict of Tensors, got {type(value).__name__}")
        if self.parts is None:
            self.parts = parts
        elif parts != self.parts:
            raise ValueError(f"output {self.name!r} changed its shape: {self.describe_shape(parts)} != "
                             f"{self.describe_shape(self.parts)}")
        return tensors

    @property
    def size(self) -> int:
        """P, the number of real numbers in one value."""
        self._need_parts()
        return sum(math.prod(p.shape) for p in self.parts)

    @property
    def shape(self) -> Union[tuple, dict]:
        self._need_parts()
        if self.parts[0].key is None:
            return self.parts[0].shape
        return {p.key: p.shape for p in self.parts}

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()

    @staticmethod
    def describe_shape(parts) -> str:
        if parts[0].key is None:
            return str(list(parts[0].shape))
        return "{" + ", ".join(f"{p.key}: {list(p.shape)}" for p in parts) + "}"

    def _need_parts(self) -> None:
        if self.parts is None:
            raise RuntimeError(f"output {self.name!r} has not been evaluated yet (its shape is unknown)")

    @property
    def cache_key(self) -> Optional[str]:
        return self._key

    # -- evaluation --------------------------------------------------------------------------------
    def value(self, params: dict) -> Any:
        return self.fn(params)

    def flat(self, params: dict) -> Tensor:
        """The value as a plain ``[P]`` tensor (parameters plain, possibly with autograd history)."""
        return torch.cat([t.reshape(-1).to(torch.float64) for t in self._learn(self.value(params))])

    def flat_coefficients(self, params: dict, degree: int) -> Tensor:
        """Series-valued parameters: the output's coefficients ``[m, K, P]`` (m = 1 for an output that does not
        depend on the parameters, or where every direction shares it)."""
        with torch.no_grad():
            tensors = self._learn(self.value(params))
        cs = []
        for t in tensors:
            if taylor.is_series(t):
                c = taylor.coefficients(t)
            else:  # a constant: degree 0 only
                c = torch.zeros(1, degree + 1, *t.shape, dtype=torch.complex128)
                c[:, 0] = t.detach().to(torch.complex128)
            cs.append(c.reshape(c.shape[0], c.shape[1], -1))
        m = max(c.shape[0] for c in cs)
        return torch.cat([c.expand(m, *c.shape[1:]) for c in cs], dim=-1)

    def unflatten(self, x: Tensor) -> Union[Tensor, dict]:
        """``[..., P]`` -> ``[..., *shape]`` (or a dict of those)."""
        self._need_parts()
        lead = x.shape[:-1]
        out, at = {}, 0
        for p in self.parts:
            size = math.prod(p.shape)
            out[p.key] = x[..., at : at + size].reshape(tuple(lead) + tuple(p.shape))
            at += size
        return out[None] if self.parts[0].key is None else out

    def element_names(self) -> list[str]:
        """A name for each of the P numbers (``name[i,j]`` / ``name.key[i]``), for tables."""
        self._need_parts()
        names = []
        for p in self.parts:
            head = self.name if p.key is None else f"{self.name}.{p.key}"
            if p.shape == ():
                names.append(head)
            else:
                for ix in _ndindex(p.shape):
                    names.append(f"{head}[{','.join(map(str, ix))}]")
        return names

    def __repr__(self) -> str:
        return f"Output({self.name!r})"


def _ndindex(shape):
    import itertools

    return itertools.product(*(range(s) for s in shape))


def _stack_outputs(outs: list[Output]) -> Output:
    """A list of outputs as one output stacked on a leading axis (all must have the same shape)."""

    def fn(params):
        vals = [o.value(params) for o in outs]
        if any(not isinstance(v, Tensor) for v in vals):
            raise ValueError("a list of outputs must be tensors of one shape (give a dict-valued output instead)")
        shapes = {tuple(v.shape) for v in vals}
        if len(shapes) != 1:
            raise ValueError(f"outputs in a list must share one shape, got {sorted(map(list, shapes))}")
        return torch.stack(vals)

    keys = [o.cache_key for o in outs]
    key = None if any(k is None for k in keys) else "stack(" + "|".join(keys) + ")"
    out = Output(fn, name=",".join(o.name for o in outs), key=key)
    out.members = [o.name for o in outs]
    return out


def as_output(task: Task, q) -> Output:
    """Whatever a user passes as an output: an :class:`Output`, a callable, a task query string, or a list/tuple of
    those (stacked on a leading axis)."""
    if isinstance(q, Output):
        return q
    if isinstance(q, str) and q in (task.outputs or {}):
        o = task.outputs[q]
        if isinstance(o, Output):
            o.name = q  # a named output is known by its name
            return o
        return Output(o, name=q, key=f"named:{q}")
    if isinstance(q, str):
        task.validate_query(q)
        return Output(lambda p, q=q: task.query(p, q), name=q, key=f"query:{q}")
    if isinstance(q, (list, tuple)):
        if not q:
            raise ValueError("give at least one output")
        return _stack_outputs([as_output(task, x) for x in q])
    if callable(q):
        return Output(q)
    raise ValueError(f"an output is a callable params -> Tensor, a query string or a list of them; got {type(q).__name__}")


# ----------------------------------------------------------------------------------------------
# ready-made outputs
# ----------------------------------------------------------------------------------------------


def _tensor_key(*ts) -> str:
    h = hashlib.sha256()
    for t in ts:
        t = t.detach().contiguous()
        h.update(f"{list(t.shape)}{t.dtype}".encode())
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def parameters(names: Optional[Sequence[str]] = None) -> Output:
    """The trained parameters themselves, ``{name: Tensor}`` (all of them, or those named)."""
    keep = None if names is None else list(names)

    def fn(params):
        if keep is not None:
            missing = [k for k in keep if k not in params]
            if missing:
                raise ValueError(f"no parameter named {missing[0]!r} (the model has: {', '.join(sorted(params))})")
        return {k: v for k, v in params.items() if keep is None or k in keep}

    return Output(fn, name="parameters", key=f"parameters:{keep}")


def own_losses(task: Task, indices: Optional[Sequence[int]] = None, batch: int = 256) -> Output:
    """Every training example's own loss (or those of ``indices``): shape ``[len(indices)]``."""
    idx = torch.arange(task.n) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("own_losses needs at least one example index")
    if int(idx.min()) < 0 or int(idx.max()) >= task.n:
        raise ValueError(f"example index out of range: the task has {task.n} training examples (0..{task.n - 1})")

    def fn(params):
        parts = [task.example_losses(params, idx[lo : lo + batch]) for lo in range(0, idx.numel(), batch)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    return Output(fn, name="own_losses", key=f"own_losses:{_tensor_key(idx)}")


def _need_forward(task: Task, what: str) -> None:
    if task.forward is None or task.loss_fn is None:
        raise ValueError(f"{what} needs a task with a model forward and a loss (build it with Task.from_module)")


def losses(task: Task, inputs: Tensor, targets: Tensor, name: str = "losses") -> Output:
    """The per-example losses (the task's ``loss_fn``) of any tensors, e.g. a test set: shape ``[len(inputs)]``."""
    _need_forward(task, "losses(...)")
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets differ in length ({len(inputs)} != {len(targets)})")
    inputs = _as_model_dtype(inputs)
    return Output(lambda p: task.loss_fn(task.forward(p, inputs), targets), name=name,
                  key=f"losses:{describe_hash(task.loss_fn)}:{_tensor_key(inputs, targets)}")


def loss(task: Task, inputs: Tensor, targets: Tensor, name: str = "loss") -> Output:
    """The mean loss of these inputs: a scalar."""
    _need_forward(task, "loss(...)")
    inputs = _as_model_dtype(inputs)
    return Output(lambda p: task.loss_fn(task.forward(p, inputs), targets).mean(), name=name,
                  key=f"loss:{describe_hash(task.loss_fn)}:{_tensor_key(inputs, targets)}")


def predictions(task: Task, inputs: Tensor, name: str = "predictions") -> Output:
    """The model's outputs on these inputs: shape ``[len(inputs), *output]``."""
    _need_forward(task, "predictions(...)")
    inputs = _as_model_dtype(inputs)
    return Output(lambda p: task.forward(p, inputs), name=name, key=f"predictions:{_tensor_key(inputs)}")


def _as_model_dtype(x: Tensor) -> Tensor:
    return x.to(torch.float64) if isinstance(x, Tensor) and x.is_floating_point() else x


def describe_hash(fn) -> str:
    return hashlib.sha256(describe_callable(fn).encode()).hexdigest()[:16]
