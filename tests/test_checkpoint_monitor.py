"""checkpoint.monitor, through the command line: a name the run cannot have is refused at start; unset, best.npz
follows val_acc, or train_loss without a validation split (cnnpipe.metrics.default_metric)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import run_script, tiny_overrides

from cnnpipe.checkpoint import load_checkpoint

SMALL = {"data.limit_train": "128", "data.limit_test": "64", "trainer.batch_size": "64", "trainer.epochs": "3",
         "optim.lr": "0.1"}


@pytest.mark.parametrize("override, needle", [
    ("checkpoint.monitor=val_accuracy", "checkpoint.monitor='val_accuracy' is not a per-epoch metric: choose one of "
                                        "val_loss, val_acc, train_loss, train_acc, or null"),
    ("checkpoint.monitor=val_acc data.val_size=0", "checkpoint.monitor=val_acc needs a validation split, and this "
                                                   "run has none (data.val_size=0)"),
])
def test_a_monitor_the_run_cannot_have_is_refused_at_start(fashion_root, tmp_path, override, needle):
    run = tmp_path / "run"
    r = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), *override.split(), f"hydra.run.dir={run}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and needle in err and "Traceback" not in err
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()   # before the first step


@pytest.mark.parametrize("overrides, follows", [
    (["data.val_size=0"], "train_loss"),                                     # unset, no validation split
    (["data.val_size=64"], "val_acc"),                                       # unset, with one
    (["data.val_size=64", "checkpoint.monitor=train_acc"], "train_acc"),
])
def test_best_npz_follows_the_monitor(fashion_root, tmp_path, overrides, follows):
    """best.npz is the epoch where the monitored metric was best (highest accuracy, lowest loss), and it says so."""
    run = tmp_path / "run"
    r = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), *overrides, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    history = load_checkpoint(run / "checkpoints" / "last.npz")[f"history/{follows}"]     # one value per epoch
    assert len(history) == 3 and len(set(history.tolist())) > 1                          # the epochs differ
    epoch = int((np.argmin if follows.endswith("loss") else np.argmax)(history)) + 1     # the first of a tie
    best = load_checkpoint(run / "checkpoints" / "best.npz")
    assert int(best["trainer/epoch"]) == epoch and float(best["trainer/best"]) == history[epoch - 1]
