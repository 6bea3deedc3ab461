"""The training loop: epochs of `train_step` (cnnpipe.step), validation each epoch, the test at the end.

Everything a run does is driven by the config (conf/train.yaml, cnnpipe/config.py); the wiring around the loop
(callbacks from the config, resume, signals, train.log) is cnnpipe.app's.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend, set_threads
from cnnpipe.backends.cores import given_cores
from cnnpipe.callbacks import Callback
from cnnpipe.checkpoint import load_checkpoint, section
from cnnpipe.data import Split, batches, load_data, needs_torchvision, num_batches, preload_torchvision
from cnnpipe.early_stop import EarlyStoppingState, check_early_stopping
from cnnpipe.evaluate import evaluate_split
from cnnpipe.jsonio import write_json_atomic
from cnnpipe.model import build_model
from cnnpipe.optim import LrSchedule, build_optimizer
from cnnpipe.rundir import check_writable
from cnnpipe.step import Clip, EpochTotals, NonFiniteLoss, StepResult, train_step

log = logging.getLogger("cnnpipe")


class Interrupted(Exception):
    """Raised after the step in progress finished because a stop was requested (signal)."""

    def __init__(self, reason: str, run_dir: Path):
        super().__init__(reason)
        self.reason, self.run_dir = reason, run_dir


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if cfg.trainer.seed < 0 or cfg.trainer.batch_size < 1 or cfg.trainer.epochs < 0:
            raise ConfigError(f"trainer.seed={cfg.trainer.seed}, trainer.batch_size={cfg.trainer.batch_size} and "
                              f"trainer.epochs={cfg.trainer.epochs}: the seed and epochs must be >= 0 and the batch "
                              f"size >= 1.")
        self.dtype = np.dtype(cfg.dtype)
        threads, threads_source = given_cores(cfg.backend.threads)
        self.threads = set_threads(threads, cfg.backend.name)
        self.backend = get_backend(cfg.backend.name)
        self.model = build_model(cfg, self.backend)          # shape checks happen here, before any data
        self.optimizer = build_optimizer(cfg.optim, self.model.named_params(), self.backend)   # value checks too
        check_writable(self.run_dir)
        log.info("model %s (%s backend, %s, %d threads: %s)\n%s", cfg.model.name, cfg.backend.name, cfg.dtype,
                 self.threads, threads_source, self.model.summary())
        if hasattr(self.backend, "warmup"):
            if needs_torchvision(cfg.data):
                preload_torchvision()                        # torch's import overlaps the numba warm-up
            self.backend.warmup(self.dtype)
            log.info("numba threading layer %s, %d threads", self.backend.numba.threading_layer(),
                     self.backend.numba.get_num_threads())
        if cfg.trainer.test_checkpoint not in ("best", "last", "auto"):
            raise ConfigError(f"trainer.test_checkpoint={cfg.trainer.test_checkpoint!r}: choose best, last or auto "
                              f"(best when there is a validation split).")
        if cfg.trainer.test_checkpoint == "best" and not cfg.checkpoint.enabled:
            raise ConfigError("trainer.test_checkpoint=best needs checkpoints/best.npz, but checkpoint.enabled=false.")
        self.clip = Clip(cfg.optim.clip_norm, cfg.optim.clip_value) if \
            cfg.optim.clip_norm is not None or cfg.optim.clip_value is not None else None
        check_early_stopping(cfg.trainer.early_stopping, bool(cfg.data.val_size))   # before the data loads
        self.data = load_data(cfg.data, cfg.trainer.seed)
        log.info("data %s from %s: train %d, val %d, test %d", self.data.name, self.data.source,
                 len(self.data.train.y), 0 if self.data.val is None else len(self.data.val.y), len(self.data.test.y))
        self.steps_per_epoch = num_batches(len(self.data.train.y), cfg.trainer.batch_size)
        self.total_steps = cfg.trainer.epochs * self.steps_per_epoch
        self.lr_at = LrSchedule(cfg.optim, self.steps_per_epoch, self.total_steps)
        # plain values for the per-step checks (a config node's attribute lookup costs microseconds)
        self.max_steps, self.log_every = cfg.trainer.max_steps, int(cfg.trainer.log_every)
        # the position (a checkpoint saves it, with the parameters, optimizer state and RNGs)
        self.epoch, self.step, self.batch_in_epoch, self.best = 0, 0, 0, None
        self.history = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": [], "epoch_seconds": []}
        self.totals = EpochTotals()
        self.clipped_steps = 0                               # steps whose gradients clipping changed
        self.early_stopping = EarlyStoppingState()
        self.stopped_early = None                            # the reason, once early stopping ended the run
        self.val_preds = None                                # last validation predictions (confusion matrix)
        self.test_preds = None                               # the final test's predictions
        self.stop_requested = None                           # a reason (e.g. "SIGTERM"): stop after this step
        self.resumed_from = None                             # the checkpoint this run continues (resume=)
        self.init_from = None                                # what init_from= loaded and skipped
        self.thread_changes = []                             # (step, threads): the thread governor's choices
        self.callbacks: list[Callback] = []

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        tc = self.cfg.trainer
        for cb in self.callbacks:
            cb.on_train_start(self)
        while not self.done():
            it = self.epoch_batches()
            bar = _progress(tc.progress, self.steps_per_epoch, self.batch_in_epoch,
                            f"epoch {self.epoch + 1}/{tc.epochs}")
            mark = time.perf_counter()
            for x, y in it:                                                  # x N,C,H,W   y N
                lr = self.lr_at(self.step)
                result = self._step(x, y, lr)
                self.clipped_steps += result.clipped
                self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                now = time.perf_counter()
                self.totals.add(result, now - mark)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, result, lr, now - mark)
                mark = now
                self._report(bar, result, lr)
                if self.stop_requested or self._max_steps_reached():
                    break
            if bar is not None:
                bar.close()
            if self.stop_requested:
                for cb in self.callbacks:
                    cb.on_interrupt(self)
                raise Interrupted(self.stop_requested, self.run_dir)
            self._end_epoch()
        return self._finish()

    def epoch_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This epoch's (x, y) batches from the current position (trainer.profile times this iterator)."""
        tc = self.cfg.trainer
        return batches(self.data.train, tc.batch_size, mean=self.data.mean, std=self.data.std, dtype=self.dtype,
                       shuffle_seed=[tc.seed, self.epoch], augment=self.data.augment,
                       crop_padding=self.data.crop_padding, start=self.batch_in_epoch)

    def _step(self, x, y, lr) -> StepResult:
        def after_backward():
            for cb in self.callbacks:
                cb.on_after_backward(self, self.step + 1, lr)
        try:
            return train_step(self.model, self.optimizer, x, y, lr, after_backward, self.clip)
        except NonFiniteLoss as e:
            where = (f"the first layer whose gradient went non-finite is {e.layer.split('.')[0]} ({e.layer})"
                     if e.layer else "all gradients were still finite (the logits overflowed)")
            raise NonFiniteLoss(e.loss, e.layer, message=(
                f"The loss became {e.loss} at step {self.step + 1} (epoch {self.epoch + 1}); {where}. Training "
                f"stopped; the last good checkpoint (if any) in {self.run_dir / 'checkpoints'} is kept. Lower "
                f"optim.lr, use dtype=float64, or check the data normalisation.")) from None

    def _report(self, bar, result: StepResult, lr: float):
        every, t = self.log_every, self.totals
        if self.step % every == 0:
            log.debug("step %d loss %.4f acc %.3f lr %.4g", self.step, result.loss, result.correct / result.n, lr)
        if bar is not None:
            bar.update(1)
            if self.step % every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                bar.set_postfix(loss=f"{t.loss_sum / t.seen:.4f}", acc=f"{t.correct / t.seen:.3f}",
                                samples_s=f"{t.seen / max(t.seconds, 1e-9):.0f}")

    def _end_epoch(self):
        t, h = self.totals, self.history
        h["train_loss"].append(t.loss_sum / max(t.seen, 1))
        h["train_acc"].append(t.correct / max(t.seen, 1))
        h["epoch_seconds"].append(t.seconds)
        metrics = {"epoch": self.epoch + 1, "train_loss": h["train_loss"][-1], "train_acc": h["train_acc"][-1],
                   "epoch_seconds": t.seconds, "samples_per_second": t.seen / max(t.seconds, 1e-9)}
        if self.data.val is not None:
            metrics["val_loss"], metrics["val_acc"], self.val_preds = self.evaluate(self.data.val)
            h["val_loss"].append(metrics["val_loss"])
            h["val_acc"].append(metrics["val_acc"])
        log.info("epoch %d/%d: " + ", ".join(f"{k} %.4f" for k in metrics if k != "epoch"), self.epoch + 1,
                 self.cfg.trainer.epochs, *[v for k, v in metrics.items() if k != "epoch"])
        self.epoch, self.batch_in_epoch, self.totals = self.epoch + 1, 0, EpochTotals()
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)

    def _finish(self) -> dict:
        if self.batch_in_epoch:                              # stopped by max_steps inside an epoch
            self._end_epoch()
        tested_on = self.test_weights()
        test_loss, test_acc, self.test_preds = self._test(tested_on)
        h, secs = self.history, sum(self.history["epoch_seconds"])
        metrics = {
            "test_acc": test_acc, "test_loss": test_loss,
            "val_acc": h["val_acc"][-1] if h["val_acc"] else None,
            "val_loss": h["val_loss"][-1] if h["val_loss"] else None,
            "train_loss": h["train_loss"][-1] if h["train_loss"] else None,
            "train_acc": h["train_acc"][-1] if h["train_acc"] else None,
            "epochs": self.epoch, "steps": self.step, "epoch_seconds": h["epoch_seconds"],
            "samples_per_second": self.step and self._samples_seen() / max(secs, 1e-9),
            "backend": self.cfg.backend.name, "threads": self.threads, "seed": self.cfg.trainer.seed,
            "dtype": self.cfg.dtype, "model": self.cfg.model.name, "dataset": self.data.name,
            "history": h, "best": self.best, "resumed_from": self.resumed_from, "init_from": self.init_from,
            "test_checkpoint": tested_on, "stopped_early": self.stopped_early, "clipped_steps": self.clipped_steps,
            "thread_changes": self.thread_changes,
        }
        log.info("test (%s weights): loss %.4f, accuracy %.4f", tested_on, test_loss, test_acc)
        write_json_atomic(self.run_dir / "metrics.json", metrics)
        for cb in self.callbacks:
            cb.on_train_end(self, metrics)
        return metrics

    def test_weights(self) -> str:
        """best or last: trainer.test_checkpoint, where auto means best when a validation split chose it."""
        choice = self.cfg.trainer.test_checkpoint
        if choice == "auto":
            choice = "best" if self.data.val is not None and self.cfg.checkpoint.enabled else "last"
        if choice == "best" and not (self.run_dir / "checkpoints" / "best.npz").exists():
            log.warning("no checkpoints/best.npz in %s: the test uses the last weights", self.run_dir)
            return "last"
        return choice

    def _test(self, weights: str) -> tuple[float, float, np.ndarray]:
        """Test loss, accuracy and predictions with the best or the last weights (the model keeps the last ones)."""
        if weights == "last":
            return self.evaluate(self.data.test)
        last = {k: v.copy() for k, v in self.model.named_params().items()}
        self.model.load_params(section(load_checkpoint(self.run_dir / "checkpoints" / "best.npz"), "param/"))
        try:
            return self.evaluate(self.data.test)
        finally:
            self.model.load_params(last)

    def _samples_seen(self):
        n, bs = len(self.data.train.y), self.cfg.trainer.batch_size
        full, rest = divmod(self.step, self.steps_per_epoch)
        return full * n + min(rest * bs, n)

    def _max_steps_reached(self):
        return self.max_steps is not None and self.step >= self.max_steps

    def done(self) -> bool:
        """No epoch left to train: every configured one ran, max_steps was reached, or early stopping ended the run."""
        return self.epoch >= self.cfg.trainer.epochs or self._max_steps_reached() or bool(self.stopped_early)

    def evaluate(self, split: Split) -> tuple[float, float, np.ndarray]:
        return evaluate_split(self.model, split, self.data, self.cfg.trainer.eval_batch_size)


def _progress(enabled, total, initial, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=True, dynamic_ncols=True)
