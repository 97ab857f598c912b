"""Tests of delsketch.ring against independent computations.

* real directions: nested torch.func.jvp along a polynomial path (float64),
* complex coefficients: identities between kernels, bilinear vs mul, and mpmath,
* degree 100: mpmath at 60 digits (trapezoidal Cauchy integrals, one mpmath.taylor),
* domain errors.
"""

from __future__ import annotations

import itertools
import math
import zlib

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from delsketch.series import kernels as R

DT = torch.float64
CDT = torch.complex128


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture(params=["loop", "vec"])
def mode(request, monkeypatch):
    """Run a test with each recurrence strategy forced (both must be correct)."""
    if request.param == "loop":
        monkeypatch.setattr(R, "_LOOP_MAX_K", 10**9)
    else:
        monkeypatch.setattr(R, "_LOOP_MAX_K", 0)
        monkeypatch.setattr(R, "_VEC_MAX_NUMEL", 10**12)
    return request.param


def path_coeffs(gen, m, K, shape, lo=None, hi=None, scale=0.5):
    """Real coefficients [m, K, *shape]: degree 0 uniform in [lo, hi] (or normal), the rest scale * normal."""
    x = torch.randn((m, K) + tuple(shape), generator=gen, dtype=DT) * scale
    if lo is not None:
        x[:, 0] = lo + (hi - lo) * torch.rand((m,) + tuple(shape), generator=gen, dtype=DT)
    else:
        x[:, 0] = torch.randn((m,) + tuple(shape), generator=gen, dtype=DT)
    return x


def jvp_taylor(f, *coeffs):
    """Taylor coefficients (1/r!) d^r/dt^r f(x(t)) at t=0 for the paths x(t) = sum_i t^i coeffs[:, i].

    Uses nested torch.func.jvp in float64; returns [m, K, *out] where K = coeffs' K.
    """
    K = coeffs[0].shape[1]

    def h(t):
        xs = []
        for c in coeffs:
            x = c[:, K - 1]
            for i in range(K - 2, -1, -1):  # Horner
                x = c[:, i] + t * x
            xs.append(x)
        return f(*xs)

    t0 = torch.zeros((), dtype=DT)
    fns = [h]
    for _ in range(1, K):
        prev = fns[-1]
        fns.append(lambda t, prev=prev: torch.func.jvp(prev, (t,), (torch.ones_like(t),))[1])
    out = [fn(t0) / math.factorial(r) for r, fn in enumerate(fns)]
    return torch.stack(out, 1)


def assert_series_close(got, ref, rtol=1e-12, what="", floor=0.0):
    """Per degree r: max |got_r - ref_r| <= rtol * max(max |ref_r|, floor) (normwise relative error)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    got = got.to(CDT)
    ref = ref.to(CDT)
    for r in range(ref.shape[1]):
        scale = ref[:, r].abs().max().item()
        err = (got[:, r] - ref[:, r]).abs().max().item()
        assert err <= rtol * max(scale, floor, 1e-300), f"{what}: degree {r}: error {err:.3e} vs scale {scale:.3e}"


def cs(x):
    """Real series coefficients as a complex128 series."""
    return x.to(CDT)


def complex_series(gen, m, K, shape, lo=0.5, hi=1.5, scale=0.4):
    """Complex coefficients; degree 0 with real part in [lo, hi] and a moderate imaginary part."""
    re = path_coeffs(gen, m, K, shape, lo, hi, scale)
    im = path_coeffs(gen, m, K, shape, -0.5, 0.5, scale)
    return torch.complex(re, im)


def one(K, shape=()):
    return R.constant(torch.ones(shape, dtype=DT), K)


GELU_TANH_C = math.sqrt(2.0 / math.pi)

# ---------------------------------------------------------------------------
# 1. real directions against nested jvp, degrees 0..4

K5 = 5
M = 3
SHAPE = (2, 3)

UNARY = [
    # name, ring kernel, torch reference, degree-0 range
    ("exp", R.exp, torch.exp, None),
    ("log", R.log, torch.log, (0.5, 2.0)),
    ("reciprocal", R.reciprocal, torch.reciprocal, (0.5, 2.0)),
    ("sqrt", R.sqrt, torch.sqrt, (0.5, 2.0)),
    ("rsqrt", R.rsqrt, torch.rsqrt, (0.5, 2.0)),
    ("pow0.5", lambda a: R.pow(a, 0.5), lambda x: x**0.5, (0.5, 2.0)),
    ("pow-0.5", lambda a: R.pow(a, -0.5), lambda x: x**-0.5, (0.5, 2.0)),
    ("pow-1", lambda a: R.pow(a, -1), lambda x: x**-1.0, (0.5, 2.0)),
    ("pow3", lambda a: R.pow(a, 3), lambda x: x**3, None),
    ("pow2.7", lambda a: R.pow(a, 2.7), lambda x: x**2.7, (0.5, 2.0)),
    ("pow-2", lambda a: R.pow(a, -2), lambda x: x**-2.0, (0.5, 2.0)),
    ("pow0", lambda a: R.pow(a, 0), lambda x: x**0.0, None),
    ("pow1", lambda a: R.pow(a, 1), lambda x: x, None),
    ("pow7", lambda a: R.pow(a, 7), lambda x: x**7, None),
    ("erf", R.erf, torch.special.erf, None),
    ("tanh", R.tanh, torch.tanh, None),
    ("sigmoid", R.sigmoid, torch.sigmoid, None),
    ("softplus", R.softplus, lambda x: torch.log1p(torch.exp(x)), None),
    ("gelu", R.gelu, F.gelu, None),
    ("gelu_tanh", R.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), None),
    ("silu", R.silu, F.silu, None),
]


@pytest.mark.parametrize("name,kern,ref,rng", UNARY, ids=[u[0] for u in UNARY])
def test_unary_vs_jvp(name, kern, ref, rng, mode):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = path_coeffs(gen, M, K5, SHAPE, *(rng or (None, None)))
    got = kern(cs(x))
    assert got.shape == x.shape and got.dtype == CDT
    assert_series_close(got, jvp_taylor(ref, x), 1e-12, name)
    assert got.imag.abs().max().item() == 0.0  # real coefficients in, real out


@pytest.mark.parametrize("name,kern,ref,rng", UNARY, ids=[u[0] for u in UNARY])
def test_unary_shared_degree0_vs_jvp(name, kern, ref, rng):
    """The engine's case: the degree-0 coefficient is the same in every direction (evaluated once, then broadcast)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    x = path_coeffs(gen, M, K5, SHAPE, *(rng or (None, None)))
    x[1:, 0] = x[0, 0]
    got = kern(cs(x))
    assert got.shape == x.shape
    assert_series_close(got, jvp_taylor(ref, x), 1e-12, name)


