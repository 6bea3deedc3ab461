"""Direct convolution for thin layers (few input channels × taps, stride 1), where im2col's copies and a GEMM
with a short side cost more than the arithmetic: every plane is read as one flat row-major array, so that each
tap's contribution to a whole output plane is one long contiguous vector loop (rules 4, 5 as the derivation
writes them: valid correlations of zero-padded planes, rule 4 with the flipped kernel).

The flat trick: on a plane W wide, output pixel (h, w) of a valid K×K correlation sums x[(h+kh)·W + w+kw], so
the whole output is out[i] = Σ w[kh,kw]·x[kh·W + kw + i] for i < (Ho-1)·W + Wo, with i = h·W + w. The positions
with w ≥ Wo wrap around a row's end: they are computed and never read.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import copy_row, register

MAX_FILTERS = 8  # direct when a layer has this many filters or fewer: im2col's GEMM then has a short side
MAX_TAPS = 256   # ... and at most this many taps C·K·K per filter (measurements: docs/numba.md)

def suits(C: int, F: int, K: int, stride: int) -> bool:
    """Whether a convolution goes direct (thin, unit stride) rather than through im2col + GEMM."""
    return stride == 1 and F <= MAX_FILTERS and C * K * K <= MAX_TAPS


# fastmath: 'contract' lets a multiply-add become one FMA; 'reassoc' lets a dot product be summed in vector lanes
# (in a fixed order for a given machine, so the results stay the same bits whatever threads run them).
_FAST = {"contract", "reassoc"}


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def _add_taps(acc, x, wrow, base):
    """acc[i] += Σ_kw wrow[kw]·x[base + kw + i] for i < len(acc): one kernel row's taps over a flat plane."""
    L, K = acc.size, wrow.size
    if K == 5:                                # LeNet's and the convnet's kernels: the five taps in one pass
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        x3, x4 = x[base + 3:base + 3 + L], x[base + 4:base + 4 + L]
        w0, w1, w2, w3, w4 = wrow[0], wrow[1], wrow[2], wrow[3], wrow[4]
        for i in range(L):
            acc[i] += w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i] + w4 * x4[i]
    elif K == 3:
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        w0, w1, w2 = wrow[0], wrow[1], wrow[2]
        for i in range(L):
            acc[i] += w0 * x0[i] + w1 * x1[i] + w2 * x2[i]
    else:
        for kw in range(K):
            xk, wk = x[base + kw:base + kw + L], wrow[kw]
            for i in range(L):
                acc[i] += wk * xk[i]


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def _row_dots(d, x, base, out):
    """out[kw] += Σ_i d[i]·x[base + kw + i] for every kw: one kernel row of rule 5's correlation."""
    L, K = d.size, out.size
    if K == 5:
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        x3, x4 = x[base + 3:base + 3 + L], x[base + 4:base + 4 + L]
        s0 = s1 = s2 = s3 = s4 = np.float32(0)    # float32 zero: unifies to float64 with float64 data
        for i in range(L):
            g = d[i]
            s0 += g * x0[i]
            s1 += g * x1[i]
            s2 += g * x2[i]
            s3 += g * x3[i]
            s4 += g * x4[i]
        out[0] += s0
        out[1] += s1
        out[2] += s2
        out[3] += s3
        out[4] += s4
    else:
        for kw in range(K):
            xk = x[base + kw:base + kw + L]
            s = np.float32(0)
            for i in range(L):
                s += d[i] * xk[i]
            out[kw] += s


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def direct_forward(xp, w, b, y):
    """y[n,f] = b[f] + Σ_c valid correlation of xp[n,c] (zero-padded) with w[f,c]; one (n, f) plane per task."""
    N, C, Hp, Wp = xp.shape                   # xp N,C,Hp,Wp; w F,C,K,K; y N,F,Ho,Wo
    F, _, K, _ = w.shape
    _, _, Ho, Wo = y.shape
    L = (Ho - 1) * Wp + Wo
    for r in prange(N * F):
        n, f = r // F, r % F
        acc = np.full(L, b[f])                # the plane on the padded width (flat)
        for c in range(C):
            x = xp[n, c].reshape(-1)
            for kh in range(K):
                _add_taps(acc, x, w[f, c, kh], kh * Wp)
        out = y[n, f]
        for h in range(Ho):
            copy_row(out[h], acc[h * Wp:h * Wp + Wo])


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def direct_input_grad(dyp, wflip, pad, dx):
    """Rule 4: dx[n,c] = Σ_f conv2d(zeropad(δ[n,f], K-1), flip(w[f,c]), 'valid'), cropped of the forward's padding.
    dyp is δ zero-padded by K-1 on every side; wflip[c,f] = w[f,c] flipped both ways. One (n, c) per task."""
    N, F, Hq, Wq = dyp.shape                  # dyp N,F,Hq,Wq; wflip C,F,K,K; dx N,C,H,W
    C, _, K, _ = wflip.shape
    _, _, H, W = dx.shape
    L = (H - 1) * Wq + W                      # only the rows and columns that survive the crop
    start = pad * Wq + pad
    for r in prange(N * C):
        n, c = r // C, r % C
        acc = np.zeros(L, dx.dtype)
        for f in range(F):
            d = dyp[n, f].reshape(-1)
            for kh in range(K):
                _add_taps(acc, d, wflip[c, f, kh], start + kh * Wq)
        out = dx[n, c]
        for h in range(H):
            copy_row(out[h], acc[h * Wq:h * Wq + W])


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def direct_weight_grad(xp, dyg, dw):
    """Rule 5: dw[f,c] = Σ_n conv2d(zeropad(x[n,c]), δ[n,f], 'valid'); dyg is δ on the padded width (flat, zero in
    the wrapped columns). One (f, c) per task, summing the batch in order: the same bits for any thread count."""
    N, C, Hp, Wp = xp.shape                   # xp N,C,Hp,Wp; dyg N,F,L; dw F,C,K,K
    F, _, K, _ = dw.shape
    for r in prange(F * C):
        f, c = r // C, r % C
        acc = np.zeros((K, K), dw.dtype)
        for n in range(N):
            x, d = xp[n, c].reshape(-1), dyg[n, f]
            for kh in range(K):
                _row_dots(d, x, kh * Wp, acc[kh])
        dw[f, c] = acc


