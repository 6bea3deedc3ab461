"""ReLU: one parallel pass each way (numpy makes a mask and a product, with temporaries), rule 7's h'(a)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import parts, register

RELU_SPLIT = 1 << 15  # arrays with fewer elements go through in one serial call


# Each task works on slices indexed from 0: numba then knows no index is negative, and the loop vectorizes.

@njit(parallel=True, cache=True)
def _relu_forward(x, y, T):
    """y = max(x, 0) over T contiguous slices of the flat arrays (a NaN stays NaN)."""
    n = x.size
    for t in prange(T):
        lo, hi = t * n // T, (t + 1) * n // T
        xs, ys = x[lo:hi], y[lo:hi]
        for i in range(hi - lo):
            v = xs[i]
            ys[i] = v if not v <= 0 else 0


@njit(parallel=True, cache=True)
def _relu_backward(delta, y, dx, T):
    """Rule 7: dx = δ·h'(a) with h'(a) = [a > 0] = [y > 0]."""
    n = delta.size
    for t in prange(T):
        lo, hi = t * n // T, (t + 1) * n // T
        ds, ys, out = delta[lo:hi], y[lo:hi], dx[lo:hi]
        for i in range(hi - lo):
            out[i] = ds[i] if ys[i] > 0 else 0


def _split(n: int) -> int:
    return parts() if n >= RELU_SPLIT else 1


def relu_forward(x: np.ndarray) -> np.ndarray:
    """y = max(x, 0), a fresh array of x's shape and dtype."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _relu_forward(x.reshape(-1), y.reshape(-1), _split(x.size))
    return y


def relu_backward(delta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rule 7: δ times h'(a) = [a > 0], read off the forward output y."""
    delta = np.ascontiguousarray(delta, dtype=y.dtype)
    dx = np.empty_like(delta)
    _relu_backward(delta.reshape(-1), y.reshape(-1), dx.reshape(-1), _split(delta.size))
    return dx


def _warm(dtype: np.dtype) -> None:
    x = np.ones(4, dtype)
    relu_backward(x, relu_forward(x))


register(__name__, (_relu_forward, _relu_backward), _warm)
