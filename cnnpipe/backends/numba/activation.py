"""ReLU: one pass each way (numpy makes a mask and a product, with temporaries), rule 7's h'(a); split over the
threads for large arrays, one serial call (no parallel region to hand over) for small ones."""
from __future__ import annotations

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import parts, register

RELU_SPLIT = 1 << 15  # arrays with fewer elements go through in one serial call

# The loops index slices from 0: numba then knows no index is negative, and the loop vectorizes.


@njit(nogil=True, cache=True, error_model="numpy")
def _relu_forward_serial(x, y):
    """y = max(x, 0) for flat arrays (a NaN stays NaN)."""
    for i in range(x.size):
        v = x[i]
        y[i] = v if not v <= 0 else 0


@njit(nogil=True, cache=True, error_model="numpy")
def _relu_backward_serial(delta, y, dx):
    """Rule 7: dx = δ·h'(a) with h'(a) = [a > 0] = [y > 0], for flat arrays."""
    for i in range(delta.size):
        dx[i] = delta[i] if y[i] > 0 else 0


@njit(parallel=True, cache=True, error_model="numpy")
def _relu_forward(x, y, T):
    """_relu_forward_serial over T contiguous slices."""
    n = x.size
    for t in prange(T):
        lo, hi = t * n // T, (t + 1) * n // T
        _relu_forward_serial(x[lo:hi], y[lo:hi])


@njit(parallel=True, cache=True, error_model="numpy")
def _relu_backward(delta, y, dx, T):
    """_relu_backward_serial over T contiguous slices."""
    n = delta.size
    for t in prange(T):
        lo, hi = t * n // T, (t + 1) * n // T
        _relu_backward_serial(delta[lo:hi], y[lo:hi], dx[lo:hi])


def relu_forward(x: np.ndarray) -> np.ndarray:
    """y = max(x, 0), a fresh array of x's shape and dtype."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    if x.size >= RELU_SPLIT and parts() > 1:
        _relu_forward(x.reshape(-1), y.reshape(-1), parts())
    else:
        _relu_forward_serial(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(delta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rule 7: δ times h'(a) = [a > 0], read off the forward output y."""
    delta = np.ascontiguousarray(delta, dtype=y.dtype)
    dx = np.empty_like(delta)
    if delta.size >= RELU_SPLIT and parts() > 1:
        _relu_backward(delta.reshape(-1), y.reshape(-1), dx.reshape(-1), parts())
    else:
        _relu_backward_serial(delta.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


def _warm(dtype: np.dtype) -> None:
    """The serial and the split pass, both ways."""
    for n in (4, RELU_SPLIT):
        x = np.ones(n, dtype)
        y = np.empty_like(x)
        _relu_forward_serial(x, y)
        _relu_forward(x, y, 2)
        _relu_backward_serial(x, y, y)
        _relu_backward(x, y, y, 2)


register(__name__, (_relu_forward, _relu_backward, _relu_forward_serial, _relu_backward_serial), _warm)
