"""Per-kernel times: conv forward/backward and pool forward/backward at every conv/pool layer shape of a model,
for one backend, beside torch's own ops (F.conv2d, F.max_pool2d, F.avg_pool2d; backward through autograd on a
kept graph). Shows which kernel a backend's gap to PyTorch comes from. Run by the benchmark as

    python -m cnnpipe.bench.kernels '{"backend": "numba", "models": ["lenet5"], "batch_size": 64, "min_time": 0.3}'
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from cnnpipe.bench.runs import RESULT_TAG
from cnnpipe.config import compose_config as compose


def time_call(fn, min_time: float, min_reps: int = 3, max_reps: int = 500) -> tuple[float, int]:
    """Median seconds of fn() after one untimed call; repeats until min_time has passed (and min_reps)."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def layer_calls(model_name: str, batch_size: int) -> list[tuple]:
    """The conv and pool layers of a model as kernel calls: (label, kind, input N,C,H,W, layer)."""
    from cnnpipe.backends import get_backend
    from cnnpipe.layers import Conv2d, Pool2d
    from cnnpipe.model import build_model
    model = build_model(compose([f"model={model_name}"]), get_backend("numpy"))
    fmt = lambda s: "×".join(map(str, s))  # noqa: E731
    out = []
    for layer in model.layers:
        shape = (batch_size, *layer.in_shape)
        if isinstance(layer, Conv2d) and layer.sym:
            label = f"{layer.name} {fmt(layer.in_shape)}→{fmt(layer.out_shape)} k{layer.K}"
            out.append((label + ("" if layer.need_dx else " (no dx)"), "conv", shape, layer))
        elif isinstance(layer, Pool2d):
            out.append((f"{layer.name} {fmt(layer.in_shape)} {layer.size}/{layer.stride}", "pool", shape, layer))
    return out


def kernel_ops(backend: str, kind: str, x, dy, layer, rng) -> dict:
    """op name → a no-argument callable running it once."""
    if backend == "torch":
        import torch
        import torch.nn.functional as F
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    else:
        from cnnpipe.backends import get_backend
        B = get_backend(backend)
    if kind == "conv":
        w = (rng.standard_normal((layer.F, x.shape[1], layer.K, layer.K)) * 0.1).astype(np.float32)    # F,C,K,K
        b = np.zeros(layer.F, np.float32)                                                     # F
        S, P = layer.stride, layer.pads[0]
        if backend != "torch":
            _, cache = B.conv2d_forward(x, w, b, S, P)
            return {"conv forward": lambda: B.conv2d_forward(x, w, b, S, P),
                    "conv backward": lambda: B.conv2d_backward(dy, cache, need_dx=layer.need_dx)}
        wt, bt = torch.from_numpy(w), torch.from_numpy(b)
        xg, wg, bg = xt.clone().requires_grad_(layer.need_dx), wt.clone().requires_grad_(), bt.clone().requires_grad_()
        yg = F.conv2d(xg, wg, bg, S, P)
        inputs = [xg, wg, bg] if layer.need_dx else [wg, bg]
        return {"conv forward": lambda: _no_grad(lambda: F.conv2d(xt, wt, bt, S, P)),
                "conv backward": lambda: torch.autograd.grad(yg, inputs, dyt, retain_graph=True)}
    ops = {}
    R, S = layer.size, layer.stride
    for mode in ("max", "mean"):
        if backend != "torch":
            _, cache = B.pool2d_forward(x, R, S, mode)
            ops[f"{mode}pool forward"] = lambda mode=mode: B.pool2d_forward(x, R, S, mode)
            ops[f"{mode}pool backward"] = lambda cache=cache: B.pool2d_backward(dy, cache)
        else:
            pool = F.max_pool2d if mode == "max" else F.avg_pool2d
            xg = xt.clone().requires_grad_()
            yg = pool(xg, R, S)
            ops[f"{mode}pool forward"] = lambda pool=pool: _no_grad(lambda: pool(xt, R, S))
            ops[f"{mode}pool backward"] = lambda yg=yg, xg=xg: torch.autograd.grad(yg, [xg], dyt, retain_graph=True)
    return ops


def _no_grad(fn):
    import torch
    with torch.no_grad():
        return fn()


def main(spec: dict) -> list[dict]:
    from cnnpipe.backends import get_backend, set_threads
    backend = spec["backend"]
    set_threads(None, None if backend == "torch" else backend)
    if backend != "torch" and hasattr(B := get_backend(backend), "warmup"):
        B.warmup(np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for model_name in spec["models"]:
        for label, kind, shape, layer in layer_calls(model_name, spec["batch_size"]):
            x = rng.standard_normal(shape).astype(np.float32)                                   # N,C,H,W
            dy = rng.standard_normal((shape[0], *layer.out_shape)).astype(np.float32)               # N,F,Ho,Wo
            for op, fn in kernel_ops(backend, kind, x, dy, layer, rng).items():
                sec, reps = time_call(fn, spec["min_time"])
                rows.append({"model": model_name, "layer": label, "op": op, "ms": 1e3 * sec, "reps": reps})
    return rows


if __name__ == "__main__":
    print(RESULT_TAG + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
