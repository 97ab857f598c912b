"""The native (C) series kernels: built on first use, checked by checksum, and equal to the eager PyTorch code."""

import itertools
import math
import os
import shutil

import pytest
import torch

from delsketch.series import native
from delsketch.training.optim import Adam

pytestmark = pytest.mark.usefixtures("single_thread")

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def _native_with_cache(monkeypatch, cache):
    """The native module, default build, reloaded to build into (or load from) ``cache``."""
    monkeypatch.setenv("DELSKETCH_CACHE", str(cache))
    monkeypatch.delenv("DELSKETCH_NATIVE", raising=False)
    monkeypatch.delenv(native.CFLAGS_VARIABLE, raising=False)
    native._reset()


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that builds into an empty cache of its own."""
    _native_with_cache(monkeypatch, tmp_path / "cache")
    yield tmp_path / "cache"
    native._reset()


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native-cache")


@pytest.fixture
def built_native(monkeypatch, _session_cache):
    """A native module built once per test session, into a cache of its own (the kernel tests: a build takes
    seconds, with every kernel compiled for each common K)."""
    _native_with_cache(monkeypatch, _session_cache)
    yield _session_cache
    native._reset()


def _series(gen, M, K, N, real0=True, shared0=True):
    """Coefficients of size 0.3 over a real degree-0 part of size 0.5-1.5 (well conditioned: a degree-0 part near
    zero makes the power recurrences amplify rounding in both codes alike)."""
    x = torch.randn(M, K, N, generator=gen, dtype=torch.complex128) * 0.3
    if real0:
        x0 = (x[:1, 0] if shared0 else x[:, 0]).real
        x[:, 0] = (x0.sign() * (0.5 + x0.abs())).to(torch.complex128)
    return x


def _eager(opt, pc, gc, mc, vc, lr_t, bc1, bc2):
    M = max(x.shape[0] for x in (pc, gc, mc, vc) if x is not None)
    outs = [torch.empty((M, *gc.shape[1:]), dtype=torch.complex128) for _ in range(3)]
    opt._series_update(pc.expand(M, *pc.shape[1:]), gc, mc, vc, lr_t, bc1, bc2, *outs)
    return outs


@needs_cc
def test_build_checksum_and_rebuild(fresh_native):
    """The first use builds the library and writes its SHA-256; a library that no longer matches its checksum is
    rebuilt, never loaded."""
    st = native.status()
    assert st["available"], st
    so = fresh_native / os.path.basename(st["path"])
    sha = so.with_suffix(".sha256")
    assert so.parent == fresh_native and sha.read_text().strip() == native._sha256(so)
    good = so.read_bytes()
    tampered = so.with_suffix(".tmp")
    tampered.write_bytes(good + b"\0")
    os.replace(tampered, so)  # a new file (the loaded library's pages are not touched)
    native._reset()
    assert native.available()
    assert so.read_bytes() != good + b"\0" and sha.read_text().strip() == native._sha256(so)
    assert sorted(p.suffix for p in fresh_native.iterdir()) == [".sha256", ".so"]  # no temporary left


def test_off_and_missing_compiler(fresh_native, monkeypatch):
    """DELSKETCH_NATIVE=0 or no compiler: not available, with the reason, and Adam still steps (eager code)."""
    monkeypatch.setenv("DELSKETCH_NATIVE", "0")
    native._reset()
    st = native.status()
    assert (st["available"], st["reason"], st["path"]) == (False, "off (DELSKETCH_NATIVE=0)", None)
    monkeypatch.delenv("DELSKETCH_NATIVE")
    monkeypatch.setenv("CC", str(fresh_native / "no-such-cc"))
    native._reset()
    st = native.status()
    assert not st["available"] and st["reason"].startswith("no C compiler")
    gen = torch.Generator().manual_seed(1)
    pc, gc = _series(gen, 3, 2, 5), _series(gen, 3, 2, 5)
    out = [torch.empty_like(pc) for _ in range(3)]
    assert native.adam_update(pc, gc, None, None, 0.9, 0.99, -0.1, 0.01, 1e-3, True, *out) is False


@needs_cc
@pytest.mark.parametrize("inside", [True, False], ids=["eps-inside", "standard"])
@pytest.mark.parametrize("K", [1, 2, 4, 7, 10])
def test_adam_kernel_equals_eager(built_native, K, inside):
    """The fused kernel against the eager series update, for every K's recurrences, both Adam variants, a zero
    state, parameters shared by all directions, element counts that leave a partial block, and degree-0 parts
    that differ by direction."""
    opt = Adam(0.01, betas=(0.85, 0.99), eps=1e-3 if inside else 1e-8, eps_inside_sqrt=inside)
    gen = torch.Generator().manual_seed(10 + K)
    lr_t, bc1, bc2 = 0.009, 1 - 0.85 ** 3, 1 - 0.99 ** 3
    for M, N, zero_state, shared_p, shared0 in [(3, 13, False, False, True), (2, 8, True, True, True),
                                                 (4, 1, False, True, False), (1, 30, False, False, False)]:
        pc = _series(gen, 1 if shared_p else M, K, N, shared0=shared0)
        gc = _series(gen, M, K, N, shared0=shared0)
        mc = None if zero_state else _series(gen, M, K, N, shared0=shared0)
        vc = None if zero_state else _series(gen, M, K, N, shared0=shared0)
        if vc is not None:
            vc[:, 0] = vc[:, 0].abs()
        ref = _eager(opt, pc, gc, mc, vc, lr_t, bc1, bc2)
        got = [torch.full_like(ref[0], float("nan")) for _ in range(3)]
        assert native.adam_update(pc, gc, mc, vc, 0.85, 0.99, -lr_t / bc1, bc2, opt.eps, inside, *got)
        for name, a, b in zip("pmv", got, ref):
            scale = b.abs().amax(dim=(0, 2), keepdim=True)
            err = ((a - b).abs() / scale).max().item()
            assert err < 1e-13, (name, M, N, zero_state, shared_p, err)


@needs_cc
def test_adam_kernel_declines_what_it_does_not_cover(built_native):
    """A degree-0 second moment that is not real and positive, a series longer than KMAX, other dtypes or a
    non-contiguous output: False, and the caller's eager code runs (which raises or handles it)."""
    gen = torch.Generator().manual_seed(3)
    M, K, N = 2, 3, 6
    pc, gc, mc, vc = (_series(gen, M, K, N) for _ in range(4))
    out = [torch.empty_like(pc) for _ in range(3)]
    args = (0.9, 0.99, -0.1, 0.01, 1e-3, True)
    vc[:, 0] = vc[:, 0].abs()
    assert native.adam_update(pc, gc, mc, vc, *args, *out)
    bad = vc.clone()
    bad[0, 0, 2] += 1e-3j
    assert not native.adam_update(pc, gc, mc, bad, *args, *out)
    neg = vc.clone()
    neg[:, 0] = -10.0
    assert not native.adam_update(pc, gc, mc, neg, *args, *out)
    long = [_series(gen, M, native.KMAX + 1, N) for _ in range(4)]
    assert not native.adam_update(*long, *args, *[torch.empty_like(long[0]) for _ in range(3)])
    assert not native.adam_update(pc.to(torch.complex64), gc, mc, vc, *args, *out)
    strided = torch.empty(M, K, 2 * N, dtype=torch.complex128)[..., ::2]
    assert not native.adam_update(pc, gc, mc, vc, *args, strided, out[1], out[2])


