"""The one output-size rule of every sliding window (conv and pool, in the layers and in every backend), and the
checks that come with it (the arrays a conv takes, the pooling modes)."""
from __future__ import annotations

from cnnpipe import ConfigError

POOL_MODES = ("max", "mean")


def out_size(n: int, k: int, stride: int, pad: int = 0, pad_after: int | None = None, what: str = "window") -> int:
    """How many k-wide windows, one every `stride`, fit n inputs with `pad` zeros before (and `pad_after`, default
    `pad`, after); a remainder that fits no window is dropped, as in PyTorch."""
    pad_after = pad if pad_after is None else pad_after
    if k < 1 or stride < 1 or pad < 0 or pad_after < 0:
        raise ConfigError(f"{what}: kernel/window size {k}, stride {stride} and padding {pad} must satisfy size >= 1, "
                          f"stride >= 1, padding >= 0. Fix the layer's size/stride/padding in the model config.")
    if n + pad + pad_after < k:
        raise ConfigError(f"{what}: a {k}x{k} window does not fit an input of size {n} (padding {pad}). Use a "
                          f"smaller kernel/pool size, more padding, or fewer downsampling layers.")
    return (n + pad + pad_after - k) // stride + 1


def conv_output(x, w, b, stride: int, pad: int, what: str = "conv2d") -> tuple[int, int]:
    """Ho, Wo of a convolution, after checking its arrays fit the backend contract: x N,C,H,W, w F,C,K,K, b F."""
    if x.ndim != 4 or w.ndim != 4 or w.shape[1] != x.shape[1] or w.shape[2] != w.shape[3] or b.shape != (w.shape[0],):
        raise ConfigError(f"{what}: expected x N,C,H,W, w F,C,K,K and b F with matching C, got x {x.shape}, "
                          f"w {w.shape}, b {b.shape}. Check the layer's in_channels / kernel size.")
    K = w.shape[-1]
    return out_size(x.shape[2], K, stride, pad, what=what), out_size(x.shape[3], K, stride, pad, what=what)


def check_pool_mode(mode: str, what: str = "pool2d") -> None:
    """A pooling is max (rule 2) or mean (rule 3)."""
    if mode not in POOL_MODES:
        raise ConfigError(f"{what}: pooling mode '{mode}' is unknown; use pool=max or pool=mean.")


def pool_output(x, size: int, stride: int, mode: str, what: str = "pool2d") -> tuple[int, int]:
    """Ho, Wo of a pooling, after checking the mode and that x is N,C,H,W."""
    check_pool_mode(mode, what)
    if x.ndim != 4:
        raise ConfigError(f"{what}: expected an N,C,H,W input, got shape {x.shape}. Put pooling after a conv layer.")
    return out_size(x.shape[2], size, stride, what=what), out_size(x.shape[3], size, stride, what=what)
