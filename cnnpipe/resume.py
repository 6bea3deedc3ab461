"""Putting a checkpoint's state into a new trainer: resume (the whole state, the run goes on) and init_from
(weights, optionally optimizer state: a new run starts from them)."""
from __future__ import annotations

import json
import logging

import numpy as np
from omegaconf import OmegaConf

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend, set_threads
from cnnpipe.checkpoint import ARCH_KEYS, CheckpointError, checkpoint_config, section
from cnnpipe.early_stop import EarlyStoppingState
from cnnpipe.model import build_model
from cnnpipe.step import EpochTotals

log = logging.getLogger("cnnpipe")


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


def check_params(model, ckpt):
    """Every parameter present with the model's shape, or a CheckpointError listing what differs."""
    problems = param_differences(model.named_params(), section(ckpt, "param/"))
    if problems:
        raise CheckpointError(f"Checkpoint {ckpt['_path']} was saved from another architecture; these parameters "
                              f"differ: {'; '.join(problems)}. Use the model settings it was trained with, or another "
                              f"checkpoint.")


def init_from_checkpoint(tr, ckpt, strict=True, optimizer=False) -> dict:
    """A new run starts from the checkpoint's weights (and optimizer state with `optimizer`): layers match by name
    and shape. strict: any difference is an error; otherwise the differing ones keep their fresh initialisation
    and are listed. Returns what was loaded and skipped (for metrics.json)."""
    path, params, saved = str(ckpt["_path"]), tr.model.named_params(), section(ckpt, "param/")
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
        skipped_state = _init_optimizer_state(tr.optimizer, section(ckpt, "optim/"), loaded, path, strict)
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
    tr.model.load_params(section(ckpt, "param/"))
    tr.optimizer.load_state_dict(section(ckpt, "optim/"))
    tr.epoch, tr.step = int(ckpt["trainer/epoch"]), int(ckpt["trainer/step"])
    tr.batch_in_epoch = int(ckpt["trainer/batch_in_epoch"])
    tr.totals = EpochTotals.from_array(ckpt["trainer/epoch_sums"])
    best = float(ckpt["trainer/best"])
    tr.best = None if np.isnan(best) else best
    tr.clipped_steps = int(ckpt.get("trainer/clipped_steps", 0))
    if "trainer/early_stopping" in ckpt:
        tr.early_stopping = EarlyStoppingState.from_array(ckpt["trainer/early_stopping"])
    tr.stopped_early = str(ckpt.get("trainer/stopped_early", "")) or None      # older checkpoints: not stopped
    if tr.stopped_early:
        log.info("the run already stopped early after epoch %d (%s): resuming it runs the final test without "
                 "training; to train on from its weights, start a new run with init_from=%s", tr.epoch,
                 tr.stopped_early, ckpt["_path"])
    for k in tr.history:
        tr.history[k] = [float(v) for v in ckpt.get(f"history/{k}", [])]
    tr.model.rng.bit_generator.state = json.loads(str(ckpt["rng/dropout"]))


def model_from_checkpoint(ckpt, overrides: list[str] = (), dtype=None, backend: str | None = None):
    """The checkpoint's network with its parameters and its config, plus data.*/backend.* overrides (the
    architecture is the checkpoint's). Returns (model, cfg)."""
    cfg = checkpoint_config(ckpt)
    if backend is not None:
        cfg = OmegaConf.merge(cfg, {"backend": {"name": backend}})
    bad = [o for o in overrides if not o.startswith(("data.", "backend.", "trainer.eval_batch_size="))]
    if bad:
        raise ConfigError(f"The architecture comes from the checkpoint: only data.*, backend.* and "
                          f"trainer.eval_batch_size can be given; got: {', '.join(bad)}.")
    for o in overrides:
        key = o.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            group = key.split(".", 1)[0]
            raise ConfigError(f"{key} is not a key of the checkpoint's {group} config; known keys: "
                              f"{', '.join(f'{group}.{k}' for k in cfg[group])}.")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    set_threads(cfg.backend.threads, cfg.backend.name)
    model = build_model(cfg, get_backend(cfg.backend.name), dtype=dtype)
    check_params(model, ckpt)
    model.load_params(section(ckpt, "param/"))
    return model, cfg