@needs_cc
def test_adam_kernel_threads_and_streaming_give_the_same_bytes(built_native, monkeypatch):
    """With several torch threads the directions are split across threads, and large outputs are written with
    non-temporal stores: the same bytes as one thread with plain stores."""
    gen = torch.Generator().manual_seed(4)
    M, K, N = 16, 4, 4096
    pc, gc, mc, vc = (_series(gen, M, K, N) for _ in range(4))
    vc[:, 0] = vc[:, 0].abs()
    args = (0.9, 0.99, -0.1, 0.01, 1e-3, True)
    one = [torch.empty_like(pc) for _ in range(3)]
    assert native.adam_update(pc, gc, mc, vc, *args, *one)
    torch.set_num_threads(2)
    two = [torch.empty_like(pc) for _ in range(3)]
    assert native.adam_update(pc, gc, mc, vc, *args, *two)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    torch.set_num_threads(1)
    for limit in (0, 1 << 62):  # stream every output / none
        monkeypatch.setattr(native, "_STREAM_BYTES", limit)
        out = [torch.empty_like(pc) for _ in range(3)]
        assert native.adam_update(pc, gc, mc, vc, *args, *out)
        assert all(torch.equal(a, b) for a, b in zip(one, out)), limit


def _generic_matmul(a, b):
    """The Cauchy matmul by its definition: c_k = sum_j a_j @ b_{k-j}, one torch.matmul per product."""
    from delsketch.series.kernels import _bilinear_generic  # noqa: PLC0415

    return _bilinear_generic(torch.matmul, a, b)


def _mat_series(gen, m, K, shape, real0, col_major=False, expand_rows=False):
    x = torch.randn(m, K, *shape, generator=gen, dtype=torch.complex128)
    if real0:
        x[:, 0] = x[:1, 0].real
    if col_major:
        x = x.mT.contiguous().mT
    if expand_rows:  # a stride-0 row axis (as an expanded bias would have)
        x = x[..., :1, :].expand(*x.shape)
    return x


