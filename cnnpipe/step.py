"""One training step: forward → softmax-CE → backward (rules 1-7) → optimizer. The only copy: the trainer, the
benchmark and the LR finder all call `train_step`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.losses import softmax_cross_entropy


@dataclass(frozen=True)
class StepResult:
    loss: float         # mean softmax cross-entropy of the batch
    correct: int        # samples whose largest logit is the label
    n: int              # samples in the batch


class NonFiniteLoss(ConfigError):
    """The loss became NaN/inf; `layer` names the first parameter whose gradient went non-finite (or None)."""

    def __init__(self, loss: float, layer: str | None, message: str | None = None):
        super().__init__(message or f"the loss became {loss}")
        self.loss, self.layer = loss, layer


def train_step(model, optimizer, x: np.ndarray, y: np.ndarray, lr: float,
               after_backward: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step on the batch x N,C,H,W, y N. `after_backward` runs between backward and the update
    (gradients fresh, parameters not yet changed): logging hooks read the gradients there."""
    logits = model.forward(x, train=True)                   # N,classes
    loss, delta = softmax_cross_entropy(logits, y)          # δ at the logits
    model.backward(delta)                                   # rules 1-7, layer by layer
    if not math.isfinite(loss):
        raise NonFiniteLoss(loss, first_nonfinite_grad(model))
    if after_backward is not None:
        after_backward()
    optimizer.step(model.named_grads(), lr)
    return StepResult(loss, int((logits.argmax(1) == y).sum()), len(y))


def first_nonfinite_grad(model) -> str | None:
    """The first parameter (in layer order) whose gradient holds a NaN or inf."""
    return next((name for name, g in model.named_grads().items() if not np.all(np.isfinite(g))), None)


@dataclass
class EpochTotals:
    """Running sums of the epoch in progress (saved in checkpoints: a resumed epoch continues them)."""
    loss_sum: float = 0.0           # Σ loss·n
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0            # wall time of the training loop (batches, steps, hooks)

    def add(self, r: StepResult, seconds: float) -> None:
        self.loss_sum, self.correct, self.seen = self.loss_sum + r.loss * r.n, self.correct + r.correct, self.seen + r.n
        self.seconds += seconds

    def as_array(self) -> np.ndarray:
        return np.array([self.loss_sum, self.correct, self.seen, self.seconds], dtype=np.float64)

    @classmethod
    def from_array(cls, a) -> EpochTotals:
        return cls(float(a[0]), int(a[1]), int(a[2]), float(a[3]))
