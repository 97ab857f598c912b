"""Kernels on batches of truncated power series.

A batch of truncated power series

    a(z) = a_0 + a_1 z + ... + a_{K-1} z^{K-1}

is a tensor of shape ``[m, K, *shape]``: ``m`` directions, ``K = degree + 1``
coefficients on the series axis (dim 1), and an arbitrary element shape.  The
default dtype is complex128 (see :func:`constant`); every kernel follows the
dtype of its inputs.  Binary kernels broadcast over ``m`` (1 vs M) and over
``*shape`` exactly like ordinary torch elementwise ops (shapes are aligned from
the right, after the two leading axes); both operands must have the same ``K``.

Everything is plain torch: no autograd, no ``torch.vmap`` (the kernels are
called from inside ``__torch_dispatch__``). On the CPU the hottest loops (small
Cauchy matmuls, elementwise Cauchy products, the exp recurrence) go through the
optional C kernels of :mod:`delsketch.series.native` when they are built; the
torch code below is their fallback and their reference in the tests.  Results
never alias their inputs, except :func:`truncate`, which returns a view.

Recurrences (Griewank & Walther, *Evaluating Derivatives*, 2nd ed., §13.2):

* product      c_k = sum_{j<=k} a_j b_{k-j}
* quotient     w_k = (a_k - sum_{j<k} w_j b_{k-j}) / b_0
* exp          v_k = (1/k) sum_{j=1..k} j u_j v_{k-j}
* log          v_k = (u_k - (1/k) sum_{j=1..k-1} j v_j u_{k-j}) / u_0
* power u^r    v_k = (1/(k u_0)) sum_{j=1..k} (r j - (k-j)) u_j v_{k-j}
* f with f'(u) = g(u):  v_k = (1/k) sum_{j=1..k} j u_j g_{k-j}
  (erf, Phi: g known from exp(-u^2); tanh: g = 1 - v^2; sigmoid: g = v - v^2,
  built coefficient by coefficient alongside v).

Each recurrence is a Python loop over k whose steps are vectorized over ``m``
and ``*shape``; for small K (or large tensors) each step is a short chain of
fused ``addcmul_`` calls, for large K on small tensors a single product-sum.

Real degree-0 coefficients.  In the engine every degree-0 coefficient is real
(complex dtype, zero imaginary part) and usually the same in all directions.
``bilinear(torch.matmul, ...)`` uses that (see :func:`_matmul_real0`), and
``bilinear(..., split=True)`` does for real ops extended to complex operands.
``mul`` does not: an elementwise complex x real product is not faster than
complex x complex in torch on CPU (the real operand is promoted; both are
memory-bound), measured.

Branches: at the degree-0 coefficient the kernels use torch's principal
branches (``log``, ``pow``, ``sqrt`` of a negative real are complex).  Kernels
that are not analytic at a zero degree-0 coefficient (log, sqrt, rsqrt,
reciprocal, div, pow with an exponent that is not a non-negative integer)
raise :class:`SeriesDomainError` naming the kernel.  ``erf`` and ``gelu`` need
erf of a complex degree-0 coefficient only when it has a nonzero imaginary
part; torch has no complex erf, so that (rare) case goes through SciPy on the
CPU.

High degrees.  The recurrences are accurate in complex128 as long as the
coefficients stay of moderate size.  When the coefficients of a series grow
(or decay) like rho^-k -- e.g. because of a singularity of f(x(t)) at
distance rho from t = 0 -- evaluate the series in a rescaled variable instead:
pass ``rescale(x, s)`` (the series of x(s z)) with s somewhat below rho (say
0.5-0.8 rho; s ~ 1 for entire functions) through the kernels, and undo it at
the end with ``rescale(result, 1 / s)`` if needed.  The kernels commute with
rescaling (coefficient k of every intermediate is multiplied by s^k), so this
changes only the floating-point range, not the algorithm.  Degree 100 (K = 101)
then stays accurate to ~1e-13 relative on all non-negligible coefficients
(tested against 60-digit mpmath references).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import native

__all__ = [
    "SeriesDomainError",
    "mul",
    "bilinear",
    "reciprocal",
    "div",
    "exp",
    "log",
    "pow",
    "sqrt",
    "rsqrt",
    "erf",
    "tanh",
    "sigmoid",
    "softplus",
    "gelu",
    "gelu_tanh",
    "silu",
    "silu_backward",
    "gelu_backward",
    "gelu_tanh_backward",
    "compose",
    "truncate",
    "constant",
    "rescale",
]


class SeriesDomainError(ArithmeticError):
    """A kernel was asked for a series at a point where its function is not analytic."""


# Recurrence strategy: a chain of fused addcmul_ per step ("loop") is fastest
# for small K and for large tensors; a single product-sum per step ("vec")
# wins for large K on small tensors (measured on CPU, complex128).
_LOOP_MAX_K = 8
_VEC_MAX_NUMEL = 1 << 15

_SQRT_2 = math.sqrt(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------------------
# helpers


def _check_series(a: torch.Tensor, name: str) -> None:
    if a.dim() < 2:
        raise ValueError(f"{name}: a series batch has shape [m, K, *shape], got {tuple(a.shape)}")


def _align(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Align the element ranks of two series batches (new axes right after dim 1)."""
    _check_series(a, name)
    _check_series(b, name)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name}: series lengths differ (K = {a.shape[1]} vs {b.shape[1]})")
    da, db = a.dim(), b.dim()
    if da < db:
        a = a[(slice(None), slice(None)) + (None,) * (db - da)]
    elif db < da:
        b = b[(slice(None), slice(None)) + (None,) * (da - db)]
    return a, b


def _bshape(*ts: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(*(t.shape for t in ts)))


def _check_nonzero0(a: torch.Tensor, name: str, what: str = "") -> None:
    if bool((a[:, 0] == 0).any()):
        raise SeriesDomainError(
            f"{name}: degree-0 coefficient is zero{what} (series not analytic there)"
        )


