"""Checkpoints: one .npz of plain arrays (no pickle), written atomically, refused clearly when bad.

Layout of a checkpoint (every entry is a numpy array; strings are numpy unicode scalars):
    format_version          int
    config                  the resolved run config, YAML
    param/<layer>.<W|b>     parameters
    optim/<key>             optimizer state (step count t, momentum buffers or Adam moments)
    trainer/<key>           epoch, step, batch_in_epoch (position inside the epoch), epoch_sums (the epoch's running
                            loss·n, correct, seen, seconds), best, clipped_steps, early_stopping (best, its epoch,
                            epochs waited), stopped_early (why early stopping ended the run; "" while it goes on,
                            and absent from older checkpoints)
    history/<key>           per-epoch train/val loss and accuracy, epoch seconds
    rng/dropout             the dropout generator's state, JSON
Shuffling and augmentation are drawn from (seed, epoch), so the state above is all a resume needs.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cnnpipe import ConfigError
from cnnpipe.callbacks import Callback
from cnnpipe.early_stop import EPOCH_METRICS
from cnnpipe.jsonio import atomic_path
from cnnpipe.metrics import default_metric, improved
from cnnpipe.rundir import checkpoint_run_dir

FORMAT_VERSION = 1
# Keys that define the network: they must match to load a checkpoint's parameters.
ARCH_KEYS = ("model", "conv", "pool", "dtype", "data.in_channels", "data.image_size", "data.num_classes")


class CheckpointError(ConfigError):
    pass


# -- writing --------------------------------------------------------------------------------------------------
def checkpoint_arrays(tr) -> dict[str, np.ndarray]:
    arrays = {"format_version": np.array(FORMAT_VERSION),
              "config": np.array(OmegaConf.to_yaml(tr.cfg, resolve=True)),
              "rng/dropout": np.array(json.dumps(tr.model.rng.bit_generator.state)),
              "trainer/epoch": np.array(tr.epoch), "trainer/step": np.array(tr.step),
              "trainer/batch_in_epoch": np.array(tr.batch_in_epoch),
              "trainer/epoch_sums": tr.totals.as_array(),
              "trainer/best": np.array(np.nan if tr.best is None else tr.best, dtype=np.float64),
              "trainer/clipped_steps": np.array(tr.clipped_steps),
              "trainer/early_stopping": tr.early_stopping.as_array(),
              "trainer/stopped_early": np.array(tr.stopped_early or "")}
    arrays.update({f"param/{k}": v for k, v in tr.model.named_params().items()})
    arrays.update({f"optim/{k}": v for k, v in tr.optimizer.state_dict().items()})
    arrays.update({f"history/{k}": np.array(v, dtype=np.float64) for k, v in tr.history.items()})
    return arrays


def save_atomic(path: Path, arrays: dict[str, np.ndarray], _before_rename=None):
    """jsonio.atomic_path's temporary file, fsync and rename: a crash at any point leaves either the old
    checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, _before_rename) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


# -- reading --------------------------------------------------------------------------------------------------
def load_checkpoint(path) -> dict[str, np.ndarray]:
    """All arrays of a checkpoint, or a CheckpointError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():                                   # a run directory or its checkpoints/ folder
        path = checkpoint_run_dir(path) / "checkpoints" / "last.npz"
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist. Give resume= / ckpt= a checkpoint file "
                              f"(…/checkpoints/last.npz or best.npz) or a run directory that has one.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":                           # every .npz is a zip archive
        raise CheckpointError(f"Checkpoint {path} is not a readable .npz file (it is not a zip archive: wrong "
                              f"file, truncated at the start, or corrupted). Use another checkpoint (best.npz, or "
                              f"an earlier run).")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}           # reads every member: CRC errors surface here
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise CheckpointError(f"Checkpoint {path} contains pickled Python objects and is refused: cnnpipe "
                                  f"checkpoints hold plain arrays only, and loading pickle can run arbitrary code."
                                  ) from None
        raise CheckpointError(f"Checkpoint {path} is not a readable .npz file ({e}); it may be truncated or "
                              f"corrupted. Use another checkpoint (best.npz, or an earlier run).") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"Checkpoint {path} is not a readable .npz file ({type(e).__name__}: {e}); it may "
                              f"be truncated or corrupted. Use another checkpoint (best.npz, or an earlier run)."
                              ) from None
    if "format_version" not in arrays or "config" not in arrays:
        raise CheckpointError(f"{path} is an .npz file but not a cnnpipe checkpoint (no format_version/config).")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {path} has format version {int(arrays['format_version'])}; this "
                              f"cnnpipe reads version {FORMAT_VERSION}.")
    arrays["_path"] = np.array(str(path))
    return arrays


def checkpoint_config(ckpt):
    return OmegaConf.create(str(ckpt["config"]))


def run_dir_of(ckpt) -> Path:
    """A checkpoint at <run>/checkpoints/x.npz belongs to <run>."""
    p = Path(str(ckpt["_path"])).resolve()
    return checkpoint_run_dir(p) or p.parent


def section(ckpt, prefix: str) -> dict[str, np.ndarray]:
    """The entries under `prefix` ("param/", "optim/", "history/"), keyed by the rest of their name."""
    return {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}


# -- the trainer callback ---------------------------------------------------------------------------------------
def checked_monitor(monitor: str | None, has_val: bool) -> str:
    """The per-epoch metric best.npz follows: checkpoint.monitor, refused at start when the run cannot have it;
    null: metrics.default_metric (val_acc, or train_loss without a validation split)."""
    names = [m for m in EPOCH_METRICS if has_val or not m.startswith("val_")]
    if monitor is None:
        return default_metric(names)
    if monitor not in EPOCH_METRICS:
        raise ConfigError(f"checkpoint.monitor={monitor!r} is not a per-epoch metric: choose one of "
                          f"{', '.join(EPOCH_METRICS)}, or null (val_acc, or train_loss without a validation split).")
    if monitor not in names:
        raise ConfigError(f"checkpoint.monitor={monitor} needs a validation split, and this run has none "
                          f"(data.val_size=0): set data.val_size > 0, or monitor one of {', '.join(names)}, or "
                          f"null (the default: train_loss without a validation split).")
    return monitor


class Checkpointer(Callback):
    """checkpoints/last.npz every `checkpoint.every` epochs (and every_steps steps) and after the run's last epoch
    (whatever ended it), best.npz by `monitor`, last.npz on an interrupt."""

    def __init__(self, tr):
        self.cfg, self.dir = tr.cfg.checkpoint, Path(tr.run_dir) / "checkpoints"
        self.every_steps = self.cfg.every_steps              # read every step: a plain value
        self.monitor = checked_monitor(self.cfg.monitor, tr.data.val is not None)

    def save(self, tr, name="last.npz"):
        save_atomic(self.dir / name, checkpoint_arrays(tr))

    def on_step_end(self, tr, step, result, lr, seconds):
        if self.every_steps and step % self.every_steps == 0:
            self.save(tr)

    def on_epoch_end(self, tr, metrics):
        better = improved(self.monitor, metrics[self.monitor], tr.best)
        if better:
            tr.best = float(metrics[self.monitor])
        if tr.epoch % self.cfg.every == 0 or tr.done():      # done: early stopping (it runs first) or max_steps too
            self.save(tr)
        if better:
            self.save(tr, "best.npz")

    def on_interrupt(self, tr):
        self.save(tr)
