"""Optimizer updates: one fused pass per parameter (numpy makes several passes and temporaries), split over the
threads for large parameters; each reproduces the numpy backend's float operation order."""
from __future__ import annotations

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import contiguous, parts, register

UPDATE_SPLIT = 1 << 16  # parameters with fewer elements update in one serial call


@njit(nogil=True, cache=True, error_model="numpy")
def _sgd_range(p, g, v, lr, momentum, wd, nesterov, has_v, first, tiny, lo, hi):
    """PyTorch's SGD step on elements lo..hi of the flat p (and v), in the numpy backend's operation order, the
    momentum buffer flushed to 0 below `tiny` (the smallest normal: numpy_backend.flush_subnormal says why).
    (Slices indexed from 0, here and below: numba then knows no index is negative, and the loop vectorizes.)"""
    ps, gs, vs = p[lo:hi], g[lo:hi], v[lo:hi]
    zero = tiny - tiny                        # 0 in the dtype (tiny * 0 would be a float64)
    for i in range(hi - lo):
        gi = gs[i]
        if wd != 0:
            gi = gi + wd * ps[i]
        if has_v:
            vi = gi if first else vs[i] * momentum + gi
            vi = vi if first or abs(vi) >= tiny else zero
            vs[i] = vi
            gi = gi + momentum * vi if nesterov else vi
        ps[i] -= lr * gi


@njit(parallel=True, cache=True, error_model="numpy")
def _sgd_parallel(p, g, v, lr, momentum, wd, nesterov, has_v, first, tiny, T):
    """_sgd_range over T contiguous slices, one per thread (T passed in: reading numba's thread count inside
    a kernel makes it uncachable)."""
    n = p.size
    for t in prange(T):
        _sgd_range(p, g, v, lr, momentum, wd, nesterov, has_v, first, tiny, t * n // T, (t + 1) * n // T)


@njit(nogil=True, cache=True, error_model="numpy")
def _adam_range(p, g, m, v, lr_bc1, b1, c1, b2, c2, eps, sqrt_bc2, wd, tiny, lo, hi):
    """PyTorch's Adam step on elements lo..hi of the flat p, m, v, in the numpy backend's operation order
    (c1, c2 = 1 - b1, 1 - b2 rounded from float64, as numpy does), m and v flushed to 0 below `tiny`."""
    ps, gs, ms, vs = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    zero = tiny - tiny                        # 0 in the dtype (tiny * 0 would be a float64)
    for i in range(hi - lo):
        gi = gs[i]
        if wd != 0:
            gi = gi + wd * ps[i]
        mi = ms[i] * b1 + c1 * gi
        vi = vs[i] * b2 + c2 * (gi * gi)
        mi = mi if abs(mi) >= tiny else zero
        vi = vi if abs(vi) >= tiny else zero
        ms[i] = mi
        vs[i] = vi
        ps[i] -= lr_bc1 * (mi / (np.sqrt(vi) / sqrt_bc2 + eps))


@njit(parallel=True, cache=True, error_model="numpy")
def _adam_parallel(p, g, m, v, lr_bc1, b1, c1, b2, c2, eps, sqrt_bc2, wd, tiny, T):
    """_adam_range over T contiguous slices, one per thread."""
    n = p.size
    for t in prange(T):
        _adam_range(p, g, m, v, lr_bc1, b1, c1, b2, c2, eps, sqrt_bc2, wd, tiny, t * n // T, (t + 1) * n // T)


def _update(serial, parallel, size, args):
    """Run an update kernel: split by the run's thread budget for a large parameter, one serial call for a small
    one."""
    if size >= UPDATE_SPLIT and parts() > 1:
        parallel(*args, parts())
    else:
        serial(*args, 0, size)


def _flat(a, what):
    """The flat view of a C-contiguous parameter or optimizer buffer (updated in place, so never a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"numba backend: the {what} must be C-contiguous to be updated in place")
    return a.reshape(-1)


def sgd_update(p: np.ndarray, g: np.ndarray, v: np.ndarray | None, lr: float, momentum: float = 0.0,
               nesterov: bool = False, weight_decay: float = 0.0, first: bool = False) -> None:
    """PyTorch's SGD step on p in place (the numpy backend's formula), one fused pass over p, g and v: g' = g +
    wd·p; v = g' on the first step, else momentum·v + g' (flushed below the smallest normal); p -= lr·(g' +
    momentum·v if nesterov else v)."""
    T = p.dtype.type
    pf = _flat(p, "parameter")
    gf = contiguous(g, p.dtype).reshape(-1)
    vf = pf if v is None else _flat(v, "momentum buffer")   # no momentum: a stand-in the kernel never touches
    args = (pf, gf, vf, T(lr), T(momentum), T(weight_decay), bool(nesterov), v is not None, bool(first),
            T(np.finfo(p.dtype).tiny))
    _update(_sgd_range, _sgd_parallel, pf.size, args)


def adam_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, b1: float, b2: float,
                eps: float, weight_decay: float, t: int) -> None:
    """PyTorch's Adam step t on p, m, v in place (the numpy backend's formula), one fused pass."""
    T = p.dtype.type
    pf = _flat(p, "parameter")
    gf = contiguous(g, p.dtype).reshape(-1)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    args = (pf, gf, _flat(m, "Adam m buffer"), _flat(v, "Adam v buffer"), T(lr / bc1), T(b1), T(1 - b1), T(b2),
            T(1 - b2), T(eps), T(np.sqrt(bc2)), T(weight_decay), T(np.finfo(p.dtype).tiny))
    _update(_adam_range, _adam_parallel, pf.size, args)


def _warm(dtype: np.dtype) -> None:
    """The serial and the parallel update of both optimizers."""
    for n in (1, UPDATE_SPLIT):
        p, g, m, v = (np.zeros(n, dtype) for _ in range(4))
        sgd_update(p, g, m, 0.1, 0.9, True, 0.1, False)
        adam_update(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.1, 1)


register(__name__, (_sgd_range, _sgd_parallel, _adam_range, _adam_parallel), _warm)