def test_unary_large_arguments_vs_jvp(mode):
    """Moderately large |x_0| against jvp, and finiteness far out (|x_0| = 40)."""
    x = torch.zeros(1, K5, 6, dtype=DT)
    x[0, 0] = torch.tensor([-40.0, -12.0, -3.0, 3.0, 12.0, 40.0])
    x[0, 1:] = torch.tensor([[0.7], [-0.3], [0.2], [0.1]], dtype=DT)
    cases = [
        ("sigmoid", R.sigmoid, torch.sigmoid),
        ("tanh", R.tanh, torch.tanh),
        ("softplus", R.softplus, F.softplus),  # F.softplus is exact below its threshold 20
        ("silu", R.silu, F.silu),
        ("erf", R.erf, torch.special.erf),
        ("gelu", R.gelu, F.gelu),
        ("gelu_tanh", R.gelu_tanh, lambda v: F.gelu(v, approximate="tanh")),
    ]
    for name, kern, ref in cases:
        r = jvp_taylor(ref, x[..., 1:5])  # |x_0| <= 12
        assert_series_close(kern(cs(x[..., 1:5])), r, 1e-12, name)
        assert torch.isfinite(kern(cs(x))).all(), name


# kernel, mpmath function, degree-0 points where the function saturates
SATURATING = [
    ("tanh", R.tanh, mpmath.tanh, (-30.0, 30.0)),
    ("sigmoid", R.sigmoid, lambda v: 1 / (1 + mpmath.exp(-v)), (-30.0, 30.0)),
    ("softplus", R.softplus, lambda v: mpmath.log(1 + mpmath.exp(v)), (-30.0, 30.0)),
    ("silu", R.silu, lambda v: v / (1 + mpmath.exp(-v)), (-30.0, 30.0)),
    ("erf", R.erf, mpmath.erf, (-6.0, 6.0)),
    ("gelu", R.gelu, lambda v: v * mpmath.ncdf(v), (-6.0, 6.0)),
    ("gelu_tanh", R.gelu_tanh,
     lambda v: v * (1 + mpmath.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) / 2, (-4.0, 4.0)),
]


@pytest.mark.parametrize("name,kern,fmp,points", SATURATING, ids=[c[0] for c in SATURATING])
def test_saturated_arguments_vs_mpmath(name, kern, fmp, points):
    """Coefficients that are tiny because f saturates keep full relative accuracy (no 1 - f^2 cancellation)."""
    c = [0.7, -0.3, 0.2, 0.1]
    for x0 in points:
        with mpmath.workdps(60):
            path = lambda t: x0 + c[0] * t + c[1] * t**2 + c[2] * t**3 + c[3] * t**4  # noqa: E731
            ref = [complex(v) for v in mpmath.taylor(lambda t: fmp(path(t)), 0, 4)]
        got = kern(_series_from([x0] + c, 5))[0]
        for k in range(5):
            assert abs(got[k] - ref[k]) <= 1e-12 * abs(ref[k]), (name, x0, k, complex(got[k]), ref[k])


def _silu_backward_formula(g, x):
    s = torch.sigmoid(x)
    return g * s * (1 + x * (1 - s))


def _gelu_backward_formula(g, x):
    return g * (0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def _gelu_tanh_backward_formula(g, x):  # the tanh form, as torch writes the approximation
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x**3))
    return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))


BINARY = [
    ("mul", R.mul, torch.mul, None),
    ("div", R.div, torch.div, (0.5, 2.0)),
    ("silu_backward", R.silu_backward, _silu_backward_formula, None),
    ("gelu_backward", R.gelu_backward, _gelu_backward_formula, None),
    ("gelu_tanh_backward", R.gelu_tanh_backward, _gelu_tanh_backward_formula, None),
]


