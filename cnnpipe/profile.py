"""trainer.profile=true: where a training step's time goes, so users (and we) see what to speed up.

The Profiler callback wraps, on the instances only (the classes stay as they are): every layer's forward and
backward, the optimizer's step, the trainer's batch iterator (Trainer.epoch_batches) and the other callbacks'
hooks. At the end of each epoch it logs a table (train.log and the console: part, ms/step, share of the step,
GFLOP/s for conv and dense layers) and writes profile.json in the run directory.

The window is the epoch's training loop as this callback sees it: from the first batch request to the end of the
last step's hooks, so every timed part lies inside it and `rest` is what no wrapper covers (the loss, accuracy,
learning-rate schedule, progress bar, bookkeeping). Layer calls outside the training step (validation, the
TensorBoard probe inside a hook) are not counted as layer time.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict

from cnnpipe.callbacks import Callback
from cnnpipe.jsonio import write_json_atomic
from cnnpipe.layers import Conv2d, Dense

log = logging.getLogger("cnnpipe")

LOOP_HOOKS = ("on_after_backward", "on_step_end")       # inside the training loop: part of the step
EPOCH_HOOKS = ("on_epoch_end",)                         # after the loop: reported beside the table
FOOTNOTE = ("GFLOP/s: FLOPs per sample (the model summary's forward count) × samples ÷ time. Backward of a conv "
            "or dense layer is counted as 2× its forward FLOPs (∂L/∂W and δ to the input each cost one forward), "
            "1× for the first layer, which skips δ to the input.")


class Profiler(Callback):
    def __init__(self, tr):
        self.clock: dict[str, float] = defaultdict(float)    # part → seconds in this epoch
        self.after_loop: dict[str, float] = defaultdict(float)
        self.in_hook = 0                                     # > 0 while another callback's hook runs
        self.start = self.end = None                         # the epoch's window (perf_counter)
        self.steps = self.samples = 0
        self.epochs: list[dict] = []
        self.wrapped = False

    # -- the wrappers ------------------------------------------------------------------------------------------
    def on_train_start(self, tr):
        """Wrap here, once every callback exists (this one is the last)."""
        if self.wrapped:
            return
        self.wrapped = True
        for layer in tr.model.layers:
            layer.forward = self._forward_timer(layer.forward, f"{layer.name} forward")
            layer.backward = self._timer(layer.backward, f"{layer.name} backward")
        tr.optimizer.step = self._timer(tr.optimizer.step, "optimizer step")
        tr.epoch_batches = self._batches_timer(tr.epoch_batches)
        for cb in tr.callbacks:
            if cb is not self:
                for hook in LOOP_HOOKS + EPOCH_HOOKS:
                    setattr(cb, hook, self._hook_timer(getattr(cb, hook), type(cb).__name__, hook in EPOCH_HOOKS))

    def _timer(self, fn, part):
        @functools.wraps(fn)
        def timed(*args):
            if self.in_hook:                                 # e.g. the TensorBoard probe's backward
                return fn(*args)
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.clock[part] += time.perf_counter() - t0
        return timed

    def _forward_timer(self, fn, part):
        timed = self._timer(fn, part)

        @functools.wraps(fn)
        def forward(x, train):
            return timed(x, train) if train else fn(x, train)     # evaluation passes are not the step's
        return forward

    def _hook_timer(self, fn, owner, after_loop):
        part = f"{owner} hooks"

        @functools.wraps(fn)
        def hook(*args):
            self.in_hook += 1
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                (self.after_loop if after_loop else self.clock)[part] += time.perf_counter() - t0
                self.in_hook -= 1
        return hook

    def _batches_timer(self, make):
        @functools.wraps(make)
        def epoch_batches():
            it = make()
            while True:
                t0 = time.perf_counter()
                if self.start is None:
                    self.start = t0
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.clock["data batch"] += time.perf_counter() - t0
                yield item
        return epoch_batches

    # -- the hooks -----------------------------------------------------------------------------------------------
    def on_step_end(self, tr, step, result, lr, seconds):
        self.steps, self.samples = self.steps + 1, self.samples + result.n
        self.end = time.perf_counter()                       # after the other callbacks' hooks of this step

    def on_epoch_end(self, tr, metrics):
        if not self.steps:
            return
        report = self.epoch_report(tr, metrics)
        self.epochs.append(report)
        log.info("%s", format_table(report))
        write_json_atomic(tr.run_dir / "profile.json", {"epochs": self.epochs, "footnote": FOOTNOTE})
        self.clock, self.after_loop = defaultdict(float), defaultdict(float)
        self.start = self.end = None
        self.steps = self.samples = 0

    def epoch_report(self, tr, metrics) -> dict:
        window = self.end - self.start
        rows = [self._row("data batch", "data", self.clock.pop("data batch", 0.0), window)]
        for layer in tr.model.layers:
            for pass_ in ("forward", "backward"):
                s = self.clock.pop(f"{layer.name} {pass_}", 0.0)
                row = self._row(f"{layer.name} {pass_}", "layer", s, window, layer=layer.name, kind=layer.kind,
                                describe=layer.describe(), **{"pass": pass_})
                if isinstance(layer, (Conv2d, Dense)) and s > 0:
                    per_sample = layer.flops() * (1 if pass_ == "forward" else 2 if layer.need_dx else 1)
                    row["gflops"] = per_sample * self.samples / s / 1e9
                rows.append(row)
        rows.append(self._row("optimizer step", "optimizer", self.clock.pop("optimizer step", 0.0), window))
        for part in sorted(self.clock):                      # the callbacks' hooks inside the loop
            rows.append(self._row(part, "hooks", self.clock[part], window))
        rest = window - sum(r["seconds"] for r in rows)
        rows.append(self._row("rest", "rest", rest, window))
        return {"epoch": metrics["epoch"], "steps": self.steps, "samples": self.samples, "window_seconds": window,
                "epoch_seconds": metrics["epoch_seconds"], "ms_per_step": 1e3 * window / self.steps, "rows": rows,
                "after_loop_seconds": dict(self.after_loop)}

    def _row(self, part, group, seconds, window, **extra):
        return {"part": part, "group": group, "seconds": seconds, "ms_per_step": 1e3 * seconds / self.steps,
                "share": seconds / window if window > 0 else 0.0, **extra}


def format_table(report: dict) -> str:
    """The epoch's profile as aligned text (train.log and the console)."""
    lines = [f"profile of epoch {report['epoch']}: {report['steps']} steps, {report['samples']} samples, "
             f"{report['ms_per_step']:.3f} ms a step ({report['window_seconds']:.2f} s from the first batch to the "
             f"last step's hooks; epoch_seconds {report['epoch_seconds']:.2f})",
             f"{'part':<28}{'ms/step':>10}{'share':>9}{'GFLOP/s':>10}"]
    for r in report["rows"]:
        gf = f"{r['gflops']:10.2f}" if "gflops" in r else ""
        lines.append(f"{r['part']:<28}{r['ms_per_step']:>10.3f}{100 * r['share']:>8.1f}%{gf}")
    lines.append(f"{'total':<28}{report['ms_per_step']:>10.3f}{100.0:>8.1f}%")
    lines.append("rest: the loss, accuracy, learning-rate schedule, progress bar and the trainer's bookkeeping.")
    if report["after_loop_seconds"]:
        lines.append("after the loop (not in the step): " + ", ".join(
            f"{k} {v:.3f} s" for k, v in report["after_loop_seconds"].items()) + " (on_epoch_end)")
    lines.append(FOOTNOTE)
    return "\n".join(lines)