@njit(parallel=True, cache=True, error_model="numpy")
def delta_on_grid(dy, Wp, dyg):
    """dyg[n,f] = δ[n,f] laid out on rows Wp wide (flat), zero in the columns past Wo."""
    N, F, Ho, Wo = dy.shape                   # dy N,F,Ho,Wo; dyg N,F,L
    for r in prange(N * F):
        n, f = r // F, r % F
        g, d = dyg[n, f], dy[n, f]
        g[:] = 0
        for h in range(Ho):
            copy_row(g[h * Wp:h * Wp + Wo], d[h])


def warm(dtype: np.dtype) -> None:
    """Every kernel, K = 5, 3 and another (each has its own loop), for `dtype`."""
    for K in (5, 3, 2):
        x = np.ones((2, 2, K + 2, K + 2), dtype)
        w = np.ones((3, 2, K, K), dtype)
        y = np.empty((2, 3, 3, 3), dtype)
        direct_forward(x, w, np.zeros(3, dtype), y)
        dyg = np.empty((2, 3, 2 * (K + 2) + 3), dtype)
        delta_on_grid(y, K + 2, dyg)
        direct_weight_grad(x, dyg, np.empty((3, 2, K, K), dtype))
        direct_input_grad(np.ones((2, 3, 3 + 2 * (K - 1), 3 + 2 * (K - 1)), dtype), np.ones((2, 3, K, K), dtype), 1,
                          np.empty((2, 2, K, K), dtype))


register(__name__, (direct_forward, direct_input_grad, direct_weight_grad, delta_on_grid), warm,
         inner=(_add_taps, _row_dots))
