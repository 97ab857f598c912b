"""The front door: a :class:`Task` from an ordinary PyTorch model, data, per-example loss and optimizer.

``Task.from_module(model, (X, y), loss_fn, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
steps=150)`` describes the run a user's own loop performs::

    for each step: batch B; loss = loss_fn(model(X[B]), y[B]).mean(); loss.backward(); opt.step()

and a plain :func:`delsketch.train` of the task reproduces that loop (same initial parameters, same batches,
the same update formulas) in float64. Example ``i``'s loss carries the weight ``1 - w_i``; the batch loss is

* ``"fixed"`` (default): ``sum_{i in B} (1 - w_i) loss_i / |B|``. Deleting examples removes their terms and
  keeps the divisor: a deleted example's share of the gradient is gone, the others' shares are unchanged.
  This is what a retraining that keeps the batch *schedule* (and so the step sizes) would do when the
  deleted examples are masked out. Use it for "what if this example had been absent from the data"
  questions about a run whose batches are fixed, and for anything compared with the paper.
* ``"renormalized"``: ``sum_{i in B} (1 - w_i) loss_i / sum_{i in B} (1 - w_i)``: the batch loss stays a mean
  over the examples left in the batch (a batch that loses examples gets a larger per-example weight). Use it
  when the retraining you mean is "the same loop on the data without D", with mean-reduced losses of
  whatever is left in each batch (e.g. full-batch training on a smaller data set).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .optim import SGD, Adam, AdamW, Optimizer, Schedule, constant
from .task import NORMALIZATIONS, Task

__all__ = ["from_module", "FromModuleWarning", "batches"]

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD, torch.optim.Adam or torch.optim.AdamW instances, or delsketch.SGD, "
                        "Adam or AdamW")


class FromModuleWarning(UserWarning):
    """Something about a user's model or optimizer that changes how delsketch runs it (float32 -> float64,
    NaN-prone optimizer in ring runs)."""


def from_module(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Any, Tensor], Tensor],
    optimizer: Any,
    *,
    steps: Optional[int] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    shuffle_seed: int = 0,
    lr_schedule: Optional[Schedule] = None,
    normalization: str = "fixed",
    name: str = "module",
    privacy: Any = None,
) -> Task:
    """The :class:`Task` of training ``model`` on ``data`` with ``loss_fn`` and ``optimizer``.

    ``model``: any ``nn.Module``; its current parameters are the initial point. It is deep-copied and the
        copy runs in float64 (a float32 model is converted, with a :class:`FromModuleWarning`, and
        ``task.config["converted_from"]`` records the original dtype); the user's model is never modified.
        Parameters the optimizer does not hold, and buffers, stay fixed at their current values.
    ``data``: ``(inputs, targets)`` tensors with the examples along dim 0, a ``TensorDataset`` of two
        tensors, or any map-style ``Dataset`` of ``(input, target)`` pairs (stacked once, here). Floating
        tensors become float64.
    ``loss_fn(outputs, targets)``: per-example losses of shape ``[batch]`` (e.g. ``reduction="none"``).
    ``optimizer``: a fresh ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` built on the model's parameters (its
        hyperparameters are read; it is never stepped), or a delsketch optimizer.
    ``steps`` / ``epochs``: the length of the run (exactly one of them).
    ``batch_size``: ``None`` = full batch at every step; otherwise the batches, epoch after epoch, that
        ``DataLoader(dataset, batch_size, shuffle=True, generator=torch.Generator().manual_seed(shuffle_seed))``
        yields (one seeded permutation per epoch cut into consecutive batches, the last one possibly smaller).
    ``lr_schedule``: a delsketch schedule (``constant``, ``cosine``, ``linear_decay``, ``warmup``) that
        multiplies the optimizer's lr.
    ``normalization``: ``"fixed"`` or ``"renormalized"``; see the module docstring for which one you want.
    ``privacy``: ``None``, or DP-SGD settings (``delsketch.privacy.DP(...)``): the task is then made private with
        :func:`delsketch.privacy.make_private` (per-example clipping, seeded noise, Poisson sampling).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (choose from: {', '.join(NORMALIZATIONS)})")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> per-example losses, got {type(loss_fn).__name__}")
    _check_modules(model)
    inputs, targets = _pairs(data)
    n = int(inputs.shape[0])

    trainable = _trainable_names(model, optimizer)
    opt = _optimizer(optimizer, lr_schedule)

    net = copy.deepcopy(model)
    dtypes = sorted({str(t.dtype) for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()})
    converted = [d for d in dtypes if d != "torch.float64"]
    if any(t.is_complex() for t in net.parameters()):
        raise TypeError("model has complex parameters; delsketch trains real float64 parameters")
    net = net.to(torch.float64)
    for p in net.parameters():
        p.requires_grad_(False)
    init = {k: p.detach().clone() for k, p in net.named_parameters() if k in trainable}
    fixed = {k: t for k, t in list(net.named_parameters()) + list(net.named_buffers()) if k not in trainable}
    if not init:
        raise ValueError("the optimizer holds none of the model's parameters: nothing to train")

    def forward(params, x):
        return functional_call(net, {**fixed, **params}, (x,), strict=False, tie_weights=False)

    def example_losses(params, idx):
        return loss_fn(forward(params, inputs[idx]), targets[idx])

    schedule = batches(n, steps=steps, epochs=epochs, batch_size=batch_size, shuffle_seed=shuffle_seed)
    _check_loss_shape(example_losses, init, schedule[0])

    config = {
        "source": "from_module",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "batch_size": batch_size,
        "shuffle_seed": shuffle_seed if batch_size is not None else None,
        "epochs": epochs,
        "trainable": sorted(init),
        "fixed": sorted(fixed),
        "converted_from": converted or None,
        "inputs": {"shape": list(inputs.shape), "dtype": str(inputs.dtype)},
        "targets": {"shape": list(targets.shape), "dtype": str(targets.dtype)},
    }
    if converted:
        warnings.warn(f"from_module: the model ({', '.join(converted)}) runs in float64 on a copy "
                      "(task.config['converted_from'])", FromModuleWarning, stacklevel=3)
    task = Task(
        name=name,
        n=n,
        init_params=lambda: {k: v.clone() for k, v in init.items()},
        example_losses=example_losses,
        schedule=schedule,
        optimizer=opt,
        normalization=normalization,
        config=config,
        model=net,
        forward=forward,
        loss_fn=loss_fn,
        data=(inputs, targets),
    )
    return task if privacy is None else privacy.apply(task)


def batches(n: int, *, steps: Optional[int] = None, epochs: Optional[int] = None, batch_size: Optional[int] = None,
            shuffle_seed: int = 0) -> list[list[int]]:
    """The batch schedule of :func:`from_module`: full batches, or per epoch one seeded permutation cut into
    consecutive batches of ``batch_size`` (the last may be smaller); ``steps`` may end inside an epoch.

    The permutations are a ``DataLoader``'s with ``shuffle=True`` and a generator seeded with ``shuffle_seed``
    (``num_workers=0``): each epoch's iterator first draws its base seed from the generator, then the
    sampler draws ``torch.randperm(n)``, and one more (empty) remainder at the end of the epoch
    (tests/test_from_module.py checks this against ``DataLoader``)."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs= (the length of the run)")
    if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size):
        raise ValueError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
    bs = n if batch_size is None else min(batch_size, n)
    per_epoch = math.ceil(n / bs)
    total = steps if steps is not None else epochs * per_epoch
    if not (isinstance(total, int) and total >= 1):
        raise ValueError(f"steps and epochs must be positive integers, got steps={steps!r}, epochs={epochs!r}")
    if batch_size is None:
        return [list(range(n)) for _ in range(total)]
    gen = torch.Generator().manual_seed(int(shuffle_seed))
    out: list[list[int]] = []
    while len(out) < total:
        torch.empty((), dtype=torch.int64).random_(generator=gen)  # the DataLoader iterator's base seed
        perm = torch.randperm(n, generator=gen).tolist()
        torch.randperm(n, generator=gen)  # RandomSampler's empty remainder draw (num_samples % n == 0) at the end
        out.extend(perm[j: j + bs] for j in range(0, n, bs))
    return out[:total]


# -- data ------------------------------------------------------------------------------------------


def _pairs(data) -> tuple[Tensor, Tensor]:
    tensors = getattr(data, "tensors", None)  # TensorDataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    elif isinstance(tensors, tuple):
        if len(tensors) != 2:
            raise ValueError(f"data: a TensorDataset of (inputs, targets) needs 2 tensors, got {len(tensors)}")
        x, y = tensors
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (tuple, list, Tensor)):
        if len(data) == 0:
            raise ValueError("data: the dataset is empty")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise ValueError("data: a Dataset must return (input, target) pairs")
        try:
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"data: cannot stack the dataset's examples into tensors ({str(e).splitlines()[0]})") from None
    else:
        raise TypeError("data must be (inputs, targets) tensors, a TensorDataset or a map-style Dataset of "
                        f"(input, target) pairs, got {type(data).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"data: inputs and targets need the same number of examples along dim 0, got shapes "
                         f"{list(x.shape)} and {list(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("data: no examples")
    return _f64(x), _f64(y)


def _f64(t: Tensor) -> Tensor:
    t = t.detach()
    if t.is_complex():
        raise TypeError("data: complex tensors are not supported")
    return (t.to(torch.float64) if t.is_floating_point() else t.clone()).contiguous()


# -- model -----------------------------------------------------------------------------------------


def _check_modules(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 and mod.training:
            raise ValueError(f"{where} is {type(mod).__name__}(p={mod.p}) in training mode: the run would be random; "
                             "set p=0 or call model.eval()")
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training and mod.track_running_stats:
            raise ValueError(f"{where} is {type(mod).__name__} in training mode with running statistics, which "
                             "training would update in place; call .eval() on it or use track_running_stats=False")


def _trainable_names(model: nn.Module, optimizer) -> set[str]:
    names = {id(p): k for k, p in model.named_parameters()}
    if isinstance(optimizer, Optimizer):
        return {k for k, p in model.named_parameters() if p.requires_grad}
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return set()  # _optimizer raises the one-line error
    out = set()
    for g in groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model; build it on "
                                 "model.parameters()")
            out.add(names[id(p)])
    return out


# -- optimizer -------------------------------------------------------------------------------------


def _optimizer(opt, lr_schedule: Optional[Schedule]) -> Optimizer:
    if lr_schedule is not None and not isinstance(lr_schedule, Schedule):
        raise TypeError("lr_schedule must be a delsketch schedule (constant, cosine, linear_decay, warmup), got "
                        f"{type(lr_schedule).__name__}")
    if isinstance(opt, Optimizer):
        if lr_schedule is not None:
            opt = copy.copy(opt)
            opt.schedule = lr_schedule
        return _warn_if_nan_prone(opt)
    kind = type(opt)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise TypeError(f"optimizer: {kind.__module__}.{kind.__qualname__} is not supported (use {SUPPORTED_OPTIMIZERS})")
    if any(len(s) for s in opt.state.values()):
        raise ValueError("optimizer: it has already taken steps (its state is not empty); pass a fresh one")
    hp = _one_group(opt)
    if hp.get("maximize", False):
        raise ValueError("optimizer: maximize=True is not supported (negate the loss instead)")
    sched = lr_schedule if lr_schedule is not None else constant()
    lr = float(hp["lr"])
    if kind is torch.optim.SGD:
        return SGD(lr, momentum=float(hp["momentum"]), weight_decay=float(hp["weight_decay"]),
                   nesterov=bool(hp["nesterov"]), dampening=float(hp["dampening"]), schedule=sched)
    if hp.get("amsgrad", False):
        raise ValueError(f"optimizer: {kind.__name__}(amsgrad=True) is not supported (its running max is not "
                         "analytic); use amsgrad=False")
    betas = tuple(float(b) for b in hp["betas"])
    decoupled = kind is torch.optim.AdamW or bool(hp.get("decoupled_weight_decay", False))
    cls = AdamW if decoupled else Adam
    return _warn_if_nan_prone(cls(lr, betas=betas, eps=float(hp["eps"]), weight_decay=float(hp["weight_decay"]),
                                  schedule=sched))


_HYPER_IGNORED = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr", "name"}


def _one_group(opt) -> dict:
    groups = [{k: v for k, v in g.items() if k not in _HYPER_IGNORED} for g in opt.param_groups]
    norm = [{k: (float(v) if isinstance(v, Tensor) else v) for k, v in g.items()} for g in groups]
    if any(g != norm[0] for g in norm[1:]):
        raise ValueError("optimizer: parameter groups with different hyperparameters are not supported")
    return norm[0]


def _warn_if_nan_prone(opt: Optimizer) -> Optimizer:
    if isinstance(opt, Adam) and not opt.eps_inside_sqrt:
        warnings.warn(
            f"{type(opt).__name__} with eps outside the square root (torch's form) is NaN-prone in ring runs where "
            f"a gradient is exactly zero; for sketching use delsketch.{type(opt).__name__}(lr, eps_inside_sqrt=True)",
            FromModuleWarning, stacklevel=4)
    return opt


def _check_loss_shape(example_losses, params, batch: list[int]) -> None:
    idx = torch.tensor(batch, dtype=torch.long)
    with torch.no_grad():
        out = example_losses(params, idx)
    if not isinstance(out, Tensor) or tuple(out.shape) != (len(batch),):
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"loss_fn must return per-example losses of shape [{len(batch)}] for a batch of "
                         f"{len(batch)} (e.g. reduction='none'), got {got}")
