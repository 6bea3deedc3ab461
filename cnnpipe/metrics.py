"""What a run's metrics mean: which one a run optimizes, which direction is better, the confusion matrix."""
from __future__ import annotations

import numpy as np

from cnnpipe import ConfigError

# The metric a run is judged by where none is named: the first of these it has. Without a validation split that
# is test_acc for a finished run (optimized_metric) and train_loss per epoch (checkpoint.monitor).
DEFAULT_METRICS = ("val_acc", "test_acc", "train_loss")


def default_metric(names) -> str:
    """The first of DEFAULT_METRICS among `names` (a run with none of them yet: test_acc, as once it finishes)."""
    names = set(names)
    return next((m for m in DEFAULT_METRICS if m in names), "test_acc")


def optimized_metric_name(cfg, metrics: dict) -> str:
    """`optimized_metric` when set, else default_metric: val_acc, or test_acc for a run without a validation split."""
    return cfg.optimized_metric or default_metric(k for k, v in metrics.items() if v is not None)


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
