"""Checkpoints: one .npz of plain arrays (no pickle), written atomically, refused clearly when bad.

Layout of a checkpoint (every entry is a numpy array; strings are numpy unicode scalars):
    format_version          int
    config                  the resolved run config, YAML
    param/<layer>.<W|b>     parameters
    optim/<key>             optimizer state (step count t, momentum buffers or Adam moments)
    trainer/<key>           epoch, step, batch_in_epoch (position inside the epoch), epoch_sums, best
    history/<key>           per-epoch train/val loss and accuracy, epoch seconds
    rng/dropout             the dropout generator's state, JSON
Shuffling and augmentation are drawn from (seed, epoch), so the state above is all a resume needs.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cnnpipe import ConfigError

log = logging.getLogger("cnnpipe")

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
              "trainer/epoch_sums": np.array(tr.epoch_sums, dtype=np.float64),
              "trainer/best": np.array(np.nan if tr.best is None else tr.best, dtype=np.float64)}
    arrays.update({f"param/{k}": v for k, v in tr.model.named_params().items()})
    arrays.update({f"optim/{k}": v for k, v in tr.optimizer.state_dict().items()})
    arrays.update({f"history/{k}": np.array(v, dtype=np.float64) for k, v in tr.history.items()})
    return arrays


def save_atomic(path: Path, arrays: dict[str, np.ndarray], _before_rename=None):
    """Write to a temporary file in the same folder, flush + fsync, then os.replace: a crash at any point
    leaves either the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        if _before_rename is not None:          # fault-injection point for tests
            _before_rename(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)                         # make the rename itself durable
    finally:
        os.close(dirfd)


# -- reading --------------------------------------------------------------------------------------------------
def load_checkpoint(path) -> dict[str, np.ndarray]:
    """All arrays of a checkpoint, or a CheckpointError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.npz" if (path / "checkpoints").is_dir() else path / "last.npz"
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
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _get(cfg, key):
    return OmegaConf.select(cfg, key)


def arch_differences(cfg_a, cfg_b, keys=ARCH_KEYS):
    """[(key, a, b)] for architecture keys whose resolved values differ."""
    out = []
    for key in keys:
        a, b = _get(cfg_a, key), _get(cfg_b, key)
        a = OmegaConf.to_container(a, resolve=True) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b, resolve=True) if OmegaConf.is_config(b) else b
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                out += [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                out.append((key, a, b))
    return out


def resume_config(cfg, ckpt, overrides: list[str] | None):
    """The config a resumed run uses.

    With `overrides` (what the user typed, from Hydra): the checkpoint's config, plus the keys the user set
    explicitly; an explicitly set architecture key that differs from the checkpoint is an error.
    Without (library use): the current config, whose architecture must equal the checkpoint's.
    """
    saved = checkpoint_config(ckpt)
    path = str(ckpt["_path"])
    if overrides is None:
        diffs = arch_differences(cfg, saved)
        merged = cfg
    else:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        keys = [k for k in keys if k != "resume" and not k.startswith("hydra")]
        arch = [k for k in keys if any(k == a or k.startswith(a + ".") or a.startswith(k + ".") for a in ARCH_KEYS)]
        diffs = arch_differences(cfg, saved, keys=arch)
        merged = OmegaConf.merge(saved, {})
        OmegaConf.set_struct(merged, False)
        for k in keys:
            value = _get(cfg, k)
            OmegaConf.update(merged, k, OmegaConf.to_container(value, resolve=True)
                             if OmegaConf.is_config(value) else value, force_add=True)
    if diffs:
        lines = "; ".join(f"{k}: checkpoint {b!r} vs now {a!r}" for k, a, b in diffs)
        raise CheckpointError(f"Cannot resume from {path}: the architecture differs from the checkpoint's ({lines}). "
                              f"Drop those overrides to continue the saved model, or start a new run without resume=.")
    merged = OmegaConf.merge(merged, {"resume": str(path)})
    return merged


def param_differences(params: dict[str, np.ndarray], saved: dict[str, np.ndarray]) -> list[str]:
    """What stops `saved` arrays from loading into `params`, matched by name and shape: one line each."""
    out = [f"{k}: model {params[k].shape} vs checkpoint {saved[k].shape}" for k in params
           if k in saved and saved[k].shape != params[k].shape]
    out += [f"{k}: missing from checkpoint" for k in params if k not in saved]
    out += [f"{k}: not in the model" for k in saved if k not in params]
    return out


def _section(ckpt, prefix) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}


def check_params(model, ckpt):
    """Every parameter present with the model's shape, or a CheckpointError listing what differs."""
    problems = param_differences(model.named_params(), _section(ckpt, "param/"))
    if problems:
        raise CheckpointError(f"Checkpoint {ckpt['_path']} was saved from another architecture; these parameters "
                              f"differ: {'; '.join(problems)}. Use the model settings it was trained with, or another "
                              f"checkpoint.")


