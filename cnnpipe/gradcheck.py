"""Whole-model gradient check: hand-written backprop against central finite differences, in float64."""
from __future__ import annotations

import numpy as np

from cnnpipe.losses import softmax_cross_entropy
from cnnpipe.model import build_model


def _loss(model, x, y):
    return softmax_cross_entropy(model.forward(x, train=False), y)[0]


def gradcheck(cfg, batch=2, samples=12, eps=1e-5, seed=0):
    """Max relative error per parameter (and for the input), over `samples` random entries of each.

    Returns rows (name, shape, max_rel_err). Inputs are random normal; dropout is off (eval mode)."""
    model = build_model(cfg, dtype=np.float64)
    for layer in model.layers:
        if hasattr(layer, "need_dx"):
            layer.need_dx = True                                # also check δ at the input
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *model.in_shape))           # N,C,H,W
    y = rng.integers(0, model.out_shape[0], size=batch)
    _, delta = softmax_cross_entropy(model.forward(x, train=False), y)
    dx = model.backward(delta)
    targets = [(name, p, model.named_grads()[name].copy()) for name, p in model.named_params().items()]
    targets.append(("input", x, dx))
    rows = []
    for name, arr, analytic in targets:
        idx = rng.choice(arr.size, size=min(samples, arr.size), replace=False)
        numeric = central_difference(lambda: _loss(model, x, y), arr, idx, eps)
        g = analytic.reshape(-1)[idx]
        worst = float(np.max(np.abs(numeric - g) / np.maximum(np.abs(numeric) + np.abs(g), 1e-6)))
        rows.append((name, arr.shape, worst))
    return rows


def central_difference(loss, a: np.ndarray, idx, eps: float) -> np.ndarray:
    """(loss(a + eps) - loss(a - eps)) / 2eps for each entry a.flat[i], i in idx (a perturbed in place, restored)."""
    flat, g = a.reshape(-1), np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        lp = loss()
        flat[i] = old - eps
        lm = loss()
        flat[i] = old
        g[j] = (lp - lm) / (2 * eps)
    return g


def format_table(rows, tol):
    lines = [f"{'parameter':<14}{'shape':<18}{'max rel err':>12}  ok", "-" * 50]
    for name, shape, err in rows:
        lines.append(f"{name:<14}{'x'.join(map(str, shape)):<18}{err:>12.2e}  {'yes' if err <= tol else 'NO'}")
    return "\n".join(lines)
