"""The hooks the trainer calls; TensorBoard logging and checkpointing are callbacks.

A hook gets what it needs as arguments: the step number, the step's result and wall time, the epoch's metrics.
It may read the trainer's model, cfg, data, dtype, run_dir, its position (epoch, step, steps_per_epoch), `clip`
(None without gradient clipping) and the predictions of the last evaluation (`val_preds` at an epoch's end with a
validation split, `test_preds` at the train's end) and why early stopping ended the run (`stopped_early`), and
ask it to stop (`stop_requested`). The checkpointer reads the whole state it saves (checkpoint_arrays).
"""
from __future__ import annotations

from cnnpipe.step import StepResult


class Callback:
    """`tr` in every hook is the cnnpipe.train.Trainer running the loop."""

    def on_train_start(self, tr) -> None:
        """Before the first step of this process (tr.step > 0 for a resumed run)."""

    def on_after_backward(self, tr, step: int, lr: float) -> None:
        """Step number `step` (1-based) has fresh gradients; the optimizer has not updated the parameters yet."""

    def on_step_end(self, tr, step: int, result: StepResult, lr: float, seconds: float) -> None:
        """After the optimizer step; `seconds` is the wall time since the previous step ended (batch included)."""

    def on_epoch_end(self, tr, metrics: dict) -> None:
        """After the epoch's validation; tr.epoch already counts the epoch."""

    def on_interrupt(self, tr) -> None:
        """A stop was requested (signal) and the step in progress has finished."""

    def on_train_end(self, tr, metrics: dict) -> None:
        """After the test evaluation; `metrics` is what metrics.json holds."""
