"""The LR range test (L. Smith 2017; fast.ai's lr_find, Lightning's lr finder): from the configured model, data and
optimizer, one `train_step` per learning rate, the lr growing exponentially from find_lr.start to find_lr.end,
until the smoothed loss diverges. Where the smoothed loss falls fastest is a good first guess for optim.lr.

    result = find_lr(cfg, run_dir)      # writes lr_find.json, lr_find.png and TensorBoard events into run_dir only
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.curve import log_x_curve
from cnnpipe.data import batches
from cnnpipe.jsonio import write_json_atomic
from cnnpipe.step import NonFiniteLoss, train_step

log = logging.getLogger("cnnpipe")

CAVEAT = ("This is a heuristic: the curve comes from a few hundred steps of a fresh model at one batch size, with "
          "the lr changing every step; confirm the choice with a short training run (or a small sweep over the "
          "range).")
SKIP_BEGIN = 10                 # the first points' average has seen few losses: no suggestion from them


@dataclass
class RangeTest:
    lr: list[float] = field(default_factory=list)             # one per step done
    loss: list[float] = field(default_factory=list)           # the step's batch loss
    smoothed_loss: list[float] = field(default_factory=list)  # bias-corrected moving average of `loss`
    stopped: str = "end"        # end | diverged | non-finite (the loss became NaN/inf: that step is not recorded)
    stop_lr: float | None = None


def check_find_lr_values(fc) -> None:
    """Values that cannot make a range test are refused before anything is built or loaded."""
    def bad(key, rule):
        raise ConfigError(f"find_lr.{key}={getattr(fc, key)!r} cannot work: {rule}. Fix it on the command line "
                          f"(find_lr.{key}=...); the defaults are in cnnpipe/config.py (FindLrConf).")
    for key in ("start", "end"):
        if not math.isfinite(fc[key]) or fc[key] <= 0:
            bad(key, "the learning rates of the test must be finite numbers > 0")
    if fc.end <= fc.start:
        bad("end", f"the lr grows from find_lr.start={fc.start:g} to find_lr.end, which must be larger")
    if fc.steps < 10:
        bad("steps", "the test needs at least 10 steps (a few hundred show the curve best)")
    if not math.isfinite(fc.diverge) or fc.diverge <= 1:
        bad("diverge", "the test stops once the smoothed loss exceeds diverge × its lowest value, so it must be > 1")
    if not math.isfinite(fc.smoothing) or not 0 <= fc.smoothing < 1:
        bad("smoothing", "the moving average's β must be in [0, 1) (0: no smoothing)")


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """steps learning rates from start to end, a constant factor apart (evenly spaced in log lr)."""
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def range_test(trainer, fc) -> RangeTest:
    """Train trainer.model from its current weights, one step per lr of the schedule, on training batches in the
    trainer's shuffled order (epoch after epoch as needed); stop when the smoothed loss passes diverge × its best."""
    tc, data, out = trainer.cfg.trainer, trainer.data, RangeTest()
    avg, best, epoch = 0.0, math.inf, 0
    lrs = lr_schedule(fc.start, fc.end, fc.steps)
    it = iter(())
    for i, lr in enumerate(lrs):
        batch = next(it, None)
        if batch is None:                                                       # the next epoch
            it = batches(data.train, tc.batch_size, mean=data.mean, std=data.std, dtype=trainer.dtype,
                         shuffle_seed=[tc.seed, epoch], augment=data.augment, crop_padding=data.crop_padding)
            epoch, batch = epoch + 1, next(it)
        x, y = batch                                                            # x N,C,H,W   y N
        try:
            loss = train_step(trainer.model, trainer.optimizer, x, y, float(lr), clip=trainer.clip).loss   # as training
        except NonFiniteLoss:
            out.stopped, out.stop_lr = "non-finite", float(lr)
            break
        avg = fc.smoothing * avg + (1 - fc.smoothing) * loss
        smoothed = avg / (1 - fc.smoothing ** (i + 1))                          # bias correction: avg starts at 0
        out.lr.append(float(lr))
        out.loss.append(float(loss))
        out.smoothed_loss.append(float(smoothed))
        best = min(best, smoothed)
        if smoothed > fc.diverge * best:
            out.stopped, out.stop_lr = "diverged", float(lr)
            break
    return out


