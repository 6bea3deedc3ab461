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
    clipped: bool = False   # gradient clipping changed the gradients of this step
    labels: np.ndarray | None = None    # N: the batch's labels
    preds: np.ndarray | None = None     # N: the predicted classes (largest logit), e.g. for a confusion matrix


class NonFiniteLoss(ConfigError):
    """The loss became NaN/inf; `layer` names the first parameter whose gradient went non-finite (or None)."""

    def __init__(self, loss: float, layer: str | None, message: str | None = None):
        super().__init__(message or f"the loss became {loss}")
        self.loss, self.layer = loss, layer


@dataclass(frozen=True)
class Clip:
    """Gradient clipping: every entry to [-value, value], then the whole set rescaled to global L2 norm `norm`
    when it is larger (either may be None)."""
    norm: float | None = None
    value: float | None = None

    def __call__(self, grads: dict[str, np.ndarray]) -> bool:
        """Clip in place; True when a gradient changed."""
        changed = False
        if self.value is not None:
            for g in grads.values():
                changed = changed or bool(np.any(np.abs(g) > self.value))
                np.clip(g, -self.value, self.value, out=g)
        if self.norm is not None:
            total = global_norm(grads)
            if total > self.norm:
                for g in grads.values():
                    g *= g.dtype.type(self.norm / total)
                changed = True
        return changed


def global_norm(grads: dict[str, np.ndarray]) -> float:
    """‖g‖ over every gradient array together (the norm gradient clipping looks at)."""
    return math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))


def train_step(model, optimizer, x: np.ndarray, y: np.ndarray, lr: float,
               after_backward: Callable[[], None] | None = None, clip: Clip | None = None) -> StepResult:
    """One optimizer step on the batch x N,C,H,W, y N. `after_backward` runs between backward and the update
    (gradients fresh as backprop made them, parameters not yet changed): logging hooks read the gradients there.
    Clipping comes after it, just before the update."""
    logits = model.forward(x, train=True)                   # N,classes
    loss, delta = softmax_cross_entropy(logits, y)          # δ at the logits
    model.backward(delta)                                   # rules 1-7, layer by layer
    if not math.isfinite(loss):
        raise NonFiniteLoss(loss, first_nonfinite_grad(model))
    if after_backward is not None:
        after_backward()
    grads = model.named_grads()
    clipped = clip(grads) if clip is not None else False
    optimizer.step(grads, lr)
    preds = logits.argmax(1)
    return StepResult(loss, int((preds == y).sum()), len(y), clipped, y, preds)


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
