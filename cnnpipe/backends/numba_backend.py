"""numba backend: the fast kernels. The numpy backend is the readable reference; this one must agree
with it (float64 ~1e-10, float32 ~1e-5) and is tested against it and PyTorch (tests/test_backend_numba.py).

Letters: N batch, C input channels, F filters, H,W input size, K kernel, S stride, Ho,Wo output size,
P = Ho*Wo output pixels, R pool window size, nb samples in one batch chunk.

How the work is split (PERF_NOTES.md): every parallel step is one numba parallel region on numba's T threads
(OpenMP layer: ~1 µs hand-offs; see cnnpipe.backends.import_numba), and the GEMMs run inside those regions as
single-threaded BLAS (numba's np.dot calls scipy's OpenBLAS, pinned to one thread), so exactly T threads compute:
no BLAS/numba oversubscription and no Python between the steps of a layer.
- conv: the batch is cut into chunks (a chunk's columns stay in cache, at least one chunk per thread), one
  task per chunk (_conv_forward_chunks, _conv_backward_chunks).
  forward per chunk: im2col col (C,K,K,nb,Ho,Wo) -> one sgemm W2d @ col -> bias add fused with the
  (F,nb,P) -> (N,F,P) reorder.
  backward per chunk: δ reordered to (F,nb,P); rule 5 dW part = δ2d @ colᵀ (parts summed in chunk order);
  rule 4 dx = col2im(W2dᵀ @ δ2d), the transposed convolution, which equals the full convolution of δ
  with the flipped kernel. Rule 6 db is numpy's (deterministic) sum over samples and pixels. Forward keeps
  the batch's columns for backward when they fit KEEP_COL_BYTES (a training batch); bigger ones are rebuilt
  in backward, so memory stays bounded for any batch size. Kept column buffers go back to a small spare
  list once backward used them.
- pools: direct loops, prange over (n, c) planes, so threads write disjoint memory.
- dense layers (matmul): row blocks of the product, one np.dot each, in one parallel region; small products
  run in one call in the calling thread.
- optimizer updates (sgd_update, adam_update): one fused pass per parameter (numpy makes 3-6 passes and
  temporaries), split over the threads for large parameters: the convnet's SGD step 6.5 -> 3.5 ms.
Every kernel is deterministic for a fixed thread count: parallel loops write disjoint outputs and every
reduction runs in one fixed order. Work buffers are reused per thread; returned arrays are always fresh.
"""
from __future__ import annotations

import threading

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.backends import import_numba

numba = import_numba()                     # the OpenMP threading layer where there is one (see import_numba)
import scipy.linalg.cython_blas  # noqa: E402,F401  the BLAS numba's np.dot calls: loaded now, so it can be pinned
from numba import njit, prange  # noqa: E402

COL_CHUNK_BYTES = 256 << 10  # im2col bytes per batch chunk: a chunk's columns stay in L2 (LeNet step 2.7 -> 2.1 ms vs 4 MiB)
KEEP_COL_BYTES = 64 << 20  # forward keeps a batch's columns up to this size for backward (else rebuilt)


# ----------------------------------------------------------------------------------------------------
# numba kernels (cache=True so a second process loads, not compiles). The per-chunk conv steps are serial
# kernels called inside the chunk kernels' prange; every parallel loop writes disjoint outputs.

@njit(nogil=True, cache=True)
def _im2col(xp, n0, S, col):
    """col[c,kh,kw,j,ho,wo] = xp[n0+j, c, ho*S+kh, wo*S+kw], xp the zero-padded input; one (c, j) per task."""
    C, K, _, nb, Ho, Wo = col.shape           # col C,K,K,nb,Ho,Wo; xp N,C,Hp,Wp
    for r in range(C * nb):
        c = r // nb
        j = r % nb
        n = n0 + j
        for kh in range(K):
            for kw in range(K):
                for ho in range(Ho):
                    if S == 1:                # unit stride: contiguous rows, vectorized copy
                        for wo in range(Wo):
                            col[c, kh, kw, j, ho, wo] = xp[n, c, ho + kh, wo + kw]
                    else:
                        for wo in range(Wo):
                            col[c, kh, kw, j, ho, wo] = xp[n, c, ho * S + kh, wo * S + kw]


