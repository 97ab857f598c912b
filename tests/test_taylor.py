"""Every Series rule against nested torch.func.jvp along real polynomial paths, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from delsketch.series import tensor as taylor
from delsketch.series import Series, SeriesDomainError, UnsupportedOpError

from jets import complex_by_interpolation, path, taylor_coefficients

DEG = 4
K = DEG + 1
G = torch.Generator().manual_seed(0)


def rnd(*shape, positive=False, scale=1.0):
    x = torch.randn(tuple(shape), generator=G, dtype=torch.float64) * scale
    return x.abs() + 0.5 if positive else x


def make_path(shape, positive=False):
    """Coefficients of a random polynomial path of degree DEG (higher terms smaller)."""
    return [rnd(*shape, positive=positive) if r == 0 else rnd(*shape, scale=0.5**r) for r in range(K)]


def as_series(coeffs, requires_grad=False):
    return taylor.variable(torch.stack(coeffs)[None].to(torch.complex128), requires_grad=requires_grad)


def check_forward(f, shapes, positive=(), tol=1e-11, deg=DEG, ref_f=None):
    ref_f = ref_f or f
    paths = [make_path(s, positive=i in positive) for i, s in enumerate(shapes)]
    series_inputs = [as_series(p) for p in paths]
    out = f(*series_inputs)
    got = taylor.coefficients(out)[0]
    ref = taylor_coefficients(lambda t: ref_f(*[path(p)(t) for p in paths]), deg)
    for r in range(deg + 1):
        torch.testing.assert_close(got[r].real, ref[r], rtol=tol, atol=tol * (1 + ref[0].abs().max().item()))
        assert got[r].imag.abs().max() == 0 or got[r].imag.abs().max() < 1e-14


def check_backward(f, shapes, positive=(), tol=1e-10, deg=DEG, ref_f=None):
    """The gradient of sum(f(x) * v) w.r.t. every input, as a series, against jvp of torch.func.grad."""
    ref_f = ref_f or f
    paths = [make_path(s, positive=i in positive) for i, s in enumerate(shapes)]
    with torch.no_grad():
        out_shape = f(*[p[0] for p in paths]).shape
    v = rnd(*out_shape)
    xs = [as_series(p, requires_grad=True) for p in paths]
    loss = (f(*xs) * v).sum()
    grads = torch.autograd.grad(loss, xs)

    def gradfun(t):
        ins = [path(p)(t) for p in paths]
        return torch.func.grad(lambda *a: (ref_f(*a) * v).sum(), argnums=tuple(range(len(ins))))(*ins)

    ref = taylor_coefficients(gradfun, deg)
    for i, g in enumerate(grads):
        got = taylor.coefficients(g)[0]
        for r in range(deg + 1):
            torch.testing.assert_close(got[r].real, ref[r][i], rtol=tol, atol=tol * (1 + ref[0][i].abs().max().item()))


UNARY = {
    "exp": (torch.exp, False),
    "log": (torch.log, True),
    "sqrt": (torch.sqrt, True),
    "rsqrt": (torch.rsqrt, True),
    "reciprocal": (torch.reciprocal, True),
    "erf": (torch.erf, False),
    "tanh": (torch.tanh, False),
    "sigmoid": (torch.sigmoid, False),
    "gelu": (F.gelu, False),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), False),
    "silu": (F.silu, False),
    "softplus": (F.softplus, False),
    "pow2.5": (lambda x: x**2.5, True),
    "pow-1.5": (lambda x: x**-1.5, True),
    "pow2": (lambda x: x**2, False),
    "pow3": (lambda x: x**3, False),
    "square": (torch.square, False),
    "log1p": (lambda x: torch.log1p(x), True),
    "expm1": (torch.expm1, False),
    "sin": (torch.sin, False),
    "cos": (torch.cos, False),
    "neg": (torch.neg, False),
    "scalar_pow": (lambda x: 2.0**x, False),
    "rsub": (lambda x: 1 - x, False),
    "scalar_div": (lambda x: 3.0 / x, True),
    "nn.GELU": (nn.GELU(), False),
    "nn.SiLU": (nn.SiLU(), False),
    "nn.Tanh": (nn.Tanh(), False),
    "nn.Sigmoid": (nn.Sigmoid(), False),
    "nn.Softplus": (nn.Softplus(), False),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_unary(name):
    f, pos = UNARY[name]
    check_forward(f, [(3, 4)], positive=(0,) if pos else ())
    check_backward(f, [(3, 4)], positive=(0,) if pos else ())


BINARY = {
    "add": (torch.add, (3, 4), (3, 4), ()),
    "add_bcast": (torch.add, (3, 4), (4,), ()),
    "sub": (torch.sub, (3, 4), (1, 4), ()),
    "mul": (torch.mul, (3, 4), (3, 4), ()),
    "mul_bcast": (torch.mul, (2, 3, 4), (3, 1), ()),
    "div": (torch.div, (3, 4), (3, 4), (1,)),
    "matmul": (torch.matmul, (3, 5), (5, 2), ()),
    "bmm": (torch.bmm, (2, 3, 5), (2, 5, 4), ()),
    "matmul_batched": (torch.matmul, (2, 3, 5), (5, 4), ()),
    "mv": (torch.mv, (3, 5), (5,), ()),
    "dot": (torch.dot, (5,), (5,), ()),
    "linear": (lambda x, w: F.linear(x, w), (3, 5), (4, 5), ()),
    "pow_tt": (torch.pow, (3, 4), (3, 4), (0,)),
    "where": (lambda a, b: torch.where(a > b, a, b), (3, 4), (3, 4), ()),
    "maximum_via_max": (lambda a, b: torch.stack([a, b]).max(0).values, (3, 4), (3, 4), ()),
    "cat": (lambda a, b: torch.cat([a, b], dim=1), (3, 4), (3, 2), ()),
    "stack": (lambda a, b: torch.stack([a, b], dim=-1), (3, 4), (3, 4), ()),
    "mse": (lambda a, b: F.mse_loss(a, b), (3, 4), (3, 4), ()),
}


# torch.func cannot take forward-mode derivatives of mse_loss's backward (immutable zero tensors):
# its reference is the formula written out
REFERENCE = {"mse": lambda a, b: ((a - b) ** 2).mean()}


@pytest.mark.parametrize("name", list(BINARY))
def test_binary(name):
    f, sa, sb, pos = BINARY[name]
    check_forward(f, [sa, sb], positive=pos, ref_f=REFERENCE.get(name))
    check_backward(f, [sa, sb], positive=pos, ref_f=REFERENCE.get(name))


@pytest.mark.parametrize("name", ["mul", "matmul", "add", "div"])
def test_binary_with_plain_operand(name):
    f, sa, sb, pos = BINARY[name]
    b = rnd(*sb, positive=True)
    check_forward(lambda a: f(a, b), [sa])
    check_backward(lambda a: f(a, b), [sa])
    b2 = rnd(*sa, positive=True)  # plain left operand
    check_forward(lambda a: f(b2, a), [sb], positive=(0,) if name == "div" else ())
    check_backward(lambda a: f(b2, a), [sb], positive=(0,) if name == "div" else ())


IDX = torch.tensor([2, 0, 2, 1])
MASK = torch.tensor([[True, False, False, True]] * 3)

STRUCT = {
    "view": lambda x: x.view(12) * x.reshape(4, 3).t().reshape(12),
    "permute": lambda x: x.reshape(2, 3, 2).permute(2, 0, 1) ** 2,
    "transpose": lambda x: x.transpose(0, 1) * 2,
    "expand": lambda x: x[None].expand(2, 3, 4) * torch.arange(2.0, dtype=torch.float64)[:, None, None],
    "unsqueeze_squeeze": lambda x: x.unsqueeze(1).squeeze(1) * x,
    "select": lambda x: x[1] * x[:, 2].sum(),
    "slice": lambda x: x[1:, ::2],
    "index": lambda x: x[IDX],
    "index_mask": lambda x: x[MASK],
    "gather": lambda x: torch.gather(x, 1, torch.tensor([[0, 1], [3, 3], [2, 0]])),
    "index_select": lambda x: torch.index_select(x, 1, torch.tensor([3, 0])),
    "sum": lambda x: x.sum(),
    "sum_dim": lambda x: x.sum(0, keepdim=True) * x,
    "mean": lambda x: x.mean(-1),
    "cumsum": lambda x: x.cumsum(1),
    "flip": lambda x: x.flip(0) * x,
    "softmax": lambda x: torch.softmax(x, -1),
    "log_softmax": lambda x: torch.log_softmax(x, 0),
    "logsumexp": lambda x: torch.logsumexp(x, -1),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.tensor([0, 3, 1])),
    "nll": lambda x: F.nll_loss(torch.log_softmax(x, 1), torch.tensor([2, 2, 1])),
    "masked_fill": lambda x: torch.softmax(x.masked_fill(~MASK, float("-inf")), -1),
    "where_scalar": lambda x: torch.where(MASK, x, 0.5),
    "amax": lambda x: x - x.amax(-1, keepdim=True),
    "max_dim": lambda x: x.max(1).values,
    "layer_norm": lambda x: F.layer_norm(x, (4,)),
    "nn.LayerNorm": nn.LayerNorm(4, dtype=torch.float64),
    "rms_norm": lambda x: F.rms_norm(x, (4,), eps=1e-5),
    "nn.RMSNorm": nn.RMSNorm(4, dtype=torch.float64),
    "rmsnorm_by_hand": lambda x: x * (x.pow(2).mean(-1, keepdim=True) + 1e-5) ** -0.5,
    "clone_contig": lambda x: x.t().contiguous().clone(),
    "split_unbind": lambda x: x.split(2, dim=1)[1] * x.unbind(0)[2][:2],
    "chunk": lambda x: x.chunk(2, dim=1)[0],
    "pad": lambda x: F.pad(x, (1, 2)),
    "tril": lambda x: torch.tril(x.reshape(3, 4)),
    "repeat": lambda x: x.repeat(2, 1),
    "norm": lambda x: torch.linalg.vector_norm(x, dim=-1),
    "var_mean": lambda x: torch.var_mean(x, dim=-1)[0],
    "clamp": lambda x: x.clamp(min=-0.3, max=0.4),
    "embedding_fn": lambda x: F.embedding(torch.tensor([[2, 0], [1, 1]]), x),
    "abs": lambda x: x.abs(),
    "index_put_row": lambda x: torch.zeros(5, 4, dtype=torch.float64).index_put((torch.tensor([1, 3]),), x[0] * x[2]),
    "index_put_accumulate": lambda x: x.index_put((torch.tensor([0, 2, 0]),), x[1] ** 2, accumulate=True),
    "setitem": lambda x: _setitem(x),
    "cat_plain": lambda x: torch.cat([x, torch.ones(1, 4, dtype=torch.float64)], 0) * x.sum(),
}


def _setitem(x):
    y = x.clone()
    y[1] = x[0] * x[2]
    return y * x


def _layer_norm_formula(x, eps=1e-5):
    var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


# torch 2.13's nested forward-mode AD through F.layer_norm is wrong from the second derivative on
# (test_layer_norm_reference_by_finite_differences shows it), so its reference is the formula.
STRUCT_REFERENCE = {"layer_norm": _layer_norm_formula, "nn.LayerNorm": _layer_norm_formula}


@pytest.mark.parametrize("name", list(STRUCT))
def test_structural(name):
    f = STRUCT[name]
    ref = STRUCT_REFERENCE.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", taylor.NonAnalyticWarning)
        check_forward(f, [(3, 4)], ref_f=ref)
        check_backward(f, [(3, 4)], ref_f=ref)


def test_layer_norm_reference_by_finite_differences():
    """The layer-norm series' degree-2 coefficient against a central second difference of F.layer_norm."""
    p = make_path((3, 4))
    got = taylor.coefficients(F.layer_norm(as_series(p), (4,)))[0, 2].real
    g = lambda t: F.layer_norm(path(p)(torch.tensor(t, dtype=torch.float64)), (4,))
    h = 1e-3
    fd = (g(h) - 2 * g(0.0) + g(-h)) / h**2 / 2
    torch.testing.assert_close(got, fd, rtol=0, atol=1e-4)


