"""Convolution: im2col + one GEMM per batch chunk, each chunk a task of one parallel region (rules 4, 5, 6); thin
layers with unit stride go to direct.py's direct convolution instead."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe import ConfigError
from cnnpipe.backends.numba import direct
from cnnpipe.backends.numba.runtime import (
    NO_4D,
    NO_COLS,
    Lease,
    blas_gemm,
    check_input,
    contiguous,
    copy_row,
    even_bounds,
    gemm,
    give_back,
    lease,
    parts,
    register,
    scratch,
    single_blas,
)
from cnnpipe.shapes import out_size

COL_CHUNK_BYTES = 256 << 10  # im2col bytes per batch chunk: a chunk's columns stay in L2 (docs/numba.md)
KEEP_COL_BYTES = 16 << 20  # forward keeps a batch's columns up to this size for backward; larger ones are rebuilt
# from the padded input, which costs less than reading them back from memory (docs/numba.md)


class ConvCache(NamedTuple):
    """What conv2d_backward needs; backward only reads it. `cols` lends forward's columns to the first backward,
    which reads them and then ends the lease (the buffer goes back to the pool); a later backward on this cache
    finds the lease void and rebuilds them from x."""
    x: np.ndarray                         # N,C,H,W
    w: np.ndarray                         # F,C,K,K
    stride: int
    pad: int
    cols: Lease | None                    # flat C,K,K,N,Ho,Wo by chunk (sample-major); None: too big to keep
    bounds: np.ndarray | None             # the chunks the kept columns are laid out by
    direct: bool = False                  # computed by direct.py (no columns)
    xp: np.ndarray | None = None          # direct: the zero-padded input N,C,Hp,Wp, which rule 5 reads again


# ----------------------------------------------------------------------------------------------------
# kernels. The per-chunk steps are serial kernels called inside the chunk kernels' prange.

# The copy loops index slices from 0 (numba then knows no index is negative, and the loops vectorize).

@njit(nogil=True, cache=True, error_model="numpy")
def _im2col(xp, n0, S, col):
    """col[c,kh,kw,j,ho,wo] = xp[n0+j, c, ho*S+kh, wo*S+kw], xp the zero-padded input; one (c, j) per task."""
    C, K, _, nb, Ho, Wo = col.shape           # col C,K,K,nb,Ho,Wo; xp N,C,Hp,Wp
    for r in range(C * nb):
        c = r // nb
        j = r % nb
        xc = xp[n0 + j, c]
        for kh in range(K):
            for kw in range(K):
                dst = col[c, kh, kw, j]
                for ho in range(Ho):
                    d = dst[ho]
                    if S == 1:                # unit stride: contiguous rows, vectorized copy (a loop here:
                        src = xc[ho + kh, kw:kw + Wo]     # runtime.copy_row measured slower, docs/numba.md)
                        for wo in range(Wo):
                            d[wo] = src[wo]
                    else:
                        src = xc[ho * S + kh]
                        for wo in range(Wo):
                            d[wo] = src[wo * S + kw]


@njit(nogil=True, cache=True, error_model="numpy")
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
                src = dcol[c, kh, kw, j]
                for ho in range(Ho):
                    s = src[ho]
                    if S == 1:
                        d = plane[ho + kh, kw:kw + Wo]
                        for wo in range(Wo):
                            d[wo] += s[wo]
                    else:
                        d = plane[ho * S + kh]
                        for wo in range(Wo):
                            d[wo * S + kw] += s[wo]
        out = dx[n0 + j, c]
        for h in range(H):
            copy_row(out[h], plane[h + pad, pad:pad + W])


@njit(nogil=True, cache=True, error_model="numpy")
def _add_bias_to_nfp(y2d, b, n0, y):
    """y[n0+j, f, :] = y2d[f, j, :] + b[f]: bias add fused with the (F,nb,P) -> (N,F,P) reorder."""
    F, nb, P = y2d.shape                      # y2d F,nb,P
    for r in range(nb * F):
        j = r // F
        f = r % F
        bf = b[f]
        for p in range(P):
            y[n0 + j, f, p] = y2d[f, j, p] + bf


@njit(nogil=True, cache=True, error_model="numpy")
def _delta_to_fnp(dy, n0, dyT):
    """dyT[f, j, :] = dy[n0+j, f, :]: δ reordered (N,F,P) -> (F,nb,P) for rule 4's sgemm."""
    F, nb, P = dyT.shape                      # dyT F,nb,P
    for r in range(F * nb):
        f = r // nb
        j = r % nb
        for p in range(P):
            dyT[f, j, p] = dy[n0 + j, f, p]