def suggest(test: RangeTest) -> dict | None:
    """The lr where the smoothed loss falls fastest (steepest negative slope against log lr), searched between the
    first SKIP_BEGIN points and the lowest loss; the range spans it and a tenth of the lowest loss's lr (the two
    rules of thumb; a sweep over it settles the choice). None when the curve never falls there."""
    s, lr = np.asarray(test.smoothed_loss), np.asarray(test.lr)
    begin, i_min = min(SKIP_BEGIN, len(s) // 10), int(np.argmin(s)) if len(s) else 0
    if i_min - begin < 2:
        return None
    slope = np.gradient(s[begin:i_min + 1], np.log(lr[begin:i_min + 1]))   # d smoothed / d log lr
    i = begin + int(np.argmin(slope))
    if slope[i - begin] >= 0:
        return None
    tenth = float(lr[i_min]) / 10                  # the other classic rule: a tenth of the lr of the lowest loss
    return {"lr": float(lr[i]), "step": i + 1, "range": sorted([float(lr[i]), tenth]),
            "method": "steepest descent of the smoothed loss; range: from it to a tenth of the lowest loss's lr",
            "min_loss_lr": float(lr[i_min]), "min_smoothed_loss": float(s[i_min])}


def find_lr(cfg, run_dir) -> dict:
    """Build the trainer's model, data and optimizer from cfg (init_from= weights too), run the range test, and write
    lr_find.json, lr_find.png and (logger.tensorboard) TensorBoard events into run_dir; the config is only read."""
    from cnnpipe.checkpoint import load_checkpoint
    from cnnpipe.resume import init_from_checkpoint
    from cnnpipe.train import Trainer
    check_find_lr_values(cfg.find_lr)
    if cfg.resume:
        raise ConfigError(f"resume={cfg.resume}: the LR range test does not continue a run. To start it from that "
                          f"run's weights, use init_from={cfg.resume} instead.")
    run_dir = Path(run_dir)
    trainer = Trainer(cfg, run_dir)                       # model, optimizer (value checks), data: as training has them
    if cfg.init_from:
        init_from_checkpoint(trainer, load_checkpoint(cfg.init_from), strict=cfg.init_from_strict,
                             optimizer=cfg.init_from_optimizer)
    fc = cfg.find_lr
    log.info("LR range test: lr %g → %g over at most %d steps (batch size %d, optim %s)", fc.start, fc.end, fc.steps,
             cfg.trainer.batch_size, cfg.optim.name)
    test = range_test(trainer, fc)
    if not test.lr:
        raise ConfigError(f"The loss became NaN/inf at the first step of the LR range test (lr {fc.start:g}): lower "
                          f"find_lr.start, or check the model (conv.k, model.init) and the data normalisation.")
    result = {**asdict(test), "steps": len(test.lr), "suggestion": suggest(test), "caveat": CAVEAT,
              "settings": {"start": fc.start, "end": fc.end, "steps": fc.steps, "diverge": fc.diverge,
                           "smoothing": fc.smoothing, "optim": cfg.optim.name, "clip_norm": cfg.optim.clip_norm,
                           "clip_value": cfg.optim.clip_value, "batch_size": cfg.trainer.batch_size,
                           "model": cfg.model.name, "backend": cfg.backend.name, "seed": cfg.trainer.seed}}
    image = curve_image(result)
    write_json_atomic(run_dir / "lr_find.json", result)
    from PIL import Image
    Image.fromarray(image).save(run_dir / "lr_find.png")
    if cfg.logger.tensorboard:
        write_tensorboard(run_dir, result, image)
    return result


def curve_image(result) -> np.ndarray:
    """Smoothed loss (and the raw batch losses, faint) against lr on a log axis, the suggestion marked; the y axis
    spans the curve up to its lowest point, so the divergence at the end runs off the top instead of flattening it."""
    s, smoothed, st = result["suggestion"], np.asarray(result["smoothed_loss"]), result["settings"]
    top, low = float(smoothed[:int(np.argmin(smoothed)) + 1].max()), float(smoothed.min())
    pad = 0.08 * (top - low) or 0.5
    return log_x_curve(result["lr"], [("batch loss", result["loss"], (170, 170, 190)),
                                      ("smoothed loss", result["smoothed_loss"], (33, 102, 172))],
                       ylim=(low - pad, top + pad), mark=(s["lr"], f"suggested {s['lr']:.2g}") if s else None,
                       span=s["range"] if s else None, xlabel="learning rate (log scale)", ylabel="loss",
                       title=f"LR range test: {st['model']}, {st['optim']}, batch {st['batch_size']} "
                             f"({result['steps']} steps, stopped: {result['stopped']})")

def write_tensorboard(run_dir: Path, result, image) -> None:
    """lr_find/loss, lr_find/smoothed_loss and lr_find/lr against the step; the curve as an image; the suggestion."""
    from cnnpipe.events import EventWriter
    w = EventWriter(run_dir)
    try:
        for step, (lr, loss, smoothed) in enumerate(zip(result["lr"], result["loss"], result["smoothed_loss"]), 1):
            w.scalars({"lr_find/loss": loss, "lr_find/smoothed_loss": smoothed, "lr_find/lr": lr}, step)
        w.image("lr_find/curve", image, result["steps"])
        w.text("lr_find/suggestion", format_suggestion(result) + "\n\n" + CAVEAT, result["steps"])
    finally:
        w.close()


def format_suggestion(result) -> str:
    s = result["suggestion"]
    if s is None:
        return ("no suggestion: the smoothed loss did not fall between the first steps and its lowest point. Lower "
                "find_lr.start (or raise find_lr.steps) so that the curve starts on its flat part.")
    return (f"suggested optim.lr={s['lr']:.3g} (the steepest descent of the smoothed loss); a range to try: "
            f"{s['range'][0]:.3g} … {s['range'][1]:.3g} (from the suggestion to a tenth of {s['min_loss_lr']:.3g}, "
            f"the lr of the lowest smoothed loss, {s['min_smoothed_loss']:.4g})")


def format_report(result, run_dir) -> str:
    st = result["settings"]
    stop = (f"reached find_lr.end={st['end']:g}" if result["stopped"] == "end" else
            f"the smoothed loss passed {st['diverge']:g} × its lowest at lr {result['stop_lr']:.3g}"
            if result["stopped"] == "diverged" else f"the loss became NaN/inf at lr {result['stop_lr']:.3g}")
    lrs = f"lr {result['lr'][0]:.3g} → {result['lr'][-1]:.3g}" if result["lr"] else "no step finished"
    return (f"LR range test: {result['steps']} steps, {lrs}; stopped: "
            f"{stop}.\n{format_suggestion(result)}.\n{CAVEAT}\nCurve: {Path(run_dir) / 'lr_find.png'} (data: "
            f"lr_find.json; TensorBoard: lr_find/*). Nothing in conf/ was changed.")
