"""TensorBoard logging: watch the δ's flow back through every layer.

    trainer.callbacks.append(TensorBoardLogger(trainer))     # events go straight into trainer.run_dir

What lands in the run's event file (global step = optimizer steps completed, continued on resume):
  scalars   train/{loss,accuracy,lr,samples_per_second}      every logger.scalar_every steps (window means), and at
                                                               the run's first step and each epoch's last step
            grad_norm/<layer>.{W,b}, grad_norm/total (before clipping)  weight_norm/<layer>.{W,b}
            update_ratio/<layer>  delta_norm/<layer>  train/clip_fraction (with gradient clipping)
            val/{loss,accuracy} each epoch; test/{loss,accuracy} at the end; probe/loss with the images
            train/stopped_early (1 at the last step; the reason as text: train/stopped_early/text_summary)
                                                               when early stopping ended the run
  images    input/probe, delta/<conv>, activation/<conv>, filters/<conv>   every logger.image_every steps
            and at the last step, for the first logger.probe_images test images (the same ones all run long);
            confusion/val (without a validation split: confusion/train, the epoch's training predictions) once an
            epoch, and confusion/test at the end; all from predictions the trainer makes anyway
  hists     weights/<layer>.W, grads/<layer>.W, deltas/<layer>  every logger.histogram_every steps (0: off)
  hparams   the run's settings and overrides + hparams/{test_acc,test_loss,val_acc,val_loss,train_loss},
            written into this run's own event file (no timestamped sub-run)

Colour maps and grids: cnnpipe.images. Letters: N probe images, C channels, F filters, H,W map size, K kernel size.
"""
from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np

from cnnpipe.callbacks import Callback
from cnnpipe.data import normalize
from cnnpipe.images import DELTA_GAMMA, colorize, confusion_image, diverging, grid
from cnnpipe.layers import ACTIVATIONS, Conv2d
from cnnpipe.losses import softmax_cross_entropy
from cnnpipe.metrics import confusion_matrix
from cnnpipe.step import EpochTotals

# Settings that are always in the HPARAMS table (so every run of every sweep has the same columns);
# the run's own Hydra overrides are added on top.
HPARAM_KEYS = ("model.name", "model.activation", "conv.k", "conv.stride", "conv.padding", "pool.mode", "pool.size",
               "optim.name", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.schedule",
               "trainer.batch_size", "trainer.epochs", "trainer.seed", "backend.name", "data.name", "dtype")

log = logging.getLogger("cnnpipe")


def _timed(hook):
    """Add the hook's wall time to the logger's clock of the training loop (`seconds`), which its last line
    reports against the loop."""
    @functools.wraps(hook)
    def timed(self, *args):
        t0 = time.perf_counter()
        try:
            return hook(self, *args)
        finally:
            self.seconds += time.perf_counter() - t0
    return timed


# -- the callback -------------------------------------------------------------------------------------------------
def tile(images):
    """The probe images' N,H,W,3 pictures side by side in one image (~square, no separator: each has its own)."""
    return grid(images, gap=0, px=1)


def _norm(a):
    a = np.asarray(a).ravel()
    return float(math.sqrt(float(np.dot(a, a))))


def _hp_value(v):
    if isinstance(v, (bool, np.bool_)) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return v.item() if isinstance(v, np.generic) else v
    return str(v)


