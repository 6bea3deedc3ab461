"""Layers as forward/backward pairs. Each backward names the DESIGN.md rule it implements.

Letters: N batch, C input channels, F filters, H,W input size, K kernel size, Ho,Wo output size.
δ ("delta") is ∂L/∂(this layer's output). A layer gets its backend once (build) and never branches on it.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import DTypeLike

from cnnpipe import ConfigError
from cnnpipe.backends import Backend
from cnnpipe.shapes import check_pool_mode, out_size


class Layer:
    """Base: `build` infers the output shape, `forward` keeps what `backward` needs."""
    kind = "layer"
    has_delta_map = False               # conv/dense: TensorBoard shows the δ this layer received

    def __init__(self) -> None:
        self.name = self.kind
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.in_shape = self.out_shape = None
        self.delta = None               # last δ received in backward (reference, no copy)

    def build(self, in_shape: tuple[int, ...], backend: Backend, rng: np.random.Generator,
              dtype: DTypeLike) -> tuple[int, ...]:
        self.in_shape = self.out_shape = tuple(in_shape)
        return self.out_shape

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def flops(self) -> int:
        """Multiply-adds ×2 per sample for the forward pass (summary table)."""
        return 0

    def describe(self) -> str:
        return self.kind


def _init_weight(rng, shape, fan_in, fan_out, init, dtype):
    if init == "he":                    # He et al.: N(0, 2/fan_in), for ReLU
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    elif init == "glorot":              # Glorot/Xavier uniform, for tanh/sigmoid
        a = math.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-a, a, size=shape)
    else:
        raise ConfigError(f"Unknown init '{init}' in model.init: choose 'he' or 'glorot'.")
    return np.ascontiguousarray(w, dtype=dtype)


class Conv2d(Layer):
    kind = "conv"
    has_delta_map = True

    def __init__(self, filters: int, k: int, stride: int = 1, padding: str | int = "same", init: str = "he",
                 need_dx: bool = True) -> None:
        super().__init__()
        self.F, self.K, self.stride, self.padding, self.init = int(filters), int(k), int(stride), padding, init
        self.need_dx = need_dx          # the first layer skips the input gradient

    def _pads(self, H, W):
        """(top, bottom, left, right) zero padding. 'same' with even K pads one more after (as TensorFlow)."""
        K, p = self.K, self.padding
        if p == "valid":
            return (0, 0, 0, 0)
        if p == "same":
            lo, hi = (K - 1) // 2, K // 2
            return (lo, hi, lo, hi)
        if isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p >= 0:
            return (int(p),) * 4
        raise ConfigError(f"{self.name}: padding={p!r} is not valid; use 'same', 'valid' or an int >= 0.")

    def build(self, in_shape: tuple[int, ...], backend: Backend, rng: np.random.Generator,
              dtype: DTypeLike) -> tuple[int, ...]:
        C, H, W = in_shape
        if self.K < 1 or self.stride < 1 or self.F < 1:
            raise ConfigError(f"{self.name}: kernel size k={self.K}, stride={self.stride} and filters={self.F} "
                              f"must all be >= 1. Fix conv.k / conv.stride or the layer's own values.")
        top, bottom, left, right = self._pads(H, W)
        if H + top + bottom < self.K or W + left + right < self.K:
            raise ConfigError(
                f"{self.name}: a {self.K}x{self.K} kernel does not fit its input {C}x{H}x{W} "
                f"(padding {self.padding!r}); the output would be smaller than 1x1. Use a smaller k, "
                f"padding=same, or remove a pooling layer before it.")
        Ho, Wo = out_size(H, self.K, self.stride, top, bottom), out_size(W, self.K, self.stride, left, right)
        self.pads, self.sym = (top, bottom, left, right), (top == bottom == left == right)
        self.B = backend
        fan_in, fan_out = C * self.K * self.K, self.F * self.K * self.K
        W_shape = (self.F, C, self.K, self.K)                                                              # F,C,K,K
        self.params = {"W": _init_weight(rng, W_shape, fan_in, fan_out, self.init, dtype),
                       "b": np.zeros(self.F, dtype=dtype)}                                                    # F
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.in_shape, self.out_shape = tuple(in_shape), (self.F, Ho, Wo)
        return self.out_shape

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        if self.sym:
            y, self.cache = self.B.conv2d_forward(x, self.params["W"], self.params["b"], self.stride, self.pads[0])
        else:                           # asymmetric 'same' (even K): zero-pad here, then a valid conv
            top, bottom, left, right = self.pads
            xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))      # N,C,Hp,Wp
            y, self.cache = self.B.conv2d_forward(xp, self.params["W"], self.params["b"], self.stride, 0)
        return y                                                     # N,F,Ho,Wo

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Rules 4, 5, 6: δ to the input is the full convolution of the δ-map with the flipped kernel,
        ∂L/∂W the valid correlation of the zero-padded input with the δ-map, ∂L/∂b the δ-map's sum.
        (The activation derivative h'(a) is applied by the activation layer below: rule 7.)"""
        self.delta = delta                                           # N,F,Ho,Wo
        dx, dW, db = self.B.conv2d_backward(delta, self.cache, need_dx=self.need_dx)
        self.grads["W"], self.grads["b"] = dW, db
        if dx is not None and not self.sym:
            top, bottom, left, right = self.pads
            dx = np.ascontiguousarray(dx[:, :, top:dx.shape[2] - bottom, left:dx.shape[3] - right])   # crop the padding
        return dx

    def flops(self) -> int:
        F, Ho, Wo = self.out_shape
        return 2 * F * Ho * Wo * self.in_shape[0] * self.K * self.K

    def describe(self) -> str:
        return f"conv {self.F} k{self.K} s{self.stride} {self.padding}"


