"""reference backend: the derivation's formulas written out literally, to read beside the slides (rules 2-6).

Dimension letters, fixed for the whole module:
    N batch, C input channels, F filters, H,W input size, K kernel size, S stride, P pad,
    Hp,Wp zero-padded input size, Hf,Wf = Hp-K+1,Wp-K+1 the stride-1 output size, Ho,Wo output size.

Every spatial formula is one call of `conv2d(a, k, 'valid')` on planes; numpy broadcasting only repeats it
over samples, channels and filters (the leading axes). `conv2d` is what deep learning calls convolution:
a valid cross-correlation, out[p,q] = Σ_ij a[p+i, q+j]·k[i,j], with no flip (MATLAB's conv2 would flip k
itself); rule 4's flip is written out. A stride-S convolution is the stride-1 one kept every S pixels, so
its backward first puts δ back on the stride-1 grid (`dilate`) and is then the stride-1 rule.

    y      = Σ_c conv2d(zeropad(x, P), W, 'valid')[::S, ::S] + b                  forward
    δx     = crop(Σ_f conv2d(zeropad(dilate(δ), K-1), flip(W), 'valid'), P)       rule 4 (h' is rule 7's)
    ∂L/∂W  = Σ_n conv2d(zeropad(x, P), dilate(δ), 'valid')                        rule 5
    ∂L/∂b  = Σ δ                                                                  rule 6
    max-pool records each window's winner, δ goes back only to it                  rule 2
    mean-pool sends δ/size² to every neuron of the window                          rule 3

Slow on purpose: docs/derivation.md ties each rule to these functions, and the numpy and numba backends are
tested to compute the same numbers. The dense product and the optimizer updates are the numpy backend's.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cnnpipe.backends.numpy_backend import (  # noqa: F401  (the contract's rest)
    adam_update,
    matmul,
    relu_backward,
    relu_forward,
    sgd_update,
)
from cnnpipe.shapes import conv_output, pool_output

# ----------------------------------------------------------------------------- the slides' vocabulary

def conv2d(a: np.ndarray, k: np.ndarray, mode: str = "valid") -> np.ndarray:
    """out[p,q] = Σ_i Σ_j a[p+i, q+j]·k[i,j] over the last two axes, only where k fits inside a ('valid').

    Leading axes broadcast, so one call does every (sample, channel, filter) plane pair at once."""
    if mode != "valid":
        raise ValueError(f"conv2d: only mode 'valid' is written here (the slides zero-pad first), got {mode!r}")
    Kh, Kw = k.shape[-2:]
    Ho, Wo = a.shape[-2] - Kh + 1, a.shape[-1] - Kw + 1
    out = np.zeros(np.broadcast_shapes(a.shape[:-2], k.shape[:-2]) + (Ho, Wo), dtype=np.result_type(a, k))
    for i in range(Kh):
        for j in range(Kw):
            out += a[..., i:i + Ho, j:j + Wo] * k[..., i, j, None, None]   # ...,Ho,Wo
    return out


def zeropad(a: np.ndarray, p: int) -> np.ndarray:
    """p zeros on every side of the last two axes: the boundary neurons the slides add."""
    return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(p, p), (p, p)])


def crop(a: np.ndarray, p: int) -> np.ndarray:
    """Undo zeropad: the padding neurons are no input's, so their δ is dropped."""
    return a[..., p:a.shape[-2] - p, p:a.shape[-1] - p]


def flip(k: np.ndarray) -> np.ndarray:
    """fliplr(flipud(k)) on the last two axes: the kernel turned by 180°."""
    return k[..., ::-1, ::-1]


def dilate(delta: np.ndarray, S: int, shape: tuple[int, int]) -> np.ndarray:
    """δ of a stride-S output on the stride-1 grid `shape`: δ[i,j] at (S·i, S·j), zero where no output was kept
    (between the samples and at the remainder the stride dropped)."""
    out = np.zeros(delta.shape[:-2] + tuple(shape), dtype=delta.dtype)   # ...,Hf,Wf
    out[..., ::S, ::S] = delta
    return out


# ----------------------------------------------------------------------------- convolution