@njit(nogil=True, cache=True)
def _col2im(dcol, n0, S, pad, dx):
    """dx[n0+j] = dcol scattered back (+=) to the input positions it was copied from, then uncropped of
    the padding; one (j, c) plane per task, accumulated in a local padded plane (fixed order)."""
    N, C, H, W = dx.shape                     # dx N,C,H,W
    _, K, _, nb, Ho, Wo = dcol.shape          # dcol C,K,K,nb,Ho,Wo
    for r in range(nb * C):
        j = r // C
        c = r % C
        plane = np.zeros((H + 2 * pad, W + 2 * pad), dx.dtype)   # Hp,Wp
        for kh in range(K):
            for kw in range(K):
                for ho in range(Ho):
                    if S == 1:
                        for wo in range(Wo):
                            plane[ho + kh, wo + kw] += dcol[c, kh, kw, j, ho, wo]
                    else:
                        for wo in range(Wo):
                            plane[ho * S + kh, wo * S + kw] += dcol[c, kh, kw, j, ho, wo]
        for h in range(H):
            for w in range(W):
                dx[n0 + j, c, h, w] = plane[h + pad, w + pad]


@njit(nogil=True, cache=True)
def _add_bias_to_nfp(y2d, b, n0, y):
    """y[n0+j, f, :] = y2d[f, j, :] + b[f]: bias add fused with the (F,nb,P) -> (N,F,P) reorder."""
    F, nb, P = y2d.shape                      # y2d F,nb,P
    for r in range(nb * F):
        j = r // F
        f = r % F
        bf = b[f]
        for p in range(P):
            y[n0 + j, f, p] = y2d[f, j, p] + bf


@njit(nogil=True, cache=True)
def _delta_to_fnp(dy, n0, dyT):
    """dyT[f, j, :] = dy[n0+j, f, :]: δ reordered (N,F,P) -> (F,nb,P) for the sgemms."""
    F, nb, P = dyT.shape                      # dyT F,nb,P
    for r in range(F * nb):
        f = r // nb
        j = r % nb
        for p in range(P):
            dyT[f, j, p] = dy[n0 + j, f, p]


@njit(nogil=True, cache=True)
def _chunk_cols(kept, n0, nb, col_shape):
    """Chunk (n0, nb)'s column array C,K,K,nb,Ho,Wo: its slice of kept (flat, sample-major) when kept is not
    empty, else a temporary (contents undefined; an empty kept still carries the dtype)."""
    C, K, Ho, Wo = col_shape
    size = C * K * K * Ho * Wo
    if kept.size:
        return kept[n0 * size:(n0 + nb) * size].reshape((C, K, K, nb, Ho, Wo))
    return np.empty((C, K, K, nb, Ho, Wo), kept.dtype)


@njit(parallel=True, cache=True)
def _conv_forward_chunks(xp, w2d, b, S, bounds, col_shape, kept, ywork, y3):
    """Forward, one batch chunk per task: im2col -> one sgemm W2d @ col (np.dot: single-threaded BLAS inside
    this parallel region) -> bias add fused with the (F,nb,P) -> (N,F,P) reorder. Chunk i spans samples
    bounds[i]..bounds[i+1]; its columns go to kept (flat, sample-major like every work buffer here) when kept
    is not empty, else to a temporary; its product to ywork (flat, N*F*P), reused across calls."""
    C, K, Ho, Wo = col_shape                  # col C,K,K,nb,Ho,Wo
    F = w2d.shape[0]                          # w2d F, C*K*K
    P, CKK = Ho * Wo, C * K * K
    for i in prange(len(bounds) - 1):
        n0, nb = bounds[i], bounds[i + 1] - bounds[i]
        col = _chunk_cols(kept, n0, nb, col_shape)
        _im2col(xp, n0, S, col)
        y2d = ywork[n0 * F * P:(n0 + nb) * F * P].reshape((F, nb * P))
        np.dot(w2d, col.reshape((CKK, nb * P)), y2d)
        _add_bias_to_nfp(y2d.reshape((F, nb, P)), b, n0, y3)