def test_relu_warns_and_matches(monkeypatch):
    # the warning is given once per process: forget that an earlier test (any ReLU in a ring run) has seen it
    monkeypatch.setattr(taylor, "_warned", set())
    with pytest.warns(taylor.NonAnalyticWarning):
        check_forward(F.relu, [(3, 4)])
    check_backward(F.relu, [(3, 4)])


def _attn_hand(x, wq, wk, wv):
    T = x.shape[0]
    q, k, v = x @ wq, x @ wk, x @ wv
    q = q.view(T, 2, 2).transpose(0, 1)
    k = k.view(T, 2, 2).transpose(0, 1)
    v = v.view(T, 2, 2).transpose(0, 1)
    att = q @ k.transpose(-1, -2) / 2**0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = torch.softmax(att.masked_fill(~mask, float("-inf")), -1)
    return (att @ v).transpose(0, 1).reshape(T, 4)


def _attn_sdpa(x, wq, wk, wv):
    T = x.shape[0]
    q, k, v = [(x @ w).view(T, 2, 2).transpose(0, 1) for w in (wq, wk, wv)]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(T, 4)


@pytest.mark.parametrize("attn", [_attn_hand, _attn_sdpa])
def test_causal_attention(attn):
    shapes = [(5, 4), (4, 4), (4, 4), (4, 4)]
    check_forward(attn, shapes, tol=1e-10)
    check_backward(attn, shapes, tol=1e-10)


