"""A Sequential model built from the config's layer stack, with shape inference and a summary table."""
from __future__ import annotations

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend
from cnnpipe.layers import ACTIVATIONS, Conv2d, Dense, Dropout, Flatten, Layer, Pool2d

LAYER_TYPES = ("conv", "pool", "act", *ACTIVATIONS, "flatten", "dense", "dropout")


class Sequential:
    def __init__(self, layers, in_shape, backend, dtype=np.float32, seed=0):
        self.layers, self.in_shape, self.dtype = layers, tuple(in_shape), np.dtype(dtype)
        init_rng = np.random.default_rng([seed, 0])         # parameters
        self.rng = np.random.default_rng([seed, 1])         # dropout masks (saved in checkpoints)
        shape, counts = self.in_shape, {}
        for i, layer in enumerate(layers):
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
            layer.name = f"{layer.kind}{counts[layer.kind]}"
            if isinstance(layer, (Conv2d, Dense)):
                layer.need_dx = i > 0                       # nothing consumes the input's gradient
            if isinstance(layer, Dropout):
                layer.rng = self.rng
            try:
                shape = layer.build(shape, backend, init_rng, self.dtype)
            except ConfigError as e:
                raise ConfigError(f"{e} (layer {i}: {layer.describe()}, input {fmt_shape(shape)}; "
                                  f"stack so far: {self._trace(i)})") from None
        self.out_shape = shape

    def _trace(self, upto):
        parts = [fmt_shape(self.in_shape)]
        for layer in self.layers[:upto]:
            parts.append(f"{layer.name} {fmt_shape(layer.out_shape)}")
        return " → ".join(parts)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        for layer in reversed(self.layers):
            delta = layer.backward(delta)
            if delta is None:                               # the first layer skipped its input gradient
                break
        return delta

    def named_params(self) -> dict[str, np.ndarray]:
        """`conv1.W` -> array (the same objects the layers hold: optimizers update them in place)."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    def named_grads(self) -> dict[str, np.ndarray]:
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.grads.items()}

    def load_params(self, arrays: dict[str, np.ndarray]) -> None:
        for name, p in self.named_params().items():
            p[...] = arrays[name]

    def param_count(self) -> int:
        return sum(p.size for p in self.named_params().values())

    def summary(self) -> str:
        rows = [("layer", "output shape", "params", "FLOPs/sample")]
        rows.append(("input", fmt_shape(self.in_shape), "", ""))
        for layer in self.layers:
            n = sum(p.size for p in layer.params.values())
            rows.append((f"{layer.name} ({layer.describe()})", fmt_shape(layer.out_shape), f"{n:,}" if n else "",
                         f"{layer.flops():,}" if layer.flops() else ""))
        total_flops = sum(layer.flops() for layer in self.layers)
        rows.append(("total", "", f"{self.param_count():,}", f"{total_flops:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]

        def line(r):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        sep = "-" * len(line(rows[0]))
        return "\n".join([line(rows[0]), sep, *map(line, rows[1:-1]), sep, line(rows[-1])])


def fmt_shape(shape):
    return "x".join(str(s) for s in shape)


def make_layers(cfg) -> list[Layer]:
    """The layer objects for cfg.model.layers, filling unset values from cfg.conv / cfg.pool / cfg.model."""
    m, layers = cfg.model, []
    if not m.layers:
        raise ConfigError(f"model '{m.name}' has no layers: give model.layers a list such as "
                          f"[{{type: conv, filters: 8}}, {{type: act}}, {{type: pool}}, {{type: flatten}}, "
                          f"{{type: dense, units: 10}}].")
    for i, spec in enumerate(m.layers):
        t = spec.type
        where = f"model '{m.name}', layer {i} (type {t})"
        if t == "conv":
            if spec.filters is None:
                raise ConfigError(f"{where}: a conv layer needs `filters`.")
            layers.append(Conv2d(spec.filters, _pick(spec.k, cfg.conv.k), _pick(spec.stride, cfg.conv.stride),
                                 _pick(spec.padding, cfg.conv.padding), init=m.init))
        elif t == "pool":
            size = _pick(spec.size, cfg.pool.size)
            stride = spec.stride if spec.stride is not None else (cfg.pool.stride if spec.size is None else size)
            layers.append(Pool2d(size, stride, _pick(spec.mode, cfg.pool.mode)))
        elif t == "act" or t in ACTIVATIONS:
            act = m.activation if t == "act" else t
            if act not in ACTIVATIONS:
                raise ConfigError(f"{where}: unknown activation '{act}' (model.activation); choose one of "
                                  f"{', '.join(ACTIVATIONS)}.")
            layers.append(ACTIVATIONS[act]())
        elif t == "flatten":
            layers.append(Flatten())
        elif t == "dense":
            if spec.units is None:
                raise ConfigError(f"{where}: a dense layer needs `units`.")
            layers.append(Dense(spec.units, init=m.init))
        elif t == "dropout":
            layers.append(Dropout(_pick(spec.p, 0.5)))
        else:
            raise ConfigError(f"{where}: unknown layer type '{t}'; choose one of {', '.join(LAYER_TYPES)}.")
    return layers


def _pick(value, default):
    return default if value is None else value


def build_model(cfg, backend=None, dtype=None, seed=None) -> Sequential:
    """Build and shape-check the configured model. Raises ConfigError naming the layer and shapes."""
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype={cfg.dtype!r} is not supported: use dtype=float32 or dtype=float64.")
    backend = backend or get_backend(cfg.backend.name)
    in_shape = (cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    model = Sequential(make_layers(cfg), in_shape, backend, dtype or np.dtype(cfg.dtype),
                       cfg.trainer.seed if seed is None else seed)
    if len(model.out_shape) != 1 or model.out_shape[0] != cfg.data.num_classes:
        raise ConfigError(f"model '{cfg.model.name}' ends in shape {fmt_shape(model.out_shape)} but dataset "
                          f"'{cfg.data.name}' has {cfg.data.num_classes} classes: the last layer must be "
                          f"`dense` with units: ${{data.num_classes}}.")
    return model