@pytest.mark.parametrize("name,kern,ref,brng", BINARY, ids=[b[0] for b in BINARY])
def test_binary_vs_jvp(name, kern, ref, brng, mode):
    gen = torch.Generator().manual_seed(11)
    a = path_coeffs(gen, M, K5, SHAPE)
    b = path_coeffs(gen, M, K5, SHAPE, *(brng or (None, None)))
    assert_series_close(kern(cs(a), cs(b)), jvp_taylor(ref, a, b), 1e-12, name)


@pytest.mark.parametrize("name,kern,ref,brng", BINARY, ids=[b[0] for b in BINARY])
def test_binary_broadcasting_vs_jvp(name, kern, ref, brng, mode):
    """m = 1 vs m = 3 and element shapes [3] vs [2, 3] vs [2, 1] (aligned from the right)."""
    gen = torch.Generator().manual_seed(12)
    rng = brng or (None, None)
    for sa, ma, sb, mb in [((3,), 1, (2, 3), 3), ((2, 3), 3, (3,), 1), ((2, 1), 3, (1, 3), 3), ((), 1, (2, 3), 3)]:
        a = path_coeffs(gen, ma, K5, sa)
        b = path_coeffs(gen, mb, K5, sb, *rng)
        # the reference paths get the same alignment: new axes right after m and K
        d = max(len(sa), len(sb))
        ra = a.reshape(a.shape[:2] + (1,) * (d - len(sa)) + sa)
        rb = b.reshape(b.shape[:2] + (1,) * (d - len(sb)) + sb)
        got = kern(cs(a), cs(b))
        exp_shape = (max(ma, mb), K5) + tuple(torch.broadcast_shapes(sa, sb))
        assert got.shape == exp_shape
        assert_series_close(got, jvp_taylor(ref, ra, rb), 1e-12, f"{name} {sa} {sb}")


def test_bilinear_matmul_vs_jvp():
    gen = torch.Generator().manual_seed(13)
    a = path_coeffs(gen, M, K5, (2, 3))
    b = path_coeffs(gen, M, K5, (3, 4))
    got = R.bilinear(torch.matmul, cs(a), cs(b))
    assert got.shape == (M, K5, 2, 4)
    assert_series_close(got, jvp_taylor(torch.matmul, a, b), 1e-12, "bilinear")
    # m broadcast: a single direction against three
    a1 = a[:1]
    got = R.bilinear(torch.matmul, cs(a1), cs(b))
    assert got.shape == (M, K5, 2, 4)
    assert_series_close(got, jvp_taylor(torch.matmul, a1.expand_as(a), b), 1e-12, "bilinear m-broadcast")


def test_compose_vs_jvp():
    """atan from atan' = 1/(1+u^2)."""
    gen = torch.Generator().manual_seed(14)
    x = path_coeffs(gen, M, K5, SHAPE)
    u = cs(x)
    got = R.compose(u, torch.atan(u[:, 0].real).to(CDT), R.reciprocal(one(K5, (1, 1)) + R.mul(u, u)))
    assert_series_close(got, jvp_taylor(torch.atan, x), 1e-12, "compose")


def test_composition_chain_vs_jvp(mode):
    """A small network-like expression through several kernels at once."""
    gen = torch.Generator().manual_seed(15)
    x = path_coeffs(gen, M, K5, (4,))
    w = path_coeffs(gen, M, K5, (4, 4))

    def ref(x, w):
        h = F.gelu(torch.matmul(w, x.unsqueeze(-1)).squeeze(-1))
        return torch.log(torch.sigmoid(h) + 0.5) * torch.rsqrt(1.0 + h * h)

    def ring(x, w):
        h = R.gelu(R.bilinear(torch.matmul, w, x.unsqueeze(-1))[..., 0])
        return R.mul(R.log(R.sigmoid(h) + 0.5 * one(K5, (1,))), R.rsqrt(one(K5, (1,)) + R.mul(h, h)))

    assert_series_close(ring(cs(x), cs(w)), jvp_taylor(ref, x, w), 1e-12, "chain")


# ---------------------------------------------------------------------------
# 2. complex coefficients


def test_complex_identities(mode):
    gen = torch.Generator().manual_seed(21)
    K = 7
    a = complex_series(gen, M, K, SHAPE)
    b = complex_series(gen, M, K, SHAPE)
    tol = 1e-12
    close = lambda x, y, w: assert_series_close(x, y, tol, w, floor=1.0)  # noqa: E731
    close(R.exp(R.log(a)), a, "exp(log a)")
    close(R.log(R.exp(a)), a, "log(exp a)")
    close(R.div(R.mul(a, b), b), a, "div(mul)")
    close(R.mul(R.reciprocal(a), a), one(K, SHAPE).expand_as(a), "a/a")
    close(R.mul(R.sqrt(a), R.sqrt(a)), a, "sqrt^2")
    close(R.mul(R.pow(a, 0.5), R.pow(a, 0.5)), a, "pow(.5)^2")
    close(R.mul(R.mul(R.rsqrt(a), R.rsqrt(a)), a), one(K, SHAPE).expand_as(a), "rsqrt^2 a")
    close(R.pow(a, 2.7), R.exp(2.7 * R.log(a)), "pow 2.7")
    close(R.pow(a, -1.3), R.exp(-1.3 * R.log(a)), "pow -1.3")
    close(R.pow(a, 3), R.mul(a, R.mul(a, a)), "pow 3")
    close(R.pow(a, -2), R.reciprocal(R.mul(a, a)), "pow -2")
    e = one(K, SHAPE)
    close(R.sigmoid(a), R.reciprocal(e + R.exp(-a)), "sigmoid")
    e2 = R.exp(2 * a)
    close(R.tanh(a), R.div(e2 - e, e2 + e), "tanh")
    close(R.softplus(a), R.log(e + R.exp(a)), "softplus")
    close(R.silu(a), R.mul(a, R.reciprocal(e + R.exp(-a))), "silu")
    close(R.gelu(a), R.mul(a, 0.5 * (e + R.erf(a / math.sqrt(2)))), "gelu")
    inner = GELU_TANH_C * (a + 0.044715 * R.pow(a, 3))
    close(R.gelu_tanh(a), 0.5 * R.mul(a, e + R.tanh(inner)), "gelu_tanh")
    # erf' = 2/sqrt(pi) exp(-a^2): compare the derivative series
    d = lambda s: s[:, 1:] * torch.arange(1, K, dtype=DT).view(1, K - 1, 1, 1)  # noqa: E731
    close(d(R.erf(a)), R.mul(d(a), (2 / math.sqrt(math.pi)) * R.exp(-R.mul(a, a))[:, : K - 1]), "erf'")


