"""How much memory a ring run needs per direction, and how many directions fit a budget.

A ring run keeps, per direction, K = degree + 1 complex128 coefficients (16 K bytes) of every tensor a plain
step keeps: the parameters, their gradients, the new parameters, the optimizer's state and the activations
autograd saves for the backward pass. :func:`ring_bytes_per_direction` counts those by running one plain step
of the task's largest batch (activations through ``torch.autograd.graph.saved_tensors_hooks``, the optimizer's
state by one real step) and multiplies by :data:`TRANSIENT_FACTOR` for the temporaries of the series products.
tests/test_memory.py checks the estimate against the peak resident memory measured in a separate process.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from .loop import _batch_gradient, _fresh_leaves
from .task import Task

__all__ = ["ring_bytes_per_direction", "available_bytes", "parse_bytes", "directions_that_fit",
           "DEFAULT_MEMORY_FRACTION", "TRANSIENT_FACTOR", "RESERVE_BYTES"]

#: the series products' temporaries, on top of what a plain step keeps (measured peaks: tests/test_memory.py).
#: 3.0 until the heap cache (delsketch/_alloc.py): blocks it keeps for reuse raised the measured peak per
#: direction by up to 1.5x (a CNN: 25-39 MiB against 20-25), hence 4.5
TRANSIENT_FACTOR = 4.5
#: memory a ring run needs whatever its number of directions (imports, plain-step buffers; measured 45-240 MB)
RESERVE_BYTES = 256 << 20
#: without a budget, a ring run may use this share of the memory available when it starts
DEFAULT_MEMORY_FRACTION = 0.5


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, dict):
        return sum(_numel(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    return 0


def step_elements(task: Task) -> dict:
    """Element counts a plain step of the task's largest batch keeps: ``params``, ``saved`` (activations autograd
    saves), ``state`` (the optimizer's state after one step)."""
    params = _fresh_leaves(task.init_params())
    names = list(params)
    s = max(range(len(task.schedule)), key=lambda j: len(task.schedule[j]))
    idx = torch.tensor(task.schedule[s], dtype=torch.long)
    w = torch.zeros(task.n, dtype=torch.float64)
    saved = [0]

    def pack(t):
        if t.is_floating_point() or t.is_complex():
            saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if task.gradient is not None:
            _, grads = task.gradient(params, task.example_losses, w, idx, s, create_graph=False)
        else:
            _, grads = _batch_gradient(task, params, names, w, idx, False)
    opt = task.optimizer
    _, state = opt.step({k: v.detach() for k, v in params.items()}, {k: g.detach() for k, g in grads.items()},
                        opt.init(params), 0)
    return {"params": _numel(params), "saved": saved[0], "state": _numel(state)}


def ring_bytes_per_direction(task: Task, degree: int) -> int:
    """Estimated peak bytes one direction adds to a ring run of ``task`` at ``degree``."""
    e = step_elements(task)
    units = 3 * e["params"] + e["state"] + e["saved"]  # parameters, gradients, new parameters; state; activations
    return int(16 * (degree + 1) * units * TRANSIENT_FACTOR)


def available_bytes() -> Optional[int]:
    """Memory available to this process now (Linux ``MemAvailable``, within a cgroup limit if lower); None if
    unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit():
            used = 0
            for upath in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(open(upath).read().strip())
                    break
                except (OSError, ValueError):
                    continue
            limit = int(raw) - used
            if limit > 0 and (avail is None or limit < avail):
                avail = limit
        break
    if avail is None and hasattr(os, "sysconf"):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    return avail


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(x: Union[int, float, str]) -> int:
    """``6GB``, ``512MiB``, ``1.5g`` or a number of bytes -> bytes (binary units)."""
    if isinstance(x, bool):
        raise ValueError(f"not a memory size: {x!r}")
    if isinstance(x, (int, float)):
        v = float(x)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(x))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a memory size: {x!r} (e.g. 6GB, 512MB, 2000000000)")
        v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not (v > 0 and v < float("inf")):
        raise ValueError(f"a memory size must be positive, got {x!r}")
    return int(v)


def directions_that_fit(task: Task, degree: int, budget_bytes: int) -> tuple[int, int]:
    """(how many directions one ring run may carry within ``budget_bytes``, the estimated bytes per direction):
    the budget less :data:`RESERVE_BYTES`, divided by :func:`ring_bytes_per_direction`."""
    per = max(1, ring_bytes_per_direction(task, degree))
    return max(0, budget_bytes - RESERVE_BYTES) // per, per
