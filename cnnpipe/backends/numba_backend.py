"""numba backend: the fast kernels. The numpy backend is the readable reference; this one must agree
with it (float64 ~1e-10, float32 ~1e-5) and is tested against it and PyTorch (tests/test_backend_numba.py).

Letters: N batch, C input channels, F filters, H,W input size, K kernel, S stride, Ho,Wo output size,
P = Ho*Wo output pixels, R pool window size, nb samples in one batch chunk.

How the work is split (PERF_NOTES.md):
- conv forward: numba packs im2col columns col (C,K,K,nb,Ho,Wo) in parallel, one sgemm W2d @ col runs in
  BLAS (np.dot, called from Python, so numba threads and BLAS threads never run at the same time), and a
  numba pass adds the bias while reordering (F,nb,P) -> (N,F,P).
- conv backward: rule 6 db is a fixed-order sum; rule 5 dW = δ2d @ colᵀ (sgemm, chunks added in fixed
  order); rule 4 dx = col2im(W2dᵀ @ δ2d), the transposed convolution, which equals the full convolution
  of δ with the flipped kernel.
- The batch is processed in chunks so a chunk's columns stay in the last-level cache; the columns are
  rebuilt in backward instead of being kept, so memory stays bounded for any batch size.
- pools: direct loops, prange over (n, c) planes, so threads write disjoint memory.
Every kernel is deterministic for a fixed thread count: parallel loops write disjoint outputs and every
reduction runs in one fixed order. Work buffers are reused per thread; returned arrays are always fresh.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

from cnnpipe import ConfigError

COL_CHUNK_BYTES = 8 << 20  # im2col bytes per batch chunk: big enough for an efficient sgemm, small for L3


# ----------------------------------------------------------------------------------------------------
# numba kernels (parallel over disjoint outputs; cache=True so a second process loads, not compiles)

@njit(parallel=True, cache=True)
def _im2col(x, n0, K, S, pad, col):
    """col[c,kh,kw,j,ho,wo] = zeropad(x)[n0+j, c, ho*S+kh, wo*S+kw]."""
    N, C, H, W = x.shape                      # x N,C,H,W
    _, _, _, nb, Ho, Wo = col.shape           # col C,K,K,nb,Ho,Wo
    for r in prange(C * K * K * nb):
        j = r % nb
        kw = (r // nb) % K
        kh = (r // (nb * K)) % K
        c = r // (nb * K * K)
        n = n0 + j
        lo = min(Wo, max(0, (pad - kw + S - 1) // S))           # first wo with wi = wo*S+kw-pad >= 0
        hi = max(lo, min(Wo, (W - 1 + pad - kw) // S + 1))      # one past the last wo with wi < W
        for ho in range(Ho):
            h = ho * S + kh - pad
            if h < 0 or h >= H:
                for wo in range(Wo):
                    col[c, kh, kw, j, ho, wo] = 0
                continue
            for wo in range(lo):
                col[c, kh, kw, j, ho, wo] = 0
            for wo in range(lo, hi):
                col[c, kh, kw, j, ho, wo] = x[n, c, h, wo * S + kw - pad]
            for wo in range(hi, Wo):
                col[c, kh, kw, j, ho, wo] = 0


@njit(parallel=True, cache=True)
def _col2im(dcol, n0, S, pad, dx):
    """dx[n0+j] = sum over (kh,kw) of dcol scattered back to the input positions it was copied from."""
    N, C, H, W = dx.shape                     # dx N,C,H,W
    _, K, _, nb, Ho, Wo = dcol.shape          # dcol C,K,K,nb,Ho,Wo
    for r in prange(nb * C):
        j = r // C
        c = r % C
        n = n0 + j
        for h in range(H):
            for w in range(W):
                dx[n, c, h, w] = 0
        for kh in range(K):
            for kw in range(K):
                lo = min(Wo, max(0, (pad - kw + S - 1) // S))
                hi = max(lo, min(Wo, (W - 1 + pad - kw) // S + 1))
                for ho in range(Ho):
                    h = ho * S + kh - pad
                    if h < 0 or h >= H:
                        continue
                    for wo in range(lo, hi):
                        dx[n, c, h, wo * S + kw - pad] += dcol[c, kh, kw, j, ho, wo]


@njit(parallel=True, cache=True)
def _add_bias_to_nfp(y2d, b, n0, y):
    """y[n0+j, f, :] = y2d[f, j, :] + b[f]: bias add fused with the (F,nb,P) -> (N,F,P) reorder."""
    F, nb, P = y2d.shape                      # y2d F,nb,P
    for r in prange(nb * F):
        j = r // F
        f = r % F
        bf = b[f]
        for p in range(P):
            y[n0 + j, f, p] = y2d[f, j, p] + bf


@njit(parallel=True, cache=True)
def _delta_to_fnp(dy, n0, dyT):
    """dyT[f, j, :] = dy[n0+j, f, :]: δ reordered (N,F,P) -> (F,nb,P) for the sgemms."""
    F, nb, P = dyT.shape                      # dyT F,nb,P
    for r in prange(F * nb):
        f = r // nb
        j = r % nb
        for p in range(P):
            dyT[f, j, p] = dy[n0 + j, f, p]


@njit(parallel=True, cache=True)
def _bias_grad(dy, db):
    """Rule 6: db[f] = sum of δ[:, f] (float64 accumulator, fixed order)."""
    N, F, P = dy.shape                        # dy N,F,P
    for f in prange(F):
        acc = 0.0
        for n in range(N):
            for p in range(P):
                acc += dy[n, f, p]
        db[f] = acc


@njit(parallel=True, cache=True)
def _maxpool_forward(x, R, S, y, arg):
    """y = max over each R×R window; arg = row-major offset i*R+j of the first max in the window."""
    N, C, H, W = x.shape                      # x N,C,H,W
    _, _, Ho, Wo = y.shape                    # y, arg N,C,Ho,Wo
    for r in prange(N * C):
        n = r // C
        c = r % C
        for ho in range(Ho):
            for wo in range(Wo):
                best = x[n, c, ho * S, wo * S]
                bi = 0
                for i in range(R):
                    for j in range(R):
                        v = x[n, c, ho * S + i, wo * S + j]
                        if v > best or (v != v and best == best):  # first NaN wins, like np.argmax
                            best = v
                            bi = i * R + j
                y[n, c, ho, wo] = best
                arg[n, c, ho, wo] = bi


@njit(parallel=True, cache=True)
def _maxpool_backward(dy, arg, R, S, dx):
    """Rule 2: δ goes only to each window's recorded winner; overlapping windows accumulate."""
    N, C, Ho, Wo = dy.shape                   # dy, arg N,C,Ho,Wo
    _, _, H, W = dx.shape                     # dx N,C,H,W
    for r in prange(N * C):
        n = r // C
        c = r % C
        for h in range(H):
            for w in range(W):
                dx[n, c, h, w] = 0
        for ho in range(Ho):
            for wo in range(Wo):
                k = arg[n, c, ho, wo]
                dx[n, c, ho * S + k // R, wo * S + k % R] += dy[n, c, ho, wo]


@njit(parallel=True, cache=True)
def _meanpool_forward(x, R, S, y):
    """y = mean over each R×R window."""
    N, C, H, W = x.shape                      # x N,C,H,W
    _, _, Ho, Wo = y.shape                    # y N,C,Ho,Wo
    inv = 1.0 / (R * R)
    for r in prange(N * C):
        n = r // C
        c = r % C
        for ho in range(Ho):
            for wo in range(Wo):
                acc = x[n, c, ho * S, wo * S] * 0
                for i in range(R):
                    for j in range(R):
                        acc += x[n, c, ho * S + i, wo * S + j]
                y[n, c, ho, wo] = acc * inv


@njit(parallel=True, cache=True)
def _meanpool_backward(dy, R, S, dx):
    """Rule 3: every neuron of a window gets δ/R²; overlapping windows accumulate."""
    N, C, Ho, Wo = dy.shape                   # dy N,C,Ho,Wo
    _, _, H, W = dx.shape                     # dx N,C,H,W
    inv = 1.0 / (R * R)
    for r in prange(N * C):
        n = r // C
        c = r % C
        for h in range(H):
            for w in range(W):
                dx[n, c, h, w] = 0
        for ho in range(Ho):
            for wo in range(Wo):
                g = dy[n, c, ho, wo] * inv
                for i in range(R):
                    for j in range(R):
                        dx[n, c, ho * S + i, wo * S + j] += g


# ----------------------------------------------------------------------------------------------------
# work buffers: one growing flat buffer per (role, dtype) and per thread; never returned to the caller

_tls = threading.local()


def _scratch(role, shape, dtype):
    """A C-contiguous work array of `shape`, reused across calls (contents undefined)."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    size = int(np.prod(shape))
    key = (role, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def _as(a, dtype):
    """C-contiguous array of `dtype` (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=dtype)


def _check_input(x, what):
    """x must be a float32/float64 N,C,H,W array; returns it C-contiguous."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ConfigError(f"numba backend: {what} has dtype {x.dtype}, but the kernels work on float32 or "
                          f"float64 arrays. Convert the input with .astype(np.float32) before calling.")
    if x.ndim != 4:
        raise ConfigError(f"numba backend: {what} has shape {x.shape}, but an N,C,H,W array is expected. "
                          f"Put conv and pool layers before Flatten, on image-shaped inputs.")
    return x


def _chunks(N, bytes_per_sample):
    """Split range(N) into equal-ish (n0, nb) chunks of at most COL_CHUNK_BYTES of columns each."""
    nb = max(1, min(N, COL_CHUNK_BYTES // max(1, bytes_per_sample)))
    count = -(-N // nb)
    nb = -(-N // count)
    return [(n0, min(nb, N - n0)) for n0 in range(0, N, nb)]


def _out_size(n, k, s, p, what):
    """Output length of a k-window sliding with stride s over n (+2p padding); remainder dropped."""
    if k < 1 or s < 1 or p < 0:
        raise ConfigError(f"numba backend: {what} size {k}, stride {s} and pad {p} must satisfy size >= 1, "
                          f"stride >= 1, pad >= 0. Fix the layer's size/stride/pad in the model config.")
    o = (n + 2 * p - k) // s + 1
    if n + 2 * p < k:
        raise ConfigError(f"numba backend: {what} window {k} (stride {s}, pad {p}) does not fit an input of "
                          f"size {n}; make the kernel smaller, pad more, or feed a larger input.")
    return o


# ----------------------------------------------------------------------------------------------------
# the contract

def conv2d_forward(x, w, b, stride=1, pad=0):
    """y = zeropad(x) ⋆ w + b (cross-correlation, like PyTorch); the cache keeps x and w, not columns."""
    x = _check_input(x, "conv2d_forward input x")       # x N,C,H,W
    dt = x.dtype
    w = _as(w, dt)                                       # w F,C,K,K
    b = _as(b, dt)                                       # b F
    N, C, H, W = x.shape
    F, K = w.shape[0], w.shape[-1]
    if w.shape != (F, C, K, K) or b.shape != (F,):
        raise ConfigError(f"numba backend: conv2d_forward got x {x.shape}, w {w.shape}, b {b.shape}; w must be "
                          f"F,C,K,K with C = {C} input channels and b must hold F values. Check the layer's "
                          f"in_channels and kernel shape.")
    S, pad = int(stride), int(pad)
    Ho, Wo = _out_size(H, K, S, pad, "conv"), _out_size(W, K, S, pad, "conv")
    P, CKK = Ho * Wo, C * K * K
    y = np.empty((N, F, Ho, Wo), dt)                     # y N,F,Ho,Wo (fresh)
    w2d = w.reshape(F, CKK)                              # F, C*K*K
    for n0, nb in _chunks(N, CKK * P * dt.itemsize):
        col = _scratch("col", (C, K, K, nb, Ho, Wo), dt)
        _im2col(x, n0, K, S, pad, col)
        y2d = _scratch("y2d", (F, nb, P), dt)            # F, nb, P
        np.dot(w2d, col.reshape(CKK, nb * P), out=y2d.reshape(F, nb * P))
        _add_bias_to_nfp(y2d, b, n0, y.reshape(N, F, P))
    return y, (x, w, S, pad)


def conv2d_backward(dy, cache, need_dx=True):
    """Rules 4 (without h'), 5, 6. dx = col2im(W2dᵀ @ δ2d), the transposed conv, i.e. the full conv of δ
    with the flipped kernel (rule 4); dW = δ2d @ colᵀ, the valid correlation of zeropad(x) with δ (rule 5);
    db = the sum of δ (rule 6). dx is None when need_dx is False (the first layer)."""
    x, w, S, pad = cache
    dt = x.dtype
    dy = _as(dy, dt)                               # dy N,F,Ho,Wo
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, Ho, Wo = dy.shape
    P, CKK = Ho * Wo, C * K * K
    dy3 = dy.reshape(N, F, P)
    db = np.empty(F, dt)                                 # rule 6
    _bias_grad(dy3, db)
    dw = np.empty((F, C, K, K), dt)                      # rule 5, chunks summed in fixed order
    dw2d = dw.reshape(F, CKK)
    dx = np.empty((N, C, H, W), dt) if need_dx else None
    w2dT = w.reshape(F, CKK).T                           # C*K*K, F (a view; BLAS reads it transposed)
    for i, (n0, nb) in enumerate(_chunks(N, CKK * P * dt.itemsize)):
        col = _scratch("col", (C, K, K, nb, Ho, Wo), dt)
        _im2col(x, n0, K, S, pad, col)
        col2d = col.reshape(CKK, nb * P)
        dyT = _scratch("dyT", (F, nb, P), dt)            # δ as F, nb, P
        _delta_to_fnp(dy3, n0, dyT)
        dyT2d = dyT.reshape(F, nb * P)
        if i == 0:
            np.dot(dyT2d, col2d.T, out=dw2d)
        else:
            part = _scratch("dw", (F, CKK), dt)
            np.dot(dyT2d, col2d.T, out=part)
            dw2d += part
        if need_dx:                                      # rule 4: reuse col's buffer for dcol
            np.dot(w2dT, dyT2d, out=col2d)
            _col2im(col, n0, S, pad, dx)
    return dx, dw, db


def pool2d_forward(x, size=2, stride=2, mode="max"):
    """Max or mean over size×size windows every `stride`; a remainder that fits no window is dropped."""
    x = _check_input(x, "pool2d_forward input x")
    if mode not in ("max", "mean"):
        raise ConfigError(f"numba backend: pool mode '{mode}' is unknown; use pool mode 'max' or 'mean'.")
    N, C, H, W = x.shape                                 # x N,C,H,W
    R, S = int(size), int(stride)
    Ho, Wo = _out_size(H, R, S, 0, "pool"), _out_size(W, R, S, 0, "pool")
    y = np.empty((N, C, Ho, Wo), x.dtype)                # y N,C,Ho,Wo
    if mode == "max":
        arg = np.empty((N, C, Ho, Wo), np.int32)         # winner offset i*R+j in its window
        _maxpool_forward(x, R, S, y, arg)
        return y, ("max", x.shape, x.dtype, R, S, arg)
    _meanpool_forward(x, R, S, y)
    return y, ("mean", x.shape, x.dtype, R, S, None)


def pool2d_backward(dy, cache):
    """Rule 2 (max: δ to the recorded winner) or rule 3 (mean: δ/R² to every neuron of the window)."""
    mode, xshape, dt, R, S, arg = cache
    dy = _as(dy, dt)                                     # dy N,C,Ho,Wo
    dx = np.empty(xshape, dt)                               # dx N,C,H,W (fresh; kernels zero it)
    if mode == "max":
        _maxpool_backward(dy, arg, R, S, dx)
    else:
        _meanpool_backward(dy, R, S, dx)
    return dx


def warmup(dtype=np.float32):
    """Compile (first process) or load from the cache (later ones) every kernel for `dtype`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = np.zeros(3, dtype)
    y, cache = conv2d_forward(x, w, b, 1, 1)
    conv2d_backward(y, cache, need_dx=True)
    conv2d_backward(y, cache, need_dx=False)
    for mode in ("max", "mean"):
        p, pc = pool2d_forward(x, 2, 2, mode)
        pool2d_backward(p, pc)