def run_hparams(cfg) -> dict:
    """The HPARAMS row of a run: HPARAM_KEYS from cfg, plus every Hydra override of this job (if Hydra runs it)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    hp = {k: _hp_value(OmegaConf.select(cfg, k, default=None)) for k in HPARAM_KEYS}
    hp["conv.padding"] = str(hp["conv.padding"])                # same | valid | int: one type per column
    try:
        from hydra.core.hydra_config import HydraConfig
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:  # noqa: BLE001 - no Hydra job: just the keys above
        overrides = []
    for ov in overrides:
        key, _, raw = ov.lstrip("+~").partition("=")
        if key == "resume":                                     # a resumed run stays one row of its sweep
            continue
        try:
            v = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an override that is not a plain config path
            v = None
        hp[key] = str(hp[key]) if key == "conv.padding" else \
            (raw if v is None or isinstance(v, (DictConfig, ListConfig)) else _hp_value(v))
    return hp


class TensorBoardLogger(Callback):
    """Scalars, δ-map/activation/filter images of a fixed probe, confusion matrix, histograms and hparams."""

    def __init__(self, tr):
        self.tr, self.cfg = tr, tr.cfg.logger
        # plain values for the per-step checks (a config node's attribute lookup costs microseconds)
        self.scalar_every, self.image_every = int(self.cfg.scalar_every), int(self.cfg.image_every)
        self.histogram_every, self.max_steps = int(self.cfg.histogram_every), tr.cfg.trainer.max_steps
        self.confusion = bool(self.cfg.confusion_every_epoch)
        self.writer, self.closed = None, False
        self.snapshot = None                      # parameters before the optimizer step (update ratio)
        self.pending = {}                         # scalars computed in on_after_backward, written in on_step_end
        self.window = EpochTotals()               # the steps since the last train/ scalars
        self.window_steps = self.window_clipped = 0   # ... and how many of them gradient clipping changed
        self.last_image_step = None
        self.first_step = 1                       # the first step this process trains (set at train start)
        self.seconds = 0.0                        # wall time of this logger's hooks in the loop and at epoch ends
        self.open_seconds = 0.0                   # once a run: opening the event file (imports)
        self.end_seconds = 0.0                    # once a run: the final images, test scalars and hparams
        split = tr.data.test
        k = max(0, min(int(self.cfg.probe_images), len(split.y)))
        self.probe_u8, self.probe_y = split.x[:k], split.y[:k]           # uint8 N,C,H,W; N
        self.metric_tags = ["hparams/test_acc", "hparams/test_loss", "hparams/train_loss"]
        if tr.data.val is not None:
            self.metric_tags += ["hparams/val_acc", "hparams/val_loss"]
        n = len(tr.data.classes)
        self.train_confusion = np.zeros((n, n), np.int64)   # this epoch's training predictions (no val split)

    # -- writer ------------------------------------------------------------------------------------------------
    @property
    def w(self):
        """The event writer (cnnpipe.events), made on first use: a resumed run's step is known by then, and events
        at or after it from the interrupted attempt are purged (TensorBoard hides them)."""
        if self.writer is None and not self.closed:
            t0 = time.perf_counter()
            from cnnpipe.events import EventWriter
            self.writer = EventWriter(self.tr.run_dir, purge_step=self.tr.step or None)
            self.writer.hparams(run_hparams(self.tr.cfg), self.metric_tags, self.tr.step)
            self.open_seconds = time.perf_counter() - t0
        return self.writer

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.writer, self.closed = None, True

    # -- hooks ---------------------------------------------------------------------------------------------------
    def scalar_step(self, tr, step) -> bool:
        """Scalars every scalar_every steps, and at the first step and each epoch's (or max_steps') last step, so
        that a run shorter than scalar_every shows its gradient and δ norms too."""
        every = self.scalar_every
        return bool(every) and (step % every == 0 or step == self.first_step or step % tr.steps_per_epoch == 0
                                or step == self.max_steps)

    def on_train_start(self, tr):
        """Open the event file here, before the loop: the imports ran in the background since __init__."""
        self.first_step = tr.step + 1
        self.w  # noqa: B018

    @_timed
    def on_after_backward(self, tr, step, lr):
        if self.scalar_step(tr, step):
            p = self.pending
            for layer in tr.model.layers:
                for k, g in layer.grads.items():
                    p[f"grad_norm/{layer.name}.{k}"] = _norm(g)
                if layer.has_delta_map and layer.delta is not None:
                    p[f"delta_norm/{layer.name}"] = _norm(layer.delta)
            p["grad_norm/total"] = math.sqrt(sum(v * v for k, v in p.items() if k.startswith("grad_norm/")))
            self.snapshot = {layer.name: {k: v.copy() for k, v in layer.params.items()}
                             for layer in tr.model.layers if layer.params}
        if self.histogram_every and step % self.histogram_every == 0:
            for layer in tr.model.layers:
                for k in layer.params:
                    self.w.histogram(f"weights/{layer.name}.{k}", layer.params[k], step)
                    self.w.histogram(f"grads/{layer.name}.{k}", layer.grads[k], step)
                if layer.has_delta_map and layer.delta is not None:
                    self.w.histogram(f"deltas/{layer.name}", layer.delta, step)

    @_timed
    def on_step_end(self, tr, step, result, lr, seconds):
        self.window.add(result, seconds)
        self.window_steps, self.window_clipped = self.window_steps + 1, self.window_clipped + result.clipped
        if self.confusion and tr.data.val is None and result.preds is not None:
            self.train_confusion += confusion_matrix(result.labels, result.preds, len(self.train_confusion))
        if self.scalar_step(tr, step):
            self._train_scalars(tr, lr, step)
        if self.image_every and step % self.image_every == 0:
            self._images(tr, step)

    def _train_scalars(self, tr, lr, step):
        t, out = self.window, {}
        if t.seen:
            out["train/loss"], out["train/accuracy"] = t.loss_sum / t.seen, t.correct / t.seen
        out["train/lr"] = lr
        if tr.clip is not None and self.window_steps:
            out["train/clip_fraction"] = self.window_clipped / self.window_steps
        if t.seconds > 0:
            out["train/samples_per_second"] = t.seen / t.seconds
        if self.snapshot is not None:
            for layer in tr.model.layers:
                if layer.name not in self.snapshot:
                    continue
                old = self.snapshot[layer.name]
                num = sum(_norm(layer.params[k] - old[k]) ** 2 for k in old)     # ‖Δθ‖² across the step
                den = sum(_norm(old[k]) ** 2 for k in old)
                if den > 0:
                    out[f"update_ratio/{layer.name}"] = math.sqrt(num / den)
                for k, v in layer.params.items():
                    out[f"weight_norm/{layer.name}.{k}"] = _norm(v)
        self.w.scalars({**out, **self.pending}, step)
        self.pending, self.snapshot, self.window = {}, None, EpochTotals()
        self.window_steps = self.window_clipped = 0

    @_timed
    def on_epoch_end(self, tr, metrics):
        w = self.w
        if metrics.get("val_loss") is not None:
            w.scalars({"val/loss": metrics["val_loss"], "val/accuracy": metrics["val_acc"]}, tr.step)
        if self.confusion:                      # from predictions the trainer made anyway: no extra pass
            if tr.data.val is not None:
                name, cm = "val", confusion_matrix(tr.data.val.y, tr.val_preds, len(tr.data.classes))
            else:
                name, cm = "train", self.train_confusion
            w.image(f"confusion/{name}", confusion_image(cm, tr.data.classes), tr.step)
            self.train_confusion = np.zeros_like(self.train_confusion)
        w.flush()

    def on_train_end(self, tr, metrics):
        if self.closed:
            return
        t0 = time.perf_counter()
        self._early_stop(tr)
        self._close_run(tr, metrics)
        self.end_seconds = time.perf_counter() - t0
        loop = max(sum(metrics["epoch_seconds"]), 1e-9)
        log.info("TensorBoard logging took %.2f s in the training loop and at epoch ends: %.1f %% of the %.1f s "
                 "training loop; once a run: %.2f s opening the event file (imports included), %.2f s for the final "
                 "images and summaries", self.seconds, 100 * self.seconds / loop, loop, self.open_seconds,
                 self.end_seconds)

    def _close_run(self, tr, metrics):
        w = self.w
        if self.last_image_step != tr.step and len(self.probe_y):
            self._images(tr, tr.step)                                # every run shows its final state
        w.scalars({"test/loss": metrics["test_loss"], "test/accuracy": metrics["test_acc"]}, tr.step)
        if self.confusion and tr.test_preds is not None and len(tr.test_preds):
            cm = confusion_matrix(tr.data.test.y, tr.test_preds, len(tr.data.classes))
            w.image("confusion/test", confusion_image(cm, tr.data.classes), tr.step)
        final = {tag: metrics.get(tag.split("/", 1)[1]) for tag in self.metric_tags}
        w.scalars({tag: v for tag, v in final.items() if v is not None and math.isfinite(v)}, tr.step)
        w.hparams_end(tr.step)
        self.close()

    def _early_stop(self, tr):
        """Written at the end, not when the stop came: a resumed stopped run purges events from its step on."""
        if tr.stopped_early:
            self.w.scalars({"train/stopped_early": 1.0}, tr.step)
            self.w.text("train/stopped_early", tr.stopped_early, tr.step)      # as train/stopped_early/text_summary

    def on_interrupt(self, tr):
        self.close()

    # -- the probe -------------------------------------------------------------------------------------------------
    def probe(self, tr):
        """Forward + backward of the probe images in eval mode, with their true labels. Returns (loss, x, outputs,
        deltas). Runs after the optimizer step: the next training forward rebuilds every cache; each layer's
        `.delta` and gradient arrays are put back so nothing the trainer or other callbacks see changes."""
        x = normalize(self.probe_u8, tr.data.mean, tr.data.std, tr.dtype)        # N,C,H,W
        kept = [(layer.delta, dict(layer.grads)) for layer in tr.model.layers]
        outs, h = [], x
        for layer in tr.model.layers:
            h = layer.forward(h, False)
            outs.append(h)
        loss, delta = softmax_cross_entropy(h, self.probe_y)
        tr.model.backward(delta)
        deltas = [layer.delta for layer in tr.model.layers]
        for layer, (dl, grads) in zip(tr.model.layers, kept):
            layer.delta = dl
            layer.grads.clear()
            layer.grads.update(grads)
        return loss, x, outs, deltas

    def _images(self, tr, step):
        if not len(self.probe_y):
            return
        self.last_image_step = step
        w = self.w
        loss, x, outs, deltas = self.probe(tr)
        w.scalars({"probe/loss": loss}, step)
        u8 = self.probe_u8.transpose(0, 2, 3, 1)                                     # N,H,W,C
        u8 = np.repeat(u8, 3, axis=3) if u8.shape[3] == 1 else u8[..., :3]
        w.image("input/probe", tile(np.stack([grid(im[None, None]) for im in u8])), step)
        layers = tr.model.layers
        for i, layer in enumerate(layers):
            if not isinstance(layer, Conv2d):
                continue
            act_i = i + 1 if i + 1 < len(layers) and layers[i + 1].kind in ACTIVATIONS else i
            if deltas[i] is not None:                                             # N,F,Ho,Wo
                maps = np.stack([grid(colorize(dm, DELTA_GAMMA)) for dm in deltas[i]])   # N,H',W',3
                w.image(f"delta/{layer.name}", tile(maps), step)
            w.image(f"activation/{layer.name}", tile(np.stack([grid(colorize(am)) for am in outs[act_i]])), step)
            W = layer.params["W"][:64, :32]                                        # F,C,K,K (at most 64×32 tiles)
            tiles = diverging(W, float(np.abs(W).max()))                           # F,C,K,K,3
            img = grid(tiles[:, 0], px=48) if W.shape[1] == 1 else grid(tiles, px=40)   # one channel: square grid
            w.image(f"filters/{layer.name}", img, step)
