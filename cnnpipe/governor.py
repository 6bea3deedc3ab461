"""The thread governor: a numba run's threads follow the cores that are free in fact, not only the ones it was given.

Two threads on two cores finish a parallel region only when both have run; while another process holds one core,
every region waits for a time slice there and a step takes several times longer than with one thread on the free
core. The governor's first trial times a window of steps with each thread count (1, then the run's budget) and
keeps the faster; until the budget is timed, the steps before the trial (run with it) stand in for its timing.
Later trials (more and more seldom while the choice holds, sooner when steps slow down) time only the other count
against the chosen one's latest steps. A count clearly slower than the best timing so far is dropped after a couple
of steps, so that checking whether the cores are free again costs little while they are not. The numba kernels
cut their work by the run's budget, not by the threads running now, so the results are the same bits whatever the
governor chooses.
"""
from __future__ import annotations

import logging
import statistics
from collections import deque

from cnnpipe.callbacks import Callback

log = logging.getLogger("cnnpipe")

FIRST_TRIAL = 3             # steps before the first trial (the first ones allocate buffers): few, since beside a
                            # busy core every step before it runs with both threads
WINDOW = 12                 # steps timed with each thread count (the median counts: hook-heavy steps stand out)
SETTLE = 1                  # steps after a change that are not timed
RECHECK = (200, 3200)       # steps between trials: the first, and the most while the choice holds (doubling)
SLOWER = 1.5                # recent steps this much slower than the chosen count's trial median: check again;
                            # a probed count this much slower than the chosen one: stop probing it
ABORT_AFTER = 2             # timed steps of a probe before it may stop early: beside a busy core every step with
                            # both threads is very slow (docs/numba.md)


class ThreadGovernor(Callback):
    def __init__(self, numba, budget: int):
        self.numba, self.budget = numba, budget
        self.candidates = [1, budget]           # the first trial times 1 first: it is never the disastrous one
        self.current = self.chosen = budget     # the count running now; the one the last trial chose
        self.next_trial, self.interval = FIRST_TRIAL, RECHECK[0]
        self.trial: dict[int, float] | None = None   # during a trial: each timed count's median step time
        self.hint: float | None = None          # the first trial: the budget's steps before it (not yet timed)
        self.queue: list[int] = []              # the counts this trial has still to time
        self.times: list[float] = []            # the steps timed so far with the count running now
        self.skip = 0
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
            self._time_trial(step, seconds)
            return
        self.recent.append(seconds)
        full = len(self.recent) == WINDOW
        slowed = self.expected is not None and full and statistics.median(self.recent) > SLOWER * self.expected
        if step >= self.next_trial or slowed:
            # a later trial counts the chosen count's latest steps as its timing and times only the other count
            self.trial = {self.chosen: statistics.median(self.recent)} if self.expected is not None and full else {}
            self.queue = [n for n in self.candidates if n not in self.trial]
            # the first trial: the budget's steps so far (the very first allocates buffers) let a clearly slower
            # one-thread probe stop early on free cores; the budget is still timed before anything is chosen
            before = list(self.recent)[1:]
            self.hint = statistics.median(before) if not self.trial and before else None
            self._time_next()

    def _time_next(self):
        self.times, self.skip = [], SETTLE
        self._set(self.queue.pop(0))

    def _time_trial(self, step, seconds):
        if self.skip:
            self.skip -= 1
            return
        self.times.append(seconds)
        best = min([*self.trial.values(), *([self.hint] if self.hint is not None else [])], default=None)
        clearly_slower = (best is not None and len(self.times) == ABORT_AFTER
                          and statistics.median(self.times) > SLOWER * best)
        if len(self.times) < WINDOW and not clearly_slower:
            return
        self.trial[self.current] = statistics.median(self.times)
        self.hint = None                        # the first trial's budget is timed against the probe, as any count
        if self.queue:
            self._time_next()
            return
        medians, self.trial = self.trial, None
        best = min(medians, key=medians.get)
        if best != self.chosen:
            self.changes.append((step, best))
            self.interval = RECHECK[0]
            timing = ", ".join(f"{1e3 * medians[n]:.1f} ms with {n}" for n in sorted(medians, reverse=True))
            log.info("threads %d -> %d at step %d: a step took %s (%s)", self.chosen, best, step, timing,
                     "another process is using the cores" if best < self.budget else "the cores are free again")
        else:
            self.interval = min(2 * self.interval, RECHECK[1])
        log.debug("thread trial at step %d: %s", step, {n: round(1e3 * t, 2) for n, t in medians.items()})
        self._set(best)
        self.chosen, self.expected = best, medians[best]
        self.recent.clear()
        self.next_trial = step + self.interval

    def on_train_end(self, tr, metrics):
        self._set(self.budget)