def test_negative_real_degree0_principal_branch(mode):
    """log / sqrt / fractional powers of a series with real negative degree-0 coefficients."""
    gen = torch.Generator().manual_seed(23)
    K = 6
    x = path_coeffs(gen, M, K, SHAPE, -2.0, -0.5)
    a = cs(x)
    e = one(K, SHAPE).expand_as(a)
    lg = R.log(a)
    assert torch.allclose(lg[:, 0].imag, torch.full_like(x[:, 0], math.pi), rtol=0, atol=1e-15)
    assert_series_close(R.exp(lg), a, 1e-12, "exp(log a)")
    # log(a) = log(-a) + i pi, with -a handled on the real shortcut path
    assert_series_close(lg, R.log(-a) + 1j * math.pi * e, 1e-12, "log(-a)")
    sq = R.sqrt(a)
    assert_series_close(sq, 1j * R.sqrt(-a), 1e-12, "sqrt(-a)")
    assert_series_close(R.mul(sq, sq), a, 1e-12, "sqrt^2")
    assert_series_close(R.mul(R.mul(R.rsqrt(a), R.rsqrt(a)), a), e, 1e-12, "rsqrt", floor=1.0)
    assert_series_close(R.pow(a, 0.3), R.exp(0.3 * R.log(a)), 1e-12, "pow 0.3")


def test_complex_bilinear_and_mul():
    gen = torch.Generator().manual_seed(22)
    K = 6
    a = complex_series(gen, M, K, (2, 3))
    b = complex_series(gen, 1, K, (3, 4))
    # bilinear(matmul) as a sum of scalar Cauchy products
    ref = R.mul(a.unsqueeze(-1), b.unsqueeze(-3)).sum(-2)
    assert_series_close(R.bilinear(torch.matmul, a, b), ref, 1e-13, "bilinear matmul")
    # bilinear(mul) == mul, and mul against a direct double loop
    c = complex_series(gen, M, K, (2, 3))
    assert_series_close(R.bilinear(torch.mul, a, c), R.mul(a, c), 1e-14, "bilinear mul")
    direct = torch.zeros_like(a)
    for k in range(K):
        for j in range(k + 1):
            direct[:, k] += a[:, j] * c[:, k - j]
    assert_series_close(R.mul(a, c), direct, 1e-14, "mul direct")


def _mp_path(coefs):
    cs_ = [mpmath.mpc(complex(c)) for c in coefs]
    return lambda t: sum(c * t**i for i, c in enumerate(cs_))


def _mp_sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def _mp_gelu(x):
    return x * (1 + mpmath.erf(x / mpmath.sqrt(2))) / 2


def _series_from(coefs, K):
    a = torch.zeros(1, K, dtype=CDT)
    for i, c in enumerate(coefs):
        a[0, i] = complex(c)
    return a


MP_LOW = [
    ("erf", R.erf, mpmath.erf),
    ("gelu", R.gelu, _mp_gelu),
    ("gelu_tanh", R.gelu_tanh, lambda x: x * (1 + mpmath.tanh(GELU_TANH_C * (x + 0.044715 * x**3))) / 2),
    ("tanh", R.tanh, mpmath.tanh),
    ("sigmoid", R.sigmoid, _mp_sigmoid),
    ("softplus", R.softplus, lambda x: mpmath.log(1 + mpmath.exp(x))),
    ("silu", R.silu, lambda x: x * _mp_sigmoid(x)),
    ("log", R.log, mpmath.log),
    ("pow2.7", lambda a: R.pow(a, 2.7), lambda x: mpmath.power(x, 2.7)),
    ("rsqrt", R.rsqrt, lambda x: 1 / mpmath.sqrt(x)),
    ("exp", R.exp, mpmath.exp),
]


