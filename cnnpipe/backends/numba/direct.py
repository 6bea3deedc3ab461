"""Direct convolution for thin layers (few filters, or a first layer's 1-3 input channels; stride 1),
where im2col's copies and a GEMM with a short side cost more than the arithmetic: every plane is read as one flat
row-major array, so that each tap's contribution to a whole output plane is one long contiguous vector loop
(rules 4, 5 as the derivation writes them: valid correlations of zero-padded planes, rule 4 with the flipped
kernel). A task computes a block of BLOCK planes (filters; channels for rule 4) together: each shifted input row
it loads feeds all of them.

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
THIN_CHANNELS = 3    # or any filter count on at most this many channels (a first layer: grey or RGB) ...
BLOCK_KERNELS = (3, 5)   # ... with a kernel size the blocks have unrolled loops for
BLOCK = 4        # planes one pass accumulates: 4 planes, 5 shifted rows and 20 weights fill 29 of 32 registers


def suits(C: int, F: int, K: int, stride: int) -> bool:
    """Whether a convolution goes direct (thin, unit stride) rather than through im2col + GEMM."""
    if stride != 1:
        return False
    return C <= THIN_CHANNELS and K in BLOCK_KERNELS or F <= MAX_FILTERS and C * K * K <= MAX_TAPS


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


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def _add_block_taps(acc, x, w, j0, c, kh, base):
    """acc[j, i] += Σ_kw w[j0+j, c, kh, kw]·x[base + kw + i] for every plane j of the block: one kernel row of
    BLOCK filters at once when the block is full (each shifted input row is loaded once for all of them), else
    plane by plane."""
    L, K = acc.shape[1], w.shape[3]
    if acc.shape[0] == BLOCK and K == 5:
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        x3, x4 = x[base + 3:base + 3 + L], x[base + 4:base + 4 + L]
        r0, r1, r2, r3 = w[j0, c, kh], w[j0 + 1, c, kh], w[j0 + 2, c, kh], w[j0 + 3, c, kh]
        p0, p1, p2, p3, p4 = r0[0], r0[1], r0[2], r0[3], r0[4]
        q0, q1, q2, q3, q4 = r1[0], r1[1], r1[2], r1[3], r1[4]
        s0, s1, s2, s3, s4 = r2[0], r2[1], r2[2], r2[3], r2[4]
        t0, t1, t2, t3, t4 = r3[0], r3[1], r3[2], r3[3], r3[4]
        for i in range(L):
            v0, v1, v2, v3, v4 = x0[i], x1[i], x2[i], x3[i], x4[i]
            a0[i] += p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3 + p4 * v4
            a1[i] += q0 * v0 + q1 * v1 + q2 * v2 + q3 * v3 + q4 * v4
            a2[i] += s0 * v0 + s1 * v1 + s2 * v2 + s3 * v3 + s4 * v4
            a3[i] += t0 * v0 + t1 * v1 + t2 * v2 + t3 * v3 + t4 * v4
    elif acc.shape[0] == BLOCK and K == 3:
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        r0, r1, r2, r3 = w[j0, c, kh], w[j0 + 1, c, kh], w[j0 + 2, c, kh], w[j0 + 3, c, kh]
        p0, p1, p2 = r0[0], r0[1], r0[2]
        q0, q1, q2 = r1[0], r1[1], r1[2]
        s0, s1, s2 = r2[0], r2[1], r2[2]
        t0, t1, t2 = r3[0], r3[1], r3[2]
        for i in range(L):
            v0, v1, v2 = x0[i], x1[i], x2[i]
            a0[i] += p0 * v0 + p1 * v1 + p2 * v2
            a1[i] += q0 * v0 + q1 * v1 + q2 * v2
            a2[i] += s0 * v0 + s1 * v1 + s2 * v2
            a3[i] += t0 * v0 + t1 * v1 + t2 * v2
    else:
        for j in range(acc.shape[0]):
            _add_taps(acc[j], x, w[j0 + j, c, kh], base)


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def _block_row_dots(dg, x, base, out):
    """out[j, kw] += Σ_i dg[j, i]·x[base + kw + i] for every filter j of the block: one kernel row of rule 5's
    correlation for BLOCK filters at once when the block is full and K is 5 or 3 (each shifted input row is loaded
    once for all of them), else filter by filter."""
    if out.shape[0] == BLOCK and out.shape[1] == 5:
        d0, d1, d2, d3 = dg[0], dg[1], dg[2], dg[3]
        L = d0.size
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        x3, x4 = x[base + 3:base + 3 + L], x[base + 4:base + 4 + L]
        z = np.float32(0)                         # float32 zero: unifies to float64 with float64 data
        p0 = p1 = p2 = p3 = p4 = q0 = q1 = q2 = q3 = q4 = z
        s0 = s1 = s2 = s3 = s4 = t0 = t1 = t2 = t3 = t4 = z
        for i in range(L):
            v0, v1, v2, v3, v4 = x0[i], x1[i], x2[i], x3[i], x4[i]
            g = d0[i]
            p0 += g * v0
            p1 += g * v1
            p2 += g * v2
            p3 += g * v3
            p4 += g * v4
            g = d1[i]
            q0 += g * v0
            q1 += g * v1
            q2 += g * v2
            q3 += g * v3
            q4 += g * v4
            g = d2[i]
            s0 += g * v0
            s1 += g * v1
            s2 += g * v2
            s3 += g * v3
            s4 += g * v4
            g = d3[i]
            t0 += g * v0
            t1 += g * v1
            t2 += g * v2
            t3 += g * v3
            t4 += g * v4
        o0, o1, o2, o3 = out[0], out[1], out[2], out[3]
        o0[0] += p0
        o0[1] += p1
        o0[2] += p2
        o0[3] += p3
        o0[4] += p4
        o1[0] += q0
        o1[1] += q1
        o1[2] += q2
        o1[3] += q3
        o1[4] += q4
        o2[0] += s0
        o2[1] += s1
        o2[2] += s2
        o2[3] += s3
        o2[4] += s4
        o3[0] += t0
        o3[1] += t1
        o3[2] += t2
        o3[3] += t3
        o3[4] += t4
    elif out.shape[0] == BLOCK and out.shape[1] == 3:
        d0, d1, d2, d3 = dg[0], dg[1], dg[2], dg[3]
        L = d0.size
        x0, x1, x2 = x[base:base + L], x[base + 1:base + 1 + L], x[base + 2:base + 2 + L]
        z = np.float32(0)
        p0 = p1 = p2 = q0 = q1 = q2 = s0 = s1 = s2 = t0 = t1 = t2 = z
        for i in range(L):
            v0, v1, v2 = x0[i], x1[i], x2[i]
            g = d0[i]
            p0 += g * v0
            p1 += g * v1
            p2 += g * v2
            g = d1[i]
            q0 += g * v0
            q1 += g * v1
            q2 += g * v2
            g = d2[i]
            s0 += g * v0
            s1 += g * v1
            s2 += g * v2
            g = d3[i]
            t0 += g * v0
            t1 += g * v1
            t2 += g * v2
        o0, o1, o2, o3 = out[0], out[1], out[2], out[3]
        o0[0] += p0
        o0[1] += p1
        o0[2] += p2
        o1[0] += q0
        o1[1] += q1
        o1[2] += q2
        o2[0] += s0
        o2[1] += s1
        o2[2] += s2
        o3[0] += t0
        o3[1] += t1
        o3[2] += t2
    else:
        for j in range(out.shape[0]):
            _row_dots(dg[j], x, base, out[j])


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def direct_forward(xp, w, b, y):
    """y[n,f] = b[f] + Σ_c valid correlation of xp[n,c] (zero-padded) with w[f,c]; one sample's block of BLOCK
    filters per task."""
    N, C, Hp, Wp = xp.shape                   # xp N,C,Hp,Wp; w F,C,K,K; y N,F,Ho,Wo
    F, _, K, _ = w.shape
    _, _, Ho, Wo = y.shape
    L = (Ho - 1) * Wp + Wo
    NB = -(-F // BLOCK)
    for r in prange(N * NB):
        n, f0 = r // NB, r % NB * BLOCK
        acc = np.empty((min(BLOCK, F - f0), L), y.dtype)   # the block's planes on the padded width (flat)
        for j in range(acc.shape[0]):
            acc[j, :] = b[f0 + j]
        for c in range(C):
            x = xp[n, c].reshape(-1)
            for kh in range(K):
                _add_block_taps(acc, x, w, f0, c, kh, kh * Wp)
        for j in range(acc.shape[0]):
            out, a = y[n, f0 + j], acc[j]
            for h in range(Ho):
                copy_row(out[h], a[h * Wp:h * Wp + Wo])


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def direct_input_grad(dyp, wflip, pad, dx):
    """Rule 4: dx[n,c] = Σ_f conv2d(zeropad(δ[n,f], K-1), flip(w[f,c]), 'valid'), cropped of the forward's padding.
    dyp is δ zero-padded by K-1 on every side; wflip[c,f] = w[f,c] flipped both ways. One sample's block of BLOCK
    channels per task."""
    N, F, Hq, Wq = dyp.shape                  # dyp N,F,Hq,Wq; wflip C,F,K,K; dx N,C,H,W
    C, _, K, _ = wflip.shape
    _, _, H, W = dx.shape
    L = (H - 1) * Wq + W                      # only the rows and columns that survive the crop
    start = pad * Wq + pad
    NB = -(-C // BLOCK)
    for r in prange(N * NB):
        n, c0 = r // NB, r % NB * BLOCK
        acc = np.zeros((min(BLOCK, C - c0), L), dx.dtype)
        for f in range(F):
            d = dyp[n, f].reshape(-1)
            for kh in range(K):
                _add_block_taps(acc, d, wflip, c0, f, kh, start + kh * Wq)
        for j in range(acc.shape[0]):
            out, a = dx[n, c0 + j], acc[j]
            for h in range(H):
                copy_row(out[h], a[h * Wq:h * Wq + W])


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def direct_weight_grad(xp, dy, dw):
    """Rule 5: dw[f,c] = Σ_n conv2d(zeropad(x[n,c]), δ[n,f], 'valid'). One block of BLOCK filters on one channel
    per task, summing the batch in order (the same bits for any thread count); each sample's δ planes are laid
    on the padded width in a task-local buffer first (flat, zero in the wrapped columns), so that every kernel
    row is one long dot product."""
    N, C, Hp, Wp = xp.shape                   # xp N,C,Hp,Wp; dy N,F,Ho,Wo; dw F,C,K,K
    F, _, K, _ = dw.shape
    _, _, Ho, Wo = dy.shape
    NB = -(-F // BLOCK)
    for r in prange(NB * C):
        f0, c = r // C * BLOCK, r % C
        nf = min(BLOCK, F - f0)
        acc = np.zeros((nf, K, K), dw.dtype)
        grid = np.zeros((nf, (Ho - 1) * Wp + Wo), dw.dtype)   # the wrapped columns stay zero
        for n in range(N):
            for j in range(nf):
                g, d = grid[j], dy[n, f0 + j]
                for h in range(Ho):
                    copy_row(g[h * Wp:h * Wp + Wo], d[h])
            x = xp[n, c].reshape(-1)
            for kh in range(K):
                _block_row_dots(grid, x, kh * Wp, acc[:, kh])
        for j in range(nf):
            dw[f0 + j, c] = acc[j]


def warm(dtype: np.dtype) -> None:
    """Every kernel, K = 5, 3 and another (each has its own loop), for `dtype`."""
    for K in (5, 3, 2):
        x = np.ones((2, 2, K + 2, K + 2), dtype)
        w = np.ones((3, 2, K, K), dtype)
        y = np.empty((2, 3, 3, 3), dtype)
        direct_forward(x, w, np.zeros(3, dtype), y)
        direct_weight_grad(x, y, np.empty((3, 2, K, K), dtype))
        direct_input_grad(np.ones((2, 3, 3 + 2 * (K - 1), 3 + 2 * (K - 1)), dtype), np.ones((2, 3, K, K), dtype), 1,
                          np.empty((2, 2, K, K), dtype))


register(__name__, (direct_forward, direct_input_grad, direct_weight_grad), warm,
         inner=(_add_taps, _row_dots, _add_block_taps, _block_row_dots))
