"""Optimizers (SGD with momentum/nesterov/weight decay, Adam) and the learning-rate schedule.

Updates follow PyTorch's formulas exactly, so the same settings train the same way in both. The element-wise
update itself is the backend's (`sgd_update` / `adam_update`: numpy spells it out, numba fuses it into one
parallel pass); without a backend the numpy one is used.
State is a flat dict of arrays (for checkpoints): `state_dict()` / `load_state_dict()`.
"""
from __future__ import annotations

import math

import numpy as np

from cnnpipe import ConfigError


class Optimizer:
    def __init__(self, params: dict[str, np.ndarray], lr: float, weight_decay: float = 0.0, backend=None):
        self.params, self.lr, self.weight_decay, self.t = params, float(lr), float(weight_decay), 0
        self.buffers: dict[str, dict[str, np.ndarray]] = {}
        if backend is None:
            from cnnpipe.backends import numpy_backend as backend
        self.B = backend

    def step(self, grads: dict[str, np.ndarray], lr: float):
        self.t += 1
        for name, p in self.params.items():
            self._update(name, p, grads[name], lr)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"t": np.array(self.t, dtype=np.int64)}
        for kind, bufs in self.buffers.items():
            for name, arr in bufs.items():
                out[f"{kind}/{name}"] = arr
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]):
        self.t = int(state["t"])
        for key, arr in state.items():
            if key == "t":
                continue
            kind, name = key.split("/", 1)
            self.buffers.setdefault(kind, {})[name] = np.array(arr, dtype=self.params[name].dtype)


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, backend=None):
        super().__init__(params, lr, weight_decay, backend)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0.")
        if self.momentum:
            self.buffers["momentum"] = {n: np.zeros_like(p) for n, p in params.items()}

    def _update(self, name, p, g, lr):
        v = self.buffers["momentum"][name] if self.momentum else None
        self.B.sgd_update(p, g, v, lr, self.momentum, self.nesterov, self.weight_decay, first=self.t == 1)


class Adam(Optimizer):
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, backend=None):
        super().__init__(params, lr, weight_decay, backend)
        self.b1, self.b2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.buffers["m"] = {n: np.zeros_like(p) for n, p in params.items()}
        self.buffers["v"] = {n: np.zeros_like(p) for n, p in params.items()}

    def _update(self, name, p, g, lr):
        self.B.adam_update(p, g, self.buffers["m"][name], self.buffers["v"][name], lr, self.b1, self.b2, self.eps,
                           self.weight_decay, self.t)


def check_optim_values(cfg):
    """Values that cannot train are refused before any data is loaded (a negative or NaN lr would only show up
    as a NaN loss a few steps in)."""
    def bad(key, value, rule):
        raise ConfigError(f"optim.{key}={value!r} cannot work: {rule}. Fix it on the command line (optim.{key}=...) "
                          f"or in conf/optim/{cfg.name}.yaml.")
    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)
    if not finite(cfg.lr) or cfg.lr <= 0:
        bad("lr", cfg.lr, "the learning rate must be a finite number > 0")
    if not finite(cfg.weight_decay) or cfg.weight_decay < 0:
        bad("weight_decay", cfg.weight_decay, "weight decay must be a finite number >= 0")
    if cfg.name == "sgd" and (not finite(cfg.momentum) or not 0 <= cfg.momentum < 1):
        bad("momentum", cfg.momentum, "momentum must be in [0, 1)")
    if cfg.name == "adam":
        if len(cfg.betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in cfg.betas):
            bad("betas", list(cfg.betas), "Adam's betas must be two numbers in [0, 1)")
        if not finite(cfg.eps) or cfg.eps <= 0:
            bad("eps", cfg.eps, "eps must be a finite number > 0")
    if cfg.schedule == "step":
        if cfg.step_size < 1:
            bad("step_size", cfg.step_size, "schedule=step needs step_size >= 1 epoch")
        if not finite(cfg.gamma) or not 0 < cfg.gamma <= 1:
            bad("gamma", cfg.gamma, "schedule=step multiplies the lr by gamma, which must be in (0, 1]")
    if cfg.schedule == "cosine" and (not finite(cfg.min_lr) or not 0 <= cfg.min_lr <= cfg.lr):
        bad("min_lr", cfg.min_lr, f"schedule=cosine decays to min_lr, which must be in [0, lr={cfg.lr}]")
    if cfg.schedule not in ("constant", "step", "cosine"):
        bad("schedule", cfg.schedule, "choose constant, step or cosine")
    if cfg.warmup_steps < 0:
        bad("warmup_steps", cfg.warmup_steps, "the warmup's length in steps must be >= 0")
    if not finite(cfg.warmup_epochs) or cfg.warmup_epochs < 0:
        bad("warmup_epochs", cfg.warmup_epochs, "the warmup's length in epochs must be a finite number >= 0")
    if cfg.warmup_steps and cfg.warmup_epochs:
        bad("warmup_epochs", cfg.warmup_epochs, "give warmup_steps or warmup_epochs, not both")
    for key in ("clip_norm", "clip_value"):
        value = cfg[key]
        if value is not None and (not finite(value) or value <= 0):
            bad(key, value, "a gradient clipping threshold must be a finite number > 0 (null: no clipping)")


def build_optimizer(cfg, params, backend=None):
    check_optim_values(cfg)
    name = cfg.name
    if name == "sgd":
        return SGD(params, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                   backend=backend)
    if name == "adam":
        return Adam(params, cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                    backend=backend)
    raise ConfigError(f"Unknown optimizer '{name}' (optim=...): choose optim=sgd or optim=adam.")


def warmup_steps(cfg, steps_per_epoch: int) -> int:
    """The linear warmup's length in steps (optim.warmup_steps, or optim.warmup_epochs × steps per epoch, at least
    one step: a warmup that was asked for is never rounded away)."""
    if cfg.warmup_steps or not cfg.warmup_epochs:
        return int(cfg.warmup_steps)
    return max(1, round(float(cfg.warmup_epochs) * steps_per_epoch))


class LrSchedule:
    """The learning rate of each step (0-based): a linear warmup over its first W steps (lr·(step+1)/W), then the
    schedule over the remaining steps: constant, step (×gamma every step_size epochs) or cosine to min_lr. The
    settings are read from the config once (the trainer asks every step)."""

    def __init__(self, cfg, steps_per_epoch: int, total_steps: int):
        if cfg.schedule not in ("constant", "step", "cosine"):
            raise ConfigError(f"Unknown lr schedule '{cfg.schedule}' (optim.schedule): choose constant, step or "
                              f"cosine.")
        self.base, self.schedule, self.min_lr = float(cfg.lr), str(cfg.schedule), float(cfg.min_lr)
        self.gamma, self.decay_steps = float(cfg.gamma), int(cfg.step_size) * steps_per_epoch
        self.warm = warmup_steps(cfg, steps_per_epoch)
        self.after_warmup = total_steps - self.warm

    def __call__(self, step: int) -> float:
        if step < self.warm:
            return self.base * (step + 1) / self.warm
        step -= self.warm
        if self.schedule == "constant":
            return self.base
        if self.schedule == "step":
            return self.base * self.gamma ** (step // self.decay_steps)
        frac = min(step / max(self.after_warmup, 1), 1.0)
        return self.min_lr + 0.5 * (self.base - self.min_lr) * (1 + math.cos(math.pi * frac))


def lr_at(cfg, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate of one step (LrSchedule, for a single question)."""
    return LrSchedule(cfg, steps_per_epoch, total_steps)(step)
