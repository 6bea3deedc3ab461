"""Pooling: direct loops, one (n, c) plane per prange task, so threads write disjoint memory (rules 2, 3). The
2×2 windows every 2 (LeNet's and most CNNs') have their own loops, which vectorize."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import check_input, contiguous, register
from cnnpipe.shapes import check_pool_mode, out_size


class PoolCache(NamedTuple):
    """What pool2d_backward needs: the input's shape and dtype, the window, and max-pool's winners."""
    mode: str                             # "max" | "mean"
    xshape: tuple                         # N,C,H,W
    dtype: np.dtype
    size: int                             # R
    stride: int                           # S
    arg: np.ndarray | None                # max: each window's winner, its position h*W + w in the input plane,
                                          # N,C,Ho,Wo int32; mean: None


@njit(nogil=True, cache=True, error_model="numpy")
def _maxpool_plane(xp, R, S, yp, ap):
    """One plane: y = max over each R×R window; arg = its winner's position h*W + w in the plane: the first maximum
    (strictly greater takes over), or a NaN, which wins wherever it is (NaN propagates, as in PyTorch). The
    comparison picks with selects, not branches: random data would mispredict every other one."""
    Ho, Wo = yp.shape                         # yp, ap Ho,Wo; xp H,W
    W = xp.shape[1]
    for ho in range(Ho):
        for wo in range(Wo):
            h0, w0 = ho * S, wo * S
            best, k = xp[h0, w0], h0 * W + w0
            for i in range(R):
                for j in range(R):
                    v = xp[h0 + i, w0 + j]
                    take = (v > best) | (v != v)
                    best = v if take else best
                    k = (h0 + i) * W + w0 + j if take else k
            yp[ho, wo] = best
            ap[ho, wo] = k


@njit(nogil=True, cache=True, error_model="numpy")
def _maxpool_plane_2x2(xp, yp, ap):
    """_maxpool_plane for 2×2 windows every 2, as vector code: the maximum first, then the first position that
    holds it. True when the plane holds a NaN (the caller then redoes it with _maxpool_plane's NaN rule)."""
    Ho, Wo = yp.shape                         # yp, ap Ho,Wo; xp H,W
    W = np.int32(xp.shape[1])
    nan = False
    for ho in range(Ho):
        r0, r1, yr, ar = xp[2 * ho], xp[2 * ho + 1], yp[ho], ap[ho]
        row = np.int32(2 * ho) * W                # the window's top-left at 2*ho*W + 2*wo
        for wo in range(Wo):
            a, b, c, d = r0[2 * wo], r0[2 * wo + 1], r1[2 * wo], r1[2 * wo + 1]
            top = a if a >= b else b
            bottom = c if c >= d else d
            m = top if top >= bottom else bottom
            tl = row + np.int32(2 * wo)
            k = tl + W + np.int32(1)
            k = tl + W if c == m else k
            k = tl + np.int32(1) if b == m else k
            k = tl if a == m else k
            yr[wo] = m
            ar[wo] = k
            nan |= (a != a) | (b != b) | (c != c) | (d != d)
    return nan


@njit(parallel=True, cache=True, error_model="numpy")
def _maxpool_forward(x, R, S, y, arg):
    """y = max over each R×R window, arg its winner's offset (see _maxpool_plane); one (n, c) plane per task."""
    N, C, Ho, Wo = y.shape                    # y, arg N,C,Ho,Wo; x N,C,H,W
    for r in prange(N * C):
        n, c = r // C, r % C
        if R != 2 or S != 2 or _maxpool_plane_2x2(x[n, c], y[n, c], arg[n, c]):
            _maxpool_plane(x[n, c], R, S, y[n, c], arg[n, c])


@njit(parallel=True, cache=True, error_model="numpy")
def _maxpool_backward(dy, arg, dx):
    """Rule 2: δ goes only to each window's recorded winner (its position in the plane); overlapping windows
    accumulate."""
    N, C, Ho, Wo = dy.shape                   # dy, arg N,C,Ho,Wo; dx N,C,H,W (fresh, C-contiguous)
    for r in prange(N * C):
        n, c = r // C, r % C
        plane = dx[n, c].reshape(-1)
        plane[:] = 0
        for ho in range(Ho):
            dr, ar = dy[n, c, ho], arg[n, c, ho]
            for wo in range(Wo):
                plane[ar[wo]] += dr[wo]


@njit(parallel=True, cache=True, error_model="numpy")
def _meanpool_forward(x, R, S, y):
    """y = mean over each R×R window."""
    N, C, Ho, Wo = y.shape                    # y N,C,Ho,Wo; x N,C,H,W
    inv = 1.0 / (R * R)
    for r in prange(N * C):
        n, c = r // C, r % C
        xp, yp = x[n, c], y[n, c]
        if R == 2 and S == 2:                 # the common window, as vector code
            for ho in range(Ho):
                r0, r1, yr = xp[2 * ho], xp[2 * ho + 1], yp[ho]
                for wo in range(Wo):
                    yr[wo] = (r0[2 * wo] + r0[2 * wo + 1] + r1[2 * wo] + r1[2 * wo + 1]) * inv
            continue
        for ho in range(Ho):
            for wo in range(Wo):
                acc = xp[ho * S, wo * S] * 0
                for i in range(R):
                    for j in range(R):
                        acc += xp[ho * S + i, wo * S + j]
                yp[ho, wo] = acc * inv


@njit(parallel=True, cache=True, error_model="numpy")
def _meanpool_backward(dy, R, S, dx):
    """Rule 3: every neuron of a window gets δ/R²; overlapping windows accumulate. Each task zeroes the plane
    it scatters into (no separate serial pass over dx)."""
    N, C, Ho, Wo = dy.shape                   # dy N,C,Ho,Wo; dx N,C,H,W
    inv = 1.0 / (R * R)
    for r in prange(N * C):
        n, c = r // C, r % C
        dx[n, c] = 0
        if R == 2 and S == 2:                 # the common window, as vector code: four stores, no adds
            for ho in range(Ho):
                r0, r1, dr = dx[n, c, 2 * ho], dx[n, c, 2 * ho + 1], dy[n, c, ho]
                for wo in range(Wo):
                    g = dr[wo] * inv
                    r0[2 * wo] = g
                    r0[2 * wo + 1] = g
                    r1[2 * wo] = g
                    r1[2 * wo + 1] = g
            continue
        for ho in range(Ho):
            for wo in range(Wo):
                g = dy[n, c, ho, wo] * inv
                for i in range(R):
                    for j in range(R):
                        dx[n, c, ho * S + i, wo * S + j] += g


def pool2d_forward(x: np.ndarray, size: int = 2, stride: int = 2,
                   mode: str = "max") -> tuple[np.ndarray, PoolCache]:
    """Max or mean over size×size windows every `stride`; a remainder that fits no window is dropped."""
    x = check_input(x, "pool2d_forward input x")
    check_pool_mode(mode, "numba pool2d")
    N, C, H, W = x.shape                                 # x N,C,H,W
    R, S = int(size), int(stride)
    Ho, Wo = out_size(H, R, S, what="numba pool2d"), out_size(W, R, S, what="numba pool2d")
    y = np.empty((N, C, Ho, Wo), x.dtype)                # y N,C,Ho,Wo
    if mode == "max":
        arg = np.empty((N, C, Ho, Wo), np.int32)         # winner offset i*R+j in its window
        _maxpool_forward(x, R, S, y, arg)
        return y, PoolCache("max", x.shape, x.dtype, R, S, arg)
    _meanpool_forward(x, R, S, y)
    return y, PoolCache("mean", x.shape, x.dtype, R, S, None)


def pool2d_backward(dy: np.ndarray, cache: PoolCache) -> np.ndarray:
    """Rule 2 (max: δ to the recorded winner) or rule 3 (mean: δ/R² to every neuron of the window)."""
    dy = contiguous(dy, cache.dtype)                     # dy N,C,Ho,Wo
    dx = np.empty(cache.xshape, cache.dtype)             # dx N,C,H,W (fresh; kernels zero it)
    if cache.mode == "max":
        _maxpool_backward(dy, cache.arg, dx)
    else:
        _meanpool_backward(dy, cache.size, cache.stride, dx)
    return dx


def _warm(dtype: np.dtype) -> None:
    """Both modes, forward and backward, 2×2 windows and others."""
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5)).astype(dtype)
    for mode in ("max", "mean"):
        for size in (2, 3):
            y, cache = pool2d_forward(x, size, 2, mode)
            pool2d_backward(y, cache)


register(__name__, (_maxpool_forward, _maxpool_backward, _meanpool_forward, _meanpool_backward), _warm,
         inner=(_maxpool_plane, _maxpool_plane_2x2))