@njit(parallel=True, cache=True)
def _conv_backward_chunks(dy3, xp, w2d, S, pad, bounds, col_shape, kept, need_dx, dx, dwork, parts):
    """Backward, one batch chunk per task: δ reordered to (F,nb,P) in dwork; rule 5 parts[i] = δ2d @ colᵀ;
    rule 4 dx = col2im(W2dᵀ @ δ2d), the product written over the columns (no longer needed). Columns come from
    kept (forward's) or are rebuilt from xp."""
    C, K, Ho, Wo = col_shape
    F = w2d.shape[0]
    P, CKK = Ho * Wo, C * K * K
    for i in prange(len(bounds) - 1):
        n0, nb = bounds[i], bounds[i + 1] - bounds[i]
        dyT = dwork[n0 * F * P:(n0 + nb) * F * P].reshape((F, nb, P))   # δ as F, nb, P
        _delta_to_fnp(dy3, n0, dyT)
        dyT2d = dyT.reshape((F, nb * P))
        col = _chunk_cols(kept, n0, nb, col_shape)
        if not kept.size:                                         # not kept: rebuilt from xp
            _im2col(xp, n0, S, col)
        col2d = col.reshape((CKK, nb * P))
        np.dot(dyT2d, col2d.T, parts[i])                          # F, C*K*K
        if need_dx:
            np.dot(w2d.T, dyT2d, col2d)                           # dcol C*K*K, nb*P over the columns
            _col2im(col, n0, S, pad, dx)


@njit(parallel=True, cache=True)
def _matmul_rows(a, b, bounds, out):
    """out[r0:r1] = a[r0:r1] @ b for each row block (one np.dot per task)."""
    for i in prange(len(bounds) - 1):
        r0, r1 = bounds[i], bounds[i + 1]
        np.dot(a[r0:r1], b, out[r0:r1])


INNER_KERNELS = (_im2col, _col2im, _add_bias_to_nfp, _delta_to_fnp, _chunk_cols)   # called only inside the chunk kernels


@njit(parallel=True, cache=True)
def _zeropad(x, pad, xp):
    """xp = x with `pad` zeros on all four sides."""
    N, C, H, W = x.shape                      # x N,C,H,W
    _, _, Hp, Wp = xp.shape                   # xp N,C,Hp,Wp
    for r in prange(N * C):
        n = r // C
        c = r % C
        for h in range(Hp):
            for w in range(Wp):
                xp[n, c, h, w] = 0
        for h in range(H):
            for w in range(W):
                xp[n, c, h + pad, w + pad] = x[n, c, h, w]


@njit(parallel=True, cache=True)
def _maxpool_forward(x, R, S, y, arg):
    """y = max over each R×R window; arg = row-major offset i*R+j of the first max in the window."""
    N, C, H, W = x.shape                      # x N,C,H,W
    _, _, Ho, Wo = y.shape                    # y, arg N,C,Ho,Wo
    for r in prange(N * C):
        n = r // C
        c = r % C
        for ho in range(Ho):
            yrow = y[n, c, ho]                # Wo: running max over the window offsets, row at a time
            arow = arg[n, c, ho]              # Wo
            first = x[n, c, ho * S, 0:(Wo - 1) * S + 1:S]
            for wo in range(Wo):
                yrow[wo] = first[wo]
                arow[wo] = 0
            for o in range(1, R * R):         # row-major offsets; strict > keeps the first max
                i = o // R
                j = o % R
                src = x[n, c, ho * S + i, j:j + (Wo - 1) * S + 1:S]
                for wo in range(Wo):
                    v = src[wo]
                    best = yrow[wo]
                    if v > best or (v != v and best == best):  # first NaN wins, like np.argmax
                        yrow[wo] = v
                        arow[wo] = o


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


@njit(nogil=True, cache=True)
def _sgd_range(p, g, v, lr, momentum, wd, nesterov, has_v, first, lo, hi):
    """PyTorch's SGD step on elements lo..hi of the flat p (and v), in the numpy backend's operation order."""
    for i in range(lo, hi):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        if has_v:
            vi = gi if first else v[i] * momentum + gi
            v[i] = vi
            gi = gi + momentum * vi if nesterov else vi
        p[i] -= lr * gi


