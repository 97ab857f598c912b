"""Fused native kernels for the hottest series loops, compiled on first use with the system's C compiler.

Eager PyTorch evaluates a series update as dozens of passes over memory, one per coefficient product. A small
C kernel does the whole update in one pass, per element, in registers. The kernels here are optional: when no
compiler is found, a compile fails, or ``DELSKETCH_NATIVE=0``, :func:`available` is False and callers use their
eager PyTorch code, which computes the same formulas (the two agree to rounding, tested to 1e-12).

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native -ffp-contract=off -fno-tree-vectorize``: the kernels
are written in explicit vectors (8 lanes of doubles where the CPU has AVX-512, else 4), and no fused
multiply-adds are emitted, so every operation rounds as IEEE double arithmetic does, a vector lane and a scalar
remainder give the same bytes, and a run gives the same bytes on every call. (GCC's loop vectorizer emitted
fused ``vfmaddsub`` complex products into the scalar remainder loops in spite of ``-ffp-contract=off``; that is
why it is off.) Each kernel is also compiled for each K of 1-8 as a constant, so that its coefficient loops
unroll into registers. The library is cached in ``$DELSKETCH_CACHE`` (default ``~/.cache/delsketch``), named by a
hash of the source, the flags, the compiler's version and the CPU's feature flags, and written atomically; a
SHA-256 beside it is checked before every load, and a library that does not match it is rebuilt, never loaded.

Kernels:

* ``series_adam``: one Adam step on series coefficients (:class:`delsketch.training.optim.Adam`), the same
  formulas as its eager ``_series_update``.
* ``cauchy_matmul``: Cauchy products of series of small matrices (``kernels._matmul_small``), in register
  tiles, with half-cost products where a degree-0 coefficient is real.
* ``series_mul``, ``series_exp``: elementwise Cauchy products and the exp recurrence in one pass
  (``kernels._mul_into``, ``kernels._exp``).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "status", "adam_update", "cauchy_matmul", "series_mul", "series_exp", "KMAX"]

#: the longest series (coefficients) the kernels take; longer ones use the eager code
KMAX = 16

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KMAX 16
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(DELSKETCH_LANES4)
#define B 8  /* lanes: 512-bit vectors where the CPU has them (-DDELSKETCH_LANES4: 4 lanes, for comparisons) */
#else
#define B 4
#endif
typedef double vd __attribute__((vector_size(8 * B)));  /* B lanes: one vector per coefficient */
typedef long long vl __attribute__((vector_size(8 * B)));
typedef double vd4 __attribute__((vector_size(32)));    /* 4 lanes (mm_tile) */
typedef long long vl4 __attribute__((vector_size(32)));

/* B interleaved complex numbers at x <-> lane vectors of their real and imaginary parts */
#if B == 8
#define I_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define I_ODD 1, 3, 5, 7, 9, 11, 13, 15
#define I_LO 0, 8, 1, 9, 2, 10, 3, 11
#define I_HI 4, 12, 5, 13, 6, 14, 7, 15
#else
#define I_EVEN 0, 2, 4, 6
#define I_ODD 1, 3, 5, 7
#define I_LO 0, 4, 1, 5
#define I_HI 2, 6, 3, 7
#endif
#if defined(__clang__)
#define EVEN(a, b) __builtin_shufflevector(a, b, I_EVEN)
#define ODD(a, b) __builtin_shufflevector(a, b, I_ODD)
#define LO(a, b) __builtin_shufflevector(a, b, I_LO)
#define HI(a, b) __builtin_shufflevector(a, b, I_HI)
#else
#define EVEN(a, b) __builtin_shuffle(a, b, (vl){I_EVEN})
#define ODD(a, b) __builtin_shuffle(a, b, (vl){I_ODD})
#define LO(a, b) __builtin_shuffle(a, b, (vl){I_LO})
#define HI(a, b) __builtin_shuffle(a, b, (vl){I_HI})
#endif

static inline void load2(const double *x, vd *re, vd *im)
{
    vd a, b;
    memcpy(&a, x, sizeof a);
    memcpy(&b, x + B, sizeof b);
    *re = EVEN(a, b);
    *im = ODD(a, b);
}

#if defined(__AVX__)
#include <immintrin.h>
#define STREAMING 1
#endif

/* stream: write around the caches (outputs larger than the caches, read again only at the next step) */
static inline void store2(double *x, vd re, vd im, int stream)
{
    const vd a = LO(re, im), b = HI(re, im);
#ifdef STREAMING
    if (stream && !((uintptr_t)x & (8 * B - 1))) {
#if B == 8
        _mm512_stream_pd(x, (__m512d)a);
        _mm512_stream_pd(x + B, (__m512d)b);
#else
        _mm256_stream_pd(x, (__m256d)a);
        _mm256_stream_pd(x + B, (__m256d)b);
#endif
        return;
    }
#endif
    memcpy(x, &a, sizeof a);
    memcpy(x + B, &b, sizeof b);
}

/* complex products of lane vectors: (ar + i aq)(br + i bq) */
#define MULR(ar, aq, br, bq) ((ar) * (br) - (aq) * (bq))
#define MULQ(ar, aq, br, bq) ((ar) * (bq) + (aq) * (br))

/* Kernels are written for any K and compiled once per common K (series of degree 0-7) as well: with K a
   constant the coefficient loops unroll and the coefficients stay in registers. DISPATCH_K returns
   f(K, args...) with K as a constant where it is one of those. */
#define KCASE(n, f, ...) case n: return f(n, __VA_ARGS__);
#ifdef DELSKETCH_GENERIC_K  /* for comparisons: one compilation for every K */
#define DISPATCH_K(K, f, ...) return f(K, __VA_ARGS__);
#else
#define DISPATCH_K(K, f, ...) switch (K) { \
    KCASE(1, f, __VA_ARGS__) KCASE(2, f, __VA_ARGS__) KCASE(3, f, __VA_ARGS__) KCASE(4, f, __VA_ARGS__) \
    KCASE(5, f, __VA_ARGS__) KCASE(6, f, __VA_ARGS__) KCASE(7, f, __VA_ARGS__) KCASE(8, f, __VA_ARGS__) \
    default: return f(K, __VA_ARGS__); }
#endif
#define INLINE static inline __attribute__((always_inline))

/* Adam on B elements of a series with K coefficients. Inputs are interleaved complex doubles, coefficient k of
   element b at x[2 * (k * ld + b)] (ld = 0 with the zero array: a zero state). Writes the same layout with lo.
   Returns nonzero where a degree-0 second moment is not real and positive. */
INLINE int block(int K, const double *p, int64_t lp, const double *g, int64_t lg, const double *m, int64_t lm,
                 const double *v, int64_t lv, double *op, double *om, double *ov, int64_t lo,
                 double b1, double b2, double f, double bc2, double eps, int eps_inside, int stream)
{
    const double r = eps_inside ? -0.5 : 0.5;
    const double c1 = 1.0 - b1, c2 = 1.0 - b2;
    vd gr[KMAX], gq[KMAX], mr[KMAX], mq[KMAX], vr[KMAX], vq[KMAX], dr[KMAX], dq[KMAX];
    for (int k = 0; k < K; k++) {
        load2(g + 2 * k * lg, &gr[k], &gq[k]);
        load2(m + 2 * k * lm, &mr[k], &mq[k]);
        load2(v + 2 * k * lv, &vr[k], &vq[k]);
    }
    /* first moment; second moment with g*g from its symmetric products */
    for (int k = 0; k < K; k++) {
        vd sr = {0}, sq = {0};
        for (int j = 0; j < (k + 1) / 2; j++) {
            sr += MULR(gr[j], gq[j], gr[k - j], gq[k - j]);
            sq += MULQ(gr[j], gq[j], gr[k - j], gq[k - j]);
        }
        if (k % 2 == 0) {
            const int h = k / 2;
            const double w = k ? 0.5 : 1.0;
            sr += w * MULR(gr[h], gq[h], gr[h], gq[h]);
            sq += w * MULQ(gr[h], gq[h], gr[h], gq[h]);
        }
        const double two = k ? 2.0 : 1.0;
        mr[k] = mr[k] * b1 + gr[k] * c1;
        mq[k] = mq[k] * b1 + gq[k] * c1;
        vr[k] = vr[k] * b2 + (two * sr) * c2;
        vq[k] = vq[k] * b2 + (two * sq) * c2;
    }
    /* d = (v / bc2 + eps)^(-1/2) or 1 / (sqrt(v / bc2) + eps), by the power recurrence on v / v_0 */
    const vd u0 = vr[0] / bc2 + (eps_inside ? eps : 0.0);
    int bad = 0;
    vd s0;
    for (int b = 0; b < B; b++) {
        bad |= !(vq[0][b] == 0.0) | !(u0[b] > 0.0);
        s0[b] = sqrt(u0[b]);
    }
    dr[0] = eps_inside ? 1.0 / s0 : s0;
    dq[0] = (vd){0};
    const vd inv0 = 1.0 / (u0 * bc2);
    for (int k = 1; k < K; k++) {
        vd sr = {0}, sq = {0};
        for (int j = 1; j <= k; j++) {
            const double w = ((r + 1.0) * j - k) / k;
            const vd ur = vr[j] * inv0, uq = vq[j] * inv0;
            sr += w * MULR(ur, uq, dr[k - j], dq[k - j]);
            sq += w * MULQ(ur, uq, dr[k - j], dq[k - j]);
        }
        dr[k] = sr; dq[k] = sq;
    }
    if (!eps_inside) { /* d <- 1 / (d + eps) by the quotient recurrence */
        vd er[KMAX], eq[KMAX];
        dr[0] += eps;
        er[0] = 1.0 / dr[0]; eq[0] = (vd){0};
        for (int k = 1; k < K; k++) {
            vd sr = {0}, sq = {0};
            for (int j = 1; j <= k; j++) {
                sr += MULR(dr[j], dq[j], er[k - j], eq[k - j]);
                sq += MULQ(dr[j], dq[j], er[k - j], eq[k - j]);
            }
            er[k] = sr * -er[0]; eq[k] = sq * -er[0];
        }
        for (int k = 0; k < K; k++) { dr[k] = er[k]; dq[k] = eq[k]; }
    }
    /* p + f * (m d), and the stores */
    for (int k = 0; k < K; k++) {
        vd sr = {0}, sq = {0};
        for (int j = 0; j <= k; j++) {
            sr += MULR(mr[j], mq[j], dr[k - j], dq[k - j]);
            sq += MULQ(mr[j], mq[j], dr[k - j], dq[k - j]);
        }
        vd pr, pq;
        load2(p + 2 * k * lp, &pr, &pq);
        store2(op + 2 * k * lo, pr + f * sr, pq + f * sq, stream);
        store2(om + 2 * k * lo, mr[k], mq[k], stream);
        store2(ov + 2 * k * lo, vr[k], vq[k], stream);
    }
    return bad;
}

/* One Adam step on truncated power series, for directions [i0, i1). Arrays are interleaved complex doubles laid
   out [direction][K][N]; s* is a direction stride in doubles (0: the same series in every direction). m and v
   may be NULL (zero state). Outputs are [direction][K][N]. f = -lr_t / bc1. Returns 0; 1 where a degree-0
   second moment is not real and positive (the caller then takes its general code); 2 for K out of range. */
INLINE int adam_k(int64_t K, int64_t i0, int64_t i1, int64_t N, const double *p, int64_t sp, const double *g,
                  int64_t sg, const double *m, int64_t sm, const double *v, int64_t sv, double *op, double *om,
                  double *ov, double b1, double b2, double f, double bc2, double eps, int eps_inside, int stream)
{
    static const double zero[2 * B];
    double tp[2 * KMAX * B], tg[2 * KMAX * B], tm[2 * KMAX * B], tv[2 * KMAX * B];
    double to[2 * KMAX * B], tom[2 * KMAX * B], tov[2 * KMAX * B];
    const int64_t so = 2 * K * N, full = N - N % B;
    int bad = 0;
    for (int64_t i = i0; i < i1; i++) {
        const double *pi = p + i * sp, *gi = g + i * sg, *mi = m ? m + i * sm : 0, *vi = v ? v + i * sv : 0;
        double *opi = op + i * so, *omi = om + i * so, *ovi = ov + i * so;
        for (int64_t e = 0; e < full; e += B)
            bad |= block((int)K, pi + 2 * e, N, gi + 2 * e, N, mi ? mi + 2 * e : zero, mi ? N : 0,
                         vi ? vi + 2 * e : zero, vi ? N : 0, opi + 2 * e, omi + 2 * e, ovi + 2 * e, N,
                         b1, b2, f, bc2, eps, eps_inside, stream);
        if (full < N) { /* the last partial block, through padded buffers (pad lanes: g = 0, v_0 = 1) */
            const int nb = (int)(N - full);
            memset(tp, 0, sizeof tp); memset(tg, 0, sizeof tg); memset(tm, 0, sizeof tm); memset(tv, 0, sizeof tv);
            for (int b = nb; b < B; b++) tv[2 * b] = 1.0;
            for (int k = 0; k < K; k++) {
                const int64_t o = 2 * (k * N + full);
                memcpy(tp + 2 * k * B, pi + o, 2 * nb * sizeof(double));
                memcpy(tg + 2 * k * B, gi + o, 2 * nb * sizeof(double));
                if (mi) memcpy(tm + 2 * k * B, mi + o, 2 * nb * sizeof(double));
                if (vi) memcpy(tv + 2 * k * B, vi + o, 2 * nb * sizeof(double));
            }
            bad |= block((int)K, tp, B, tg, B, tm, B, tv, B, to, tom, tov, B, b1, b2, f, bc2, eps, eps_inside, 0);
            for (int k = 0; k < K; k++) {
                const int64_t o = 2 * (k * N + full);
                memcpy(opi + o, to + 2 * k * B, 2 * nb * sizeof(double));
                memcpy(omi + o, tom + 2 * k * B, 2 * nb * sizeof(double));
                memcpy(ovi + o, tov + 2 * k * B, 2 * nb * sizeof(double));
            }
        }
    }
#ifdef STREAMING
    if (stream) _mm_sfence();  /* the streamed stores are visible before the call returns */
#endif
    return bad ? 1 : 0;
}

int delsketch_series_adam(int64_t i0, int64_t i1, int64_t K, int64_t N,
                          const double *p, int64_t sp, const double *g, int64_t sg,
                          const double *m, int64_t sm, const double *v, int64_t sv,
                          double *op, double *om, double *ov,
                          double b1, double b2, double f, double bc2, double eps, int eps_inside, int stream)
{
    if (K < 1 || K > KMAX) return 2;
    DISPATCH_K(K, adam_k, i0, i1, N, p, sp, g, sg, m, sm, v, sv, op, om, ov, b1, b2, f, bc2, eps, eps_inside, stream)
}

/* ---------------------------------------------------------------------------------------------------------
   Cauchy products of small complex matrices: c_k = sum_{j<=k} a_j b_{k-j}, k < K, for every outer index (the
   direction and the batch dims). Each outer index packs its a and b into padded buffers (any strides), then
   computes MR x NC tiles of each c_k in registers. Where a_0 (b_0) has a zero imaginary part throughout (the
   engine's degree-0 coefficients are real), its products take half the multiplications. */
#define MR 4                 /* rows of a tile */
#define NV 2                 /* vectors per tile row */
#define NC (NV * 2)          /* complex columns of a tile */
#if defined(__clang__)
#define SWAP(x) __builtin_shufflevector(x, x, 1, 0, 3, 2)
#define DUPRE(x) __builtin_shufflevector(x, x, 0, 0, 2, 2)
#else
#define SWAP(x) __builtin_shuffle(x, (vl4){1, 0, 3, 2})
#define DUPRE(x) __builtin_shuffle(x, (vl4){0, 0, 2, 2})
#endif

static inline vd bc1(double x) { return (vd){0} + x; }  /* B lanes of x */
static inline vd4 bc1_4(double x) { return (vd4){x, x, x, x}; }
static inline vd4 bc2_4(const double *z) { return (vd4){z[0], z[1], z[0], z[1]}; }

/* Tile (rows i0.., columns l0..) of c_k = sum_j a_j b_{k-j}: a_j at pa + j * sa (MR rows of q, row stride q),
   b_j at pb + j * sb (row stride ldb), complex numbers. a0r/b0r: a_0/b_0 are real (their products take half
   the multiplications). Writes the tile's first ni rows and nl columns at c (row stride ldc). */
static void mm_tile(int k, int64_t q, const double *pa, int64_t sa, const double *pb, int64_t sb, int64_t ldb,
                    int a0r, int b0r, double *c, int64_t ldc, int64_t ni, int64_t nl)
{
    const vd4 sgn = {-1.0, 1.0, -1.0, 1.0};
    vd4 acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = (vd4){0};
    for (int j = 0; j <= k; j++) {
        const double *A = pa + 2 * j * sa, *P = pb + 2 * (k - j) * sb;
        if (j == 0 && a0r) {         /* real a_0: ar (br, bi) */
            for (int64_t r = 0; r < q; r++) {
                vd4 x[NV];
                memcpy(x, P + 2 * r * ldb, sizeof x);
                for (int i = 0; i < MR; i++) {
                    const vd4 s = bc1_4(A[2 * (i * q + r)]);
                    for (int v = 0; v < NV; v++) acc[i][v] += s * x[v];
                }
            }
        } else if (j == k && b0r) {  /* real b_0: (ar, ai) (br, br) */
            for (int64_t r = 0; r < q; r++) {
                vd4 x[NV];
                memcpy(x, P + 2 * r * ldb, sizeof x);
                for (int v = 0; v < NV; v++) x[v] = DUPRE(x[v]);
                for (int i = 0; i < MR; i++) {
                    const vd4 s = bc2_4(A + 2 * (i * q + r));
                    for (int v = 0; v < NV; v++) acc[i][v] += s * x[v];
                }
            }
        } else {                     /* ar (br, bi) + ai (-bi, br) */
            for (int64_t r = 0; r < q; r++) {
                vd4 x[NV], y[NV];
                memcpy(x, P + 2 * r * ldb, sizeof x);
                for (int v = 0; v < NV; v++) y[v] = SWAP(x[v]) * sgn;
                for (int i = 0; i < MR; i++) {
                    const vd4 sr = bc1_4(A[2 * (i * q + r)]), si = bc1_4(A[2 * (i * q + r) + 1]);
                    for (int v = 0; v < NV; v++) {
                        acc[i][v] += sr * x[v];
                        acc[i][v] += si * y[v];
                    }
                }
            }
        }
    }
    if (ni == MR && nl == NC) {
        for (int i = 0; i < MR; i++) memcpy(c + 2 * i * ldc, acc[i], sizeof acc[i]);
    } else {
        double t[2 * MR * NC];
        memcpy(t, acc, sizeof acc);
        for (int64_t i = 0; i < ni; i++) memcpy(c + 2 * i * ldc, t + 2 * i * NC, (size_t)(2 * nl) * sizeof(double));
    }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(DELSKETCH_LANES4)
#define WIDE 1
/* mm_tile in 8-lane vectors: MR x 8 complex columns, twice the work per instruction (where the CPU has
   AVX-512), for matrices wider than one 4-column tile. The same products in the same order as mm_tile. */
static void mm_tile8(int k, int64_t q, const double *pa, int64_t sa, const double *pb, int64_t sb, int64_t ldb,
                     int a0r, int b0r, double *c, int64_t ldc, int64_t ni, int64_t nl)
{
    const __m512d sgn = _mm512_setr_pd(-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0);
    __m512d acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_pd();
    for (int j = 0; j <= k; j++) {
        const double *A = pa + 2 * j * sa, *P = pb + 2 * (k - j) * sb;
        const int kind = (j == 0 && a0r) ? 1 : (j == k && b0r) ? 2 : 0;
        for (int64_t r = 0; r < q; r++) {
            __m512d x0 = _mm512_loadu_pd(P + 2 * r * ldb), x1 = _mm512_loadu_pd(P + 2 * r * ldb + 8);
            if (kind == 1) {         /* real a_0: ar (br, bi) */
                for (int i = 0; i < MR; i++) {
                    const __m512d s = _mm512_set1_pd(A[2 * (i * q + r)]);
                    acc[i][0] = _mm512_add_pd(acc[i][0], _mm512_mul_pd(s, x0));
                    acc[i][1] = _mm512_add_pd(acc[i][1], _mm512_mul_pd(s, x1));
                }
            } else if (kind == 2) {  /* real b_0: (ar, ai) (br, br) */
                x0 = _mm512_movedup_pd(x0);
                x1 = _mm512_movedup_pd(x1);
                for (int i = 0; i < MR; i++) {
                    const __m512d s = _mm512_broadcast_f64x2(_mm_loadu_pd(A + 2 * (i * q + r)));
                    acc[i][0] = _mm512_add_pd(acc[i][0], _mm512_mul_pd(s, x0));
                    acc[i][1] = _mm512_add_pd(acc[i][1], _mm512_mul_pd(s, x1));
                }
            } else {                 /* ar (br, bi) + ai (-bi, br) */
                const __m512d y0 = _mm512_mul_pd(_mm512_permute_pd(x0, 0x55), sgn),
                              y1 = _mm512_mul_pd(_mm512_permute_pd(x1, 0x55), sgn);
                for (int i = 0; i < MR; i++) {
                    const __m512d sr = _mm512_set1_pd(A[2 * (i * q + r)]), si = _mm512_set1_pd(A[2 * (i * q + r) + 1]);
                    acc[i][0] = _mm512_add_pd(acc[i][0], _mm512_mul_pd(sr, x0));
                    acc[i][0] = _mm512_add_pd(acc[i][0], _mm512_mul_pd(si, y0));
                    acc[i][1] = _mm512_add_pd(acc[i][1], _mm512_mul_pd(sr, x1));
                    acc[i][1] = _mm512_add_pd(acc[i][1], _mm512_mul_pd(si, y1));
                }
            }
        }
    }
    if (ni == MR && nl == 8) {
        for (int i = 0; i < MR; i++) {
            _mm512_storeu_pd(c + 2 * i * ldc, acc[i][0]);
            _mm512_storeu_pd(c + 2 * i * ldc + 8, acc[i][1]);
        }
    } else {
        double t[2 * MR * 8];
        for (int i = 0; i < MR; i++) {
            _mm512_storeu_pd(t + 16 * i, acc[i][0]);
            _mm512_storeu_pd(t + 16 * i + 8, acc[i][1]);
        }
        for (int64_t i = 0; i < ni; i++) memcpy(c + 2 * i * ldc, t + 16 * i, (size_t)(2 * nl) * sizeof(double));
    }
}
#else
#define WIDE 0
#endif

/* y[i][j] (row stride ld) = x[i * rs + j * cs], complex numbers */
static void pack(const double *x, int64_t rs, int64_t cs, int64_t rows, int64_t cols, double *y, int64_t ld)
{
    if (cs == 1) {
        for (int64_t i = 0; i < rows; i++) memcpy(y + 2 * i * ld, x + 2 * i * rs, (size_t)(2 * cols) * sizeof(double));
    } else if (rs == 1) {    /* a transpose: columns read in order, one 16-byte move per complex number */
        for (int64_t j = 0; j < cols; j++)
            for (int64_t i = 0; i < rows; i++) memcpy(y + 2 * (i * ld + j), x + 2 * (i + j * cs), 16);
    } else {
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++) memcpy(y + 2 * (i * ld + j), x + 2 * (i * rs + j * cs), 16);
    }
}

/* all imaginary parts of the rows x cols matrix at x (row stride ld, unit column stride) are zero */
static int real_part_only(const double *x, int64_t rows, int64_t cols, int64_t ld)
{
    int z = 1;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) z &= x[2 * (i * ld + j) + 1] == 0.0;
    return z;
}

/* offset (in complex numbers) of outer index o */
static inline int64_t outer_offset(int64_t o, int64_t nd, const int64_t *sizes, const int64_t *st)
{
    int64_t off = 0;
    for (int64_t d = nd - 1; d >= 0; d--) {
        off += (o % sizes[d]) * st[d];
        o /= sizes[d];
    }
    return off;
}

/* Outer indices [o0, o1) of c [outer][K][p][n] (row-major matrices; cs: outer strides, ck: coefficient stride)
   from a, b with element strides (in complex numbers) as [outer dims][K][rows][cols]; nd outer dims of the
   given sizes (strides 0 broadcast). b is read in place when its rows are contiguous and n is a multiple of
   the tile width, else packed with a (padded to whole tiles, zeros). Returns 0, or 3 when out of memory. */
int delsketch_cauchy_matmul(int64_t o0, int64_t o1, int64_t K, int64_t p, int64_t q, int64_t n, int64_t nd,
                            const int64_t *sizes, const double *a, const int64_t *as, int64_t ak, int64_t ar,
                            int64_t ac, const double *b, const int64_t *bs, int64_t bk, int64_t br, int64_t bc,
                            double *c, const int64_t *cs, int64_t ck)
{
    const int wide = WIDE && n > NC;  /* 8-column tiles where a row holds more than one 4-column tile */
    const int64_t nc = wide ? 2 * NC : NC;
    const int64_t pp = (p + MR - 1) / MR * MR, np = (n + nc - 1) / nc * nc;
    const int direct = bc == 1 && n == np;
    const int64_t na = 2 * K * pp * q, nb = direct ? 0 : 2 * K * q * np;
    double *buf = calloc((size_t)(na + nb + 1), sizeof(double));
    if (!buf) return 3;
    double *pa = buf, *pb = pa + na;
    const int densea = ak == p * q && ((ar == q && ac == 1) || (ar == 1 && ac == p)),
              denseb = bk == q * n && ((br == n && bc == 1) || (br == 1 && bc == q));
    const int64_t ntiles = (np / nc) * (pp / MR) * K;
    for (int64_t o = o0; o < o1; o++) {
        const int64_t oa = outer_offset(o, nd, sizes, as), ob = outer_offset(o, nd, sizes, bs),
                      oc = outer_offset(o, nd, sizes, cs);
        for (int64_t k = 0; k < K; k++) pack(a + 2 * (oa + k * ak), ar, ac, p, q, pa + 2 * k * pp * q, q);
        const double *B0;
        int64_t sb, ldb;
        if (direct) {
            B0 = b + 2 * ob; sb = bk; ldb = br;
        } else {
            for (int64_t k = 0; k < K; k++) pack(b + 2 * (ob + k * bk), br, bc, q, n, pb + 2 * k * q * np, np);
            B0 = pb; sb = q * np; ldb = np;
        }
        const int a0r = real_part_only(pa, p, q, q), b0r = real_part_only(B0, q, n, ldb);
        /* a and b of the next outer index, where each is one dense block, are prefetched a few lines per tile:
           the weight series of a step exceed the caches, and the reads of b's rows and of the packing stall on
           memory */
        const char *nexta = 0, *nextb = 0;
        int64_t linesa = 0, linesb = 0, pera = 0, perb = 0;
        if (o + 1 < o1) {
            if (densea) {
                nexta = (const char *)(a + 2 * outer_offset(o + 1, nd, sizes, as));
                linesa = (K * p * q * 16 + 63) / 64;
                pera = (linesa + ntiles - 1) / ntiles;
            }
            if (denseb) {
                nextb = (const char *)(b + 2 * outer_offset(o + 1, nd, sizes, bs));
                linesb = (K * q * n * 16 + 63) / 64;
                perb = (linesb + ntiles - 1) / ntiles;
            }
        }
        for (int64_t l0 = 0; l0 < np; l0 += nc)
            for (int64_t i0 = 0; i0 < pp; i0 += MR)
                for (int64_t k = 0; k < K; k++) {
                    for (int64_t t = 0; t < pera && linesa > 0; t++, linesa--, nexta += 64)
                        __builtin_prefetch(nexta, 0, 3);
                    for (int64_t t = 0; t < perb && linesb > 0; t++, linesb--, nextb += 64)
                        __builtin_prefetch(nextb, 0, 3);
                    const double *A = pa + 2 * i0 * q, *P = B0 + 2 * l0;
                    double *C = c + 2 * (oc + k * ck + i0 * n + l0);
                    const int64_t ni = p - i0 < MR ? p - i0 : MR, nl = n - l0 < nc ? n - l0 : nc;
#if WIDE
                    if (wide) {
                        mm_tile8((int)k, q, A, pp * q, P, sb, ldb, a0r, b0r, C, n, ni, nl);
                        continue;
                    }
#endif
                    mm_tile((int)k, q, A, pp * q, P, sb, ldb, a0r, b0r, C, n, ni, nl);
                }
    }
    free(buf);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
   Cauchy products of elementwise series: c_k = sum_{j<=k} a_j b_{k-j}, k < K, in one pass. Outer indices (nd
   dims of the given sizes; strides in complex numbers, 0 broadcasts) times an inner run of L elements (inner
   strides al, bl; c's is 1): B elements at a time where al, bl are 0 or 1, else one by one. */
static inline void load_run(const double *x, int64_t s, vd *re, vd *im)
{
    if (s) load2(x, re, im);
    else { *re = bc1(x[0]); *im = bc1(x[1]); }
}

INLINE int mul_k(int64_t K, int64_t o0, int64_t o1, int64_t L, int64_t nd, const int64_t *sizes, const double *a,
                 const int64_t *as, int64_t ak, int64_t al, const double *b, const int64_t *bs, int64_t bk,
                 int64_t bl, double *c, const int64_t *cs, int64_t ck)
{
    const int vec = (al == 0 || al == 1) && (bl == 0 || bl == 1);
    for (int64_t o = o0; o < o1; o++) {
        const int64_t oa = outer_offset(o, nd, sizes, as), ob = outer_offset(o, nd, sizes, bs),
                      oc = outer_offset(o, nd, sizes, cs);
        int64_t l = 0;
        if (vec)
            for (; l + B <= L; l += B) {
                vd ar[KMAX], aq[KMAX], br[KMAX], bq[KMAX];
                for (int64_t k = 0; k < K; k++) {
                    load_run(a + 2 * (oa + k * ak + l * al), al, &ar[k], &aq[k]);
                    load_run(b + 2 * (ob + k * bk + l * bl), bl, &br[k], &bq[k]);
                }
                for (int64_t k = 0; k < K; k++) {
                    vd sr = {0}, sq = {0};
                    for (int64_t j = 0; j <= k; j++) {
                        sr += MULR(ar[j], aq[j], br[k - j], bq[k - j]);
                        sq += MULQ(ar[j], aq[j], br[k - j], bq[k - j]);
                    }
                    store2(c + 2 * (oc + k * ck + l), sr, sq, 0);
                }
            }
        for (; l < L; l++) {
            const double *x = a + 2 * (oa + l * al), *y = b + 2 * (ob + l * bl);
            for (int64_t k = 0; k < K; k++) {
                double sr = 0.0, sq = 0.0;
                for (int64_t j = 0; j <= k; j++) {
                    const double *u = x + 2 * j * ak, *w = y + 2 * (k - j) * bk;
                    sr += MULR(u[0], u[1], w[0], w[1]);
                    sq += MULQ(u[0], u[1], w[0], w[1]);
                }
                c[2 * (oc + k * ck + l)] = sr;
                c[2 * (oc + k * ck + l) + 1] = sq;
            }
        }
    }
    return 0;
}

int delsketch_series_mul(int64_t o0, int64_t o1, int64_t K, int64_t L, int64_t nd, const int64_t *sizes,
                         const double *a, const int64_t *as, int64_t ak, int64_t al,
                         const double *b, const int64_t *bs, int64_t bk, int64_t bl,
                         double *c, const int64_t *cs, int64_t ck)
{
    if (K < 1 || K > KMAX) return 2;
    DISPATCH_K(K, mul_k, o0, o1, L, nd, sizes, a, as, ak, al, b, bs, bk, bl, c, cs, ck)
}

/* The exp recurrence v_k = (1/k) sum_{j=1..k} j a_j v_{k-j}, k = 1..K-1, with v_0 given in v; a and v laid out
   as in delsketch_series_mul (v's inner stride 1). */
INLINE int exp_k(int64_t K, int64_t o0, int64_t o1, int64_t L, int64_t nd, const int64_t *sizes, const double *a,
                 const int64_t *as, int64_t ak, int64_t al, double *v, const int64_t *vs, int64_t vk)
{
    for (int64_t o = o0; o < o1; o++) {
        const int64_t oa = outer_offset(o, nd, sizes, as), ov = outer_offset(o, nd, sizes, vs);
        int64_t l = 0;
        if (al == 0 || al == 1)
            for (; l + B <= L; l += B) {
                vd ar[KMAX], aq[KMAX], vr[KMAX], vq[KMAX];
                for (int64_t k = 1; k < K; k++) {
                    load_run(a + 2 * (oa + k * ak + l * al), al, &ar[k], &aq[k]);
                    ar[k] *= (double)k; aq[k] *= (double)k;
                }
                load2(v + 2 * (ov + l), &vr[0], &vq[0]);
                for (int64_t k = 1; k < K; k++) {
                    vd sr = {0}, sq = {0};
                    for (int64_t j = 1; j <= k; j++) {
                        sr += MULR(ar[j], aq[j], vr[k - j], vq[k - j]);
                        sq += MULQ(ar[j], aq[j], vr[k - j], vq[k - j]);
                    }
                    vr[k] = sr * (1.0 / k); vq[k] = sq * (1.0 / k);
                    store2(v + 2 * (ov + k * vk + l), vr[k], vq[k], 0);
                }
            }
        for (; l < L; l++) {
            double ur[KMAX], uq[KMAX], wr[KMAX], wq[KMAX];
            for (int64_t k = 1; k < K; k++) {
                const double *x = a + 2 * (oa + k * ak + l * al);
                ur[k] = x[0] * (double)k; uq[k] = x[1] * (double)k;
            }
            wr[0] = v[2 * (ov + l)]; wq[0] = v[2 * (ov + l) + 1];
            for (int64_t k = 1; k < K; k++) {
                double sr = 0.0, sq = 0.0;
                for (int64_t j = 1; j <= k; j++) {
                    sr += MULR(ur[j], uq[j], wr[k - j], wq[k - j]);
                    sq += MULQ(ur[j], uq[j], wr[k - j], wq[k - j]);
                }
                wr[k] = sr * (1.0 / k); wq[k] = sq * (1.0 / k);
                v[2 * (ov + k * vk + l)] = wr[k];
                v[2 * (ov + k * vk + l) + 1] = wq[k];
            }
        }
    }
    return 0;
}

int delsketch_series_exp(int64_t o0, int64_t o1, int64_t K, int64_t L, int64_t nd, const int64_t *sizes,
                         const double *a, const int64_t *as, int64_t ak, int64_t al,
                         double *v, const int64_t *vs, int64_t vk)
{
    if (K < 1 || K > KMAX) return 2;
    DISPATCH_K(K, exp_k, o0, o1, L, nd, sizes, a, as, ak, al, v, vs, vk)
}
"""