@pytest.mark.parametrize("name,kern,fmp", MP_LOW, ids=[c[0] for c in MP_LOW])
def test_complex_vs_mpmath_taylor(name, kern, fmp, mode):
    """Complex polynomial path (complex degree 0 included) against mpmath.taylor, degree 6."""
    coefs = [0.6 + 0.35j, -0.8 + 0.5j, 0.3 - 0.2j]
    K = 7
    with mpmath.workdps(40):
        ref = [complex(c) for c in mpmath.taylor(lambda t: fmp(_mp_path(coefs)(t)), 0, K - 1)]
    got = kern(_series_from(coefs, K))
    assert_series_close(got, torch.tensor([ref], dtype=CDT), 1e-12, name)


# ---------------------------------------------------------------------------
# 3. degree 100 against mpmath


def _cauchy_coeffs(f, K, rho, N=256, dps=60):
    """Coefficients c_k rho^k of f(t) = sum c_k t^k by the trapezoidal rule on |t| = rho in mpmath.

    Exponentially accurate (aliasing ~ (rho/R)^N for a singularity at distance R);
    computed at `dps` digits, so independent of the ring's recurrences and rounding.
    """
    with mpmath.workdps(dps):
        w = [mpmath.expjpi(mpmath.mpf(2 * n) / N) for n in range(N)]
        vals = [f(rho * w[n]) for n in range(N)]
        return np.array([complex(mpmath.fsum(vals[n] * w[(-n * k) % N] for n in range(N)) / N) for k in range(K)])


def _nearest_singularity(coefs, targets):
    """Smallest |t| with x(t) equal to one of the singular values of f."""
    best = math.inf
    for tg in targets:
        p = [complex(c) for c in coefs]
        p[0] -= tg
        best = min(best, float(np.abs(np.roots(p[::-1])).min()))
    return best


def assert_high_degree_close(got, ref, rtol=1e-8):
    """Compare coefficients (in the rescaled variable) with a decay-aware criterion.

    env_k = max_{|j-k|<=3} |ref_j| is the local decay envelope.  Coefficient k is
    significant when |ref_k| >= 1e-3 env_k (not an accidental near-zero of the
    decaying sequence) and |ref_k| >= 1e-35 max_j |ref_j| (the reference, computed
    at 60 digits, is exact far below that); there the relative error must be
    <= rtol.  Every other coefficient must be within rtol * max(env_k, 1e-35 max|ref|).
    No cut relative to the largest coefficient otherwise: with the rescaling the
    recurrences keep relative accuracy even on coefficients 1e-30 below the largest.
    """
    K = len(ref)
    a = np.abs(ref)
    env = np.array([a[max(0, k - 3) : k + 4].max() for k in range(K)])
    floor = 1e-35 * a.max()
    sig = (a >= 1e-3 * env) & (a >= floor)
    err = np.abs(got - ref)
    assert sig.sum() >= K // 2, "criterion too weak: most coefficients insignificant"
    bad = sig & (err > rtol * a)
    assert not bad.any(), f"relative error {(err / a)[bad].max():.2e} at degrees {np.nonzero(bad)[0][:10]}"
    bad = ~sig & (err > rtol * np.maximum(env, floor))
    assert not bad.any(), f"absolute error at degrees {np.nonzero(bad)[0][:10]}"


def _ring_log1p_tanh2(a):
    t = R.tanh(a)
    return R.log(one(a.shape[1]) + R.mul(t, t))


# poles of x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)): 2 sqrt(2/pi)(x + 0.044715 x^3) = i pi (2n+1)
_GELU_TANH_POLES = [
    complex(r)
    for n in (-3, -2, -1, 0, 1, 2)
    for r in np.roots([0.044715, 0.0, 1.0, -1j * math.pi * (2 * n + 1) / (2 * GELU_TANH_C)])
]

# name, path coefficients, mpmath f, ring f, singular values of f (None: entire, rescale s = 1)
HIGH = [
    ("exp_gelu", [0.3, 0.8, -0.4], lambda x: mpmath.exp(_mp_gelu(x)), lambda a: R.exp(R.gelu(a)), None),
    ("exp_gelu_c", [0.3 + 0.2j, 0.8 - 0.5j, 0.3j], lambda x: mpmath.exp(_mp_gelu(x)), lambda a: R.exp(R.gelu(a)), None),
    ("log1p_tanh2", [0.2, 0.5, 0.3], lambda x: mpmath.log(1 + mpmath.tanh(x) ** 2), _ring_log1p_tanh2,
     [k * 1j * math.pi / 4 for k in (-3, -2, -1, 1, 2, 3)]),
    ("log1p_tanh2_c", [0.2 + 0.1j, 0.5 - 0.2j, 0.3 + 0.1j], lambda x: mpmath.log(1 + mpmath.tanh(x) ** 2),
     _ring_log1p_tanh2, [k * 1j * math.pi / 4 for k in (-3, -2, -1, 1, 2, 3)]),
    ("erf", [0.5, 1.0, 0.2], mpmath.erf, R.erf, None),
    ("erf_c", [0.5 + 0.3j, 1.0 - 0.4j], mpmath.erf, R.erf, None),
    ("sigmoid", [0.4, 1.2, -0.3], _mp_sigmoid, R.sigmoid, [k * 1j * math.pi for k in (-3, -1, 1, 3)]),
    ("sigmoid_c", [0.4 - 0.2j, 1.2 + 0.3j, -0.3], _mp_sigmoid, R.sigmoid, [k * 1j * math.pi for k in (-3, -1, 1, 3)]),
    ("rsqrt_1px2", [0.4, 1.0], lambda x: 1 / mpmath.sqrt(1 + x * x), lambda a: R.rsqrt(one(a.shape[1]) + R.mul(a, a)),
     [1j, -1j]),
    ("softplus_silu_c", [0.4 + 0.1j, 1.0, 0.2j], lambda x: mpmath.log(1 + mpmath.exp(x)) * x * _mp_sigmoid(x),
     lambda a: R.mul(R.softplus(a), R.silu(a)), [k * 1j * math.pi for k in (-3, -1, 1, 3)]),
    ("gelu_tanh", [0.1, 0.9, 0.3], lambda x: x / (1 + mpmath.exp(-2 * GELU_TANH_C * (x + 0.044715 * x**3))),
     R.gelu_tanh, _GELU_TANH_POLES),
    ("div_exp_gelu", [0.1, 0.9, 0.3], lambda x: mpmath.exp(_mp_gelu(x)) / (2 + x * x),
     lambda a: R.div(R.exp(R.gelu(a)), 2 * one(a.shape[1]) + R.mul(a, a)), [1j * math.sqrt(2), -1j * math.sqrt(2)]),
]