class Pool2d(Layer):
    kind = "pool"

    def __init__(self, size: int = 2, stride: int | None = None, mode: str = "max") -> None:
        super().__init__()
        self.size, self.stride, self.mode = int(size), int(stride or size), mode

    def build(self, in_shape: tuple[int, ...], backend: Backend, rng: np.random.Generator,
              dtype: DTypeLike) -> tuple[int, ...]:
        C, H, W = in_shape
        check_pool_mode(self.mode, self.name)
        if self.size < 1 or self.stride < 1:
            raise ConfigError(f"{self.name}: pool size={self.size} and stride={self.stride} must be >= 1.")
        if H < self.size or W < self.size:
            raise ConfigError(
                f"{self.name}: a {self.size}x{self.size} {self.mode}-pool does not fit its input {C}x{H}x{W}; "
                f"the output would be smaller than 1x1. Remove a pooling layer, use padding=same in the convs "
                f"before it, or a smaller conv.k.")
        self.B = backend
        self.in_shape = tuple(in_shape)
        self.out_shape = (C, out_size(H, self.size, self.stride), out_size(W, self.size, self.stride))
        return self.out_shape

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y, self.cache = self.B.pool2d_forward(x, self.size, self.stride, self.mode)
        return y

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Rule 2 (max: δ to the recorded winner) or rule 3 (mean: δ/size² to every neuron of the window)."""
        return self.B.pool2d_backward(delta, self.cache)

    def flops(self) -> int:
        C, Ho, Wo = self.out_shape
        return C * Ho * Wo * self.size * self.size

    def describe(self) -> str:
        return f"{self.mode}pool {self.size} s{self.stride}"


class ReLU(Layer):
    kind = "relu"

    def build(self, in_shape: tuple[int, ...], backend: Backend, rng: np.random.Generator,
              dtype: DTypeLike) -> tuple[int, ...]:
        self.B = backend
        return super().build(in_shape, backend, rng, dtype)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.y = self.B.relu_forward(x)                              # max(a, 0)
        return self.y

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Rule 7: multiply δ by h'(a) = [a > 0]."""
        return self.B.relu_backward(delta, self.y)


class Tanh(Layer):
    kind = "tanh"

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.y = np.tanh(x)
        return self.y

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Rule 7: multiply δ by h'(a) = 1 - tanh²(a)."""
        return delta * (1 - self.y * self.y)


class Sigmoid(Layer):
    kind = "sigmoid"

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.y = 1 / (1 + np.exp(-x))
        return self.y

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Rule 7: multiply δ by h'(a) = σ(a)(1 - σ(a))."""
        return delta * self.y * (1 - self.y)


class Flatten(Layer):
    kind = "flatten"

    def build(self, in_shape: tuple[int, ...], backend: Backend, rng: np.random.Generator,
              dtype: DTypeLike) -> tuple[int, ...]:
        self.in_shape, self.out_shape = tuple(in_shape), (int(np.prod(in_shape)),)
        return self.out_shape

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        return x.reshape(x.shape[0], -1)                              # N,C*H*W

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Rule 1: the dense layer's δ's are copied (reshaped) back to the positions they came from."""
        return delta.reshape((delta.shape[0],) + self.in_shape)     # N,C,H,W


class Dense(Layer):
    kind = "dense"
    has_delta_map = True

    def __init__(self, units: int, init: str = "he", need_dx: bool = True) -> None:
        super().__init__()
        self.units, self.init, self.need_dx = int(units), init, need_dx

    def build(self, in_shape: tuple[int, ...], backend: Backend, rng: np.random.Generator,
              dtype: DTypeLike) -> tuple[int, ...]:
        if len(in_shape) != 1:
            raise ConfigError(f"{self.name}: a dense layer needs a flat input but gets {'x'.join(map(str, in_shape))}; "
                              f"put a 'flatten' layer before it.")
        if self.units < 1:
            raise ConfigError(f"{self.name}: units={self.units} must be >= 1.")
        D = in_shape[0]
        self.params = {"W": _init_weight(rng, (self.units, D), D, self.units, self.init, dtype),   # U,D
                       "b": np.zeros(self.units, dtype=dtype)}                                    # U
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.in_shape, self.out_shape = tuple(in_shape), (self.units,)
        self.B = backend
        return self.out_shape

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.x = x                                                   # N,D
        y = self.B.matmul(x, self.params["W"].T)                     # N,U
        y += self.params["b"]
        return y

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """MLP backprop: ∂L/∂W = δᵀx, ∂L/∂b = Σδ, δ to the input = δW (rule 1 carries it on)."""
        self.delta = delta                                           # N,U
        self.grads["W"] = self.B.matmul(delta.T, self.x)             # U,D
        self.grads["b"] = delta.sum(axis=0)                          # U
        return self.B.matmul(delta, self.params["W"]) if self.need_dx else None   # N,D

    def flops(self) -> int:
        return 2 * self.in_shape[0] * self.units

    def describe(self) -> str:
        return f"dense {self.units}"


class Dropout(Layer):
    kind = "dropout"

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)
        if not 0.0 <= self.p < 1.0:
            raise ConfigError(f"dropout: p={self.p} must be in [0, 1).")
        self.rng = None                                              # set by the model (one generator per run)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        if not train or self.p == 0.0:
            self.mask = None
            return x
        keep = self.rng.random(x.shape, dtype=x.dtype) >= self.p    # inverted dropout: scale at train time
        self.mask = keep * x.dtype.type(1.0 / (1.0 - self.p))
        return x * self.mask

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """δ flows only through the kept units, with the same 1/(1-p) scale."""
        return delta if self.mask is None else delta * self.mask

    def describe(self) -> str:
        return f"dropout {self.p:g}"


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}
