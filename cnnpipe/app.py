"""The wiring around the training loop: a Trainer with its callbacks from the config (resume, init_from,
checkpoints, TensorBoard), train.log in the run directory, and signals that stop the loop cleanly."""
from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import types
from pathlib import Path

from omegaconf import DictConfig

from cnnpipe import ConfigError, runlock
from cnnpipe.checkpoint import Checkpointer, checkpoint_arrays, load_checkpoint, run_dir_of, save_atomic
from cnnpipe.early_stop import EarlyStopping
from cnnpipe.governor import ThreadGovernor
from cnnpipe.metrics import optimized_metric
from cnnpipe.resume import init_from_checkpoint, restore, resume_config
from cnnpipe.rundir import check_writable
from cnnpipe.train import Trainer

log = logging.getLogger("cnnpipe")


def make_trainer(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> Trainer:
    """A Trainer writing into run_dir, with its callbacks. With cfg.resume: rebuilt from the checkpoint's state;
    in the checkpoint's own run directory it continues that run, elsewhere it starts a new run from that state and
    the source run is only read. With cfg.init_from: a new run (step 0) from the checkpoint's weights."""
    if cfg.resume and cfg.init_from:
        raise ConfigError(f"resume={cfg.resume} and init_from={cfg.init_from} were both given: resume= continues a "
                          f"run (its step, optimizer and position), init_from= starts a new run from a checkpoint's "
                          f"weights. Give one of them.")
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        cfg = resume_config(cfg, ckpt, overrides)
    run_dir = Path(run_dir)
    check_writable(run_dir)
    log_to_file(run_dir / "train.log")
    trainer = Trainer(cfg, run_dir)
    if ckpt is not None:
        _continue_from(trainer, ckpt)
    if cfg.init_from:
        trainer.init_from = init_from_checkpoint(trainer, load_checkpoint(cfg.init_from), strict=cfg.init_from_strict,
                                                 optimizer=cfg.init_from_optimizer)
    numba = getattr(trainer.backend, "numba", None)         # numba only: its results do not depend on the count
    if cfg.backend.adapt_threads and numba is not None and trainer.threads > 1:
        budget = min(trainer.threads, numba.config.NUMBA_NUM_THREADS)
        trainer.callbacks.append(ThreadGovernor(numba, budget).attach(trainer))
    if cfg.trainer.early_stopping.patience is not None:          # before the checkpointer: it saves the count
        trainer.callbacks.append(EarlyStopping(cfg.trainer.early_stopping))
    if cfg.checkpoint.enabled:
        trainer.callbacks.append(Checkpointer(trainer))
    if cfg.logger.tensorboard:
        from cnnpipe.tb import TensorBoardLogger
        trainer.callbacks.append(TensorBoardLogger(trainer))
    if cfg.trainer.profile:                             # last: it times the other callbacks' hooks
        from cnnpipe.profile import Profiler
        trainer.callbacks.append(Profiler(trainer))
    return trainer


def _continue_from(trainer: Trainer, ckpt) -> None:
    """Put the checkpoint's state back; into a new run directory, that directory gets its own copy of it."""
    restore(trainer, ckpt)
    trainer.resumed_from = str(ckpt["_path"])
    source = run_dir_of(ckpt)
    where = f"at epoch {trainer.epoch}, step {trainer.step} (batch {trainer.batch_in_epoch} of the epoch)"
    if source.resolve() == trainer.run_dir.resolve():
        log.info("resumed from %s %s", ckpt["_path"], where)
        return
    save_atomic(trainer.run_dir / "checkpoints" / "last.npz", checkpoint_arrays(trainer))
    if (source / "checkpoints" / "best.npz").exists():                 # the best so far, for test_checkpoint=best
        shutil.copyfile(source / "checkpoints" / "best.npz", trainer.run_dir / "checkpoints" / "best.npz")
    log.info("resumed from %s %s into the new run directory %s; %s is left as it is", ckpt["_path"], where,
             trainer.run_dir, source)


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> float:
    """Run one training job in run_dir and return the optimized metric (for Hydra's sweepers).

    SIGINT/SIGTERM/SIGUSR2 finish the step in progress, write checkpoints/last.npz and raise Interrupted. SLURM
    may send its time-limit warning (SIGUSR2) up to a minute early, so one that comes during set-up is kept: the
    run then stops after its first step."""
    early = types.SimpleNamespace(stop_requested=None)
    with stop_on_signals(early, (signal.SIGUSR2,)):
        trainer = make_trainer(cfg, run_dir, overrides)
        runlock.started(run_dir)                # set up: from here on a failure keeps the directory (a run)
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


def log_to_file(path: Path) -> None:
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