_HIGH_REF: dict = {}


@pytest.mark.parametrize("name,coefs,fmp,fring,sing", HIGH, ids=[h[0] for h in HIGH])
def test_degree_100_vs_mpmath(name, coefs, fmp, fring, sing, mode):
    K = 101
    # rescale z so that the coefficients neither blow up nor vanish: 0.6 x the distance
    # to the nearest singularity of f(x(t)); entire functions: s = 1 (their
    # coefficients decay faster than geometrically there).
    s = 1.0 if sing is None else 0.6 * _nearest_singularity(coefs, sing)
    if name not in _HIGH_REF:  # shared by both modes
        _HIGH_REF[name] = _cauchy_coeffs(lambda t: fmp(_mp_path(coefs)(t)), K, s)
    ref = _HIGH_REF[name]
    got = fring(R.rescale(_series_from(coefs, K), s))[0].numpy()
    assert_high_degree_close(got, ref)


def test_degree_100_cauchy_reference_matches_mpmath_taylor():
    """The trapezoidal reference itself against mpmath.taylor (and the ring against both)."""
    coefs = [0.4 - 0.2j, 1.2 + 0.3j, -0.3]
    s = 0.6 * _nearest_singularity(coefs, [k * 1j * math.pi for k in (-3, -1, 1, 3)])
    f = lambda t: _mp_sigmoid(_mp_path(coefs)(t))  # noqa: E731
    with mpmath.workdps(60):
        tay = np.array([complex(c * mpmath.mpf(s) ** k) for k, c in enumerate(mpmath.taylor(f, 0, 100))])
    ref = _cauchy_coeffs(f, 101, s)
    assert np.abs(tay - ref).max() <= 1e-25 * np.abs(ref).max()
    assert_high_degree_close(R.sigmoid(R.rescale(_series_from(coefs, 101), s))[0].numpy(), tay)


# ---------------------------------------------------------------------------
# 4. domain errors and small utilities


@pytest.mark.parametrize(
    "name,fn",
    [
        ("log", R.log),
        ("sqrt", R.sqrt),
        ("rsqrt", R.rsqrt),
        ("reciprocal", R.reciprocal),
        ("pow", lambda a: R.pow(a, 0.5)),
        ("pow", lambda a: R.pow(a, -1)),
        ("pow", lambda a: R.pow(a, -2)),
        ("div", lambda a: R.div(one(a.shape[1], a.shape[2:]), a)),
    ],
)
def test_domain_errors(name, fn):
    a = complex_series(torch.Generator().manual_seed(41), 2, 4, (3,))
    a[1, 0, 2] = 0.0  # one zero degree-0 coefficient is enough
    with pytest.raises(R.SeriesDomainError, match=rf"^{name}: degree-0 coefficient is zero"):
        fn(a)
    assert issubclass(R.SeriesDomainError, ArithmeticError)


def test_integer_powers_at_zero():
    x = torch.zeros(1, 5, 1, dtype=DT)
    x[0, 1] = 2.0  # x(t) = 2t + 0.5 t^2
    x[0, 2] = 0.5
    a = cs(x)
    p2 = R.pow(a, 2)
    assert_series_close(p2, jvp_taylor(lambda y: y * y, x), 1e-14, "pow 2 at zero")
    assert_series_close(R.pow(a, 3), jvp_taylor(lambda y: y**3, x), 1e-14, "pow 3 at zero")
    assert torch.equal(R.pow(a, 0), one(5, (1,)))
    p1 = R.pow(a, 1)
    assert torch.equal(p1, a) and p1.data_ptr() != a.data_ptr()


def test_constant_truncate_rescale():
    c = R.constant(torch.tensor([1.0, -2.0]), 4, m=3)
    assert c.shape == (3, 4, 2) and c.dtype == CDT
    assert torch.equal(c[:, 0].real, torch.tensor([[1.0, -2.0]] * 3, dtype=DT)) and (c[:, 1:] == 0).all()
    assert R.constant(1.5 + 2j, 3).shape == (1, 3)
    a = complex_series(torch.Generator().manual_seed(51), 2, 6, (3,))
    assert torch.equal(R.truncate(a, 3), a[:, :3])
    with pytest.raises(ValueError):
        R.truncate(a, 7)
    r = R.rescale(a, 0.5j)
    for k in range(6):
        assert torch.allclose(r[:, k], a[:, k] * (0.5j) ** k, rtol=1e-15, atol=0)
    # truncation commutes with the kernels (degree k depends on degrees <= k only)
    assert_series_close(R.exp(a)[:, :3], R.exp(R.truncate(a, 3)), 1e-15, "truncate")
    # rescaling commutes with the kernels
    assert_series_close(R.rescale(R.log(a), 0.7), R.log(R.rescale(a, 0.7)), 1e-13, "rescale")


