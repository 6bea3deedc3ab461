"""Mini-batches of a split: x float32/float64 N,C,H,W = (u8/255 - mean)/std, y int64 N, shuffled and augmented
from seeds, so that any batch of any epoch can be made again (resuming mid-epoch)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, DTypeLike

from cnnpipe.data.bundle import Split

AUGMENT = 2                                         # spawn key of the augmentation's random stream


def num_batches(n: int, batch_size: int) -> int:
    """Batches in one pass over n samples; the last, partial one counts."""
    return -(-n // batch_size)


def batches(split: Split, batch_size: int, *, mean: ArrayLike, std: ArrayLike, dtype: DTypeLike = np.float32,
            shuffle_seed: int | Sequence[int] | None = None, augment: bool = False, crop_padding: int | None = None,
            start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x, y) batches: x dtype N,C,H,W = (u8/255 - mean)/std, y int64 N. The last partial batch is kept.

    shuffle_seed: None = the split's order; else the order is default_rng(shuffle_seed).permutation(n).
    augment: random crop (zero padding crop_padding: data.crop_padding, needed then) + horizontal flip, all drawn for the whole pass up front,
    so start=k (skip the first k batches: resuming mid-epoch) yields exactly the batches an uninterrupted pass
    yields from there. Pass a new shuffle_seed each epoch (e.g. [seed, epoch]) for new crops.
    """
    x, y = split.x, split.y                                                 # uint8 N,C,H,W, int64 N
    n = len(y)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"batches: dtype must be float32 or float64, got {dtype}")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    if augment and crop_padding is None:
        raise ValueError("batches: augment=True needs crop_padding (the bundle's, i.e. data.crop_padding)")
    nb = num_batches(n, batch_size)
    if not 0 <= start <= nb:
        raise ValueError(f"batches: start={start} is outside 0..{nb} ({n} samples, batch size {batch_size})")
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    if augment:
        entropy = 0 if shuffle_seed is None else shuffle_seed
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(AUGMENT,)))
        shift = rng.integers(0, 2 * crop_padding + 1, size=(2, n))            # 2,n: dy, dx of each position
        flip = rng.random(n) < 0.5                                            # n
    for b in range(start, nb):
        s = slice(b * batch_size, (b + 1) * batch_size)
        idx = order[s]
        xb = x[idx]                                                           # uint8 N,C,H,W
        if augment:
            xb = crop_flip(xb, shift[0, s], shift[1, s], flip[s], crop_padding)
        yield normalize(xb, mean, std, dtype), y[idx]


def normalize(x: np.ndarray, mean: ArrayLike, std: ArrayLike, dtype: DTypeLike = np.float32) -> np.ndarray:
    """uint8 N,C,H,W -> dtype N,C,H,W = (x/255 - mean)/std per channel, as one multiply-add in dtype."""
    C = x.shape[1]
    std = np.asarray(std, dtype=np.float64).reshape(C)
    scale = (1.0 / (255.0 * std)).astype(dtype).reshape(1, C, 1, 1)          # 1,C,1,1
    offset = (-np.asarray(mean, dtype=np.float64).reshape(C) / std).astype(dtype).reshape(1, C, 1, 1)
    out = np.multiply(x, scale, dtype=dtype)                                  # N,C,H,W
    out += offset
    return out


def crop_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int) -> np.ndarray:
    """Sample i: the H×W window at (dy[i], dx[i]) of x[i] zero-padded by pad, mirrored left-right if flip[i]."""
    N, C, H, W = x.shape
    padded = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=x.dtype)     # N,C,H+2p,W+2p
    padded[:, :, pad:pad + H, pad:pad + W] = x
    windows = sliding_window_view(padded, (H, W), axis=(2, 3))              # N,C,2p+1,2p+1,H,W (a view)
    out = windows[np.arange(N), :, dy, dx]                                  # N,C,H,W (one gather)
    out[flip] = out[flip, :, :, ::-1]
    return out