def apply0(x: torch.Tensor, *fns, positive: bool = False) -> tuple:
    """Functions ``fns`` of degree-0 coefficients x, real on the real axis.

    When x is complex with zero imaginary part -- the common case: the engine's
    degree-0 coefficients are the plain run -- they are evaluated on the real
    part, 5-10x faster than complex exp/tanh/sqrt/... on CPU.  When x [m, *s]
    holds the same value in all m directions (the engine's case again) they
    are evaluated once, on x[:1], and the results have shape [1, *s]
    (broadcastable like a coefficient; one comparison pass instead of m
    evaluations).  ``positive``: the functions are real only on the positive
    real axis (log, powers), so the shortcut also needs x > 0.
    """
    x = _shared0(x)
    if x.is_complex():
        off = (x.imag != 0) | (x.real <= 0) if positive else x.imag != 0
        if not bool(off.any()):
            xr = x.real
            return tuple(f(xr).to(x.dtype) for f in fns)
    return tuple(f(x) for f in fns)


def _use_loop(K: int, u: torch.Tensor) -> bool:
    return K <= _LOOP_MAX_K or u[:, 0].numel() > _VEC_MAX_NUMEL


def accumulate(out: torch.Tensor, terms: list, scale=None) -> None:
    """out <- scale * sum_t w_t x_t y_t for terms (x_t, y_t, w_t), w_t real floats.

    One mul plus one fused addcmul_ per further term; the term with the largest
    |w| is written first so that no extra pass is needed when that weight is 1.
    ``scale`` is None, a float or a tensor broadcastable to ``out``.
    """
    terms = [t for t in terms if t[2] != 0.0]
    if not terms:
        out.zero_()
        return
    piv = max(range(len(terms)), key=lambda t: abs(terms[t][2]))
    x0, y0, w0 = terms[piv]
    torch.mul(x0, y0, out=out)
    for t, (x, y, w) in enumerate(terms):
        if t != piv:
            out.addcmul_(x, y, value=w / w0)
    if isinstance(scale, torch.Tensor):
        if w0 != 1.0:
            out.mul_(w0)
        out.mul_(scale)
    else:
        f = w0 * (1.0 if scale is None else scale)
        if f != 1.0:
            out.mul_(f)


def _vdot(xr: torch.Tensor, y: torch.Tensor, k: int, jlo: int, jhi: int, w=None) -> torch.Tensor:
    """sum_{j=jlo..jhi} w_j x_j y_{k-j} as one product-sum.

    ``xr`` is x reversed along dim 1 (xr[:, K-1-j] = x_j, K = xr.shape[1]); ``w``
    is None or a real tensor of the weights ordered j = jhi, jhi-1, ..., jlo.
    """
    K = xr.shape[1]
    n = jhi - jlo + 1
    p = xr[:, K - 1 - jhi : K - 1 - jhi + n] * y[:, k - jhi : k - jhi + n]
    if w is not None:
        p.mul_(w.view((1, n) + (1,) * (p.dim() - 2)))
    return p.sum(1)


def _arange_col(K: int, like: torch.Tensor, start: int = 0) -> torch.Tensor:
    """[1, K-start, 1, ...] real tensor start, ..., K-1 matching ``like``'s rank."""
    r = torch.arange(start, K, dtype=like.real.dtype if like.is_complex() else like.dtype, device=like.device)
    return r.view((1, K - start) + (1,) * (like.dim() - 2))


