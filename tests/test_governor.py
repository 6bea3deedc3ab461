"""The thread governor: beside a process that holds a core, a numba run drops to the free core's one thread, and
the run's numbers stay the same bits as an undisturbed run's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_fashion_root, run_script, tiny_overrides

from cnnpipe.governor import ABORT_AFTER, FIRST_TRIAL, RECHECK, SETTLE, WINDOW, ThreadGovernor

TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")


class Threads:
    """numba's set_num_threads, recorded (the governor's only contact with numba)."""
    def __init__(self):
        self.calls = []

    def set_num_threads(self, n):
        self.calls.append(n)


class Run:
    step = 0


def feed(gov, seconds_for, steps):
    """Steps whose time depends on the thread count the governor set last."""
    for step in range(1, steps + 1):
        gov.on_step_end(Run, step, None, 0.1, seconds_for[gov.current])


def test_it_keeps_the_faster_count_and_says_so_once():
    gov = ThreadGovernor(Threads(), 2)
    gov.on_train_start(Run)
    feed(gov, {2: 0.009, 1: 0.006}, FIRST_TRIAL + 2 * (WINDOW + SETTLE) + 5)
    assert gov.current == 1 and gov.changes == [(FIRST_TRIAL + 2 * (WINDOW + SETTLE), 1)]
    gov2 = ThreadGovernor(Threads(), 2)
    feed(gov2, {2: 0.004, 1: 0.006}, 400)
    assert gov2.current == 2 and gov2.changes == []
    assert gov2.interval > 200                          # unchanged choice: the next check comes later


def test_on_free_cores_the_first_one_thread_probe_stays_short():
    """One thread twice as slow (the cores are free): the steps before the first trial, run with both threads, show
    it after a couple of steps; both threads are then timed for the window and kept."""
    gov = ThreadGovernor(Threads(), 2)
    gov.on_train_start(Run)
    counts = []
    for step in range(1, FIRST_TRIAL + 2 * SETTLE + ABORT_AFTER + WINDOW + 5):
        counts.append(gov.current)
        gov.on_step_end(Run, step, None, 0.1, {2: 0.004, 1: 0.008}[gov.current])
    assert counts.count(1) == SETTLE + ABORT_AFTER
    assert gov.trial is None and gov.current == 2 and gov.changes == []
    assert gov.expected == 0.004                        # the budget itself was timed, not only the steps before


def test_a_slowdown_brings_the_next_check_forward():
    gov = ThreadGovernor(Threads(), 2)
    feed(gov, {2: 0.004, 1: 0.006}, 60)                 # first trial done: 2 threads, next check at ~250
    assert gov.current == 2 and gov.trial is None and gov.next_trial > 200
    gov.on_step_end(Run, 61, None, 0.1, 0.004)
    for step in range(62, 62 + WINDOW):                 # another process starts: steps twice as slow
        gov.on_step_end(Run, step, None, 0.1, 0.008)
    assert gov.trial is not None                        # checked now, not at step 250


def test_beside_a_busy_core_the_two_thread_probes_stay_short():
    """Two threads 20x slower than one (another process holds a core): the first trial drops them after a couple of
    steps, and each later check times only them, against one thread's latest steps, for as few steps again."""
    gov = ThreadGovernor(Threads(), 2)
    gov.on_train_start(Run)
    seconds_for = {2: 0.090, 1: 0.0045}
    counts = []
    for step in range(1, 1000):
        counts.append(gov.current)
        gov.on_step_end(Run, step, None, 0.1, seconds_for[gov.current])
    assert gov.changes == [(FIRST_TRIAL + 2 * SETTLE + WINDOW + ABORT_AFTER, 1)]
    # steps run with two threads: the first FIRST_TRIAL, then SETTLE + ABORT_AFTER in each of three trials (the
    # first, and the checks RECHECK[0] and 2·RECHECK[0] steps after the one before; the next would come after 1000)
    assert counts.count(2) == FIRST_TRIAL + 3 * (SETTLE + ABORT_AFTER)
    assert sum(1 for a, b in zip(counts, counts[1:]) if (a, b) == (1, 2)) == 3 and 7 * RECHECK[0] > 1000


@TWO_CORES
def test_beside_a_busy_core_a_numba_run_drops_to_one_thread_with_the_same_results(tmp_path):
    root = make_fashion_root(tmp_path / "data", n_train=5000, n_test=100)      # 154 steps of 32
    common = [*tiny_overrides(root, **{"data.val_size": "64"}), "backend=numba"]
    calm = run_script("train.py", *common, "backend.adapt_threads=false", f"hydra.run.dir={tmp_path / 'calm'}")
    assert calm.returncode == 0, calm.stderr[-2000:]
    busy = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
    try:
        r = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'busy'}")
    finally:
        busy.kill()
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "busy" / "metrics.json").read_text())
    assert (m["thread_changes"] or [[0, 2]])[0][1] == 1, m["thread_changes"]
    assert "threads 2 -> 1 at step" in (tmp_path / "busy" / "train.log").read_text()
    c = json.loads((tmp_path / "calm" / "metrics.json").read_text())
    assert m["history"]["train_loss"] == c["history"]["train_loss"] and m["test_loss"] == c["test_loss"]