def test_k_mismatch_and_k1():
    a = complex_series(torch.Generator().manual_seed(52), 2, 4, (3,))
    with pytest.raises(ValueError):
        R.mul(a, a[:, :3])
    a1 = a[:, :1]
    for fn, f0 in [(R.exp, torch.exp), (R.log, torch.log), (R.tanh, torch.tanh), (R.sqrt, torch.sqrt)]:
        assert torch.allclose(fn(a1)[:, 0], f0(a1[:, 0]), rtol=1e-15)
    assert torch.allclose(R.erf(a1.real.to(CDT))[:, 0].real, torch.special.erf(a1[:, 0].real), rtol=1e-15)


def test_results_do_not_alias_inputs(mode):
    a = complex_series(torch.Generator().manual_seed(53), 2, 5, (3,))
    keep = a.clone()
    for fn in [R.exp, R.log, R.sqrt, R.tanh, R.sigmoid, R.gelu, R.softplus, lambda x: R.pow(x, 1.5),
               lambda x: R.mul(x, x), lambda x: R.div(x, x), R.reciprocal]:
        fn(a)
    assert torch.equal(a, keep)


# ---------------------------------------------------------------------------
# 5. shortcuts for real degree-0 coefficients in bilinear (against the generic path)


def real0_series(gen, m, K, shape, shared=False, col_major=False, real0=True):
    """Complex series whose degree-0 coefficient is real (complex dtype), optionally the same in all m."""
    x = complex_series(gen, m, K, shape)
    if real0:
        x[:, 0] = (x[:1, 0] if shared else x[:, 0]).real
    return x.mT.contiguous().mT if col_major else x


@pytest.fixture
def shortcut_calls(monkeypatch):
    """Let the shortcuts take tensors of any size, and count the calls of each."""
    monkeypatch.setattr(R, "_MATMUL_MIN_NUMEL", 0)
    monkeypatch.setattr(R, "_SMALL_MATMUL_MACS", 0)  # no matrix counts as small (tests that want them set it)
    calls = {"matmul": 0, "small": 0, "split": 0}
    for name, key in [("_matmul_real0", "matmul"), ("_matmul_small", "small"), ("_bilinear_real0", "split")]:
        orig = getattr(R, name)

        def spy(*args, _orig=orig, _key=key):
            calls[_key] += 1
            return _orig(*args)

        monkeypatch.setattr(R, name, spy)
    return calls


MATMUL_SHAPES = [  # as small matrices: b_k largest (rows stacked), a_k largest (columns), c_k largest (inner)
    ((3, 4), (4, 5)),  # 4-D: rows
    ((2, 8), (8, 1)),  # 4-D: columns
    ((6, 2), (2, 6)),  # 4-D: inner
    ((2, 3, 4), (2, 4, 5)),  # 5-D (heads): rows
    ((1, 3, 4), (2, 4, 5)),  # 5-D, broadcasting heads
    ((2, 3, 4), (1, 4, 5)),
    ((2, 5, 5), (1, 5, 2)),  # 5-D: columns
    ((1, 6, 2), (2, 2, 6)),  # 5-D: inner
]


@pytest.mark.parametrize("small", [False, "native", "torch"], ids=["real0", "small-native", "small-torch"])
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_bilinear_matmul_real0_vs_generic(K, small, shortcut_calls, monkeypatch):
    """All layouts (row-/column-major a and b), m broadcasts, shared or per-direction a_0, real or complex b_0;
    as large matrices (the real degree-0 split) and as small ones (the native kernel, or torch's stacked rows,
    columns or inner blocks)."""
    if small:
        monkeypatch.setattr(R, "_SMALL_MATMUL_MACS", 1 << 15)
        monkeypatch.setattr(R, "_NATIVE_SMALL", small == "native")
        if small == "native" and not R.native.available():
            pytest.skip(f"native kernels not built: {R.native.status()['reason']}")
    gen = torch.Generator().manual_seed(61 + K)
    n = 0
    for (sa, sb), (ma, mb), ta, tb, shared, rb in itertools.product(
        MATMUL_SHAPES, [(3, 3), (1, 3), (3, 1)], [False, True], [False, True], [False, True], [False, True]
    ):
        a = real0_series(gen, ma, K, sa, shared=shared, col_major=ta)
        b = real0_series(gen, mb, K, sb, shared=shared, col_major=tb, real0=rb)
        keep = (a.clone(), b.clone())
        got = R.bilinear(torch.matmul, a, b)
        ref = R._bilinear_generic(torch.matmul, a, b)
        what = f"K={K} {sa}{'T' if ta else ''} @ {sb}{'T' if tb else ''} m={ma},{mb} shared={shared} real b0={rb}"
        assert got.dtype == ref.dtype and got.is_contiguous(), what
        assert_series_close(got, ref, 1e-13, what)
        assert torch.equal(a, keep[0]) and torch.equal(b, keep[1]), what
        assert got.data_ptr() not in (a.data_ptr(), b.data_ptr())
        assert torch.equal(R.bilinear(torch.matmul, a, b), got), f"not deterministic: {what}"
        n += 1
    if not small:
        assert shortcut_calls == {"matmul": 2 * n if K > 1 else 0, "small": 0, "split": 0}
    else:  # every case, each called twice
        assert shortcut_calls == {"matmul": 0, "small": 2 * n if K > 1 else 0, "split": 0}