@needs_cc
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_cauchy_matmul_kernel_equals_definition(built_native, K):
    """Tile edges (p, n not multiples of the 4 x 4 or 4 x 8 tile, a single row or column), real or complex degree-0
    parts on either side (the half-cost products are taken only where all imaginary parts are zero), row- and
    column-major operands read in place or packed, stride-0 rows, broadcast directions and heads."""
    gen = torch.Generator().manual_seed(90 + K)
    shapes = [((1, 3), (3, 1)), ((7, 16), (16, 27)), ((5, 2), (2, 8)), ((2, 7, 4), (2, 4, 7)),
              ((1, 6, 5), (3, 5, 4)), ((3, 9, 3), (1, 3, 12)), ((6, 3), (3, 16)), ((3, 2), (2, 5))]
    n = 0
    for (sa, sb), (ma, mb), ra, rb, ta, tb in itertools.product(
            shapes, [(3, 3), (1, 3), (3, 1)], [True, False], [True, False], [False, True], [False, True]):
        a = _mat_series(gen, ma, K, sa, ra, col_major=ta, expand_rows=(n % 7 == 3))
        b = _mat_series(gen, mb, K, sb, rb, col_major=tb)
        got = native.cauchy_matmul(a, b)
        ref = _generic_matmul(a, b)
        what = f"K={K} {sa}{'T' if ta else ''} @ {sb}{'T' if tb else ''} m={ma},{mb} real0={ra},{rb}"
        assert got is not None and got.shape == ref.shape and got.is_contiguous(), what
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-14, f"{what}: {err:.1e}"
        n += 1
    # a degree-0 part with one nonzero imaginary part must not take the real path
    a = _mat_series(gen, 2, K, (4, 4), True)
    b = _mat_series(gen, 2, K, (4, 4), True)
    a[1, 0, 2, 3] += 0.5j
    b[0, 0, 1, 1] += 0.25j
    got, ref = native.cauchy_matmul(a, b), _generic_matmul(a, b)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-14


@needs_cc
def test_cauchy_matmul_kernel_declines_and_threads(built_native, monkeypatch):
    """What the kernel does not take (None: the caller's torch code runs), and the same bytes on any thread
    count."""
    gen = torch.Generator().manual_seed(97)
    a = _mat_series(gen, 4, 3, (5, 6), True)
    b = _mat_series(gen, 4, 3, (6, 7), True)
    assert native.cauchy_matmul(a.real.contiguous(), b.real.contiguous()) is None  # not complex128
    assert native.cauchy_matmul(a.to(torch.complex64), b.to(torch.complex64)) is None
    assert native.cauchy_matmul(a, b[:, :2]) is None  # series lengths differ
    assert native.cauchy_matmul(a, b.mT) is None  # inner dimensions differ
    assert native.cauchy_matmul(a[:, :, 0], b) is None  # ranks differ
    assert native.cauchy_matmul(a.conj(), b) is None  # a lazy conjugate
    big_a = _mat_series(gen, 64, 4, (7, 16), True)
    big_b = _mat_series(gen, 64, 4, (16, 16), True, col_major=True)
    torch.set_num_threads(1)
    one = native.cauchy_matmul(big_a, big_b)
    torch.set_num_threads(2)
    two = native.cauchy_matmul(big_a, big_b)
    assert torch.equal(one, two)
    monkeypatch.setenv("DELSKETCH_NATIVE", "0")
    native._reset()
    assert native.cauchy_matmul(big_a, big_b) is None


@needs_cc
def test_compiler_variants_agree(built_native, monkeypatch):
    """DELSKETCH_NATIVE_CFLAGS builds another library (another cache key). Session 11's kernels (4 lanes, one
    compilation for every K, GCC's loop vectorizer on) give the same Adam step, products and matmul to rounding
    as the default build (8 lanes where the CPU has AVX-512, each common K compiled as a constant)."""
    gen = torch.Generator().manual_seed(6)
    M, K, N = 5, 4, 37
    pc, gc, mc, vc = (_series(gen, M, K, N) for _ in range(4))
    vc[:, 0] = vc[:, 0].abs()
    a = _mat_series(gen, M, K, (7, 16), True)
    b = _mat_series(gen, M, K, (16, 27), True, col_major=True)

    def run():
        out = [torch.empty_like(pc) for _ in range(4)]
        assert native.adam_update(pc, gc, mc, vc, 0.9, 0.99, -0.1, 0.01, 1e-3, True, *out[:3])
        assert native.series_mul(out[3], pc, gc)
        return [*out, native.cauchy_matmul(a, b)], native.status()["path"]

    ref, path = run()
    monkeypatch.setenv(native.CFLAGS_VARIABLE, "-DDELSKETCH_LANES4 -DDELSKETCH_GENERIC_K -ftree-vectorize")
    native._reset()
    got, other = run()
    assert other != path and native.status()["flags"][-1] == "-ftree-vectorize"
    for i, (x, y) in enumerate(zip(got, ref)):
        scale = y.flatten(2).abs().amax(dim=(0, 2), keepdim=True)
        err = ((x - y).flatten(2).abs() / scale).max().item()
        assert 0 <= err < 1e-13, (i, err)


