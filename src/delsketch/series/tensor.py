"""Series: a tensor type that carries truncated power series through ordinary PyTorch code.

A ``Series`` looks like a float64 tensor of some logical shape to PyTorch (autograd, ``nn.Module``,
optimizers) but holds, per element, the K coefficients of a truncated power series in z for m
directions at once: an inner complex tensor of shape ``[m, K, *shape]``. Every aten op that reaches
``__torch_dispatch__`` is mapped to a rule in this module; the arithmetic lives in ``delsketch.series.kernels``.

Facts the design rests on (see docs/architecture.md):

* Autograd sees a real dtype, so the real derivative formulas act on complex coefficients and give
  the holomorphic derivative the ring needs (no Wirtinger conjugations).
* Constants (plain tensors, Python scalars) enter affine ops in the degree-0 coefficient only.
* Comparisons, max/argmax, masks and the branch of piecewise functions act on the real part of the
  degree-0 coefficient, which is the same in every direction.
* An op without a rule raises ``UnsupportedOpError`` naming the aten op and the module being run.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from . import kernels as ring
from .kernels import SeriesDomainError
from .registry import implementer, lookup, register_rule, use_torch_decomposition

aten = torch.ops.aten

__all__ = [
    "Series",
    "UnsupportedOpError",
    "SeriesDomainError",
    "NonAnalyticWarning",
    "lift",
    "variable",
    "coefficients",
    "is_series",
    "module_context",
]


class UnsupportedOpError(NotImplementedError):
    """An aten op reached a Series and delsketch has no series rule for it."""


class NonAnalyticWarning(UserWarning):
    """An op that is not analytic everywhere (ReLU, abs, ...) was applied to a series."""


# ----------------------------------------------------------------------------------------------
# module tracking, so errors can name the module that was running
# ----------------------------------------------------------------------------------------------

_state = threading.local()


def _module_stack() -> list[str]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


@contextlib.contextmanager
def module_context():
    """While active, errors raised by series rules name the innermost running nn.Module."""
    stack = _module_stack()

    def pre(module, args):
        stack.append(type(module).__name__)

    def post(module, args, output):
        if stack:
            stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
        stack.clear()


def _where() -> str:
    stack = _module_stack()
    if stack:
        return f" (in module {'/'.join(stack)})"
    return ""


# ----------------------------------------------------------------------------------------------
# the tensor type
# ----------------------------------------------------------------------------------------------


class Series(torch.Tensor):
    """A float64-looking tensor whose elements are truncated power series (m directions, K coefficients)."""

    _c: torch.Tensor
    __slots__ = ("_c",)

    @staticmethod
    def __new__(cls, coeffs: torch.Tensor, requires_grad: bool = False):
        if coeffs.dim() < 2:
            raise ValueError("Series coefficients need shape [m, K, *shape]")
        if not coeffs.is_complex():
            coeffs = coeffs.to(torch.complex128)
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            coeffs.shape[2:],
            strides=coeffs.stride()[2:],
            dtype=torch.float64,
            device=coeffs.device,
            requires_grad=requires_grad,
        )
        r._c = coeffs
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    # -- introspection -------------------------------------------------------------------------
    @property
    def coeffs(self) -> torch.Tensor:
        """The inner ``[m, K, *shape]`` complex coefficient tensor."""
        return self._c

    @property
    def m(self) -> int:
        return self._c.shape[0]

    @property
    def K(self) -> int:
        return self._c.shape[1]

    @property
    def degree(self) -> int:
        return self._c.shape[1] - 1

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D401
        base = self._c[0, 0].real
        return (
            f"Series(m={self.m}, degree={self.degree}, shape={tuple(self.shape)}, "
            f"degree0={base.tolist() if base.numel() <= 8 else '...'})"
        )

    def __tensor_flatten__(self):
        return ["_c"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Series(inner["_c"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = lookup(func)
        if rule is None:
            raise UnsupportedOpError(
                f"delsketch: no series rule for aten op {func}{_where()}; rewrite that part of the model with "
                "supported ops or add a rule with delsketch.series.register_rule (docs/your-own-model.md)"
            )
        try:
            out = rule.impl(*args, **kwargs)
        except (UnsupportedOpError, SeriesDomainError) as e:
            msg = str(e)
            if "aten" not in msg:
                msg = f"{msg} [aten op {func}{_where()}]"
            raise type(e)(msg) from None
        if _CHECK_FINITE[0]:
            _check_finite_outputs(func, out)
        return out


_CHECK_FINITE = [False]


@contextlib.contextmanager
def check_every_op(enabled: bool = True):
    """Debug mode: verify after every op that no coefficient is NaN or infinite (slow)."""
    old = _CHECK_FINITE[0]
    _CHECK_FINITE[0] = enabled
    try:
        yield
    finally:
        _CHECK_FINITE[0] = old


def _check_finite_outputs(func, out):
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, Series) and not bool(torch.isfinite(t._c).all()):
            raise SeriesDomainError(f"non-finite coefficient produced by aten op {func}{_where()}")


# ----------------------------------------------------------------------------------------------
# construction helpers
# ----------------------------------------------------------------------------------------------


def is_series(x: Any) -> bool:
    return isinstance(x, Series)


def all_finite(x: torch.Tensor) -> bool:
    """True when every element (every coefficient of every direction, for a Series) is finite."""
    if isinstance(x, Series):
        return bool(torch.isfinite(x._c).all())
    return bool(torch.isfinite(x).all())


def lift(x: torch.Tensor, degree: int, m: int = 1, requires_grad: bool = False) -> Series:
    """A constant series: degree-0 coefficient = x, the rest 0, shared by m directions (stored once if m == 1)."""
    c = ring.constant(x.detach().to(torch.float64), degree + 1, m=1)
    if m != 1:
        c = c.expand(m, *c.shape[1:]).contiguous()
    return Series(c, requires_grad=requires_grad)


def variable(coeffs: torch.Tensor, requires_grad: bool = False) -> Series:
    """A series from explicit coefficients ``[m, K, *shape]``."""
    return Series(coeffs, requires_grad=requires_grad)


def coefficients(x: torch.Tensor) -> torch.Tensor:
    """The coefficient tensor ``[m, K, *shape]`` of a Series (detached)."""
    if not isinstance(x, Series):
        raise TypeError(f"expected a Series, got {type(x).__name__}")
    return x._c.detach() if x._c.requires_grad else x._c


# ----------------------------------------------------------------------------------------------
# rule helpers
# ----------------------------------------------------------------------------------------------

rule = register_rule  # the built-in rules below use the same registry as users


@implementer("series")
def _series_impl(op, fn):
    return fn


@implementer("kernel")
def _kernel_impl(op, kernel):
    def r(x):
        return _wrap(kernel(x._c))

    return r


@implementer("inplace")
def _inplace_impl(op, out_of_place):
    def r(self, *args, **kwargs):
        return _assign(self, out_of_place(self, *args, **kwargs))

    return r


@implementer("decomposition")
def _decomposition_impl(op, fn):
    return fn


def _K_of(*xs) -> int:
    K = None
    for x in xs:
        if isinstance(x, Series):
            if K is None:
                K = x.K
            elif x.K != K:
                raise UnsupportedOpError(f"series of different degrees ({K - 1} and {x.K - 1}) in one op")
    return K


def _const(x, K: int, like_dtype=torch.complex128) -> torch.Tensor:
    """Series coefficients [1, K, *shape] for a plain tensor or Python scalar."""
    if isinstance(x, Series):
        return x._c
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=torch.float64)
    if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.float64)
    return ring.constant(x, K)


def _wrap(c: torch.Tensor) -> Series:
    if c._is_zerotensor():  # autograd's immutable zeros leak in through plain operands
        c = torch.zeros(c.shape, dtype=c.dtype, device=c.device)
    return Series(c)


def _dim(d: int, nd: int) -> int:
    """Normalize a logical dim and shift it past the two leading inner dims."""
    if nd == 0:
        if d not in (0, -1):
            raise IndexError(f"dimension {d} out of range for a 0-dim tensor")
        return 2
    if d < 0:
        d += nd
    if not 0 <= d < nd:
        raise IndexError(f"dimension out of range (expected to be in range of [{-nd}, {nd - 1}], got {d})")
    return d + 2


def _dims(ds, nd: int):
    if ds is None:
        return None
    if isinstance(ds, int):
        ds = [ds]
    return [_dim(d, nd) for d in ds]


def _real0(x):
    """Real part of the degree-0 coefficient (logical shape), for plain tensors the tensor itself."""
    if isinstance(x, Series):
        return x._c[0, 0].real
    return x


def _fit(c: torch.Tensor, nd: int) -> torch.Tensor:
    """Insert singleton logical dims after [m, K] so that the series has ``nd`` logical dims."""
    have = c.dim() - 2
    if have >= nd:
        return c
    return c.reshape(*c.shape[:2], *([1] * (nd - have)), *c.shape[2:])


def _logical_nd(*xs) -> int:
    return max((x.dim() if isinstance(x, torch.Tensor) else 0) for x in xs)


def _broadcast_m(a: torch.Tensor, b: torch.Tensor):
    ma, mb = a.shape[0], b.shape[0]
    if ma == mb:
        return a, b
    if ma == 1:
        return a.expand(mb, *a.shape[1:]), b
    if mb == 1:
        return a, b.expand(ma, *b.shape[1:])
    raise UnsupportedOpError(f"series with different numbers of directions ({ma} and {mb}) in one op")


# ----------------------------------------------------------------------------------------------
# structural / linear-homogeneous ops: applied to every coefficient, dims shifted by 2
# ----------------------------------------------------------------------------------------------


@rule(aten.detach.default, aten.alias.default, aten.lift_fresh.default, aten.conj_physical.default,
      aten.conj.default, aten.resolve_conj.default, aten.resolve_neg.default, aten._conj.default)
def _alias(x):
    return _wrap(x._c)


@rule(aten.clone.default)
def _clone(x, memory_format=None):
    return _wrap(x._c.clone())


@rule(aten.contiguous.default)
def _contig(x, memory_format=None):
    return _wrap(x._c.contiguous())


@rule(aten._to_copy.default)
def _to_copy(x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    if dtype is not None and dtype != torch.float64:
        raise UnsupportedOpError(f"cannot convert a series to dtype {dtype}: series stay float64 (complex128 inside)")
    c = x._c if device is None else x._c.to(device)
    return _wrap(c.clone())


@rule(aten.to.dtype, aten.to.dtype_layout, aten.to.device)
def _to(x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is not None and dtype != torch.float64:
        raise UnsupportedOpError(f"cannot convert a series to dtype {dtype}: series stay float64 (complex128 inside)")
    return _wrap(x._c.clone()) if kwargs.get("copy") else x


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(x, size):
    c = x._c
    new = tuple(c.shape[:2]) + tuple(size)
    try:
        return _wrap(c.view(new))
    except RuntimeError:
        return _wrap(c.reshape(new))


@rule(aten.expand.default)
def _expand(x, size, implicit=False):
    c = x._c
    extra = len(size) - x.dim()
    if extra > 0:
        c = c.reshape(*c.shape[:2], *([1] * extra), *c.shape[2:])
    return _wrap(c.expand(*c.shape[:2], *size))


@rule(aten.permute.default)
def _permute(x, dims):
    nd = x.dim()
    return _wrap(x._c.permute(0, 1, *[_dim(d, nd) for d in dims]))


@rule(aten.transpose.int)
def _transpose(x, d0, d1):
    nd = x.dim()
    return _wrap(x._c.transpose(_dim(d0, nd), _dim(d1, nd)))


@rule(aten.t.default)
def _t(x):
    if x.dim() < 2:
        return _wrap(x._c)
    return _wrap(x._c.transpose(2, 3))


@rule(aten.unsqueeze.default)
def _unsqueeze(x, dim):
    return _wrap(x._c.unsqueeze(_dim(dim, x.dim() + 1)))


@rule(aten.squeeze.default)
def _squeeze(x):
    dims = [i + 2 for i, s in enumerate(x.shape) if s == 1]
    return _wrap(x._c.squeeze(dims) if dims else x._c)


@rule(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze_dims(x, dim):
    dims = _dims(dim, x.dim())
    dims = [d for d in dims if x._c.shape[d] == 1]
    return _wrap(x._c.squeeze(dims) if dims else x._c)


@rule(aten.select.int)
def _select(x, dim, index):
    return _wrap(x._c.select(_dim(dim, x.dim()), index))


@rule(aten.slice.Tensor)
def _slice(x, dim=0, start=None, end=None, step=1):
    return _wrap(aten.slice.Tensor(x._c, _dim(dim, x.dim()), start, end, step))


@rule(aten.narrow.default)
def _narrow(x, dim, start, length):
    return _wrap(x._c.narrow(_dim(dim, x.dim()), start, length))


@rule(aten.diagonal.default)
def _diagonal(x, offset=0, dim1=0, dim2=1):
    nd = x.dim()
    return _wrap(torch.diagonal(x._c, offset, _dim(dim1, nd), _dim(dim2, nd)))


@rule(aten.flip.default)
def _flip(x, dims):
    return _wrap(x._c.flip(_dims(dims, x.dim())))


@rule(aten.roll.default)
def _roll(x, shifts, dims=()):
    if not dims:
        flat = x._c.reshape(*x._c.shape[:2], -1)
        return _wrap(flat.roll(shifts, 2).reshape(x._c.shape))
    return _wrap(x._c.roll(shifts, _dims(dims, x.dim())))


@rule(aten.repeat.default)
def _repeat(x, repeats):
    extra = len(repeats) - x.dim()
    c = x._c
    if extra > 0:
        c = c.reshape(*c.shape[:2], *([1] * extra), *c.shape[2:])
    return _wrap(c.repeat(1, 1, *repeats))


def _tri_rule(fn):
    def r(x, diagonal=0):
        return _wrap(fn(x._c, diagonal))

    return r


register_rule(aten.tril.default)(_tri_rule(torch.tril))
register_rule(aten.triu.default)(_tri_rule(torch.triu))


@rule(aten.unbind.int)
def _unbind(x, dim=0):
    return [_wrap(c) for c in x._c.unbind(_dim(dim, x.dim()))]


@rule(aten.split.Tensor)
def _split(x, split_size, dim=0):
    return [_wrap(c) for c in x._c.split(split_size, _dim(dim, x.dim()))]


@rule(aten.split_with_sizes.default)
def _split_sizes(x, split_sizes, dim=0):
    return [_wrap(c) for c in x._c.split(list(split_sizes), _dim(dim, x.dim()))]


@rule(aten.cat.default)
def _cat(tensors, dim=0):
    K = _K_of(*tensors)
    ref = next(t for t in tensors if isinstance(t, Series))
    nd = ref.dim()
    cs = [_const(t, K) for t in tensors]
    m = max(c.shape[0] for c in cs)
    cs = [c.expand(m, *c.shape[1:]) if c.shape[0] != m else c for c in cs]
    # as torch.cat does, skip legacy empty 1-d tensors when concatenating higher-rank tensors
    cs = [c for c, t in zip(cs, tensors) if nd == 1 or not (t.dim() == 1 and t.shape[0] == 0)]
    return _wrap(torch.cat([_fit(c, nd) for c in cs], _dim(dim, nd)))


@rule(aten.stack.default)
def _stack(tensors, dim=0):
    nd = tensors[0].dim() + 1
    return _cat([aten.unsqueeze.default(t, dim if dim >= 0 else dim + nd) for t in tensors], dim if dim >= 0 else dim + nd)


def _reduce(op, x, dim, keepdim):
    """A linear reduction (sum, mean) over logical dims, applied to every coefficient."""
    dims = list(range(2, x._c.dim())) if dim is None or len(dim) == 0 else _dims(dim, x.dim())
    if not dims:
        return _wrap(x._c.clone())
    return _wrap(op(x._c, dims, keepdim=keepdim))


@rule(aten.sum.dim_IntList)
def _sum_dim(x, dim=None, keepdim=False, dtype=None):
    return _reduce(torch.sum, x, dim, keepdim)


@rule(aten.sum.default)
def _sum(x, dtype=None):
    return _sum_dim(x, None)


@rule(aten.mean.dim)
def _mean_dim(x, dim=None, keepdim=False, dtype=None):
    return _reduce(torch.mean, x, dim, keepdim)


@rule(aten.mean.default)
def _mean(x, dtype=None):
    return _mean_dim(x, None)


def _var_impl(x, dim, correction, keepdim):
    dims = list(range(x.dim())) if dim is None or len(dim) == 0 else [d % max(x.dim(), 1) for d in dim]
    count = 1
    for d in dims:
        count *= x.shape[d] if x.dim() else 1
    corr = 1 if correction is None else correction
    mean = _mean_dim(x, dims, True)
    dev = _sub(x, mean)
    var = _wrap(_sum_dim(_wrap(ring.mul(dev._c, dev._c)), dims, keepdim)._c / max(count - corr, 0))
    return var, (mean if keepdim else _wrap(mean._c.squeeze([d + 2 for d in dims]) if dims else mean._c))


@rule(aten.var.correction)
def _var(x, dim=None, correction=None, keepdim=False):
    return _var_impl(x, dim, correction, keepdim)[0]


@rule(aten.var_mean.correction)
def _var_mean(x, dim=None, correction=None, keepdim=False):
    return _var_impl(x, dim, correction, keepdim)


@rule(aten.var.dim)
def _var_dim(x, dim=None, unbiased=True, keepdim=False):
    return _var_impl(x, dim, 1 if unbiased else 0, keepdim)[0]


@rule(aten.var_mean.dim)
def _var_mean_dim(x, dim=None, unbiased=True, keepdim=False):
    return _var_impl(x, dim, 1 if unbiased else 0, keepdim)


@rule(aten.real.default)
def _real(x):
    return x  # the series presents a real dtype; its holomorphic extension of "real part" is the identity


@rule(aten._safe_softmax.default)
def _safe_softmax(x, dim, dtype=None):
    sm = aten._softmax.default(x, dim, False)
    dead = (_real0(x) == float("-inf")).all(dim, keepdim=True)
    if bool(dead.any()):
        return _where_rule(dead, 0.0, sm)
    return sm


@rule(aten.cumsum.default)
def _cumsum(x, dim, dtype=None):
    return _wrap(x._c.cumsum(_dim(dim, x.dim())))


@rule(aten.neg.default)
def _neg(x):
    return _wrap(-x._c)


@rule(aten.gather.default)
def _gather(x, dim, index, sparse_grad=False):
    c = x._c
    idx = index.expand(*c.shape[:2], *index.shape) if index.dim() else index.reshape(1, 1).expand(*c.shape[:2])
    return _wrap(torch.gather(c, _dim(dim, x.dim()), idx))


@rule(aten.index_select.default)
def _index_select(x, dim, index):
    return _wrap(torch.index_select(x._c, _dim(dim, x.dim()), index))


@rule(aten.embedding.default)
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if isinstance(indices, Series):
        raise UnsupportedOpError("embedding indices cannot be a series")
    c = weight._c
    out = torch.index_select(c, 2, indices.reshape(-1))
    return _wrap(out.reshape(*c.shape[:2], *indices.shape, c.shape[-1]))


@rule(aten.embedding_dense_backward.default)
def _embedding_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    if scale_grad_by_freq:
        raise UnsupportedOpError("embedding with scale_grad_by_freq=True")
    g = grad_output._c
    D = g.shape[-1]
    flat_idx = indices.reshape(-1)
    gf = g.reshape(*g.shape[:2], -1, D)
    if padding_idx is not None and padding_idx >= 0:
        keep = flat_idx != padding_idx
        gf = gf * keep.to(gf.real.dtype)[:, None]
    out = g.new_zeros(*g.shape[:2], num_weights, D)
    out.index_add_(2, flat_idx, gf)
    return _wrap(out)


@rule(aten.index.Tensor)
def _index(x, indices):
    if any(isinstance(i, Series) for i in indices if i is not None):
        raise UnsupportedOpError("indexing with a series as index")
    present = [i for i, t in enumerate(indices) if t is not None]
    if present and present != list(range(present[0], present[-1] + 1)):
        raise UnsupportedOpError("advanced indexing with non-adjacent index tensors")
    return _wrap(aten.index.Tensor(x._c, [None, None, *indices]))


@rule(aten.index_put.default, aten._index_put_impl_.default)
def _index_put(x, indices, values, accumulate=False, unsafe=False):
    K = _K_of(x, values)
    # logical rank of the indexed region, so that lower-rank values broadcast against it as in torch
    region_nd = aten.index.Tensor(torch.zeros((), dtype=torch.bool).expand(x.shape), indices).dim()
    xc, vc = _broadcast_m(_const(x, K), _fit(_const(values, K), region_nd))
    out = aten.index_put.default(xc.clone(), [None, None, *indices], vc, accumulate)
    return _wrap(out)


@rule(aten.scatter_add.default)
def _scatter_add(x, dim, index, src):
    K = _K_of(x, src)
    xc, sc = _broadcast_m(_const(x, K), _const(src, K))
    idx = index.expand(*sc.shape[:2], *index.shape)
    return _wrap(torch.scatter_add(xc, _dim(dim, x.dim()), idx, sc))


@rule(aten.scatter.src, aten.scatter.value)
def _scatter(x, dim, index, src):
    K = _K_of(x, src)
    xc = _const(x, K)
    if isinstance(src, torch.Tensor):
        xc, sc = _broadcast_m(xc, _const(src, K))
        idx = index.expand(*sc.shape[:2], *index.shape)
        return _wrap(torch.scatter(xc, _dim(dim, x.dim()), idx, sc))
    idx = index.expand(*xc.shape[:2], *index.shape)
    out = torch.scatter(xc, _dim(dim, x.dim()), idx, 0.0)
    out[:, 0] = torch.scatter(out[:, 0], _dim(dim, x.dim()) - 1, index.expand(out.shape[0], *index.shape), src)
    return _wrap(out)


@rule(aten.select_backward.default)
def _select_backward(grad, input_sizes, dim, index):
    g = grad._c
    out = g.new_zeros(*g.shape[:2], *input_sizes)
    out.select(_dim(dim, len(input_sizes)), index).copy_(g)
    return _wrap(out)


@rule(aten.slice_backward.default)
def _slice_backward(grad, input_sizes, dim, start, end, step):
    g = grad._c
    out = g.new_zeros(*g.shape[:2], *input_sizes)
    aten.slice.Tensor(out, _dim(dim, len(input_sizes)), start, end, step).copy_(g)
    return _wrap(out)


@rule(aten.index_add.default)
def _index_add(x, dim, index, source, alpha=1):
    K = _K_of(x, source)
    xc, sc = _broadcast_m(_const(x, K), _const(source, K))
    return _wrap(torch.index_add(xc, _dim(dim, x.dim()), index, sc, alpha=alpha))


@rule(aten.constant_pad_nd.default)
def _pad(x, pad, value=0.0):
    c = torch.nn.functional.pad(x._c, list(pad), value=0.0)
    if value != 0:
        region = torch.nn.functional.pad(torch.zeros(x.shape, dtype=torch.bool), list(pad), value=True)
        c = c.clone()
        c[:, 0] = torch.where(region, torch.as_tensor(value, dtype=c.dtype), c[:, 0])
    return _wrap(c)


def _fold_apply(fn, x: Series, tail: int, *extra):
    """Apply a linear op coefficient-wise by folding [m, K, ...] into the op's batch dimension.

    ``tail`` is the number of trailing dims the op consumes as one example (e.g. 3 for [C, H, W])."""
    c = x._c
    lead = c.shape[: c.dim() - tail]
    out = fn(c.reshape(-1, *c.shape[c.dim() - tail :]), *extra)
    return out.reshape(*lead, *out.shape[1:])


def _avg_pool_rule(nd_spatial):
    def r(x, *args):
        tail = nd_spatial + 1
        fn = {1: aten.avg_pool1d.default, 2: aten.avg_pool2d.default, 3: aten.avg_pool3d.default}[nd_spatial]

        def f(flat, *a):
            re = fn(flat.real.contiguous(), *a)
            im = fn(flat.imag.contiguous(), *a)
            return torch.complex(re, im)

        return _wrap(_fold_apply(f, x, tail, *args))

    return r


register_rule(aten.avg_pool1d.default)(_avg_pool_rule(1))
register_rule(aten.avg_pool2d.default)(_avg_pool_rule(2))
register_rule(aten.avg_pool3d.default)(_avg_pool_rule(3))


def _avg_pool_bwd_rule(op, nd_spatial):
    def r(grad_output, self, *args):
        tail = nd_spatial + 1
        s_shape = tuple(self.shape[-tail:])

        def f(flat):
            proto = torch.zeros(flat.shape[0], *s_shape, dtype=torch.float64)
            re = op(flat.real.contiguous(), proto, *args)
            im = op(flat.imag.contiguous(), proto, *args)
            return torch.complex(re, im)

        return _wrap(_fold_apply(f, grad_output, tail))

    return r


register_rule(aten.avg_pool2d_backward.default)(_avg_pool_bwd_rule(aten.avg_pool2d_backward.default, 2))
register_rule(aten.avg_pool3d_backward.default)(_avg_pool_bwd_rule(aten.avg_pool3d_backward.default, 3))


# ----------------------------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------------------------


@rule(aten.add.Tensor, aten.add.Scalar)
def _add(a, b, alpha=1):
    if isinstance(a, Series) and isinstance(b, Series):
        _K_of(a, b)
        nd = _logical_nd(a, b)
        ac, bc = _fit(a._c, nd), _fit(b._c, nd)
        return _wrap(ac + bc * alpha if alpha != 1 else ac + bc)
    if isinstance(a, Series):
        return _wrap(_add_const(a._c, b * alpha if alpha != 1 else b))
    # a plain, b Series
    bc = b._c * alpha if alpha != 1 else b._c
    return _wrap(_add_const(bc, a))


def _add_const(c: torch.Tensor, k, fresh: bool = False) -> torch.Tensor:
    """c + k where k is a plain tensor or scalar entering the degree-0 coefficient only. ``fresh``: c is a
    temporary of the calling rule, updated in place when it is contiguous and already of the result's shape
    (saves a copy of the whole series, e.g. in 1 - s)."""
    if isinstance(k, torch.Tensor):
        c = _fit(c, k.dim())
        shape = torch.broadcast_shapes(c.shape[2:], k.shape)
        if tuple(shape) != tuple(c.shape[2:]):
            c = c.expand(*c.shape[:2], *shape)
    if fresh and c.is_contiguous():
        out = c
    else:
        out = c.contiguous().clone() if c.data_ptr() == c.contiguous().data_ptr() else c.contiguous()
    out[:, 0] = out[:, 0] + k
    return out


@rule(aten.sub.Tensor, aten.sub.Scalar)
def _sub(a, b, alpha=1):
    """a - alpha b, one pass over the coefficients (no negated temporary)."""
    if isinstance(b, Series):
        if isinstance(a, Series):
            _K_of(a, b)
            nd = _logical_nd(a, b)
            ac, bc = _fit(a._c, nd), _fit(b._c, nd)
            return _wrap(ac - bc * alpha if alpha != 1 else ac - bc)
        nb = b._c * (-alpha) if alpha != 1 else torch.neg(b._c)  # a new tensor: the constant goes in in place
        return _wrap(_add_const(nb, a, fresh=True))
    return _add(a, -b if not isinstance(b, torch.Tensor) else torch.neg(b), alpha)


@rule(aten.rsub.Tensor, aten.rsub.Scalar)
def _rsub(a, b, alpha=1):
    # b - alpha * a
    return _sub(b, a, alpha)


@rule(aten.mul.Tensor, aten.mul.Scalar)
def _mul(a, b):
    if isinstance(a, Series) and isinstance(b, Series):
        _K_of(a, b)
        return _wrap(ring.mul(a._c, b._c))
    if isinstance(a, Series):
        return _wrap(_fit(a._c, _logical_nd(b)) * b)
    return _wrap(a * _fit(b._c, _logical_nd(a)))


@rule(aten.div.Tensor, aten.div.Scalar)
def _div(a, b):
    if isinstance(b, Series):
        K = _K_of(a, b)
        return _wrap(ring.div(_const(a, K), b._c))
    return _wrap(_fit(a._c, _logical_nd(b)) / b)


@rule(aten.div.Tensor_mode)
def _div_mode(a, b, rounding_mode=None):
    if rounding_mode is None:
        return _div(a, b)
    raise UnsupportedOpError(f"division with rounding_mode={rounding_mode!r} is not analytic")


@rule(aten.reciprocal.default)
def _reciprocal(x):
    return _wrap(ring.reciprocal(x._c))


def _bilinear(op, a, b):
    """op(a, b) for a bilinear op that broadcasts over leading dims (mul, matmul)."""
    if isinstance(a, Series) and isinstance(b, Series):
        _K_of(a, b)
        return _wrap(ring.bilinear(op, a._c, b._c))
    if isinstance(a, Series):
        return _wrap(op(a._c, b.to(a._c.dtype)))
    return _wrap(op(a.to(b._c.dtype), b._c))


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(a, b):
    return _bilinear(torch.matmul, a, b)


@rule(aten.mv.default)
def _mv(a, v):
    return _bilinear(lambda x, y: torch.matmul(x, y.unsqueeze(-1)).squeeze(-1), a, v)


@rule(aten.dot.default, aten.vdot.default)
def _dot(a, b):
    return _bilinear(lambda x, y: (x * y).sum(-1), a, b)


@rule(aten.addmm.default)
def _addmm(bias, m1, m2, beta=1, alpha=1):
    prod = _mm(m1, m2)
    if alpha != 1:
        prod = _wrap(prod._c * alpha)
    if beta == 0:
        return prod
    b = bias if beta == 1 else (_wrap(bias._c * beta) if isinstance(bias, Series) else bias * beta)
    return _add(prod, b)


@rule(aten.baddbmm.default)
def _baddbmm(bias, b1, b2, beta=1, alpha=1):
    return _addmm(bias, b1, b2, beta=beta, alpha=alpha)


@rule(aten.addmv.default)
def _addmv(bias, mat, vec, beta=1, alpha=1):
    prod = _mv(mat, vec)
    if alpha != 1:
        prod = _wrap(prod._c * alpha)
    if beta == 0:
        return prod
    b = bias if beta == 1 else (_wrap(bias._c * beta) if isinstance(bias, Series) else bias * beta)
    return _add(prod, b)


# -- convolution -------------------------------------------------------------------------------


def _conv_pair(x, w, stride, padding, dilation, groups, transposed, output_padding):
    """conv of x [m, N, C, *sp] with w [m, O, C/g, *k] per direction, via one grouped conv."""
    x, w = _broadcast_m(x, w)
    m = x.shape[0]
    N = x.shape[1]
    xf = x.transpose(0, 1).reshape(N, m * x.shape[2], *x.shape[3:])
    wf = w.reshape(m * w.shape[1], *w.shape[2:])
    out = _complex_conv(xf, wf, stride, padding, dilation, transposed, output_padding, groups * m)
    return out.reshape(N, m, -1, *out.shape[2:]).transpose(0, 1)


def _complexify(op):
    """Extend a real bilinear op to complex operands: (a_r + i a_i)(b_r + i b_i) by real calls."""

    def f(a, b):
        if not a.is_complex() and not b.is_complex():
            return op(a, b)
        if not a.is_complex():
            return torch.complex(op(a, b.real.contiguous()), op(a, b.imag.contiguous()))
        if not b.is_complex():
            return torch.complex(op(a.real.contiguous(), b), op(a.imag.contiguous(), b))
        ar, ai, br, bi = a.real.contiguous(), a.imag.contiguous(), b.real.contiguous(), b.imag.contiguous()
        return torch.complex(op(ar, br) - op(ai, bi), op(ar, bi) + op(ai, br))

    return f


def _complex_conv(x, w, stride, padding, dilation, transposed, output_padding, groups):
    op = lambda a, b: aten.convolution.default(a, b, None, stride, padding, dilation, transposed, output_padding, groups)
    return _complexify(op)(x, w)


@rule(aten.convolution.default)
def _convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise UnsupportedOpError("transposed convolution")
    if isinstance(x, Series) and isinstance(w, Series):
        _K_of(x, w)
        if x.dim() != w.dim():
            raise UnsupportedOpError("unbatched convolution input with a series weight")
        out = ring.bilinear(
            lambda a, b: _conv_pair(a, b, stride, padding, dilation, groups, transposed, output_padding),
            x._c,
            w._c,
            split=True,
        )
    elif isinstance(x, Series):
        c = x._c
        nsp = w.dim() - 2
        flat = c.reshape(-1, *c.shape[c.dim() - nsp - 1 :])
        o = _complex_conv(flat, w, stride, padding, dilation, transposed, output_padding, groups)
        out = o.reshape(*c.shape[: c.dim() - nsp - 1], *o.shape[1:])
    else:
        c = w._c  # [m, K, O, C/g, *k]
        m, K = c.shape[:2]
        if groups != 1:
            out = ring.bilinear(
                lambda a, b: _conv_pair(a, b, stride, padding, dilation, groups, transposed, output_padding),
                _const(x, K),
                c,
                split=True,
            )
        else:
            wf = c.reshape(m * K * c.shape[2], *c.shape[3:])
            o = _complex_conv(x, wf, stride, padding, dilation, transposed, output_padding, 1)
            # o: [N, m*K*O, *sp] (or [m*K*O, *sp] unbatched)
            if x.dim() == w.dim():
                out = o.reshape(o.shape[0], m, K, c.shape[2], *o.shape[2:]).permute(1, 2, 0, *range(3, o.dim() + 2))
            else:
                out = o.reshape(m, K, c.shape[2], *o.shape[1:])
    res = _wrap(out)
    if bias is not None:
        shape = [1] * (res.dim() - (w.dim() - 1)) + [-1] + [1] * (w.dim() - 2)
        res = _add(res, aten.view.default(bias, shape) if isinstance(bias, Series) else bias.view(shape))
    return res


@rule(aten.convolution_backward.default)
def _convolution_backward(
    grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask
):
    if transposed:
        raise UnsupportedOpError("transposed convolution backward")
    K = _K_of(grad_output, input, weight)
    go = _const(grad_output, K)
    gi = gw = gb = None
    nsp = len(stride)

    if output_mask[0]:
        wc = _const(weight, K)
        in_shape = tuple(input.shape)

        def op_in(g, w):
            g, w = _broadcast_m(g, w)
            m, N = g.shape[0], g.shape[1]
            gf = g.transpose(0, 1).reshape(N, m * g.shape[2], *g.shape[3:])
            wf = w.reshape(m * w.shape[1], *w.shape[2:])
            proto = torch.zeros(N, m * in_shape[1], *in_shape[2:], dtype=torch.float64)
            r = _complexify(lambda a, b: aten.convolution_backward.default(
                a, proto, b, None, stride, padding, dilation, False, output_padding, groups * m, [True, False, False]
            )[0])(gf, wf)
            return r.reshape(N, m, *in_shape[1:]).transpose(0, 1)

        gi = _wrap(ring.bilinear(op_in, go, wc, split=True))
    if output_mask[1]:
        xc = _const(input, K)
        w_shape = tuple(weight.shape)

        def op_w(g, x):
            g, x = _broadcast_m(g, x)
            m, N = g.shape[0], g.shape[1]
            gf = g.transpose(0, 1).reshape(N, m * g.shape[2], *g.shape[3:])
            xf = x.transpose(0, 1).reshape(N, m * x.shape[2], *x.shape[3:])
            proto = torch.zeros(m * w_shape[0], *w_shape[1:], dtype=torch.float64)
            r = _complexify(lambda a, b: aten.convolution_backward.default(
                a, b, proto, None, stride, padding, dilation, False, output_padding, groups * m, [False, True, False]
            )[1])(gf, xf)
            return r.reshape(m, *w_shape)

        gw = _wrap(ring.bilinear(op_w, go, xc, split=True))
    if output_mask[2]:
        dims = [0] + list(range(2, 2 + nsp))
        gb = _sum_dim(grad_output, dims) if isinstance(grad_output, Series) else grad_output.sum(dims)
    return gi, gw, gb


# -- nonlinear elementwise ---------------------------------------------------------------------


for _op, _k in [
    (aten.exp.default, ring.exp),
    (aten.log.default, ring.log),
    (aten.sqrt.default, ring.sqrt),
    (aten.rsqrt.default, ring.rsqrt),
    (aten.erf.default, ring.erf),
    (aten.tanh.default, ring.tanh),
    (aten.sigmoid.default, ring.sigmoid),
    (aten.silu.default, ring.silu),
]:
    register_rule(_op, kind="kernel")(_k)


@rule(aten.silu_backward.default)
def _silu_backward(grad_output, self):
    K = _K_of(grad_output, self)
    return _wrap(ring.silu_backward(_const(grad_output, K), _const(self, K)))


@rule(aten.gelu_backward.default)
def _gelu_backward(grad_output, self, approximate="none"):
    K = _K_of(grad_output, self)
    if approximate not in ("none", "tanh"):
        raise UnsupportedOpError(f"gelu_backward approximate={approximate!r}")
    kern = ring.gelu_backward if approximate == "none" else ring.gelu_tanh_backward
    return _wrap(kern(_const(grad_output, K), _const(self, K)))


@rule(aten.gelu.default)
def _gelu(x, approximate="none"):
    if approximate == "none":
        return _wrap(ring.gelu(x._c))
    if approximate == "tanh":
        return _wrap(ring.gelu_tanh(x._c))
    raise UnsupportedOpError(f"gelu approximate={approximate!r}")


@rule(aten.softplus.default)
def _softplus(x, beta=1, threshold=20):
    # torch switches to the identity above `threshold` (on beta*x); follow the same branch on degree 0
    c = x._c
    sp = ring.softplus(c * beta) / beta if beta != 1 else ring.softplus(c)
    above = (c[0, 0].real * beta) > threshold
    if bool(above.any()):
        sp = torch.where(above, c, sp)
    return _wrap(sp)


def _degree0(x):
    """The real degree-0 value of a Series (max over directions) or a plain tensor: a constant for shifts."""
    if isinstance(x, Series):
        return x._c[:, 0].real.amax(0)
    return torch.as_tensor(x, dtype=torch.float64)


def _finite_or_zero(c: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(c), c, torch.zeros((), dtype=c.dtype))


@rule(aten.logaddexp.default)
def _logaddexp(a, b):
    # log(e^a + e^b) = c + log(e^(a-c) + e^(b-c)) with c the larger degree-0 value (a constant)
    c = _finite_or_zero(torch.maximum(_degree0(a), _degree0(b)))
    return torch.log(torch.exp(a - c) + torch.exp(b - c)) + c


@rule(aten.logsumexp.default)
def _logsumexp(x, dim, keepdim=False):
    # the same shift by the degree-0 max along dim (torch's decomposition takes abs() of the max, which warns)
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        dims = list(range(x.dim()))
    c = _finite_or_zero(_degree0(x).amax(dim=dims, keepdim=True))
    out = torch.log(torch.exp(x - c).sum(dim=dims, keepdim=True)) + c
    return out if keepdim else out.squeeze(dims)


@rule(aten.log1p.default)
def _log1p(x):
    return _wrap(ring.log(_add_const(x._c, 1.0)))


@rule(aten.expm1.default)
def _expm1(x):
    return _wrap(_add_const(ring.exp(x._c), -1.0))


@rule(aten.sin.default)
def _sin(x):
    e1 = ring.exp(1j * x._c)
    e2 = ring.exp(-1j * x._c)
    return _wrap((e1 - e2) / 2j)


@rule(aten.cos.default)
def _cos(x):
    e1 = ring.exp(1j * x._c)
    e2 = ring.exp(-1j * x._c)
    return _wrap((e1 + e2) / 2)


@rule(aten.pow.Tensor_Scalar)
def _pow(x, exponent):
    e = float(exponent)
    if e == 1:
        return _wrap(x._c.clone())
    if e == 2:
        return _wrap(ring.mul(x._c, x._c))
    return _wrap(ring.pow(x._c, e))


@rule(aten.pow.Tensor_Tensor)
def _pow_tt(x, y):
    if not isinstance(y, Series) and y.dim() == 0:
        return _pow(x, float(y))
    K = _K_of(x, y)
    return _wrap(ring.exp(_mul(_wrap(ring.log(_const(x, K))), y)._c))


@rule(aten.pow.Scalar)
def _pow_scalar(base, y):
    return _wrap(ring.exp(y._c * math.log(base)))


@rule(aten.square.default)
def _square(x):
    return _wrap(ring.mul(x._c, x._c))


# -- piecewise (non-analytic) and selection ------------------------------------------------------

_warned: set[str] = set()


def _warn_once(name: str):
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"{name} is not analytic: its series follows the branch chosen by the degree-0 coefficient and is "
            "wrong if training passes near the kink; prefer GELU/SiLU/tanh",
            NonAnalyticWarning,
            stacklevel=4,
        )


@rule(aten.relu.default)
def _relu(x):
    _warn_once("ReLU")
    keep = x._c[0, 0].real > 0
    return _wrap(torch.where(keep, x._c, torch.zeros((), dtype=x._c.dtype)))


@rule(aten.threshold_backward.default)
def _threshold_backward(grad_output, self, threshold):
    keep = _real0(self) > threshold
    if isinstance(grad_output, Series):
        return _wrap(torch.where(keep, grad_output._c, torch.zeros((), dtype=grad_output._c.dtype)))
    return torch.where(keep, grad_output, torch.zeros((), dtype=grad_output.dtype))


@rule(aten.abs.default)
def _abs(x):
    _warn_once("abs")
    sign = torch.where(x._c[0, 0].real >= 0, 1.0, -1.0).to(torch.float64)
    return _wrap(x._c * sign)


@rule(aten.sign.default, aten.sgn.default)
def _sign(x):
    return torch.sign(_real0(x))


@rule(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(x, min=None, max=None):
    c = x._c
    x0 = c[0, 0].real
    out = c
    if min is not None:
        low = x0 < min
        out = torch.where(low, ring.constant(torch.as_tensor(min, dtype=torch.float64).expand(x0.shape), c.shape[1]), out)
    if max is not None:
        high = x0 > max
        out = torch.where(high, ring.constant(torch.as_tensor(max, dtype=torch.float64).expand(x0.shape), c.shape[1]), out)
    return _wrap(out)


def _cmp(op):
    def r(a, b):
        return op(_real0(a), _real0(b))

    return r


for _name in ["gt", "lt", "ge", "le", "eq", "ne"]:
    for _ov in ["Tensor", "Scalar"]:
        register_rule(getattr(getattr(aten, _name), _ov))(_cmp(getattr(torch, _name)))


@rule(aten.isfinite.default)
def _isfinite(x):
    c = x._c
    return torch.isfinite(c).all(1).all(0)


@rule(aten.isnan.default)
def _isnan(x):
    return torch.isnan(x._c).any(1).any(0)


@rule(aten.isinf.default)
def _isinf(x):
    return torch.isinf(x._c).any(1).any(0)


def _minmax_rule(larger: bool):
    def r(a, b):
        _warn_once("maximum" if larger else "minimum")
        a0 = a._c[0, 0].real if isinstance(a, Series) else torch.as_tensor(a, dtype=torch.float64)
        b0 = b._c[0, 0].real if isinstance(b, Series) else torch.as_tensor(b, dtype=torch.float64)
        return _where_rule(a0 >= b0 if larger else a0 <= b0, a, b)

    return r


register_rule(aten.maximum.default)(_minmax_rule(True))
register_rule(aten.minimum.default)(_minmax_rule(False))


@rule(aten.where.self)
def _where_rule(cond, a, b):
    if isinstance(cond, Series):
        raise UnsupportedOpError("where with a series condition")
    K = _K_of(a, b)
    nd = _logical_nd(cond, a, b)
    ac, bc = _broadcast_m(_fit(_const(a, K), nd), _fit(_const(b, K), nd))
    return _wrap(torch.where(cond, ac, bc))


register_rule(aten.where.ScalarOther)(_where_rule)
register_rule(aten.where.ScalarSelf)(_where_rule)
register_rule(aten.where.Scalar)(_where_rule)


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(x, mask, value):
    if isinstance(value, Series):
        return _where_rule(mask, value, x)
    c = x._c
    shape = torch.broadcast_shapes(c.shape[2:], mask.shape)
    out = c.expand(*c.shape[:2], *shape).masked_fill(mask, 0)
    out[:, 0] = out[:, 0].masked_fill(mask, value if not isinstance(value, torch.Tensor) else value.item())
    return _wrap(out)


def _select_by_degree0(x, dim, keepdim, largest: bool):
    c = x._c
    x0 = c[0, 0].real
    if dim is None:
        idx = (x0.reshape(-1).argmax() if largest else x0.reshape(-1).argmin())
        flat = c.reshape(*c.shape[:2], -1)
        return _wrap(flat[:, :, idx]), idx
    idx = x0.argmax(dim, keepdim=True) if largest else x0.argmin(dim, keepdim=True)
    d = _dim(dim, x.dim())
    val = torch.gather(c, d, idx.expand(*c.shape[:2], *idx.shape))
    if not keepdim:
        val = val.squeeze(d)
        idx = idx.squeeze(dim)
    return _wrap(val), idx


def _amax_rule(largest):
    def r(x, dim=(), keepdim=False):
        dims = list(dim) if dim else list(range(x.dim()))
        if len(dims) == 1 or x.dim() <= 1:
            if x.dim() == 0:
                return _wrap(x._c.clone())
            return _select_by_degree0(x, dims[0], keepdim, largest)[0]
        raise UnsupportedOpError("amax/amin over several dims of a series")

    return r


register_rule(aten.amax.default)(_amax_rule(True))
register_rule(aten.amin.default)(_amax_rule(False))


@rule(aten.max.dim)
def _max_dim(x, dim, keepdim=False):
    return _select_by_degree0(x, dim, keepdim, True)


@rule(aten.min.dim)
def _min_dim(x, dim, keepdim=False):
    return _select_by_degree0(x, dim, keepdim, False)


@rule(aten.max.default)
def _max(x):
    return _select_by_degree0(x, None, False, True)[0]


@rule(aten.min.default)
def _min(x):
    return _select_by_degree0(x, None, False, False)[0]


@rule(aten.argmax.default)
def _argmax(x, dim=None, keepdim=False):
    return torch.argmax(_real0(x), dim, keepdim)


@rule(aten.argmin.default)
def _argmin(x, dim=None, keepdim=False):
    return torch.argmin(_real0(x), dim, keepdim)


# -- factories and in-place ----------------------------------------------------------------------


def _full_like_series(x: Series, value, shape=None) -> Series:
    shape = tuple(x.shape) if shape is None else tuple(shape)
    c = x._c.new_zeros(x.m, x.K, *shape)
    if value != 0:
        c[:, 0] = value
    return _wrap(c)


@rule(aten.zeros_like.default, aten.empty_like.default)
def _zeros_like(x, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    if dtype is not None and dtype != torch.float64:
        return torch.zeros(x.shape, dtype=dtype)
    return _full_like_series(x, 0)


@rule(aten.ones_like.default)
def _ones_like(x, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    if dtype is not None and dtype != torch.float64:
        return torch.ones(x.shape, dtype=dtype)
    return _full_like_series(x, 1)


@rule(aten.full_like.default)
def _full_like(x, fill_value, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    if dtype is not None and dtype != torch.float64:
        return torch.full(x.shape, fill_value, dtype=dtype)
    return _full_like_series(x, fill_value)


@rule(aten.new_zeros.default, aten.new_empty.default)
def _new_zeros(x, size, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is not None and dtype != torch.float64:
        return torch.zeros(size, dtype=dtype)
    return _full_like_series(x, 0, size)


@rule(aten.new_ones.default)
def _new_ones(x, size, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is not None and dtype != torch.float64:
        return torch.ones(size, dtype=dtype)
    return _full_like_series(x, 1, size)


@rule(aten.new_full.default)
def _new_full(x, size, fill_value, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is not None and dtype != torch.float64:
        return torch.full(size, fill_value, dtype=dtype)
    return _full_like_series(x, fill_value, size)


@rule(aten.new_empty_strided.default)
def _new_empty_strided(x, size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    if dtype is not None and dtype != torch.float64:
        return torch.empty_strided(size, stride, dtype=dtype)
    return _full_like_series(x, 0, size)


@rule(aten._local_scalar_dense.default)
def _item(x):
    # reading a value (logging, progress bars) gives the base value: the real degree-0 coefficient
    return x._c[0, 0].real.item()


@rule(aten.is_same_size.default)
def _is_same_size(a, b):
    return tuple(a.shape) == tuple(b.shape)


def _assign(self, result):
    """Write ``result`` (Series or plain) into ``self`` in place, keeping views aliased when possible."""
    if not isinstance(self, Series):
        raise UnsupportedOpError("in-place op on a plain tensor with a series operand (the result is a series)")
    K = self.K
    rc = _const(result, K)
    if tuple(rc.shape[2:]) != tuple(self.shape):
        rc = rc.expand(*rc.shape[:2], *self.shape)
    if rc.shape[0] == self._c.shape[0] or rc.shape[0] == 1:
        self._c.copy_(rc)
    elif self._c._base is None and self._c.shape[0] == 1:
        self._c = rc.clone()
    else:
        raise UnsupportedOpError(
            f"in-place op would change the number of directions of a view ({self._c.shape[0]} -> {rc.shape[0]})"
        )
    return self


@rule(aten.copy_.default)
def _copy_(self, src, non_blocking=False):
    return _assign(self, src)


@rule(aten.zero_.default)
def _zero_(self):
    self._c.zero_()
    return self


@rule(aten.fill_.Scalar)
def _fill_(self, value):
    self._c.zero_()
    self._c[:, 0] = value
    return self


for _name in ["add_", "sub_", "mul_", "div_", "lerp_", "addcmul_", "addcdiv_", "clamp_", "masked_fill_",
              "exp_", "sqrt_", "neg_", "pow_", "relu_", "tanh_", "sigmoid_", "index_put_", "addmm_", "baddbmm_",
              "index_add_", "scatter_add_", "scatter_", "clamp_min_", "clamp_max_"]:
    register_rule(getattr(aten, _name), kind="inplace")(getattr(aten, _name[:-1]))


# ----------------------------------------------------------------------------------------------
# curated decompositions: composite ops lowered to the rules above
# ----------------------------------------------------------------------------------------------

use_torch_decomposition(
    aten._softmax,
    aten._log_softmax,
    aten._softmax_backward_data,
    aten._log_softmax_backward_data,
    aten.nll_loss_forward,
    aten.nll_loss_backward,
    aten.nll_loss2d_forward,
    aten.tanh_backward,
    aten.sigmoid_backward,
    aten.softplus_backward,
    aten.native_layer_norm,
    aten.native_layer_norm_backward,
    aten._fused_rms_norm,
    aten._fused_rms_norm_backward,
    aten.mse_loss,
    aten.mse_loss_backward,
    aten.linalg_vector_norm,
    aten.addcmul,
    aten.addcdiv,
    aten.lerp,
    aten.log_sigmoid_forward,
    aten.xlogy,
    aten.glu,
    aten._adaptive_avg_pool2d,
    aten.binary_cross_entropy,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten.elu,
    aten.mish,
    aten.smooth_l1_loss,
    aten.huber_loss,
    aten.native_group_norm,
    aten.native_group_norm_backward,
    aten.binary_cross_entropy_with_logits,
    aten.binary_cross_entropy_backward,
    aten.soft_margin_loss,
    aten.soft_margin_loss_backward,
    aten.multi_margin_loss,
    aten.smooth_l1_loss_backward,
    aten.huber_loss_backward,
    aten.elu_backward,
    aten.mish_backward,
    aten.celu,
    aten.leaky_relu,
    aten.leaky_relu_backward,
    aten.native_batch_norm,
    aten.native_batch_norm_backward,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit_functional,
    aten._scaled_dot_product_attention_math,
    aten.log_sigmoid_backward,
)


@rule(aten.flatten.using_ints)
def _flatten(x, start_dim=0, end_dim=-1):
    nd = max(x.dim(), 1)
    s, e = start_dim % nd, end_dim % nd
    shape = list(x.shape) or [1]
    return torch.reshape(x, shape[:s] + [math.prod(shape[s:e + 1])] + shape[e + 1:])


@rule(aten.atleast_2d.default)
def _atleast_2d(x):
    return x if x.dim() >= 2 else torch.reshape(x, (1,) * (2 - x.dim()) + tuple(x.shape))


@rule(aten.log_sigmoid.default)
def _log_sigmoid(x):
    return -torch.nn.functional.softplus(-x)
