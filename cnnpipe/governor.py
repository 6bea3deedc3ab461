"""The thread governor: a numba run's threads follow the cores that are free in fact, not only the ones it was given.

Two threads on two cores finish a parallel region only when both have run; while another process holds one core,
every region waits for a time slice there and a step takes 2-3× longer than with one thread on the free core. The
governor times a window of steps with each thread count (the run's budget, and 1), keeps the faster, and checks
again later (sooner when steps slow down). The numba kernels cut their work by the run's budget, not by the
threads running now, so the results are the same bits whatever the governor chooses.
"""
from __future__ import annotations

import logging
import statistics
from collections import deque

from cnnpipe.callbacks import Callback

log = logging.getLogger("cnnpipe")

FIRST_TRIAL = 20            # steps before the first trial: kernels loaded, buffers allocated
WINDOW = 12                 # steps timed with each thread count (the median counts: hook-heavy steps stand out)
SETTLE = 2                  # steps after a change that are not timed
RECHECK = (200, 3200)       # steps between trials: the first, and the most while the choice holds (doubling)
SLOWER = 1.5                # recent steps this much slower than the chosen count's trial median: check again


class ThreadGovernor(Callback):
    def __init__(self, numba, budget: int):
        self.numba, self.budget = numba, budget
        self.candidates = [budget, 1]
        self.current = budget
        self.next_trial, self.interval = FIRST_TRIAL, RECHECK[0]
        self.trial: list[tuple[int, list[float]]] | None = None
        self.index = self.skip = 0
        self.expected = None                    # the chosen count's median step time in the last trial
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.changes: list[tuple[int, int]] = []   # (step, threads) whenever the count changed

    def attach(self, tr) -> ThreadGovernor:
        tr.thread_changes = self.changes           # metrics.json lists them
        return self

    def _set(self, threads: int) -> None:
        self.numba.set_num_threads(threads)
        self.current = threads

    def on_train_start(self, tr):
        self.next_trial += tr.step

    def on_step_end(self, tr, step, result, lr, seconds):
        if self.trial is not None:
            self._time_trial(tr, step, seconds)
            return
        self.recent.append(seconds)
        slowed = (self.expected is not None and len(self.recent) == WINDOW
                  and statistics.median(self.recent) > SLOWER * self.expected)
        if step >= self.next_trial or slowed:
            self.trial = [(n, []) for n in self.candidates]
            self.index, self.skip = 0, SETTLE
            self._set(self.trial[0][0])

    def _time_trial(self, tr, step, seconds):
        if self.skip:
            self.skip -= 1
            return
        threads, times = self.trial[self.index]
        times.append(seconds)
        if len(times) < WINDOW:
            return
        self.index += 1
        if self.index < len(self.trial):
            self._set(self.trial[self.index][0])
            self.skip = SETTLE
            return
        medians = {n: statistics.median(t) for n, t in self.trial}
        best = min(medians, key=medians.get)
        before = self.changes[-1][1] if self.changes else self.budget
        if best != before:
            self.changes.append((step, best))
            self.interval = RECHECK[0]
            timing = ", ".join(f"{1e3 * medians[n]:.1f} ms with {n}" for n in medians)
            log.info("threads %d -> %d at step %d: a step took %s (%s)", before, best, step, timing,
                     "another process is using the cores" if best < self.budget else "the cores are free again")
        else:
            self.interval = min(2 * self.interval, RECHECK[1])
        log.debug("thread trial at step %d: %s", step, {n: round(1e3 * t, 2) for n, t in medians.items()})
        self._set(best)
        self.expected, self.trial = medians[best], None
        self.recent.clear()
        self.next_trial = step + self.interval

    def on_train_end(self, tr, metrics):
        self._set(self.budget)