@needs_cc
@pytest.mark.parametrize("K", [1, 2, 4, 16])
def test_series_mul_kernel_equals_definition(built_native, K):
    """The elementwise Cauchy product against its definition (one complex product per pair, summed in torch),
    over broadcasts in m and in the shape (stride-0 inner runs on either side), runs shorter and longer than a
    vector, transposed (non-unit inner stride) operands, a strided output view, and rank-2 series."""
    from delsketch.series import kernels as R  # noqa: PLC0415

    gen = torch.Generator().manual_seed(70 + K)
    cases = [((3, 5, 6), (3, 5, 6)), ((1, 5, 6), (3, 5, 6)), ((3, 5, 1), (3, 5, 6)), ((3, 1, 6), (3, 5, 1)),
             ((3,), (3,)), ((3, 6), (1, 1)), ((2, 3, 4, 9), (2, 1, 4, 1)), ((2, 7, 3), (2, 7, 3))]
    for (sa, sb), ta in itertools.product(cases, [False, True]):
        a = torch.randn(sa[0], K, *sa[1:], generator=gen, dtype=torch.complex128)
        b = torch.randn(sb[0], K, *sb[1:], generator=gen, dtype=torch.complex128)
        if ta and a.dim() > 3:
            a = a.mT.contiguous().mT
        shape = torch.broadcast_shapes(a.shape, b.shape)
        ref = sum(a[:, j : j + 1] * b[:, : K - j] if j == 0 else
                  torch.nn.functional.pad(a[:, j : j + 1] * b[:, : K - j], (0, 0) * (a.dim() - 2) + (j, 0))
                  for j in range(K))
        out = torch.full(shape, 7.0 + 0j, dtype=torch.complex128)
        assert native.series_mul(out, a, b), (sa, sb)
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-15, (K, sa, sb, ta)
        assert torch.equal(R.mul(a, b), out)
    # into a strided view (compose writes v[:, 1:]), leaving the rest alone
    a = torch.randn(2, K, 3, 5, generator=gen, dtype=torch.complex128)
    big = torch.zeros(2, K + 1, 3, 5, dtype=torch.complex128)
    assert native.series_mul(big[:, 1:], a, a)
    assert torch.equal(big[:, 0], torch.zeros(2, 3, 5, dtype=torch.complex128))
    assert torch.equal(big[:, 1:], R.mul(a, a))
    # declined: other dtypes, K out of range, shapes that do not broadcast to out's
    assert not native.series_mul(out.real.clone(), out.real, out.real)
    c = torch.randn(1, native.KMAX + 1, 3, dtype=torch.complex128)
    assert not native.series_mul(torch.empty_like(c), c, c)
    assert not native.series_mul(torch.empty(2, K, 4, dtype=torch.complex128), a[:, :, 0], a[:, :, 0])


@needs_cc
@pytest.mark.parametrize("K", [2, 4, 16])
def test_series_exp_kernel_equals_recurrence(built_native, monkeypatch, K):
    """The native exp recurrence against torch's (the kernel switched off), on contiguous, transposed and
    stride-0 (expanded) inputs and a scaled degree-0 coefficient; and exp against nested jvp via the kernel."""
    from delsketch.series import kernels as R  # noqa: PLC0415

    gen = torch.Generator().manual_seed(80 + K)
    base = torch.randn(3, K, 5, 6, generator=gen, dtype=torch.complex128) * 0.5
    for a in (base, base.mT.contiguous().mT, base[..., :1].expand(base.shape), base[:, :, 0]):
        got = R._exp(a, 0.7)
        again = got.clone()
        assert native.series_exp(again, a) and torch.equal(again, got), a.stride()  # got is the kernel's
        with monkeypatch.context() as mp:
            mp.setattr(R, "_NATIVE_ELEMENTWISE", False)
            ref = R._exp(a, 0.7)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-14, a.stride()
    # exp(a0 + a1 z) = exp(a0) exp(a1 z): coefficients exp(a0) a1^k / k!
    a = torch.zeros(2, K, 7, dtype=torch.complex128)
    a[:, 0] = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    a[:, 1] = torch.randn(2, 7, generator=gen, dtype=torch.complex128)
    want = torch.stack([a[:, 0].exp() * a[:, 1] ** k / math.factorial(k) for k in range(K)], 1)
    assert ((R.exp(a) - want).abs().max() / want.abs().max()).item() < 1e-14
    v = torch.zeros(1, native.KMAX + 1, 2, dtype=torch.complex128)
    assert not native.series_exp(v, v.clone())