@njit(parallel=True, cache=True)
def _sgd_parallel(p, g, v, lr, momentum, wd, nesterov, has_v, first, T):
    """_sgd_range over T contiguous slices, one per thread (T passed in: reading numba's thread count inside
    a kernel makes it uncachable)."""
    n = p.size
    for t in prange(T):
        _sgd_range(p, g, v, lr, momentum, wd, nesterov, has_v, first, t * n // T, (t + 1) * n // T)


@njit(nogil=True, cache=True)
def _adam_range(p, g, m, v, lr_bc1, b1, c1, b2, c2, eps, sqrt_bc2, wd, lo, hi):
    """PyTorch's Adam step on elements lo..hi of the flat p, m, v, in the numpy backend's operation order
    (c1, c2 = 1 - b1, 1 - b2 rounded from float64, as numpy does)."""
    for i in range(lo, hi):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        mi = m[i] * b1 + c1 * gi
        vi = v[i] * b2 + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] -= lr_bc1 * (mi / (np.sqrt(vi) / sqrt_bc2 + eps))


@njit(parallel=True, cache=True)
def _adam_parallel(p, g, m, v, lr_bc1, b1, c1, b2, c2, eps, sqrt_bc2, wd, T):
    """_adam_range over T contiguous slices, one per thread."""
    n = p.size
    for t in prange(T):
        _adam_range(p, g, m, v, lr_bc1, b1, c1, b2, c2, eps, sqrt_bc2, wd, t * n // T, (t + 1) * n // T)


# ----------------------------------------------------------------------------------------------------
# work buffers and threads

_spare = {}                                 # (size, dtype) -> flat column buffers backward handed back


def _take(size, dtype):
    """A flat work buffer of `size` elements for kept columns: a spare one if backward returned one."""
    spare = _spare.get((size, np.dtype(dtype).str))
    return spare.pop() if spare else np.empty(size, dtype)


def _give_back(buf):
    """Backward is done with kept columns: keep up to two spares per size for the next forward."""
    spare = _spare.setdefault((buf.size, buf.dtype.str), [])
    if len(spare) < 2:
        spare.append(buf)


_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NO_COLS = {d.str: np.empty(0, d) for d in _DTYPES}             # "no kept columns" for the chunk kernels
_NO_4D = {d.str: np.empty((0, 0, 0, 0), d) for d in _DTYPES}    # "no padded input" / "no input gradient"
_tls = threading.local()


def _scratch(role, shape, dtype):
    """A C-contiguous work array of `shape`, reused across calls of the calling thread (contents undefined)."""
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
    """Chunk bounds over range(N): chunks of at most COL_CHUNK_BYTES of columns each, and at least one per
    thread (a multiple of the thread count where the batch allows). Returns int64 [0, ..., N]."""
    T = _workers()
    count = max(-(-N * bytes_per_sample // COL_CHUNK_BYTES), 1)
    count = min(N, -(-count // T) * T)
    nb = -(-N // count)
    return np.array([*range(0, N, nb), N], np.int64)


def _workers():
    """The thread budget: numba's thread count, as set by cnnpipe.backends.set_threads."""
    return max(1, numba.get_num_threads())


_BLAS = None


def _blas_libs():
    """threadpoolctl controllers of every loaded BLAS: numpy's OpenBLAS and scipy's (numba's np.dot calls
    scipy's BLAS; it is loaded with this module)."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        except Exception:  # pragma: no cover - threadpoolctl missing or unreadable: leave BLAS as it is
            _BLAS = []
    return _BLAS


class _single_blas:
    """BLAS single-threaded while a parallel region calls it from every numba thread (a threaded BLAS inside
    would oversubscribe: measured 8 ms stalls per call); the caller's settings come back afterwards."""

    def __enter__(self):
        self.libs = [(lib, n) for lib in _blas_libs() if (n := lib.get_num_threads()) != 1]
        for lib, _ in self.libs:                         # already 1 (set_threads does it): nothing to do
            lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, n in self.libs:
            lib.set_num_threads(n)


def _padded(x, pad):
    """zeropad(x) in a reused work buffer (x itself when pad is 0)."""
    if pad == 0:
        return x
    N, C, H, W = x.shape
    xp = _scratch("xp", (N, C, H + 2 * pad, W + 2 * pad), x.dtype)   # N,C,Hp,Wp
    _zeropad(x, pad, xp)
    return xp


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
    """y = zeropad(x) ⋆ w + b (cross-correlation, like PyTorch); the cache keeps x and w, and the columns
    when they fit KEEP_COL_BYTES (backward then skips its im2col)."""
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
    y3 = y.reshape(N, F, P)
    w2d = w.reshape(F, CKK)                              # F, C*K*K
    xp = _padded(x, pad)                                 # xp N,C,Hp,Wp
    kept = _take(N * CKK * P, dt) if N * CKK * P * dt.itemsize <= KEEP_COL_BYTES else None
    bounds = _chunks(N, CKK * P * dt.itemsize)          # chunk i: samples bounds[i]..bounds[i+1]
    with _single_blas():
        _conv_forward_chunks(xp, w2d, b, S, bounds, (C, K, Ho, Wo), _NO_COLS[dt.str] if kept is None else kept,
                             _scratch("y2d", (N * F * P,), dt), y3)
    return y, (x, w, S, pad, [kept, bounds])


def conv2d_backward(dy, cache, need_dx=True):
    """Rules 4 (without h'), 5, 6. dx = col2im(W2dᵀ @ δ2d), the transposed conv, i.e. the full conv of δ
    with the flipped kernel (rule 4); dW = δ2d @ colᵀ, the valid correlation of zeropad(x) with δ (rule 5),
    one partial per batch chunk, summed in chunk order; db = the sum of δ (rule 6). dx is None when
    need_dx is False (the first layer)."""
    x, w, S, pad, keep = cache
    kept, fwd_bounds = keep
    keep[0] = None                                       # kept columns serve one backward (then rebuilt)
    dt = x.dtype
    dy = _as(dy, dt)                                     # dy N,F,Ho,Wo
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, Ho, Wo = dy.shape
    P, CKK = Ho * Wo, C * K * K
    dy3 = dy.reshape(N, F, P)
    db = dy3.sum(axis=(0, 2))                            # rule 6 (numpy's pairwise sum: 3-5x faster than a
                                                         # prange over filters here, and deterministic)
    dx = np.empty((N, C, H, W), dt) if need_dx else None
    xp = _padded(x, pad) if kept is None else _NO_4D[dt.str]   # xp N,C,Hp,Wp
    bounds = _chunks(N, CKK * P * dt.itemsize) if kept is None else fwd_bounds   # kept: laid out by these
    parts = np.empty((len(bounds) - 1, F, CKK), dt)     # rule 5 partials, one per chunk
    with _single_blas():
        _conv_backward_chunks(dy3, xp, w.reshape(F, CKK), S, pad, bounds, (C, K, Ho, Wo),
                              _NO_COLS[dt.str] if kept is None else kept, need_dx,
                              dx if need_dx else _NO_4D[dt.str], _scratch("dyT", (N * F * P,), dt), parts)
    if kept is not None:
        _give_back(kept)
    dw2d = parts[0]
    for part in parts[1:]:                               # fixed order: deterministic
        dw2d += part
    return dx, dw2d.reshape(F, C, K, K), db


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


# Below this a dense product runs in the calling thread: measured on 2 cores, 64x400 @ 400x120 (6 MFLOP,
# LeNet's dense1) took 0.086 ms in one call and 0.104 ms split; 26 MFLOP: 0.32 ms one call, 0.24 ms split.
MATMUL_SPLIT_FLOPS = 2e7


def matmul(a, b):
    """a @ b for the dense layers (forward x Wᵀ, backward δᵀx and δW): the rows of `a` split over numba's T
    threads, each with single-threaded BLAS. Letting OpenBLAS thread these itself would leave its workers
    spinning (OPENBLAS_THREAD_TIMEOUT) on the cores that the next numba parallel region needs; every output
    row is one thread's sgemm, so the result is deterministic."""
    M, K = a.shape                                       # a M,K (any strides, e.g. δᵀ)
    N = b.shape[1]                                       # b K,N
    out = np.empty((M, N), np.result_type(a, b))         # M,N (fresh)
    a = a if a.dtype == out.dtype else a.astype(out.dtype)
    b = b if b.dtype == out.dtype else b.astype(out.dtype)
    if 2.0 * M * N * K < MATMUL_SPLIT_FLOPS or _workers() == 1:
        with _single_blas():                             # one call in the calling thread
            return np.dot(a, b, out=out)
    a = np.ascontiguousarray(a)                          # e.g. δᵀ: the row blocks must be contiguous
    b = b if b.flags.c_contiguous or b.flags.f_contiguous else np.ascontiguousarray(b)
    T = min(_workers(), M)
    with _single_blas():
        _matmul_rows(a, b, np.array([r * M // T for r in range(T + 1)], np.int64), out)
    return out


UPDATE_SPLIT = 1 << 16  # parameters with fewer elements update in one serial call


def _update(serial, parallel, size, args):
    """Run an update kernel: split over the threads for a large parameter, one serial call for a small one."""
    if size >= UPDATE_SPLIT and _workers() > 1:
        parallel(*args, _workers())
    else:
        serial(*args, 0, size)


def _flat(a, what):
    """The flat view of a C-contiguous parameter or optimizer buffer (updated in place, so never a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"numba backend: the {what} must be C-contiguous to be updated in place")
    return a.reshape(-1)


def sgd_update(p, g, v, lr, momentum=0.0, nesterov=False, weight_decay=0.0, first=False):
    """PyTorch's SGD step on p in place (the numpy backend's formula), one fused pass over p, g and v: g' = g +
    wd·p; v = g' on the first step, else momentum·v + g'; p -= lr·(g' + momentum·v if nesterov else v)."""
    T = p.dtype.type
    pf = _flat(p, "parameter")
    gf = _as(g, p.dtype).reshape(-1)
    vf = pf if v is None else _flat(v, "momentum buffer")   # no momentum: a stand-in the kernel never touches
    args = (pf, gf, vf, T(lr), T(momentum), T(weight_decay), bool(nesterov), v is not None, bool(first))
    _update(_sgd_range, _sgd_parallel, pf.size, args)


def adam_update(p, g, m, v, lr, b1, b2, eps, weight_decay, t):
    """PyTorch's Adam step t on p, m, v in place (the numpy backend's formula), one fused pass."""
    T = p.dtype.type
    pf = _flat(p, "parameter")
    gf = _as(g, p.dtype).reshape(-1)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    args = (pf, gf, _flat(m, "Adam m buffer"), _flat(v, "Adam v buffer"), T(lr / bc1), T(b1), T(1 - b1), T(b2),
            T(1 - b2), T(eps), T(np.sqrt(bc2)), T(weight_decay))
    _update(_adam_range, _adam_parallel, pf.size, args)


def warmup(dtype=np.float32):
    """Compile (first process) or load from the cache (later ones) every kernel for `dtype`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = np.zeros(3, dtype)
    for stride in (1, 2):                                # im2col's unit-stride and strided loops
        y, cache = conv2d_forward(x, w, b, stride, 1)
        conv2d_backward(y, cache, need_dx=True)
        conv2d_backward(y, cache, need_dx=False)
    for mode in ("max", "mean"):
        p, pc = pool2d_forward(x, 2, 2, mode)
        pool2d_backward(p, pc)
    a, bounds = np.ones((4, 3), dtype), np.array([0, 2, 4], np.int64)
    for bm in (np.ones((3, 5), dtype), np.ones((5, 3), dtype).T):   # split dense products: b = W or Wᵀ
        with _single_blas():
            _matmul_rows(a, bm, bounds, np.empty((4, 5), dtype))
    for n in (1, UPDATE_SPLIT):                          # serial and parallel optimizer updates
        p, g, m, v = (np.zeros(n, dtype) for _ in range(4))
        sgd_update(p, g, m, 0.1, 0.9, True, 0.1, False)
        adam_update(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.1, 1)
