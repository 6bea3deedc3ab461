"""What a run's metrics mean: which one a run optimizes, which direction is better, the confusion matrix."""
from __future__ import annotations

import numpy as np

from cnnpipe import ConfigError


def optimized_metric_name(cfg, metrics: dict) -> str:
    """`optimized_metric` when set, else val_acc, or test_acc for a run without a validation split."""
    return cfg.optimized_metric or ("val_acc" if metrics.get("val_acc") is not None else "test_acc")


def optimized_metric(cfg, metrics: dict) -> float:
    """The value train() returns to Hydra's sweepers."""
    key = optimized_metric_name(cfg, metrics)
    if key not in metrics:
        raise ConfigError(f"optimized_metric={key!r} is not a metric of the run; choose one of "
                          f"{', '.join(k for k, v in metrics.items() if isinstance(v, float))}.")
    return metrics[key]


def lower_is_better(name: str) -> bool:
    """Losses are minimized, everything else (accuracies) maximized."""
    return name.endswith("loss")


def improved(name: str, new: float, old: float | None, min_delta: float = 0.0, mode: str = "auto") -> bool:
    """Is `new` better than `old` for metric `name` by more than min_delta (always, when there is no old)?
    mode: min | max | auto (from the name)."""
    if old is None:
        return True
    smaller = lower_is_better(name) if mode == "auto" else mode == "min"
    return new < old - min_delta if smaller else new > old + min_delta


def confusion_matrix(y: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    """n×n counts: row = true class, column = predicted class."""
    return np.bincount(np.asarray(y, np.int64) * n + np.asarray(preds, np.int64), minlength=n * n).reshape(n, n)