#: outputs of at least this many bytes are written around the caches (non-temporal stores, where the CPU has
#: AVX): they exceed the caches and are read again only at the next step. Same bytes either way.
_STREAM_BYTES = 1 << 24
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-tree-vectorize", "-fno-math-errno", "-fPIC", "-shared"]
#: extra compiler flags, appended to _FLAGS (and part of the library's cache key): for comparisons, e.g.
#: ``-DDELSKETCH_LANES4 -DDELSKETCH_GENERIC_K -ftree-vectorize`` builds session 11's kernels (bench/engine_ab.py)
CFLAGS_VARIABLE = "DELSKETCH_NATIVE_CFLAGS"
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    d = os.environ.get("DELSKETCH_CACHE")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "delsketch"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flags() -> list:
    return _FLAGS + shlex.split(os.environ.get(CFLAGS_VARIABLE, ""))


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_so = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    src = Path(tmp_so[: -len(".so.tmp")] + ".c")
    try:
        src.write_text(_SOURCE)
        r = subprocess.run([cc, *_flags(), "-o", tmp_so, str(src), "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip()[:300]}")
        digest = _sha256(Path(tmp_so))
        sha_tmp = Path(tmp_so + ".sha256")
        sha_tmp.write_text(digest + "\n")
        os.replace(tmp_so, out)  # the library first, then its checksum: a reader never trusts a half-written pair
        os.replace(sha_tmp, out.with_suffix(".sha256"))
    finally:
        for leftover in (Path(tmp_so), src, Path(tmp_so + ".sha256")):
            try:
                leftover.unlink()
            except OSError:
                pass


def _load():
    if os.environ.get("DELSKETCH_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "off (DELSKETCH_NATIVE=0)", None
    cc = os.environ.get("CC", "cc")
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({cc}: {e})", None
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_flags()), ver, _cpu_flags(), platform.machine()])
                         .encode()).hexdigest()[:20]
    last = None
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"delsketch-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        so = d / f"native-{key}.so"
        sha = so.with_suffix(".sha256")
        try:
            if not (so.exists() and sha.exists() and sha.read_text().strip() == _sha256(so)):
                _build(cc, so)
            lib = ctypes.CDLL(str(so))
            fn = lib.delsketch_series_adam
            i64, dp, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
            fn.argtypes = [i64, i64, i64, i64, dp, i64, dp, i64, dp, i64, dp, i64, dp, dp, dp,
                           dbl, dbl, dbl, dbl, dbl, ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
            mm = lib.delsketch_cauchy_matmul
            ip = ctypes.POINTER(i64)
            mm.argtypes = [i64] * 7 + [ip, dp, ip, i64, i64, i64, dp, ip, i64, i64, i64, dp, ip, i64]
            mm.restype = ctypes.c_int
            ml = lib.delsketch_series_mul
            ml.argtypes = [i64] * 5 + [ip, dp, ip, i64, i64, dp, ip, i64, i64, dp, ip, i64]
            ml.restype = ctypes.c_int
            ex = lib.delsketch_series_exp
            ex.argtypes = [i64] * 5 + [ip, dp, ip, i64, i64, dp, ip, i64]
            ex.restype = ctypes.c_int
            return lib, "compiled", str(so)
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            last = e
    return None, f"build failed: {last}", None


def _get():
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, reason, path = _load()
                _state.update(lib=lib, reason=reason, path=path)
    return _state["lib"]


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return _get() is not None


def status() -> dict:
    """``{"available": bool, "reason": str, "path": str | None, "flags": [...]}``, for run records and
    benchmarks."""
    _get()
    return {"available": _state["lib"] is not None, "reason": _state["reason"], "path": _state["path"],
            "flags": _flags()}


def _reset() -> None:
    """Forget the loaded library (tests: re-read ``DELSKETCH_NATIVE``)."""
    with _lock:
        _state.clear()


def _dir_stride(x: torch.Tensor, M: int, K: int, N: int) -> Optional[int]:
    """x's direction stride in doubles, 0 for one series shared by all M directions, None if x does not fit."""
    if not _plain_c128(x):
        return None
    if x.dim() < 2 or x.shape[1] != K or x[0].numel() != K * N or not x[0].is_contiguous():
        return None
    if x.shape[0] == 1:
        return 0
    if x.shape[0] != M:
        return None
    return 2 * x.stride(0)


def adam_update(pc, gc, mc, vc, b1: float, b2: float, f: float, bc2: float, eps: float, eps_inside: bool,
                out_p, out_m, out_v) -> bool:
    """One fused Adam step on coefficient stacks ``[M_x, K, *shape]`` (M_x = 1 or M; ``mc``/``vc`` may be None
    for a zero state) into contiguous ``out_*`` ``[M, K, *shape]``. Returns False, having written nothing
    usable, when the kernel does not apply (no library, layout, K > :data:`KMAX`, or a degree-0 second moment
    that is not real and positive); the caller then runs its eager code."""
    lib = _get()
    if lib is None:
        return False
    M, K = out_p.shape[0], out_p.shape[1]
    N = out_p[0].numel() // max(K, 1)
    if K > KMAX or N == 0:
        return False
    for o in (out_p, out_m, out_v):
        if o.dtype != torch.complex128 or o.device.type != "cpu" or not o.is_contiguous() or o.shape != out_p.shape:
            return False
    strides = [None if x is None else _dir_stride(x, M, K, N) for x in (pc, gc, mc, vc)]
    if strides[0] is None or strides[1] is None or (mc is not None and strides[2] is None) \
            or (vc is not None and strides[3] is None):
        return False
    ptr = lambda x: None if x is None else x.data_ptr()
    args = (K, N, ptr(pc), strides[0], ptr(gc), strides[1], ptr(mc), strides[2] or 0, ptr(vc), strides[3] or 0,
            out_p.data_ptr(), out_m.data_ptr(), out_v.data_ptr(), b1, b2, f, bc2, eps, int(bool(eps_inside)),
            int(3 * out_p.numel() * 16 >= _STREAM_BYTES))
    return _split(lib.delsketch_series_adam, M, 2 * M * K * N, args) == 0


def _plain_c128(x: torch.Tensor) -> bool:
    return x.dtype == torch.complex128 and x.device.type == "cpu" and not x.is_conj() and not x.is_neg()


def _i64s(vals):
    return (ctypes.c_int64 * max(len(vals), 1))(*vals)


def _split(fn, total: int, work: int, args) -> int:
    """fn(o0, o1, *args) over [0, total), in slices on torch's threads when the work is large enough."""
    threads = max(1, min(torch.get_num_threads(), total, work >> 16))
    if threads == 1:
        return fn(0, total, *args)
    cuts = [total * t // threads for t in range(threads + 1)]
    with ThreadPoolExecutor(threads) as ex:  # ctypes releases the GIL
        return max(ex.map(lambda t: fn(cuts[t], cuts[t + 1], *args), range(threads)))


def cauchy_matmul(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """``c_k = sum_{j<=k} a_j @ b_{k-j}`` for series of matrices ``a [m_a, K, *batch_a, p, q]``,
    ``b [m_b, K, *batch_b, q, n]`` of equal rank >= 4 (m and batch dims broadcast as in torch.matmul), any
    strides: a contiguous ``[M, K, *batch, p, n]``. None when the kernel does not apply (no library, not
    complex128 on the CPU, shapes that do not match); the caller then takes its torch code.

    Meant for small matrices, which torch's batched matmuls handle at ~1 us of overhead per matrix and with
    every coefficient read K times: here each outer index reads a and b once into padded buffers. Products with
    a degree-0 coefficient whose imaginary parts are all zero take half the multiplications."""
    lib = _get()
    if lib is None or not (_plain_c128(a) and _plain_c128(b)) or a.dim() != b.dim() or a.dim() < 4:
        return None
    K, p, q, n = a.shape[1], a.shape[-2], a.shape[-1], b.shape[-1]
    if b.shape[1] != K or b.shape[-2] != q or min(p, q, n, K) == 0:
        return None
    try:
        batch = tuple(torch.broadcast_shapes(a.shape[2:-2], b.shape[2:-2]))
        M = torch.broadcast_shapes(a.shape[:1], b.shape[:1])[0]
    except RuntimeError:
        return None
    outer = (M, *batch)
    ae = a.expand(M, K, *batch, p, q)
    be = b.expand(M, K, *batch, q, n)
    out = torch.empty((M, K, *batch, p, n), dtype=torch.complex128)
    nd = len(outer)

    def outer_strides(x):
        st = x.stride()
        return _i64s([st[0], *st[2 : 2 + len(batch)]])

    sa, sb, so = ae.stride(), be.stride(), out.stride()
    args = (K, p, q, n, nd, _i64s(outer), ae.data_ptr(), outer_strides(ae), sa[1], sa[-2], sa[-1],
            be.data_ptr(), outer_strides(be), sb[1], sb[-2], sb[-1], out.data_ptr(), outer_strides(out), so[1])
    total = math.prod(outer)
    rc = _split(lib.delsketch_cauchy_matmul, total, total * K * K * p * q * n, args)
    if rc != 0:
        raise MemoryError("delsketch native cauchy_matmul: out of memory for its packing buffers")
    return out


def _runs(out: torch.Tensor, *ins: torch.Tensor):
    """The elementwise layout of out and inputs of out's shape (series axis 1 apart), as the kernels take it:
    the count of outer indices, the inner run's length, the outer sizes, and per tensor (out first) its pointer,
    outer strides, coefficient stride and inner stride. Neighbouring dims that are one run of memory in every
    tensor are merged; when out's last dim is not a run (stride 1), the inner run has length one."""
    ts = (out, *ins)
    dims = [0] + list(range(2, out.dim()))
    sizes = [out.shape[d] for d in dims]
    st = [[x.stride(d) for d in dims] for x in ts]
    i = len(sizes) - 1
    while i > 0:
        if all(s[i - 1] == s[i] * sizes[i] for s in st):
            sizes[i - 1] *= sizes[i]
            del sizes[i]
            for s in st:
                s[i - 1] = s.pop(i)
        i -= 1
    if st[0][-1] != 1:
        sizes.append(1)
        for t, s in enumerate(st):
            s.append(1 if t == 0 else 0)
    L = sizes.pop()
    ops = [(x.data_ptr(), _i64s(s[:-1]), x.stride(1), s[-1]) for x, s in zip(ts, st)]
    return math.prod(sizes), L, _i64s(sizes), len(sizes), ops


def series_mul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """out <- the Cauchy product of a and b (``[m, K, *shape]`` of equal rank, broadcasting over m and shape to
    out's shape; out may be a view whose last dim has stride 1). One pass instead of K torch passes. Returns
    False, having written nothing, when the kernel does not apply (no library, not complex128 on the CPU, K >
    :data:`KMAX`, shapes that do not broadcast to out's)."""
    lib = _get()
    if lib is None or not (_plain_c128(a) and _plain_c128(b) and _plain_c128(out)):
        return False
    K = out.shape[1] if out.dim() >= 2 else 0
    if not (a.dim() == b.dim() == out.dim() >= 2) or a.shape[1] != K or b.shape[1] != K or not 1 <= K <= KMAX:
        return False
    try:
        ae, be = a.expand(out.shape), b.expand(out.shape)
    except RuntimeError:
        return False
    if out.numel() == 0:
        return True
    total, L, sizes, nd, (oc, oa, ob) = _runs(out, ae, be)
    args = (K, L, nd, sizes, *oa, *ob, *oc[:3])  # out's inner stride is 1
    return _split(lib.delsketch_series_mul, total, total * L * K * K, args) == 0


def series_exp(v: torch.Tensor, a: torch.Tensor) -> bool:
    """v[:, 1:] <- the exp recurrence v_k = (1/k) sum_{j=1..k} j a_j v_{k-j} on ``v [m, K, *shape]`` whose
    v[:, 0] is set (exp(a_0), times any factor: the recurrence is linear in v), for a of v's shape. One pass
    instead of K(K-1)/2 torch passes. False, having written nothing, when the kernel does not apply."""
    lib = _get()
    if lib is None or not (_plain_c128(a) and _plain_c128(v)) or a.shape != v.shape or v.dim() < 2:
        return False
    K = v.shape[1]
    if not 1 <= K <= KMAX:
        return False
    if K == 1 or v.numel() == 0:
        return True
    total, L, sizes, nd, (ov, oa) = _runs(v, a)
    args = (K, L, nd, sizes, *oa, *ov[:3])  # v's inner stride is 1
    return _split(lib.delsketch_series_exp, total, total * L * K * K, args) == 0