@pytest.mark.parametrize(
    "mod",
    [
        nn.Conv1d(2, 3, 3, padding=1, dtype=torch.float64),
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=torch.float64),
        nn.Conv2d(2, 4, 3, groups=2, dtype=torch.float64),
        nn.AvgPool2d(2),
        nn.AvgPool1d(2),
    ],
)
def test_conv_and_pool_modules(mod):
    """Module with series parameters and series input, via functional_call."""
    shape = (2, 2, 6) if isinstance(mod, (nn.Conv1d, nn.AvgPool1d)) else (2, 2, 6, 6)
    names = [n for n, _ in mod.named_parameters()]
    shapes = [shape] + [tuple(p.shape) for _, p in mod.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    check_forward(f, shapes, tol=1e-10)
    check_backward(f, shapes, tol=1e-10)
    if names:  # plain input, series weights
        x = rnd(*shape)
        check_forward(lambda *ps: f(x, *ps), shapes[1:], tol=1e-10)


def test_linear_and_embedding_modules():
    lin = nn.Linear(5, 3, dtype=torch.float64)
    emb = nn.Embedding(6, 5, dtype=torch.float64)
    idx = torch.tensor([[1, 5, 1], [0, 2, 3]])

    def f(we, w, b):
        h = torch.func.functional_call(emb, {"weight": we}, (idx,))
        return torch.func.functional_call(lin, {"weight": w, "bias": b}, (h,))

    shapes = [(6, 5), (3, 5), (3,)]
    check_forward(f, shapes)
    check_backward(f, shapes)


def test_complex_direction_matches_interpolation_of_real_directions():
    """Holomorphic extension: the series along x0 + z(a+ib) equals the degree-r polynomial in s
    fitted to real-direction jvp results along a + s b, evaluated at s = i."""
    x0, a, b = rnd(3, 4), rnd(3, 4), rnd(3, 4)

    def f(x):
        return torch.log_softmax(F.gelu(x) @ x.t(), -1).sum(0)

    c = torch.stack([x0.to(torch.complex128), (a + 1j * b)] + [torch.zeros(3, 4, dtype=torch.complex128)] * (K - 2))
    got = taylor.coefficients(f(taylor.variable(c[None])))[0]
    for r in range(1, K):
        ref = complex_by_interpolation(lambda d: taylor_coefficients(lambda t: f(x0 + t * d), r)[r], a, b, r)
        torch.testing.assert_close(got[r], ref, rtol=1e-9, atol=1e-9)


def test_directions_are_independent_and_broadcast():
    """m directions in one Series give the same coefficients as m separate runs; m=1 broadcasts."""
    x = torch.randn(3, K, 2, 4, dtype=torch.complex128, generator=G)
    w = torch.randn(1, K, 4, 4, dtype=torch.complex128, generator=G)
    f = lambda a, b: torch.tanh(a @ b).sum(-1)
    batched = taylor.coefficients(f(taylor.variable(x), taylor.variable(w)))
    for i in range(3):
        single = taylor.coefficients(f(taylor.variable(x[i : i + 1]), taylor.variable(w)))
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-13, atol=1e-13)