def _new_like0(u: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    v = torch.empty(u.shape, dtype=torch.result_type(u, v0), device=u.device)
    v[:, 0] = v0
    return v


# ---------------------------------------------------------------------------
# construction


def constant(x, K: int, m: int = 1) -> torch.Tensor:
    """Series with degree-0 coefficient ``x`` (real or complex) and zeros above: [m, K, *x.shape], complex128."""
    x = torch.as_tensor(x)
    out = torch.zeros((m, K) + tuple(x.shape), dtype=torch.complex128, device=x.device)
    out[:, 0] = x
    return out


def truncate(a: torch.Tensor, K: int) -> torch.Tensor:
    """The first ``K`` coefficients of ``a`` (a view)."""
    _check_series(a, "truncate")
    if K < 1 or K > a.shape[1]:
        raise ValueError(f"truncate: cannot keep K = {K} of {a.shape[1]} coefficients")
    return a[:, :K]


def rescale(a: torch.Tensor, s) -> torch.Tensor:
    """Series of a(s z): coefficient k multiplied by s**k (s real or complex)."""
    _check_series(a, "rescale")
    K = a.shape[1]
    dtype = a.dtype
    if isinstance(s, complex) and not a.is_complex():
        dtype = torch.complex128
    p = torch.tensor([s**k for k in range(K)], dtype=dtype, device=a.device)
    return a * p.view((1, K) + (1,) * (a.dim() - 2))


# ---------------------------------------------------------------------------
# products


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out <- Cauchy product of rank-aligned a, b (out has the full broadcast shape)."""
    if _NATIVE_ELEMENTWISE and native.series_mul(out, a, b):
        return out
    K = a.shape[1]
    torch.mul(a[:, 0:1], b, out=out)
    for j in range(1, K):
        out[:, j:].addcmul_(a[:, j : j + 1], b[:, : K - j])
    return out


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cauchy product c_k = sum_{j<=k} a_j b_{k-j}, broadcasting over m and shape."""
    a, b = _align(a, b, "mul")
    out = torch.empty(_bshape(a, b), dtype=torch.result_type(a, b), device=a.device)
    return _mul_into(out, a, b)


def _square(a: torch.Tensor) -> torch.Tensor:
    """mul(a, a) using the symmetry of the Cauchy product (about half the work)."""
    K = a.shape[1]
    out = torch.empty_like(a)
    h = (K + 1) // 2
    torch.mul(a[:, :h], a[:, :h], out=out[:, 0::2])  # diagonal terms a_i^2 -> c_{2i}
    if K > 1:
        out[:, 1::2].zero_()
    for i in range(h):
        if 2 * i + 1 < K:  # 2 a_i a_l -> c_{i+l} for l > i
            out[:, 2 * i + 1 :].addcmul_(a[:, i : i + 1], a[:, i + 1 : K - i], value=2.0)
    return out


def bilinear(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    split: bool = False,
) -> torch.Tensor:
    """c_k = sum_{j<=k} op(a[:, j], b[:, k-j]) for a bilinear ``op``.

    ``op(x, y)`` receives ``[m_a, *sa]`` and ``[m_b, *sb]`` tensors (one of the
    m's may be 1) and must treat dim 0 as a batch axis (e.g. ``torch.matmul``
    for ``*sa``, ``*sb`` of rank >= 2).  Returns ``[m, K, *out]``.

    Shortcuts for real degree-0 coefficients (complex dtype, zero imaginary
    part: the engine's case), same results up to rounding:

    * ``op is torch.matmul`` (operands of equal rank >= 4, real a_0, not
      tiny): see :func:`_matmul_real0`; small matrices (any layout and a_0):
      :func:`_matmul_small`.
    * ``split=True``, for an op that is a real op extended to complex operands
      by several real calls (as taylor does for convolutions), when a_0 and b_0
      are real: the products with a_0 or b_0 become real calls, see
      :func:`_bilinear_real0`; op then also receives real tensors whose dim 0
      stacks several coefficients.  Not the default: for ops that are cheap on
      complex operands (elementwise products, matrix-vector products) the
      split costs more than it saves.
    """
    _check_series(a, "bilinear")
    _check_series(b, "bilinear")
    K = a.shape[1]
    if b.shape[1] != K:
        raise ValueError(f"bilinear: series lengths differ (K = {K} vs {b.shape[1]})")
    if _FAST_REAL0 and K > 1 and a.is_complex() and b.dtype == a.dtype:
        if op is torch.matmul:
            if a.dim() == b.dim() >= 4:
                if a.shape[-2] * a.shape[-1] * b.shape[-1] <= _SMALL_MATMUL_MACS:
                    return _matmul_small(a, b)
                elif a.numel() + b.numel() > _MATMUL_MIN_NUMEL and _real0(a):
                    return _matmul_real0(a, b)
        elif split and _real0(a) and _real0(b):
            return _bilinear_real0(op, a, b)
    return _bilinear_generic(op, a, b)


# Shortcuts for real degree-0 coefficients in bilinear (tests switch them off to compare, or
# lower the size threshold, below which the extra calls cost more than they save).
_FAST_REAL0 = True
_MATMUL_MIN_NUMEL = 1 << 17
# small matrices (at most this many multiply-adds p q n): bound by memory, so the real splitting's copies and
# passes cost more than its flops save; they take _matmul_small (in-process A/B on the paper task,
# docs/performance.md)
_SMALL_MATMUL_MACS = 1 << 15
# small matrices go through the native kernel when it is available (tests switch it off to check the torch code)
_NATIVE_SMALL = True
# elementwise Cauchy products and the exp recurrence in one native pass each
# (:func:`delsketch.series.native.series_mul`, :func:`~delsketch.series.native.series_exp`)
_NATIVE_ELEMENTWISE = True


def _matmul_small(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bilinear(torch.matmul) for series of small matrices (equal rank >= 4, batch dims broadcast).

    The native kernel (:func:`delsketch.series.native.cauchy_matmul`) when it is built and takes the operands,
    else :func:`_matmul_stacked`.
    """
    if _NATIVE_SMALL:
        out = native.cauchy_matmul(a, b)
        if out is not None:
            return out
    return _matmul_stacked(a, b)


def _matmul_stacked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bilinear(torch.matmul) for series of small matrices in torch: the K(K+1)/2 products as K matmuls, each
    coefficient of the largest of a_k, b_k, c_k touched once.

    Small matmuls are bound by memory, not flops, and the generic products read every b_j K - j times, every
    a_i K - i times and write a temporary per product. Here the smaller operand's coefficients are stacked (one
    copy of it, or a view) so that:

    * b_k largest (a few rows times a weight): P_j = [a_0; ..; a_{K-1-j}] @ b_j, rows stacked, each b_j read
      once, and c_{i+j} += (P_j)_i;
    * a_k largest: P_i = a_i @ [b_0, .., b_{K-1-i}], columns stacked, each a_i read once;
    * c_k largest (a short inner dimension, as in g^T x): c_k = [a_0 .. a_k] @ [b_k; ..; b_0], each c_k written
      once, by one matmul with a (k+1)-fold inner dimension.

    Measured against the generic products and the real degree-0 split: docs/performance.md.
    """
    K, p, q, n = a.shape[1], a.shape[-2], a.shape[-1], b.shape[-1]
    M = max(a.shape[0], b.shape[0])
    batch = tuple(torch.broadcast_shapes(a.shape[2:-2], b.shape[2:-2]))
    out = torch.empty((M, K, *batch, p, n), dtype=torch.result_type(a, b), device=a.device)
    ha, hb = (a.shape[0], *a.shape[2:-2]), (b.shape[0], *b.shape[2:-2])  # leading dims without K
    if q * n >= p * q and q * n >= p * n:  # rows
        af = a.movedim(1, -3).reshape(*ha, K * p, q)
        ot = out.movedim(1, -3)  # [M, *batch, K, p, n]
        if batch:
            ot.copy_(torch.matmul(af, b[:, 0]).unflatten(-2, (K, p)))
        else:
            torch.matmul(af, b[:, 0], out=out.view(M, K * p, n))
        for j in range(1, K):
            ot[..., j:, :, :] += torch.matmul(af[..., : (K - j) * p, :], b[:, j]).unflatten(-2, (K - j, p))
    elif p * q >= p * n:  # columns
        bf = b.movedim(1, -2).reshape(*hb, q, K * n)
        oc = out.movedim(1, -2)  # [M, *batch, p, K, n]
        for i in range(K):
            prod = torch.matmul(a[:, i], bf[..., : (K - i) * n]).unflatten(-1, (K - i, n))
            if i == 0:
                oc.copy_(prod)
            else:
                oc[..., i:, :] += prod
    else:  # inner dimension
        af = a.movedim(1, -2).reshape(*ha, p, K * q)  # a_0 .. a_{K-1} side by side (a view for a column-major a)
        bf = b.movedim(1, -3).flip(-3).reshape(*hb, K * q, n)  # one copy: b_{K-1}; ..; b_0
        for k in range(K):
            out[:, k] = torch.matmul(af[..., : (k + 1) * q], bf[..., (K - 1 - k) * q :, :])
    return out


def _bilinear_generic(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bilinear without shortcuts: K(K+1)/2 calls of op on the coefficients as they are."""
    K = a.shape[1]
    first = op(a[:, 0], b[:, 0])
    out = torch.empty((first.shape[0], K) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device)
    out[:, 0] = first
    del first
    for k in range(1, K):
        ok = out[:, k]
        ok.copy_(op(a[:, 0], b[:, k]))
        for j in range(1, k + 1):
            ok += op(a[:, j], b[:, k - j])
    return out


def _real0(x: torch.Tensor) -> bool:
    """Complex x whose degree-0 coefficient has zero imaginary part everywhere (one pass over x[:, 0])."""
    return x.is_complex() and not bool(torch.count_nonzero(x[:, 0].imag))


def _shared0(x0: torch.Tensor) -> torch.Tensor:
    """x0 [m, *s] -> x0[:1] when all m directions hold the same value (one pass), else x0."""
    if x0.shape[0] > 1 and torch.equal(x0, x0[:1].expand_as(x0)):
        return x0[:1]
    return x0


def _add_middle(op, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out[:, k] += sum_{j=1..k-1} op(a_j, b_{k-j}): the products without a degree-0 factor."""
    for k in range(2, a.shape[1]):
        ok = out[:, k]
        for j in range(1, k):
            ok += op(a[:, j], b[:, k - j])


def _stack_parts(x: torch.Tensor, m: int) -> torch.Tensor:
    """Complex coefficients x [mx, K', *s] -> real [2 K' m, *s]: (real/imag, k, direction) on dim 0."""
    if x.shape[0] != m:
        x = x.expand((m,) + tuple(x.shape[1:]))
    xr = torch.view_as_real(x).movedim(-1, 0).transpose(1, 2)  # [2, K', m, *s]
    return xr.reshape((-1,) + tuple(x.shape[2:]))


def _parts_product(op, x0: torch.Tensor, y: torch.Tensor, left: bool) -> torch.Tensor:
    """op(x0, y_k) (left) or op(y_k, x0) for all k of y [my, K', *s] in one call; x0 real [mx, *s0].

    Returns a real (or, for an op that makes complex values from real ones,
    complex) tensor [2, K', m, *out]: the products with the real parts of y,
    then with the imaginary parts.
    """
    m = max(x0.shape[0], y.shape[0])
    n = 2 * y.shape[1]
    if x0.shape[0] == 1:
        ys = _stack_parts(y, y.shape[0])
    else:
        ys = _stack_parts(y, m)
        x0 = x0.repeat((n,) + (1,) * (x0.dim() - 1))
    r = op(x0, ys) if left else op(ys, x0)
    return r.view((2, y.shape[1], -1) + tuple(r.shape[1:]))


def _bilinear_real0(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bilinear for complex a, b with real degree-0 coefficients, for any op.

    a_0 b_0 is one real op call (with m = 1 when a_0 and b_0 are the same in
    all directions); a_0 b_k for k >= 1 is one real op call on the real and
    imaginary parts of b_1..b_{K-1} stacked on dim 0, and likewise a_k b_0; the
    (K-1)(K-2)/2 remaining products are complex.  For an op that makes a
    complex call out of four real ones this replaces 2K-1 complex calls (8K-4
    real ones) by 4K-3 real ones, at the price of copying the coefficients
    into real and imaginary parts and back.
    """
    K = a.shape[1]
    M = max(a.shape[0], b.shape[0])
    a0 = _shared0(a[:, 0].real)
    b0 = _shared0(b[:, 0].real)
    c0 = op(a0, b0)
    out = torch.empty((M, K) + tuple(c0.shape[1:]), dtype=torch.promote_types(c0.dtype, a.dtype), device=c0.device)
    out[:, 0] = c0
    del c0
    p = _parts_product(op, a0, b[:, 1:], True)
    q = _parts_product(op, b0, a[:, 1:], False)
    hi = out[:, 1:]
    if p.is_complex() or q.is_complex():  # op(real, real) need not be real for a complex-bilinear op
        hi.copy_((p[0] + q[0] + 1j * (p[1] + q[1])).transpose(0, 1))
    else:
        s = p + q
        torch.view_as_real(hi).copy_(s.movedim(0, -1).transpose(0, 1))
        del s
    del p, q
    _add_middle(op, out, a, b)
    return out


def _matmul_real0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bilinear(torch.matmul, a, b) for a, b of equal rank >= 4 and a real degree-0 coefficient of a.

    The products a_0 b_k are one matmul with a_0 entering with m = 1 when it
    is the same in all directions.  When the rows of b are contiguous it is a
    real matmul against b viewed as real [.., q, 2n] (no copy): half the
    flops of the complex matmuls it replaces.  (A column-major b cannot be
    split into real and imaginary parts without a slow transposing copy, so
    there it stays complex.)  When b_0 is real too (the engine's case), a_0 b_0
    is one real matmul (once, when both are shared by all directions) and the
    products a_k b_0 (k >= 1) one real matmul of b_0 against the real and
    imaginary parts of a_1..a_{K-1} stacked as rows (one copy of a): the
    Cauchy matmul then costs 4(K-1) + 4(K-1)(K-2)/2 real matmuls per
    direction instead of 2K + 4K(K-1)/2 (degree 1: 4 instead of 8; degree 3:
    24 instead of 32).  The products without a degree-0 factor are complex
    matmuls, see :func:`_matmul_rest`.
    """
    M = max(a.shape[0], b.shape[0])
    K = a.shape[1]
    a0 = _shared0(a[:, 0].real).unsqueeze(1)  # [m or 1, 1, .., p, q]
    b0_real = _real0(b)
    if b.stride(-1) != 1 and a0[0].numel() > a0.shape[-1] * a0.shape[-2] and b.numel() < a.numel():
        # a complex a_0 would be expanded over b's batch axes by matmul (a copy of a's size);
        # when b is smaller, copying b into row-major order is the cheaper copy
        b = b.contiguous()
    bk = b[:, 1:] if b0_real else b  # with a real b_0, a_0 b_0 is computed apart (real, maybe shared)
    if bk.stride(-1) == 1:
        r = torch.matmul(a0.contiguous(), torch.view_as_real(bk).flatten(-2))  # [., K', .., p, 2n]
        a0bk = torch.view_as_complex(r.unflatten(-1, (-1, 2)))
    else:
        a0bk = torch.matmul(a0.to(b.dtype), bk)
    if not b0_real:
        out = a0bk if a0bk.shape[0] == M else a0bk.expand((M,) + tuple(a0bk.shape[1:])).contiguous()
        _matmul_rest(out, a, b)
        return out
    b0 = _shared0(b[:, 0].real)  # [m or 1, .., q, n]
    batch = torch.broadcast_shapes(a.shape[2:-2], b.shape[2:-2])
    out = torch.empty((M, K) + tuple(batch) + (a.shape[-2], b.shape[-1]), dtype=a0bk.dtype, device=a.device)
    o0 = torch.view_as_real(out[:, 0])
    o0[..., 0].copy_(torch.matmul(a0[:, 0], b0))
    o0[..., 1].zero_()
    # a_k b_0: rows [Re a_k; Im a_k] (one copy of a_1..a_{K-1}) times b_0, one gemm when b_0 is one matrix
    p = a.shape[-2]
    ar = torch.view_as_real(a[:, 1:]).movedim(-1, -3).flatten(-3, -2)  # [ma, K-1, .., 2p, q]
    if b0.shape[0] == 1 and b0.dim() == 3:
        akb0 = torch.matmul(ar.reshape(-1, ar.shape[-1]), b0[0]).view(ar.shape[:-1] + (b0.shape[-1],))
    else:
        akb0 = torch.matmul(ar, b0.unsqueeze(1))
    akb0 = akb0.unflatten(-2, (2, p)).movedim(-3, -1)  # [ma, K-1, .., p, n, 2]
    torch.add(torch.view_as_real(a0bk), akb0, out=torch.view_as_real(out[:, 1:]))
    del a0bk, akb0, ar
    _matmul_rest(out, a, b, skip_b0=True)
    return out


def _col_major(x: torch.Tensor) -> bool:
    """The matrices x[..., :, :] are stored column by column (x is a transposed view)."""
    return x.stride(-2) == 1 and x.stride(-1) != 1


def _matmul_rest(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, skip_b0: bool = False) -> None:
    """out[:, k] += sum_{j=1..k} a_j b_{k-j} for k >= 1, as K-1 complex matmuls (``skip_b0``: j < k only).

    The k products are one matmul with a k times longer inner dimension: the
    blocks a_j side by side ([.., p, k q]) times the blocks b_{k-j} stacked
    ([.., k q, n]).  The block matrices are views of one copy of a and one of
    b (or of a or b itself, for 4-D series whose layout already fits), made
    from row-major or column-major data as it is stored.  This saves
    (K-1)(K-2)/2 temporaries and additions of the size of an output
    coefficient and makes the matmuls more efficient; when the copies are
    larger than that, the products are done one by one instead.
    """
    K = a.shape[1]
    lo = 2 if skip_b0 else 1  # the first k with a product left
    if K <= lo:
        return
    s = 1 if skip_b0 else 0  # products a_j b_{k-j} with k - j >= s
    q = a.shape[-1]
    at = a.mT
    a_t = _col_major(a)  # x_k = [a_1 .. a_k] from a^T's row blocks, y_k = [b_{k-1}; ..; b_0]; else reversed
    x_view = a_t and a.dim() == 4 and at.stride(1) == q * at.stride(-2)
    y_view = not a_t and b.dim() == 4 and not _col_major(b) and b.stride(1) == q * b.stride(-2)
    copies = (0 if x_view else a[:, 1 : K - s].numel()) + (0 if y_view else b[:, s : K - 1].numel())
    if a.dim() == 4 and copies > (K - 1) * (K - 2) // 2 * out[:, 0].numel():
        # (for rank > 4, matmul copies every coefficient it is given anyway: its batch axes do not merge)
        for k in range(lo, K):
            ok = out[:, k]
            for j in range(1, k + 1 - s):
                ok += torch.matmul(a[:, j], b[:, k - j])
        return
    if a_t:
        xs = at[:, 1:] if x_view else torch.stack([at[:, j] for j in range(1, K - s)], dim=-3)  # [.., K-1-s, q, p]
        xk = lambda k: xs[..., : k - s, :, :].flatten(-3, -2).mT  # noqa: E731
        ys = _row_blocks(b, range(K - 2, s - 1, -1), False)  # b_{K-2} .. b_s
        yk = lambda k: ys(K - 1 - k, K - 1 - s)  # noqa: E731
    else:
        xs = torch.stack([a[:, j] for j in range(K - 1 - s, 0, -1)], dim=-2)  # [.., p, K-1-s, q]: a_{K-1-s} .. a_1
        xk = lambda k: xs[..., K - 1 - k :, :].flatten(-2)  # noqa: E731
        ys = _row_blocks(b, range(s, K - 1), y_view)  # b_s .. b_{K-2}
        yk = lambda k: ys(0, k - s)  # noqa: E731
    for k in range(lo, K):
        out[:, k] += torch.matmul(xk(k), yk(k))


def _row_blocks(b: torch.Tensor, order, view: bool) -> Callable[[int, int], torch.Tensor]:
    """f(i, j): the coefficients b[:, order[i:j]] stacked as row blocks, a [.., (j-i) q, n] matrix.

    ``view``: order is o, o+1, ... and b is a 4-D series whose coefficients are
    already stacked like that in memory.  Otherwise one copy of the listed
    coefficients, from b's row-major or column-major storage as it is.
    """
    order = list(order)
    if view:
        o = order[0]
        return lambda i, j: b[:, o + i : o + j].flatten(1, 2)
    if _col_major(b):
        # stacked rows of b = side-by-side columns of b^T: copy the row-major b^T blocks side by side
        bt = torch.stack([b[:, i].mT for i in order], dim=-2)  # [.., n, len, q]
        return lambda i, j: bt[..., i:j, :].flatten(-2).mT
    bs = torch.stack([b[:, i] for i in order], dim=-3)  # [.., len, q, n]
    return lambda i, j: bs[..., i:j, :, :].flatten(-3, -2)


# ---------------------------------------------------------------------------
# quotient and powers


def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Quotient a / b: w_k = (a_k - sum_{j<k} w_j b_{k-j}) / b_0."""
    a, b = _align(a, b, "div")
    _check_nonzero0(b, "div", " in the denominator")
    K = a.shape[1]
    inv0 = 1.0 / b[:, 0]
    w = torch.empty(_bshape(a, b), dtype=torch.result_type(a, b), device=a.device)
    w[:, 0] = a[:, 0] * inv0
    if K == 1:
        return w
    if _use_loop(K, w):
        for k in range(1, K):
            wk = w[:, k]
            torch.addcmul(a[:, k], b[:, 1], w[:, k - 1], value=-1.0, out=wk)
            for j in range(2, k + 1):
                wk.addcmul_(b[:, j], w[:, k - j], value=-1.0)
            wk.mul_(inv0)
    else:
        br = b.flip(1)
        for k in range(1, K):
            w[:, k] = (a[:, k] - _vdot(br, w, k, 1, k)) * inv0
    return w


def reciprocal(a: torch.Tensor) -> torch.Tensor:
    """1 / a by the quotient recurrence."""
    _check_series(a, "reciprocal")
    _check_nonzero0(a, "reciprocal")
    K = a.shape[1]
    w = torch.empty_like(a)
    w[:, 0] = 1.0 / a[:, 0]
    if K == 1:
        return w
    ninv0 = -w[:, 0]
    if _use_loop(K, a):
        for k in range(1, K):
            accumulate(w[:, k], [(a[:, j], w[:, k - j], 1.0) for j in range(1, k + 1)], ninv0)
    else:
        ar = a.flip(1)
        for k in range(1, K):
            w[:, k] = _vdot(ar, w, k, 1, k) * ninv0
    return w


def _int_pow(a: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        out = torch.zeros_like(a)
        out[:, 0] = 1.0
        return out
    result = None
    base = a
    while True:
        if n & 1:
            result = base if result is None else mul(result, base)
        n >>= 1
        if not n:
            break
        base = _square(base)
    return result.clone() if result is a else result


def _pow(u: torch.Tensor, r: float, f0=None) -> torch.Tensor:
    """u**r for u_0 != 0 (checked by the caller) by the power recurrence; f0: u_0 -> u_0**r."""
    K = u.shape[1]
    u0 = u[:, 0]
    (v0,) = apply0(u0, f0 or (lambda x: torch.pow(x, r)), positive=True)
    v = _new_like0(u, v0)
    if K == 1:
        return v
    uh = u * (1.0 / u0).unsqueeze(1)  # u / u_0, so uh_0 = 1
    rp1 = r + 1.0
    if _use_loop(K, u):
        for k in range(1, K):
            accumulate(v[:, k], [(uh[:, j], v[:, k - j], (rp1 * j - k) / k) for j in range(1, k + 1)])
    else:
        uhr = uh.flip(1)
        rdt = u.real.dtype if u.is_complex() else u.dtype
        for k in range(1, K):
            wts = (rp1 * torch.arange(k, 0, -1, dtype=rdt, device=u.device) - k) / k
            v[:, k] = _vdot(uhr, v, k, 1, k, wts)
    return v


def pow(a: torch.Tensor, r: float) -> torch.Tensor:
    """a**r for a real exponent r (principal branch at the degree-0 coefficient).

    Integer r >= 0 uses binary powering with Cauchy products and is valid at
    a_0 == 0; any other r raises SeriesDomainError there.
    """
    _check_series(a, "pow")
    r = float(r)
    if r >= 0 and r.is_integer():
        return _int_pow(a, int(r))
    _check_nonzero0(a, "pow", f" and the exponent {r:g} is not a non-negative integer")
    if r == -1.0:
        return reciprocal(a)
    return _pow(a, r)


def sqrt(a: torch.Tensor) -> torch.Tensor:
    """a**0.5 (principal branch)."""
    _check_series(a, "sqrt")
    _check_nonzero0(a, "sqrt")
    return _pow(a, 0.5, torch.sqrt)


def rsqrt(a: torch.Tensor) -> torch.Tensor:
    """a**-0.5 (principal branch)."""
    _check_series(a, "rsqrt")
    _check_nonzero0(a, "rsqrt")
    return _pow(a, -0.5, torch.rsqrt)


# ---------------------------------------------------------------------------
# exp and log


def exp(a: torch.Tensor) -> torch.Tensor:
    """exp(a): v_k = (1/k) sum_{j=1..k} j a_j v_{k-j}."""
    _check_series(a, "exp")
    return _exp(a, 1.0)


def _exp(a: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * exp(a) (the recurrence is linear in v, so the factor goes into v_0 only)."""
    K = a.shape[1]
    v = torch.empty_like(a)
    (v0,) = apply0(a[:, 0], torch.exp)
    if scale != 1.0:
        v0.mul_(scale)
    v[:, 0] = v0
    del v0
    if K == 1 or (_NATIVE_ELEMENTWISE and native.series_exp(v, a)):
        return v
    if _use_loop(K, a):
        for k in range(1, K):
            accumulate(v[:, k], [(a[:, j], v[:, k - j], j / k) for j in range(1, k + 1)])
    else:
        jar = (a * _arange_col(K, a)).flip(1)
        for k in range(1, K):
            v[:, k] = _vdot(jar, v, k, 1, k) * (1.0 / k)
    return v


def log(a: torch.Tensor) -> torch.Tensor:
    """log(a) (principal branch): v_k = (a_k - (1/k) sum_{j=1..k-1} j v_j a_{k-j}) / a_0."""
    _check_series(a, "log")
    _check_nonzero0(a, "log")
    K = a.shape[1]
    v = torch.empty_like(a)
    (v[:, 0],) = apply0(a[:, 0], torch.log, positive=True)
    if K == 1:
        return v
    inv0 = 1.0 / a[:, 0]
    if _use_loop(K, a):
        for k in range(1, K):
            vk = v[:, k]
            if k == 1:
                torch.mul(a[:, 1], inv0, out=vk)
                continue
            torch.addcmul(a[:, k], v[:, 1], a[:, k - 1], value=-1.0 / k, out=vk)
            for j in range(2, k):
                vk.addcmul_(v[:, j], a[:, k - j], value=-j / k)
            vk.mul_(inv0)
    else:
        ar = a.flip(1)
        jv = torch.empty_like(a)  # jv_j = j v_j
        for k in range(1, K):
            if k == 1:
                v[:, 1] = a[:, 1] * inv0
            else:
                v[:, k] = (a[:, k] - _vdot(ar, jv, k, 1, k - 1) * (1.0 / k)) * inv0
            jv[:, k] = v[:, k] * k
    return v


# ---------------------------------------------------------------------------
# f(u) from f'(u)


def compose(u: torch.Tensor, f0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Series of f(u) from f0 = f(u_0) and the series g of f'(u).

    v_0 = f0 and v_k = (1/k) sum_{j=1..k} j u_j g_{k-j}, i.e. v' = u' g
    integrated; ``g`` needs at least K-1 coefficients (more are ignored).
    ``f0`` has shape ``[m or 1, *shape]`` (broadcast like a coefficient).
    """
    _check_series(u, "compose")
    K = u.shape[1]
    f0 = torch.as_tensor(f0, device=u.device)
    if K == 1:
        return _new_like0(u, f0)
    if g.shape[1] < K - 1:
        raise ValueError(f"compose: g has {g.shape[1]} coefficients, need {K - 1}")
    du = u[:, 1:] * _arange_col(K, u, 1)  # du_i = (i+1) u_{i+1}
    du, g = _align(du, g[:, : K - 1], "compose")
    full = _bshape(du, g)
    v = torch.empty(
        (full[0], K) + full[2:], dtype=torch.promote_types(torch.result_type(du, g), f0.dtype), device=u.device
    )
    v[:, 0] = f0
    p = _mul_into(v[:, 1:], du, g)
    p.mul_(1.0 / _arange_col(K, p, 1))
    return v


def _riccati(u: torch.Tensor, v0: torch.Tensor, g0: torch.Tensor, c1: float, with_g: bool = False):
    """v with v' = u' g, g = c0 + c1 v - v^2 (g_0 = g0 given, computed stably by the caller).

    ``with_g``: return (v, g) with all K coefficients of g = f'(u) too (one more step of its recurrence).
    """
    K = u.shape[1]
    v = _new_like0(u, v0)
    g = torch.empty((u.shape[0], K if with_g else K - 1) + tuple(u.shape[2:]), dtype=v.dtype, device=u.device)
    if g.shape[1]:
        g[:, 0] = g0
    loop = _use_loop(K, u)
    if not loop:
        jur = (u * _arange_col(K, u)).flip(1)
        vr = torch.empty_like(v)  # vr[:, K-1-i] = v_i
        vr[:, K - 1] = v[:, 0]

    def g_step(n: int) -> None:  # g_n = c1 v_n - sum_{i=0..n} v_i v_{n-i}
        if loop:  # symmetric: pairs twice, middle once
            terms = [(v[:, i], v[:, n - i], -2.0) for i in range((n + 1) // 2)]
            if n % 2 == 0:
                terms.append((v[:, n // 2], v[:, n // 2], -1.0))
            gn = g[:, n]
            accumulate(gn, terms)
            if c1 != 0.0:
                gn.add_(v[:, n], alpha=c1)
        else:
            s = _vdot(vr, v, n, 0, n)
            g[:, n] = v[:, n] * c1 - s if c1 != 0.0 else -s

    for k in range(1, K):
        if k >= 2:
            g_step(k - 1)
        if loop:
            accumulate(v[:, k], [(u[:, j], g[:, k - j], j / k) for j in range(1, k + 1)])
        else:
            v[:, k] = _vdot(jur, g, k, 1, k) * (1.0 / k)
            vr[:, K - 1 - k] = v[:, k]
    if with_g and K >= 2:
        g_step(K - 1)
    return (v, g) if with_g else v


def _scipy_special(name: str, x: torch.Tensor) -> torch.Tensor:
    try:
        import scipy.special  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover
        raise NotImplementedError(
            f"{name} of a complex degree-0 coefficient needs SciPy (torch has no complex {name})"
        ) from exc
    res = getattr(scipy.special, name)(x.detach().cpu().numpy())
    return torch.from_numpy(res).to(device=x.device, dtype=x.dtype)


def _erf0(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        if bool((x.imag != 0).any()):
            return _scipy_special("erf", x)
        return torch.special.erf(x.real).to(x.dtype)
    return torch.special.erf(x)


def _erfc0(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        if bool((x.imag != 0).any()):
            return _scipy_special("erfc", x)
        return torch.special.erfc(x.real).to(x.dtype)
    return torch.special.erfc(x)


def _neg_half_sq_exp(u: torch.Tensor, c: float, scale: float, full: bool = False) -> torch.Tensor:
    """scale * exp(-c u^2) with K-1 coefficients (all that compose needs), or all K with ``full``."""
    s = _square(u if full else u[:, : u.shape[1] - 1])
    s.mul_(-c)
    return _exp(s, scale)


def erf(a: torch.Tensor) -> torch.Tensor:
    """erf(a): erf' = (2/sqrt(pi)) exp(-u^2)."""
    _check_series(a, "erf")
    if a.shape[1] == 1:
        return _new_like0(a, _erf0(a[:, 0]))
    return compose(a, _erf0(a[:, 0]), _neg_half_sq_exp(a, 1.0, _TWO_OVER_SQRT_PI))


def _ndtr(a: torch.Tensor) -> torch.Tensor:
    """Phi(a), the standard normal CDF: Phi' = exp(-u^2/2)/sqrt(2 pi)."""
    f0 = _ndtr0(a[:, 0])
    if a.shape[1] == 1:
        return _new_like0(a, f0)
    return compose(a, f0, _neg_half_sq_exp(a, 0.5, _INV_SQRT_2PI))


def _ndtr0(x: torch.Tensor) -> torch.Tensor:
    """Phi at degree-0 coefficients, through erfc: no cancellation for x << 0."""
    return 0.5 * _erfc0(-x * (1.0 / _SQRT_2))


def tanh(a: torch.Tensor) -> torch.Tensor:
    """tanh(a): tanh' = 1 - tanh^2."""
    _check_series(a, "tanh")
    # g0 = 1 - tanh^2 = 1/cosh^2, without cancellation
    v0, g0 = apply0(a[:, 0], torch.tanh, lambda x: torch.cosh(x).reciprocal_().square_())
    return _riccati(a, v0, g0, 0.0)


def _sigmoid0(a: torch.Tensor) -> tuple:
    """sigmoid and sigmoid' = s(1 - s) = s(x) s(-x) (without cancellation) at the degree-0 coefficient."""
    return apply0(a[:, 0], torch.sigmoid, lambda x: torch.sigmoid(x).mul_(torch.sigmoid(-x)))


def sigmoid(a: torch.Tensor) -> torch.Tensor:
    """sigmoid(a) = 1/(1+exp(-a)): sigmoid' = s - s^2."""
    _check_series(a, "sigmoid")
    return _riccati(a, *_sigmoid0(a), 1.0)


def _softplus0(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)) (split on the real part)."""
    pos = (x.real if x.is_complex() else x) > 0
    return torch.where(pos, x, torch.zeros_like(x)) + torch.log1p(torch.exp(torch.where(pos, -x, x)))


def softplus(a: torch.Tensor) -> torch.Tensor:
    """softplus(a) = log(1 + exp(a)): softplus' = sigmoid."""
    _check_series(a, "softplus")
    K = a.shape[1]
    (f0,) = apply0(a[:, 0], _softplus0)
    if K == 1:
        return _new_like0(a, f0)
    return compose(a, f0, sigmoid(a[:, : K - 1]))


def gelu(a: torch.Tensor) -> torch.Tensor:
    """Exact GELU: a * Phi(a)."""
    _check_series(a, "gelu")
    return mul(a, _ndtr(a))


def gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    """tanh-approximate GELU 0.5 a (1 + tanh(sqrt(2/pi)(a + 0.044715 a^3))).

    Evaluated as a * sigmoid(2 sqrt(2/pi)(a + 0.044715 a^3)), the same function
    without the cancellation in 1 + tanh for a_0 << 0.
    """
    _check_series(a, "gelu_tanh")
    return mul(a, sigmoid(_gelu_tanh_arg(a)[1]))


def _gelu_tanh_arg(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a^2, y) with y = 2 sqrt(2/pi) (a + 0.044715 a^3), the argument of the tanh GELU's sigmoid."""
    a2 = _square(a)
    return a2, mul(a, a2).mul_(0.044715).add_(a).mul_(2.0 * _GELU_TANH_C)


def gelu_backward(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """grad * gelu'(a) = grad * (Phi(a) + a phi(a)), phi = Phi' = exp(-a^2/2) / sqrt(2 pi).

    One square and one exp recurrence give phi with all K coefficients; Phi is phi integrated along a
    (:func:`compose`); then two Cauchy products. (torch's decomposition computes erf, which squares and
    exponentiates again, the normal density a second time, and several scalings: twice the passes.)
    """
    _check_series(a, "gelu_backward")
    phi = _neg_half_sq_exp(a, 0.5, _INV_SQRT_2PI, full=True)
    d = mul(a, phi)
    d += compose(a, _ndtr0(a[:, 0]), phi)
    del phi
    return mul(grad, d)


def gelu_tanh_backward(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """grad * d/da [a sigmoid(y)], y = 2 c (a + 0.044715 a^3), c = sqrt(2/pi) (the tanh GELU, as
    :func:`gelu_tanh`): grad * (s + a s' y'), with s and s' from one Riccati recurrence."""
    _check_series(a, "gelu_tanh_backward")
    a2, y = _gelu_tanh_arg(a)
    s, sp = _sigmoid_and_derivative(y)
    del y
    dy = a2.mul_(3.0 * 0.044715 * 2.0 * _GELU_TANH_C)
    dy[:, 0] += 2.0 * _GELU_TANH_C
    d = mul(a, mul(sp, dy))
    del sp, dy
    d += s
    return mul(grad, d)


def silu(a: torch.Tensor) -> torch.Tensor:
    """SiLU: a * sigmoid(a)."""
    _check_series(a, "silu")
    return mul(a, sigmoid(a))


def _sigmoid_and_derivative(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid(a), sigmoid'(a)), both with all K coefficients, from one Riccati recurrence."""
    return _riccati(a, *_sigmoid0(a), 1.0, with_g=True)


def silu_backward(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """grad * silu'(a) = grad * (s + a s'), s = sigmoid(a), s' = s - s^2.

    One Riccati recurrence gives s and s' together; then two Cauchy products.
    (torch's decomposition of silu_backward evaluates sigmoid through exp and a
    quotient and takes four products: about three times the passes.)
    """
    _check_series(a, "silu_backward")
    s, g = _sigmoid_and_derivative(a)
    d = mul(a, g)
    d += s
    del s, g
    return mul(grad, d)