class ConvCache(NamedTuple):
    xp: np.ndarray      # N,C,Hp,Wp  zeropad(x, P)
    w: np.ndarray       # F,C,K,K    in x's dtype
    S: int
    P: int


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, pad: int = 0):
    """y[n,f] = b[f] + Σ_c conv2d(zeropad(x[n,c]), W[f,c], 'valid'), kept every `stride` pixels."""
    S, P = int(stride), int(pad)
    Ho, Wo = conv_output(x, w, b, S, P)                                   # checks the shapes fit first
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    w, b = w.astype(x.dtype, copy=False), b.astype(x.dtype, copy=False)
    xp = zeropad(x, P)                                                                # N,C,Hp,Wp
    # Σ over the channels one at a time (all at once would hold an N,F,C,Hf,Wf temporary)
    y = sum(conv2d(xp[:, None, c], w[None, :, c], "valid") for c in range(C))        # N,F,Hf,Wf   Σ over c
    y = y[:, :, ::S, ::S] + b[:, None, None]                                          # N,F,Ho,Wo
    return np.ascontiguousarray(y), ConvCache(xp, w, S, P)


def conv2d_backward(dy: np.ndarray, cache: ConvCache, need_dx: bool = True):
    """Rules 4 (without h'), 5, 6: δx = full conv of δ with the flipped kernel, ∂L/∂W = conv2d(zeropad(x), δ,
    'valid'), ∂L/∂b = Σδ. need_dx=False skips rule 4 (the first layer's input needs no δ) and returns dx=None."""
    xp, w, S, P = cache
    N, C, Hp, Wp = xp.shape
    F, _, K, _ = w.shape
    dy = dy.astype(w.dtype, copy=False)                                               # N,F,Ho,Wo
    delta = dilate(dy, S, (Hp - K + 1, Wp - K + 1))                                   # N,F,Hf,Wf
    db = dy.sum(axis=(0, 2, 3))                                                       # F            rule 6
    # rule 5, every (n, f, c) at once: N,F,C,K,K is small (the result is K×K), then Σ over the samples
    dw = conv2d(xp[:, None, :], delta[:, :, None], "valid").sum(axis=0)               # F,C,K,K      rule 5
    if not need_dx:
        return None, dw, db
    # rule 4: δ zero-padded by K-1 (the full convolution), the flipped kernel, Σ over the filters it fed
    dxp = sum(conv2d(zeropad(delta[:, f, None], K - 1), flip(w[f])[None], "valid")   # N,C,Hp,Wp    rule 4
              for f in range(F))
    return np.ascontiguousarray(crop(dxp, P)), dw, db                                 # N,C,H,W


# ----------------------------------------------------------------------------- pooling

class PoolCache(NamedTuple):
    mode: str
    x_shape: tuple      # N,C,H,W
    dtype: np.dtype
    size: int
    S: int
    winner: np.ndarray | None   # N,C,Ho,Wo  max: row-major index of the winner inside its window


def pool2d_forward(x: np.ndarray, size: int = 2, stride: int = 2, mode: str = "max"):
    """Max or mean over every size×size window, one every `stride` pixels; rows/cols left over are dropped.
    Max records each window's winner (the first maximum in row-major order) for rule 2."""
    k, S = int(size), int(stride)
    Ho, Wo = pool_output(x, k, S, mode)                                   # checks mode and shape
    N, C, H, W = x.shape
    y = np.empty((N, C, Ho, Wo), dtype=x.dtype)                                       # N,C,Ho,Wo
    winner = np.zeros((N, C, Ho, Wo), dtype=np.intp) if mode == "max" else None       # N,C,Ho,Wo
    for i in range(Ho):
        for j in range(Wo):
            window = x[:, :, i * S:i * S + k, j * S:j * S + k].reshape(N, C, k * k)   # N,C,k²
            if mode == "max":
                winner[:, :, i, j] = window.argmax(axis=2)
                y[:, :, i, j] = window.max(axis=2)
            else:
                y[:, :, i, j] = window.mean(axis=2)
    return y, PoolCache(mode, x.shape, x.dtype, k, S, winner)


def pool2d_backward(dy: np.ndarray, cache: PoolCache) -> np.ndarray:
    """Rules 2, 3: max sends δ only to the recorded winner of its window; mean sends δ/size² to every neuron of
    the window. Overlapping windows accumulate; rows/cols no window covered get 0."""
    mode, (N, C, H, W), dtype, k, S, winner = cache
    Ho, Wo = dy.shape[2:]
    dy = dy.astype(dtype, copy=False)                                                 # N,C,Ho,Wo
    dx = np.zeros((N, C, H, W), dtype=dtype)                                          # N,C,H,W
    for i in range(Ho):
        for j in range(Wo):
            d = dy[:, :, i, j, None, None]                                            # N,C,1,1
            if mode == "max":                                                         # rule 2
                share = d * (np.arange(k * k) == winner[:, :, i, j, None]).reshape(N, C, k, k)
            else:                                                                     # rule 3
                share = d / (k * k)
            dx[:, :, i * S:i * S + k, j * S:j * S + k] += share                      # N,C,k,k
    return dx
