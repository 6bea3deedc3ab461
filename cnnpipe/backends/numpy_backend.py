"""numpy backend: the fast readable kernels, im2col + GEMM (DESIGN.md backend contract, rules 2-6). The derivation's
formulas spelled out literally are the reference backend's (cnnpipe/backends/reference.py); the tests check this
one against it, against PyTorch and against finite differences.

Dimension letters, fixed for the whole module:
    N batch, C input channels, F filters, H,W input size, K kernel size,
    Hp,Wp zero-padded input size, Ho,Wo output size, S stride, P pad.

    y, cache   = conv2d_forward(x, w, b, stride=1, pad=0)          # x N,C,H,W  w F,C,K,K  b F -> y N,F,Ho,Wo
    dx, dw, db = conv2d_backward(dy, cache, need_dx=True)          # rules 4 (without h'), 5, 6
    y, cache   = pool2d_forward(x, size=2, stride=2, mode="max")   # "max" | "mean"
    dx         = pool2d_backward(dy, cache)                        # rules 2, 3

Convolution is im2col + GEMM: one copy of a sliding-window view gathers every window into a buffer ordered
(N, C,K,K, Ho,Wo), so one batched `W2d @ col` gives y as N,F,Ho,Wo with no transpose. Backward
reuses the buffer: rule 5 is `(col @ δᵀ)ᵀ`, rule 4 is `col2im(W2dᵀ @ δ)` (K² strided slice-adds), the
transposed convolution, which equals rule 4's full convolution of δ with the flipped kernel. Everything stays
in the input's dtype (float32 in, float32 out).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnpipe.shapes import conv_output, pool_output

# im2col buffers above this many bytes are built one chunk of samples at a time and not cached
# (backward rebuilds them), e.g. C=64, K=5, N=256 at 28x28 would need 1.3 GB at once.
COL_CHUNK_BYTES = 256 * 2**20


def _zeropad(x, P):
    """Zero-pad the last two axes by P on every side (a copy even for P=0 is avoided)."""
    if P == 0:
        return x
    N, C, H, W = x.shape
    xp = np.zeros((N, C, H + 2 * P, W + 2 * P), dtype=x.dtype)  # N,C,Hp,Wp
    xp[:, :, P:P + H, P:P + W] = x
    return xp


def _im2col(xp, K, S, Ho, Wo):
    """Gather every K×K window of xp into col[n, c,ki,kj, ho,wo] = xp[n, c, S*ho+ki, S*wo+kj].

    The windows are a strided view of xp (no copy); one copy lays them out, faster than K² slice-copies."""
    N, C = xp.shape[:2]
    windows = sliding_window_view(xp, (K, K), axis=(2, 3))[:, :, :S * Ho:S, :S * Wo:S]  # N,C,Ho,Wo,K,K view
    col = np.empty((N, C, K, K, Ho, Wo), dtype=xp.dtype)  # N,C,K,K,Ho,Wo
    np.copyto(col, windows.transpose(0, 1, 4, 5, 2, 3))
    return col.reshape(N, C * K * K, Ho * Wo)  # N,CKK,HoWo


def _col2im(dcol, C, K, S, Ho, Wo, Hp, Wp):
    """Adjoint of _im2col: every window's gradient is added back where it was read (K² slice-adds).

    Stride 1 takes dcol in "wide rows" (n, CKK, Ho*Wp): output row ho spans all Wp padded columns,
    those past Wo carrying zero δ, so each of the K² adds is one long contiguous run of the flat
    padded image: dxflat[n, c, (ho+ki)*Wp + wo+kj] += dcol[n, c,ki,kj, ho*Wp+wo] (one long add, not Ho short ones).
    """
    N = dcol.shape[0]
    if S == 1:
        dcol = dcol.reshape(N, C, K, K, Ho * Wp)  # n,C,K,K,HoWp
        dflat = np.zeros((N, C, Hp * Wp + K - 1), dtype=dcol.dtype)  # n,C,HpWp + tail the last row spills into
        for ki in range(K):
            for kj in range(K):
                dflat[:, :, ki * Wp + kj:ki * Wp + kj + Ho * Wp] += dcol[:, :, ki, kj]
        return dflat[:, :, :Hp * Wp].reshape(N, C, Hp, Wp)  # n,C,Hp,Wp
    dcol = dcol.reshape(N, C, K, K, Ho, Wo)
    dxp = np.zeros((N, C, Hp, Wp), dtype=dcol.dtype)  # N,C,Hp,Wp
    for ki in range(K):
        for kj in range(K):
            dxp[:, :, ki:ki + S * Ho:S, kj:kj + S * Wo:S] += dcol[:, :, ki, kj]
    return dxp


def _chunks(N, bytes_per_sample):
    """Sample ranges whose im2col buffer stays under COL_CHUNK_BYTES (at least one sample each)."""
    step = max(1, min(N, COL_CHUNK_BYTES // max(1, bytes_per_sample)))
    return [slice(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


# ----------------------------------------------------------------------------- convolution

def conv2d_forward(x, w, b, stride=1, pad=0):
    """y[n,f] = b[f] + Σ_c correlate(zeropad(x[n,c]), w[f,c]) sampled every `stride` pixels."""
    S, P = int(stride), int(pad)
    Ho, Wo = conv_output(x, w, b, S, P)                                   # checks the shapes fit first
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    w2d = w.astype(x.dtype, copy=False).reshape(F, C * K * K)  # F,CKK
    xp = _zeropad(x, P)  # N,C,Hp,Wp
    y = np.empty((N, F, Ho * Wo), dtype=x.dtype)  # N,F,HoWo
    chunks = _chunks(N, C * K * K * Ho * Wo * x.itemsize)
    col = None
    for sl in chunks:
        col = _im2col(xp[sl], K, S, Ho, Wo)  # n,CKK,HoWo
        np.matmul(w2d, col, out=y[sl])  # n,F,HoWo
    y += b.astype(x.dtype, copy=False)[:, None]
    # one chunk: keep its im2col buffer for backward; several: keep xp and rebuild them there
    col, xp = (col, None) if len(chunks) == 1 else (None, xp)
    return y.reshape(N, F, Ho, Wo), ((N, C, H, W), (H + 2 * P, W + 2 * P), w2d, K, S, P, col, xp)


def conv2d_backward(dy, cache, need_dx=True):
    """Rules 4 (without h'), 5, 6: dx = full conv of δ with the flipped kernel, dw = zeropad(x) ⋆ δ, db = Σδ.

    dx is computed as col2im(W2dᵀ @ δ), which is the same sum as rule 4's flipped-kernel full
    convolution (the reference backend writes that one out). h'(a) is applied by the activation layer
    (rule 7). need_dx=False skips rule 4 and returns dx=None (the first layer needs no input δ).
    """
    (N, C, H, W), (Hp, Wp), w2d, K, S, P, col, xp = cache
    F, dtype = w2d.shape[0], w2d.dtype
    Ho, Wo = dy.shape[2:]
    dy3 = np.ascontiguousarray(dy, dtype=dtype).reshape(N, F, Ho * Wo)  # N,F,HoWo
    db = dy3.sum(axis=(0, 2))  # F                                             rule 6
    dwT = np.zeros((C * K * K, F), dtype=dtype)  # CKK,F
    if need_dx and S == 1:  # δ in wide rows for _col2im: Wp columns a row, zeros past Wo
        delta_wide = np.zeros((N, F, Ho, Wp), dtype=dtype)  # N,F,Ho,Wp
        delta_wide[..., :Wo] = dy3.reshape(N, F, Ho, Wo)
        delta_wide = delta_wide.reshape(N, F, Ho * Wp)  # N,F,HoWp
    else:
        delta_wide = dy3  # N,F,HoWo
    dxps = []
    for sl in _chunks(N, C * K * K * Ho * Wo * dtype.itemsize):
        if xp is not None:  # chunked forward: rebuild this chunk's columns
            col = _im2col(xp[sl], K, S, Ho, Wo)  # n,CKK,HoWo
        # rule 5 as dWᵀ = col @ δᵀ: BLAS runs this operand order faster than δ @ colᵀ (docs/numba.md)
        dwT += np.matmul(col, dy3[sl].transpose(0, 2, 1)).sum(axis=0)  # CKK,F
        if need_dx:
            dcol = np.matmul(w2d.T, delta_wide[sl])  # n,CKK,HoWo (HoWp at stride 1)   rule 4
            dxps.append(_col2im(dcol, C, K, S, Ho, Wo, Hp, Wp))  # n,C,Hp,Wp
    dx = None
    if need_dx:
        dxp = dxps[0] if len(dxps) == 1 else np.concatenate(dxps)  # N,C,Hp,Wp
        dx = np.ascontiguousarray(dxp[:, :, P:P + H, P:P + W])  # N,C,H,W
    return dx, np.ascontiguousarray(dwT.T).reshape(F, C, K, K), db


# ----------------------------------------------------------------------------- pooling

def pool2d_forward(x, size=2, stride=2, mode="max"):
    """Max or mean over size×size windows every `stride` pixels; rows/cols left over are dropped."""
    k, S = int(size), int(stride)
    Ho, Wo = pool_output(x, k, S, mode)                                   # checks mode and shape
    N, C, H, W = x.shape
    if mode == "mean":  # k² strided slice-adds (numpy sums over a tiny reshaped axis slowly)
        y = x[:, :, 0:S * Ho:S, 0:S * Wo:S].copy()  # N,C,Ho,Wo
        for o in range(1, k * k):
            ki, kj = divmod(o, k)
            y += x[:, :, ki:ki + S * Ho:S, kj:kj + S * Wo:S]
        y *= 1.0 / (k * k)
        return y, (mode, x.shape, x.dtype, k, S, None)
    # max: a running max over the k² window offsets in row-major order; `arg` records the winner's
    # offset ki*k+kj. Only a strictly larger value takes over, so ties go to the first maximum.
    # (Faster than reshape + argmax over a k*k axis: argmax over a tiny last axis is slow in numpy.)
    y = x[:, :, 0:S * Ho:S, 0:S * Wo:S].copy()  # N,C,Ho,Wo
    arg = np.zeros((N, C, Ho, Wo), dtype=np.uint8 if k * k <= 256 else np.int32)  # N,C,Ho,Wo
    for o in range(1, k * k):
        ki, kj = divmod(o, k)
        v = x[:, :, ki:ki + S * Ho:S, kj:kj + S * Wo:S]  # N,C,Ho,Wo
        # arg < o so far, hence max(arg, better*o) sets o exactly where v wins
        np.maximum(arg, np.multiply(v > y, o, dtype=arg.dtype), out=arg)
        np.maximum(y, v, out=y)
    return y, (mode, x.shape, x.dtype, k, S, arg)


def pool2d_backward(dy, cache):
    """Rules 2, 3: max sends δ to the recorded winner only; mean sends δ/size² to every window
    member. Overlapping windows accumulate; dropped remainder rows/cols get 0."""
    mode, (N, C, H, W), dtype, k, S, arg = cache
    Ho, Wo = dy.shape[2:]
    dy = dy.astype(dtype, copy=False)
    tiles = k == S and H == S * Ho and W == S * Wo  # the windows cover dx exactly once: no zeroing pass
    dx = np.empty((N, C, H, W), dtype=dtype) if tiles else np.zeros((N, C, H, W), dtype=dtype)  # N,C,H,W
    share = dy * (1.0 / (k * k)) if mode == "mean" else None  # N,C,Ho,Wo  rule 3: δ/size² to each member
    for o in range(k * k):
        ki, kj = divmod(o, k)
        dxo = dx[:, :, ki:ki + S * Ho:S, kj:kj + S * Wo:S]  # N,C,Ho,Wo view: offset o of every window
        if k <= S:  # windows do not overlap: each element of dx is written once, in place
            if mode == "mean":
                dxo[...] = share  # rule 3
            else:
                np.multiply(dy, arg == o, out=dxo)  # rule 2: δ to the winner only
        else:  # overlapping windows accumulate
            dxo += share if mode == "mean" else dy * (arg == o)
    return dx


# ----------------------------------------------------------------------------- activations

def relu_forward(x):
    """y = max(x, 0)."""
    return np.maximum(x, 0)


def relu_backward(delta, y):
    """Rule 7: δ times h'(a) = [a > 0], read off the forward output y (y > 0 exactly where a > 0)."""
    return delta * (y > 0)


# ----------------------------------------------------------------------------- dense layers

def matmul(a, b):
    """a @ b for the dense layers (forward x Wᵀ, backward δᵀx and δW): numpy's BLAS, its own threads."""
    return a @ b


# ----------------------------------------------------------------------------- optimizer updates

def flush_subnormal(a):
    """a with every entry whose magnitude is below the dtype's smallest normal number set to 0 (in place): the
    momentum and Adam buffers of a unit whose gradient stays 0 decay geometrically and would otherwise spend
    hundreds of steps in subnormal numbers, on which x86 cores compute many times slower (docs/numba.md)."""
    np.copyto(a, 0, where=np.abs(a) < np.finfo(a.dtype).tiny)


def sgd_update(p, g, v, lr, momentum=0.0, nesterov=False, weight_decay=0.0, first=False):
    """PyTorch's SGD step on p in place: g' = g + wd·p; v = g' on the first step, else momentum·v + g' (flushed
    below the smallest normal); p -= lr·(g' + momentum·v if nesterov else v). v is None without momentum (then
    p -= lr·g')."""
    T = p.dtype.type
    if weight_decay:
        g = g + T(weight_decay) * p
    if v is not None:
        if first:                       # PyTorch initialises the buffer with the first gradient
            v[...] = g
        else:
            v *= T(momentum)
            v += g
            flush_subnormal(v)
        g = g + T(momentum) * v if nesterov else v
    p -= T(lr) * g


def adam_update(p, g, m, v, lr, b1, b2, eps, weight_decay, t):
    """PyTorch's Adam step t (1-based) on p, m, v in place: g' = g + wd·p; m = b1·m + (1-b1)·g';
    v = b2·v + (1-b2)·g'² (both flushed below the smallest normal); p -= lr/(1-b1ᵗ) · m / (√v/√(1-b2ᵗ) + eps)."""
    T = p.dtype.type
    if weight_decay:
        g = g + T(weight_decay) * p
    m *= T(b1)
    m += T(1 - b1) * g
    flush_subnormal(m)
    v *= T(b2)
    v += T(1 - b2) * (g * g)
    flush_subnormal(v)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    denom = np.sqrt(v) / T(np.sqrt(bc2)) + T(eps)
    p -= T(lr / bc1) * (m / denom)