def test_bilinear_matmul_real0_vs_jvp(shortcut_calls):
    """The shortcut against nested jvp (real directions: all degree-0 coefficients real)."""
    gen = torch.Generator().manual_seed(62)
    a = path_coeffs(gen, M, K5, (2, 3))
    b = path_coeffs(gen, M, K5, (3, 4))
    assert_series_close(R.bilinear(torch.matmul, cs(a), cs(b)), jvp_taylor(torch.matmul, a, b), 1e-12, "matmul")
    a1 = a[:1]
    got = R.bilinear(torch.matmul, cs(a1), cs(b))
    assert_series_close(got, jvp_taylor(torch.matmul, a1.expand_as(a), b), 1e-12, "matmul m-broadcast")
    # a degree-0 coefficient shared by all directions (the engine's case), the other one not
    a[:, 0] = a[:1, 0]
    got = R.bilinear(torch.matmul, cs(a), cs(b.mT.contiguous().mT))
    assert_series_close(got, jvp_taylor(torch.matmul, a, b), 1e-12, "matmul shared a_0")
    assert shortcut_calls["matmul"] == 3


def _conv1d_op(x, w):
    """A series convolution as the engine calls it (real conv extended to complex by real calls)."""
    from delsketch.series import tensor as taylor  # noqa: PLC0415

    return taylor._conv_pair(x, w, [1], [1], [1], 1, False, [0])


def _strict_matmul(x, y):
    assert x.is_complex() == y.is_complex(), "mixed real/complex operands"
    return torch.matmul(x, y)


SPLIT_OPS = [
    ("conv1d", _conv1d_op, (2, 4, 9), (5, 4, 3)),  # x [N, C, L], w [O, C, k]
    ("matmul (no mixed operands)", _strict_matmul, (2, 3), (3, 4)),
    ("mul", torch.mul, (2, 3), (2, 3)),
    ("mv", lambda x, y: torch.matmul(x, y.unsqueeze(-1)).squeeze(-1), (2, 3), (3,)),
    ("complex-valued op", lambda x, y: 1j * torch.matmul(x, y), (2, 3), (3, 4)),
]


@pytest.mark.parametrize("name,op,sa,sb", SPLIT_OPS, ids=[o[0] for o in SPLIT_OPS])
def test_bilinear_split_vs_generic(name, op, sa, sb, shortcut_calls):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n = 0
    for K, (ma, mb), shared in itertools.product([2, 4, 6], [(3, 3), (1, 3), (3, 1)], [False, True]):
        a = real0_series(gen, ma, K, sa, shared=shared)
        b = real0_series(gen, mb, K, sb, shared=shared)
        keep = (a.clone(), b.clone())
        got = R.bilinear(op, a, b, split=True)
        ref = R._bilinear_generic(op, a, b)
        assert got.dtype == ref.dtype
        assert_series_close(got, ref, 1e-13, f"{name} K={K} m={ma},{mb} shared={shared}")
        assert torch.equal(a, keep[0]) and torch.equal(b, keep[1])
        assert torch.equal(R.bilinear(op, a, b, split=True), got)
        n += 1
    assert shortcut_calls["split"] == 2 * n


def test_bilinear_shortcut_fallbacks(shortcut_calls, monkeypatch):
    """Complex degree-0 coefficients, split=False and the switch take the generic path (bit for bit)."""
    gen = torch.Generator().manual_seed(63)
    a = complex_series(gen, M, 4, (3, 4))
    b = real0_series(gen, M, 4, (4, 5))
    c = real0_series(gen, M, 4, (3, 4))
    d = complex_series(gen, M, 4, (4, 5))
    # matmul needs a real a_0; split needs both real
    assert torch.equal(R.bilinear(torch.matmul, a, b), R._bilinear_generic(torch.matmul, a, b))
    for x, y in [(a, b), (c, d)]:
        assert torch.equal(R.bilinear(_strict_matmul, x, y, split=True), R._bilinear_generic(torch.matmul, x, y))
    assert torch.equal(R.bilinear(_strict_matmul, c, b), R._bilinear_generic(torch.matmul, c, b))  # split=False
    assert shortcut_calls == {"matmul": 0, "small": 0, "split": 0}
    monkeypatch.setattr(R, "_FAST_REAL0", False)
    assert torch.equal(R.bilinear(torch.matmul, c, b), R._bilinear_generic(torch.matmul, c, b))
    assert shortcut_calls == {"matmul": 0, "small": 0, "split": 0}
    monkeypatch.setattr(R, "_FAST_REAL0", True)
    R.bilinear(torch.matmul, c, b)
    assert shortcut_calls == {"matmul": 1, "small": 0, "split": 0}
