"""The training loop: forward → softmax-CE → backward (rules 1-7) → optimizer step, in one readable function.

Everything a run does is driven by the config: see conf/train.yaml and cnnpipe/config.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import types
from pathlib import Path

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend, set_threads
from cnnpipe.backends.cores import given_cores
from cnnpipe.data import batches, load_data, num_batches, preload_torchvision
from cnnpipe.losses import softmax_cross_entropy
from cnnpipe.model import build_model
from cnnpipe.optim import build_optimizer, lr_at

log = logging.getLogger("cnnpipe")


class Callback:
    """Hooks the trainer calls; TensorBoard logging and checkpointing are callbacks."""
    def on_train_start(self, tr): ...
    def on_after_backward(self, tr, lr): ...            # gradients are fresh, parameters not yet updated
    def on_step_end(self, tr, loss, acc, lr): ...       # after the optimizer step; tr.step already counts it
    def on_epoch_end(self, tr, metrics): ...
    def on_interrupt(self, tr): ...                     # a stop was requested; the step in progress finished
    def on_train_end(self, tr, metrics): ...


class NonFiniteLoss(ConfigError):
    pass


class Trainer:
    def __init__(self, cfg, run_dir):
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
        check_writable(self.run_dir)
        _log_to_file(self.run_dir / "train.log")
        log.info("model %s (%s backend, %s, %d threads: %s)\n%s", cfg.model.name, cfg.backend.name, cfg.dtype,
                 self.threads, threads_source, self.model.summary())
        if hasattr(self.backend, "warmup"):
            preload_torchvision()                            # torch's import overlaps the numba warm-up
            self.backend.warmup(self.dtype)
            log.info("numba threading layer %s, %d threads", self.backend.numba.threading_layer(),
                     self.backend.numba.get_num_threads())
        self.data = load_data(cfg.data, cfg.trainer.seed)
        log.info("data %s from %s: train %d, val %d, test %d", self.data.name, self.data.source,
                 len(self.data.train.y), 0 if self.data.val is None else len(self.data.val.y), len(self.data.test.y))
        self.optimizer = build_optimizer(cfg.optim, self.model.named_params(), self.backend)
        self.steps_per_epoch = num_batches(len(self.data.train.y), cfg.trainer.batch_size)
        self.total_steps = cfg.trainer.epochs * self.steps_per_epoch
        # trainer state (everything a checkpoint needs besides parameters, optimizer and RNGs)
        self.epoch, self.step, self.batch_in_epoch, self.best = 0, 0, 0, None
        self.history = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": [], "epoch_seconds": []}
        self.epoch_sums = [0.0, 0, 0, 0.0]                   # loss·n, correct, n, seconds inside the current epoch
        self.val_preds = None                                # last validation predictions (confusion matrix)
        self.stop_requested = None                           # set to a reason (e.g. "SIGTERM") to stop after this step
        self.callbacks: list[Callback] = []

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, tc = self.cfg, self.cfg.trainer
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.epoch < tc.epochs and not self._max_steps_reached():
            loss_sum, correct, seen, seconds = self.epoch_sums
            it = batches(self.data.train, tc.batch_size, mean=self.data.mean, std=self.data.std, dtype=self.dtype,
                         shuffle_seed=[tc.seed, self.epoch], augment=self.data.augment,
                         crop_padding=self.data.crop_padding, start=self.batch_in_epoch)
            bar = _progress(tc.progress, self.steps_per_epoch, self.batch_in_epoch, f"epoch {self.epoch + 1}/{tc.epochs}")
            t0 = time.perf_counter()
            for x, y in it:                                                  # x N,C,H,W   y N
                lr = lr_at(cfg.optim, self.step, self.steps_per_epoch, self.total_steps)
                logits = self.model.forward(x, train=True)                   # N,classes
                loss, delta = softmax_cross_entropy(logits, y)               # δ at the logits
                self.model.backward(delta)                                   # rules 1-7, layer by layer
                if not math.isfinite(loss):
                    raise NonFiniteLoss(self._nonfinite_message(loss))
                for cb in self.callbacks:
                    cb.on_after_backward(self, lr)
                self.optimizer.step(self.model.named_grads(), lr)
                acc = float((logits.argmax(1) == y).mean())
                loss_sum, correct, seen = loss_sum + loss * len(y), correct + int(acc * len(y) + 0.5), seen + len(y)
                self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                self.epoch_sums = [loss_sum, correct, seen, seconds + time.perf_counter() - t0]
                for cb in self.callbacks:
                    cb.on_step_end(self, loss, acc, lr)
                if self.step % tc.log_every == 0:
                    log.debug("step %d loss %.4f acc %.3f lr %.4g", self.step, loss, acc, lr)
                if bar is not None:
                    bar.update(1)
                    if self.step % tc.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                                        samples_s=f"{seen / max(self.epoch_sums[3], 1e-9):.0f}")
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

    def _end_epoch(self):
        loss_sum, correct, seen, seconds = self.epoch_sums
        h = self.history
        h["train_loss"].append(loss_sum / max(seen, 1))
        h["train_acc"].append(correct / max(seen, 1))
        h["epoch_seconds"].append(seconds)
        metrics = {"epoch": self.epoch + 1, "train_loss": h["train_loss"][-1], "train_acc": h["train_acc"][-1],
                   "epoch_seconds": seconds, "samples_per_second": seen / max(seconds, 1e-9)}
        if self.data.val is not None:
            metrics["val_loss"], metrics["val_acc"], self.val_preds = self.evaluate(self.data.val)
            h["val_loss"].append(metrics["val_loss"])
            h["val_acc"].append(metrics["val_acc"])
        log.info("epoch %d/%d: " + ", ".join(f"{k} %.4f" for k in metrics if k != "epoch"), self.epoch + 1,
                 self.cfg.trainer.epochs, *[v for k, v in metrics.items() if k != "epoch"])
        self.epoch, self.batch_in_epoch, self.epoch_sums = self.epoch + 1, 0, [0.0, 0, 0, 0.0]
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)

    def _finish(self) -> dict:
        if self.batch_in_epoch:                              # stopped by max_steps inside an epoch
            self._end_epoch()
        test_loss, test_acc, _ = self.evaluate(self.data.test)
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
            "history": h, "best": self.best,
        }
        log.info("test: loss %.4f, accuracy %.4f", test_loss, test_acc)
        write_json_atomic(self.run_dir / "metrics.json", metrics)
        for cb in self.callbacks:
            cb.on_train_end(self, metrics)
        return metrics

    def _samples_seen(self):
        n, bs = len(self.data.train.y), self.cfg.trainer.batch_size
        full, rest = divmod(self.step, self.steps_per_epoch)
        return full * n + min(rest * bs, n)

    def _max_steps_reached(self):
        return self.cfg.trainer.max_steps is not None and self.step >= self.cfg.trainer.max_steps

    def _nonfinite_message(self, loss):
        first = next((name for name, g in self.model.named_grads().items() if not np.all(np.isfinite(g))), None)
        where = f"the first layer whose gradient went non-finite is {first.split('.')[0]} ({first})" if first \
            else "all gradients were still finite (the logits overflowed)"
        return (f"The loss became {loss} at step {self.step + 1} (epoch {self.epoch + 1}); {where}. Training stopped; "
                f"the last good checkpoint (if any) in {self.run_dir / 'checkpoints'} is kept. Lower optim.lr, "
                f"use dtype=float64, or check the data normalisation.")

    def evaluate(self, split):
        return evaluate_split(self.model, split, self.data, self.cfg.trainer.eval_batch_size)


class Interrupted(Exception):
    """Raised after the step in progress finished because a stop was requested (signal)."""
    def __init__(self, reason, run_dir):
        super().__init__(reason)
        self.reason, self.run_dir = reason, run_dir


def evaluate_split(model, split, data, batch_size):
    """Mean loss, accuracy and predictions over a split, in eval mode (no dropout)."""
    loss_sum, preds = 0.0, []
    for x, y in batches(split, batch_size, mean=data.mean, std=data.std, dtype=model.dtype):
        logits = model.forward(x, train=False)                           # N,classes
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss_sum -= float(logp[np.arange(len(y)), y].sum())
        preds.append(logits.argmax(1))
    preds = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    n = max(len(split.y), 1)
    return loss_sum / n, float((preds == split.y).mean()) if len(preds) else 0.0, preds


def optimized_metric(cfg, metrics):
    key = cfg.optimized_metric or ("val_acc" if metrics.get("val_acc") is not None else "test_acc")
    if key not in metrics:
        raise ConfigError(f"optimized_metric={key!r} is not a metric of the run; choose one of "
                          f"{', '.join(k for k, v in metrics.items() if isinstance(v, float))}.")
    return metrics[key]


def make_trainer(cfg, run_dir, overrides=None) -> Trainer:
    """A Trainer with its callbacks; with cfg.resume, rebuilt from the checkpoint and continuing in its run dir."""
    from cnnpipe.checkpoint import Checkpointer, load_checkpoint, restore, resume_config, run_dir_of
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        cfg, run_dir = resume_config(cfg, ckpt, overrides), run_dir_of(ckpt)
    trainer = Trainer(cfg, run_dir)
    if ckpt is not None:
        restore(trainer, ckpt)
        log.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)", ckpt["_path"], trainer.epoch,
                 trainer.step, trainer.batch_in_epoch)
    if cfg.checkpoint.enabled:
        trainer.callbacks.append(Checkpointer(trainer))
    if cfg.logger.tensorboard:
        from cnnpipe.tb import TensorBoardLogger
        trainer.callbacks.append(TensorBoardLogger(trainer))
    return trainer


def train(cfg, run_dir, overrides=None) -> float:
    """Run one training job in run_dir and return the optimized metric (for Hydra's sweepers).

    SIGINT/SIGTERM/SIGUSR2 finish the step in progress, write checkpoints/last.npz and raise Interrupted. SLURM
    may send its time-limit warning (SIGUSR2) up to a minute early, so one that comes during set-up is kept: the
    run then stops after its first step."""
    early = types.SimpleNamespace(stop_requested=None)
    with stop_on_signals(early, (signal.SIGUSR2,)):
        trainer = make_trainer(cfg, run_dir, overrides)
        with stop_on_signals(trainer):
            trainer.stop_requested = trainer.stop_requested or early.stop_requested
            metrics = trainer.fit()
    return optimized_metric(trainer.cfg, metrics)


@contextlib.contextmanager
def stop_on_signals(trainer, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)):
    """First SIGINT/SIGTERM/SIGUSR2: ask the loop to stop after this step (sets trainer.stop_requested). A second
    SIGINT: stop at once. SIGUSR2 is the warning a SLURM job gets before its time limit (submitit's sbatch
    --signal=USR2@<delay>)."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = name
        log.warning("%s received: finishing the current step, then saving checkpoints/last.npz", name)
    if threading.current_thread() is not threading.main_thread():
        yield                                   # signals can only be handled on the main thread
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- small helpers ------------------------------------------------------------------------------------------
def check_writable(run_dir: Path):
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"The run directory {run_dir} is not writable ({e.strerror}). Choose another with "
                          f"hydra.run.dir=<path>, or fix its permissions, then run again.") from None


def write_json_atomic(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _log_to_file(path: Path):
    """train.log in the run directory (Hydra already adds one when it runs the job; don't add it twice)."""
    root = logging.getLogger()
    for h in root.handlers + log.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve():
            return
    for h in [h for h in log.handlers if getattr(h, "cnnpipe_run_log", False)]:
        log.removeHandler(h)                                   # a previous run in this process
        h.close()
    handler = logging.FileHandler(path)
    handler.cnnpipe_run_log = True
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _progress(enabled, total, initial, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=True, dynamic_ncols=True)