def test_backward_accumulates_into_leaf_grad():
    w = taylor.lift(torch.randn(4, 3, dtype=torch.float64, generator=G), degree=2, requires_grad=True)
    x = taylor.variable(torch.randn(2, 3, 5, 4, dtype=torch.complex128, generator=G))
    (x @ w).pow(2).sum().backward()
    assert isinstance(w.grad, Series) and w.grad.shape == w.shape and w.grad.m == 2


def test_unsupported_op_names_the_op_and_module():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.i0(x)

    x = taylor.lift(torch.ones(3, dtype=torch.float64), degree=2)
    with taylor.module_context():
        with pytest.raises(UnsupportedOpError, match=r"aten\.(special_)?i0.*Odd"):
            Odd()(x)


@pytest.mark.parametrize("f,name", [(torch.log, "log"), (torch.sqrt, "sqrt"), (torch.rsqrt, "rsqrt"), (torch.reciprocal, "reciprocal")])
def test_domain_errors_name_the_kernel(f, name):
    c = torch.zeros(1, 3, 2, dtype=torch.complex128)
    c[0, 0, 0] = 1.0
    c[0, 1] = 1.0
    with pytest.raises(SeriesDomainError, match=name):
        f(taylor.variable(c))


def test_nonfinite_detection():
    c = torch.ones(1, 3, 2, dtype=torch.complex128)
    c[0, 2, 1] = float("nan")
    s = taylor.variable(c)
    assert not taylor.all_finite(s) and taylor.all_finite(s[0])
    with taylor.check_every_op():
        with pytest.raises(SeriesDomainError, match="non-finite"):
            s * 2


def test_inplace_ops_and_item():
    x = taylor.lift(torch.tensor([1.0, 2.0], dtype=torch.float64), degree=2, m=2)
    y = taylor.variable(torch.randn(2, 3, 2, dtype=torch.complex128, generator=G))
    ref = taylor.coefficients(x * 3 + y)
    x.mul_(3).add_(y)
    torch.testing.assert_close(taylor.coefficients(x), ref)
    assert x.sum().item() == pytest.approx(float(ref[0, 0].real.sum()))
    with pytest.raises(UnsupportedOpError):
        torch.zeros(2, dtype=torch.float64).add_(y)