@njit(nogil=True, cache=True, error_model="numpy")
def _delta_to_pf(dy, n0, dyPF):
    """dyPF[j*P + p, f] = dy[n0+j, f, p]: δ as (nb*P, F), the layout in which rule 5's sgemm col2d @ dyPF runs
    fastest (docs/numba.md)."""
    nb_P, F = dyPF.shape                      # dyPF nb*P, F; dy N,F,P
    P = dy.shape[2]
    for j in range(nb_P // P):
        d = dy[n0 + j]                        # F,P
        out = dyPF[j * P:(j + 1) * P]         # P,F
        for p in range(P):
            row = out[p]
            for f in range(F):
                row[f] = d[f, p]


@njit(nogil=True, cache=True, error_model="numpy")
def _chunk_cols(kept, n0, nb, col_shape):
    """Chunk (n0, nb)'s column array C,K,K,nb,Ho,Wo: its slice of kept (flat, sample-major) when kept is not
    empty, else a temporary (contents undefined; an empty kept still carries the dtype)."""
    C, K, Ho, Wo = col_shape
    size = C * K * K * Ho * Wo
    if kept.size:
        return kept[n0 * size:(n0 + nb) * size].reshape((C, K, K, nb, Ho, Wo))
    return np.empty((C, K, K, nb, Ho, Wo), kept.dtype)


@njit(parallel=True, cache=True, error_model="numpy")
def _conv_forward_chunks(xp, w2d, b, S, bounds, col_shape, kept, ywork, y3, fn):
    """Forward, one batch chunk per task: im2col -> one sgemm W2d @ col (fn: single-threaded BLAS inside
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
        gemm(fn, w2d, False, col.reshape((CKK, nb * P)), False, y2d)
        _add_bias_to_nfp(y2d.reshape((F, nb, P)), b, n0, y3)


@njit(parallel=True, cache=True, error_model="numpy")
def _conv_backward_chunks(dy3, xp, w2d, S, pad, bounds, groups, col_shape, kept, need_dx, dx, dwork, pfwork, parts,
                          fn):
    """Backward, one group of consecutive batch chunks per task (groups[g]..groups[g+1]), chunk by chunk: rule 5
    parts[g] = Σ over the group's chunks, in order, of col2d @ δ as (nb*P, F) in pfwork, i.e. dW2dᵀ (the GEMM
    accumulates); rule 4 dx = col2im(W2dᵀ @ δ2d), δ2d reordered to (F,nb,P) in dwork, the product in a chunk-sized
    temporary. Columns come from kept (forward's, only read) or are rebuilt from xp."""
    C, K, Ho, Wo = col_shape
    F = w2d.shape[0]
    P, CKK = Ho * Wo, C * K * K
    for g in prange(len(groups) - 1):
        for i in range(groups[g], groups[g + 1]):
            n0, nb = bounds[i], bounds[i + 1] - bounds[i]
            dyPF = pfwork[n0 * F * P:(n0 + nb) * F * P].reshape((nb * P, F))   # δ as nb*P, F
            _delta_to_pf(dy3, n0, dyPF)
            col = _chunk_cols(kept, n0, nb, col_shape)
            if not kept.size:                                         # not kept: rebuilt from xp
                _im2col(xp, n0, S, col)
            gemm(fn, col.reshape((CKK, nb * P)), False, dyPF, False, parts[g], i > groups[g])   # C*K*K, F
            if need_dx:
                dyT = dwork[n0 * F * P:(n0 + nb) * F * P].reshape((F, nb, P))   # δ as F, nb, P
                _delta_to_fnp(dy3, n0, dyT)
                dcol = np.empty((CKK, nb * P), dx.dtype)              # C*K*K, nb*P
                gemm(fn, w2d, True, dyT.reshape((F, nb * P)), False, dcol)
                _col2im(dcol.reshape((C, K, K, nb, Ho, Wo)), n0, S, pad, dx)


@njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
def _bias_grad(dy3, db):
    """Rule 6: db[f] = Σ_n Σ_p δ[n,f,p]. One filter per task: each sample's plane summed in vector lanes
    (reassoc), the planes' sums added in sample order in float64: the same bits for any thread count."""
    N, F, P = dy3.shape                       # dy3 N,F,P; db F
    for f in prange(F):
        total = 0.0
        for n in range(N):
            d = dy3[n, f]
            s = np.float32(0)                 # float32 zero: unifies to float64 with float64 data
            for p in range(P):
                s += d[p]
            total += s
        db[f] = total


@njit(parallel=True, cache=True, error_model="numpy")
def _zeropad(x, pad, xp):
    """xp = x with `pad` zeros on all four sides."""
    N, C, H, W = x.shape                      # x N,C,H,W; xp N,C,Hp,Wp
    for r in prange(N * C):
        n, c = r // C, r % C
        xp[n, c] = 0
        for h in range(H):
            copy_row(xp[n, c, h + pad, pad:pad + W], x[n, c, h])


# ----------------------------------------------------------------------------------------------------
# work split and buffers

def _chunks(N, bytes_per_sample):
    """Chunk bounds over range(N): chunks of at most COL_CHUNK_BYTES of columns each, and at least one per
    thread of the run's budget (a multiple of it where the batch allows). Returns int64 [0, ..., N]."""
    T = parts()
    count = max(-(-N * bytes_per_sample // COL_CHUNK_BYTES), 1)
    count = min(N, -(-count // T) * T)
    nb = -(-N // count)
    return np.array([*range(0, N, nb), N], np.int64)


def _padded(x, pad, keep=False):
    """zeropad(x) in a reused work buffer, or a fresh array when a cache keeps it (x itself when pad is 0)."""
    if pad == 0:
        return x
    N, C, H, W = x.shape
    shape = (N, C, H + 2 * pad, W + 2 * pad)             # N,C,Hp,Wp
    xp = np.empty(shape, x.dtype) if keep else scratch("xp", shape, x.dtype)
    _zeropad(x, pad, xp)
    return xp


# ----------------------------------------------------------------------------------------------------
# the contract

def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1,
                   pad: int = 0) -> tuple[np.ndarray, ConvCache]:
    """y = zeropad(x) ⋆ w + b (cross-correlation, like PyTorch): direct.py's direct convolution for a thin layer
    with unit stride, else im2col + GEMM. The cache keeps x and w (and, for im2col, the columns when they fit
    KEEP_COL_BYTES: backward then skips its im2col)."""
    x = check_input(x, "conv2d_forward input x")        # x N,C,H,W
    w = contiguous(w, x.dtype)                           # w F,C,K,K
    b = contiguous(b, x.dtype)                           # b F
    N, C, H, W = x.shape
    F, K = w.shape[0], w.shape[-1]
    if w.shape != (F, C, K, K) or b.shape != (F,):
        raise ConfigError(f"numba backend: conv2d_forward got x {x.shape}, w {w.shape}, b {b.shape}; w must be "
                          f"F,C,K,K with C = {C} input channels and b must hold F values. Check the layer's "
                          f"in_channels and kernel shape.")
    S, pad = int(stride), int(pad)
    if direct.suits(C, F, K, S):                         # thin layer: no columns
        Ho, Wo = out_size(H, K, S, pad, what="numba conv2d"), out_size(W, K, S, pad, what="numba conv2d")
        y = np.empty((N, F, Ho, Wo), x.dtype)            # y N,F,Ho,Wo (fresh)
        xp = _padded(x, pad, keep=True)
        direct.direct_forward(xp, w, b, y)
        return y, ConvCache(x, w, S, pad, None, None, direct=True, xp=xp)
    return _im2col_forward(x, w, b, S, pad)


def _im2col_forward(x, w, b, S, pad):
    """conv2d_forward by im2col + one sgemm per batch chunk (x, w, b checked and contiguous)."""
    dt = x.dtype
    N, C, H, W = x.shape
    F, K = w.shape[0], w.shape[-1]
    Ho, Wo = out_size(H, K, S, pad, what="numba conv2d"), out_size(W, K, S, pad, what="numba conv2d")
    P, CKK = Ho * Wo, C * K * K
    y = np.empty((N, F, Ho, Wo), dt)                     # y N,F,Ho,Wo (fresh)
    y3 = y.reshape(N, F, P)
    w2d = w.reshape(F, CKK)                              # F, C*K*K
    xp = _padded(x, pad)                                 # xp N,C,Hp,Wp
    cols = lease(N * CKK * P, dt) if N * CKK * P * dt.itemsize <= KEEP_COL_BYTES else None
    bounds = _chunks(N, CKK * P * dt.itemsize)          # chunk i: samples bounds[i]..bounds[i+1]
    kept = NO_COLS[dt.str] if cols is None else cols.array
    with single_blas():
        _conv_forward_chunks(xp, w2d, b, S, bounds, (C, K, Ho, Wo), kept, scratch("y2d", (N * F * P,), dt), y3,
                             blas_gemm(dt))
    return y, ConvCache(x, w, S, pad, cols, bounds)


def conv2d_backward(dy: np.ndarray, cache: ConvCache,
                    need_dx: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Rules 4 (without h'), 5, 6. dx = col2im(W2dᵀ @ δ2d), the transposed conv, i.e. the full conv of δ
    with the flipped kernel (rule 4); dW = (col2d @ δ as (N·P, F))ᵀ, the valid correlation of zeropad(x) with δ
    (rule 5), one partial per group of chunks, summed in group order; db = the sum of δ (rule 6). dx is None when
    need_dx is False (the first layer)."""
    x, w, S, pad = cache.x, cache.w, cache.stride, cache.pad
    kept = cache.cols.array if cache.cols is not None and cache.cols.valid else None   # else rebuilt
    dt = x.dtype
    dy = contiguous(dy, dt)                              # dy N,F,Ho,Wo
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, Ho, Wo = dy.shape
    P, CKK = Ho * Wo, C * K * K
    dy3 = dy.reshape(N, F, P)
    db = np.empty(F, dt)
    _bias_grad(dy3, db)                                  # rule 6
    dx = np.empty((N, C, H, W), dt) if need_dx else None
    if cache.direct:
        dx, dw = _direct_backward(dy, cache.xp, w, pad, dx)
        return dx, dw, db
    xp = _padded(x, pad) if kept is None else NO_4D[dt.str]   # xp N,C,Hp,Wp
    bounds = _chunks(N, CKK * P * dt.itemsize) if kept is None else cache.bounds   # kept: laid out by these
    groups = even_bounds(len(bounds) - 1, parts())       # the run's thread budget: the same bits for any threads
    partial = np.empty((len(groups) - 1, CKK, F), dt)    # rule 5 partials of dW2dᵀ, one per group of chunks
    with single_blas():
        _conv_backward_chunks(dy3, xp, w.reshape(F, CKK), S, pad, bounds, groups, (C, K, Ho, Wo),
                              NO_COLS[dt.str] if kept is None else kept, need_dx,
                              dx if need_dx else NO_4D[dt.str],
                              scratch("dyT", (N * F * P,), dt) if need_dx else NO_COLS[dt.str],
                              scratch("dyPF", (N * F * P,), dt), partial, blas_gemm(dt))
    if kept is not None:
        give_back(cache.cols)                            # the lease ends: a later backward rebuilds the columns
    dw2dT = partial[0]
    for part in partial[1:]:                             # fixed order: deterministic
        dw2dT += part
    return dx, np.ascontiguousarray(dw2dT.T).reshape(F, C, K, K), db


def _direct_backward(dy, xp, w, pad, dx):
    """Rules 4 and 5 by direct.py, xp the forward's zero-padded input: (dx or None, dW)."""
    N, C = xp.shape[:2]
    F, _, K, _ = w.shape
    _, _, Ho, Wo = dy.shape
    dw = np.empty((F, C, K, K), dy.dtype)
    direct.direct_weight_grad(xp, dy, dw)
    if dx is not None:
        dyp = scratch("dyp", (N, F, Ho + 2 * (K - 1), Wo + 2 * (K - 1)), dy.dtype)   # zeropad(δ, K-1)
        _zeropad(dy, K - 1, dyp)
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))     # C,F,K,K flipped
        direct.direct_input_grad(dyp, wflip, pad, dx)
    return dx, dw


def _warm(dtype: np.dtype) -> None:
    """Both im2col loops (unit and other strides), kept and rebuilt columns, with and without dx."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = np.zeros(3, dtype)
    for stride in (1, 2):
        y, cache = _im2col_forward(x, w, b, stride, 1)
        conv2d_backward(y, cache, need_dx=True)          # kept columns
        conv2d_backward(y, cache, need_dx=False)         # rebuilt columns


register(__name__, (_conv_forward_chunks, _conv_backward_chunks, _bias_grad, _zeropad), _warm,
         inner=(_im2col, _col2im, _add_bias_to_nfp, _delta_to_fnp, _delta_to_pf, _chunk_cols))
