"""Early stopping: end training when the monitored per-epoch metric has not improved for `patience` epochs."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.callbacks import Callback
from cnnpipe.metrics import improved

log = logging.getLogger("cnnpipe")
EPOCH_METRICS = ("val_loss", "val_acc", "train_loss", "train_acc")


@dataclass
class EarlyStoppingState:
    """What a checkpoint keeps, so that a resumed run goes on counting."""
    best: float | None = None
    best_epoch: int = 0
    wait: int = 0           # epochs since the best

    def as_array(self) -> np.ndarray:
        return np.array([math.nan if self.best is None else self.best, self.best_epoch, self.wait], np.float64)

    @classmethod
    def from_array(cls, a) -> EarlyStoppingState:
        return cls(None if math.isnan(a[0]) else float(a[0]), int(a[1]), int(a[2]))


def check_early_stopping(cfg, has_val: bool) -> None:
    """trainer.early_stopping values that cannot work are refused at start."""
    if cfg.patience is None:
        return
    where = "trainer.early_stopping"
    if cfg.patience < 1:
        raise ConfigError(f"{where}.patience={cfg.patience}: the epochs to wait must be >= 1 (null turns early "
                          f"stopping off).")
    if cfg.monitor not in EPOCH_METRICS:
        raise ConfigError(f"{where}.monitor={cfg.monitor!r} is not a per-epoch metric; choose one of "
                          f"{', '.join(EPOCH_METRICS)}.")
    if cfg.monitor.startswith("val_") and not has_val:
        raise ConfigError(f"{where}.monitor={cfg.monitor} needs a validation split, and this run has none "
                          f"(data.val_size=0): set data.val_size > 0 or monitor train_loss.")
    if cfg.mode not in ("min", "max", "auto"):
        raise ConfigError(f"{where}.mode={cfg.mode!r}: choose min, max or auto (min for losses).")
    if not math.isfinite(cfg.min_delta) or cfg.min_delta < 0:
        raise ConfigError(f"{where}.min_delta={cfg.min_delta}: must be a finite number >= 0.")


class EarlyStopping(Callback):
    def __init__(self, cfg):
        self.cfg = cfg

    def on_epoch_end(self, tr, metrics):
        c, s = self.cfg, tr.early_stopping
        value = metrics[c.monitor]
        if improved(c.monitor, value, s.best, c.min_delta, c.mode):
            s.best, s.best_epoch, s.wait = float(value), tr.epoch, 0
            return
        s.wait += 1
        if s.wait >= c.patience and tr.epoch < tr.cfg.trainer.epochs:
            tr.stopped_early = (f"{c.monitor} has not improved by more than {c.min_delta:g} for {s.wait} epochs "
                                f"(best {s.best:.4f} at epoch {s.best_epoch})")
            log.info("early stopping after epoch %d: %s", tr.epoch, tr.stopped_early)