def init_from_checkpoint(tr, ckpt, strict=True, optimizer=False) -> dict:
    """A new run starts from the checkpoint's weights (and optimizer state with `optimizer`): layers match by name
    and shape. strict: any difference is an error; otherwise the differing ones keep their fresh initialisation
    and are listed. Returns what was loaded and skipped (for metrics.json)."""
    path, params, saved = str(ckpt["_path"]), tr.model.named_params(), _section(ckpt, "param/")
    problems = param_differences(params, saved)
    if problems and strict:
        raise CheckpointError(f"init_from={path}: these parameters do not match the model by name and shape: "
                              f"{'; '.join(problems)}. Set init_from_strict=false to load the matching ones and keep "
                              f"the others freshly initialised (e.g. a new last layer for another dataset).")
    loaded = [k for k in params if k in saved and saved[k].shape == params[k].shape]
    for k in loaded:
        params[k][...] = saved[k]
    skipped = [p.split(":")[0] for p in problems if "not in the model" not in p]
    if optimizer:
        skipped_state = _init_optimizer_state(tr.optimizer, _section(ckpt, "optim/"), loaded, path, strict)
        skipped += [k for k in skipped_state if k not in skipped]
    log.info("init_from %s: loaded %d parameter arrays%s%s", path, len(loaded),
             " and the optimizer state" if optimizer else "",
             f"; skipped (kept their fresh initialisation): {'; '.join(problems)}" if problems else "")
    return {"path": path, "loaded": loaded, "skipped": skipped, "optimizer": bool(optimizer)}


def _init_optimizer_state(opt, saved: dict[str, np.ndarray], loaded: list[str], path, strict) -> list[str]:
    """Copy the saved optimizer buffers of the loaded parameters into `opt`; returns the parameters without one."""
    state = opt.state_dict()
    wanted = [k for k in state if k != "t" and k.split("/", 1)[1] in loaded]
    missing = [k for k in wanted if k not in saved or saved[k].shape != state[k].shape]
    if missing and strict:
        raise CheckpointError(f"init_from={path} init_from_optimizer=true: the checkpoint has no matching optimizer "
                              f"state for {', '.join(missing)} (saved keys: {', '.join(sorted(saved)) or 'none'}); "
                              f"was it trained with another optimizer? Drop init_from_optimizer, or set "
                              f"init_from_strict=false to load what matches.")
    state.update({k: saved[k] for k in wanted if k not in missing})
    if "t" in saved:
        state["t"] = saved["t"]
    opt.load_state_dict(state)
    return sorted({k.split("/", 1)[1] for k in missing})


def restore(tr, ckpt):
    """Put parameters, optimizer, trainer position and RNG state back exactly as they were saved."""
    check_params(tr.model, ckpt)
    tr.model.load_params(_section(ckpt, "param/"))
    tr.optimizer.load_state_dict(_section(ckpt, "optim/"))
    tr.epoch, tr.step = int(ckpt["trainer/epoch"]), int(ckpt["trainer/step"])
    tr.batch_in_epoch = int(ckpt["trainer/batch_in_epoch"])
    sums = ckpt["trainer/epoch_sums"]
    tr.epoch_sums = [float(sums[0]), int(sums[1]), int(sums[2]), float(sums[3])]
    best = float(ckpt["trainer/best"])
    tr.best = None if np.isnan(best) else best
    for k in tr.history:
        tr.history[k] = [float(v) for v in ckpt.get(f"history/{k}", [])]
    tr.model.rng.bit_generator.state = json.loads(str(ckpt["rng/dropout"]))


# -- the trainer callback ---------------------------------------------------------------------------------------
def _better(monitor, new, old):
    return old is None or (new < old if monitor.endswith("loss") else new > old)


class Checkpointer:
    """checkpoints/last.npz every `checkpoint.every` epochs (and every_steps steps), best.npz by `monitor`,
    last.npz on an interrupt."""

    def __init__(self, tr):
        self.cfg, self.dir = tr.cfg.checkpoint, Path(tr.run_dir) / "checkpoints"

    def save(self, tr, name="last.npz"):
        save_atomic(self.dir / name, checkpoint_arrays(tr))

    def on_train_start(self, tr): ...
    def on_after_backward(self, tr, lr): ...

    def on_step_end(self, tr, loss, acc, lr):
        if self.cfg.every_steps and tr.step % self.cfg.every_steps == 0:
            self.save(tr)

    def on_epoch_end(self, tr, metrics):
        monitor = self.cfg.monitor if self.cfg.monitor in metrics else \
            ("val_acc" if "val_acc" in metrics else "train_loss")
        improved = _better(monitor, metrics[monitor], tr.best)
        if improved:
            tr.best = float(metrics[monitor])
        if tr.epoch % self.cfg.every == 0 or tr.epoch == tr.cfg.trainer.epochs:
            self.save(tr)
        if improved:
            self.save(tr, "best.npz")

    def on_interrupt(self, tr):
        self.save(tr)

    def on_train_end(self, tr, metrics): ...
