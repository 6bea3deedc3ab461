"""The trainer end to end on small IDX data: it learns, it is deterministic, it writes the run contract."""
import json

import numpy as np
import pytest
from conftest import run_script, tiny_overrides

from cnnpipe.app import train
from cnnpipe.train import Trainer


def test_tiny_run_learns_and_writes_metrics(compose_cfg, fashion_root, tmp_path):
    cfg = compose_cfg(tiny_overrides(fashion_root, **{"trainer.epochs": "2"}))
    result = train(cfg, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["train_loss"] < 0.5 * np.log(10)          # well below chance (ln 10 = 2.30)
    assert m["test_acc"] > 0.8 and result == m["val_acc"]
    for key in ("test_acc", "test_loss", "val_acc", "train_loss", "epochs", "epoch_seconds", "samples_per_second",
                "backend", "seed"):
        assert key in m
    assert m["epochs"] == 2 and len(m["epoch_seconds"]) == 2 and m["backend"] == "numpy"
    assert (tmp_path / "train.log").read_text().count("epoch 2/2") == 1
    assert (tmp_path / "checkpoints" / "last.npz").exists()


def test_without_validation_the_test_accuracy_is_returned(compose_cfg, fashion_root, tmp_path):
    cfg = compose_cfg(tiny_overrides(fashion_root, **{"data.val_size": "0", "trainer.max_steps": "3"}))
    result = train(cfg, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["val_acc"] is None and result == m["test_acc"] and m["steps"] == 3


@pytest.mark.parametrize("extra", [{}, {"model": "convnet", "data.limit_train": "200", "optim": "adam"}])
def test_same_seed_gives_bit_identical_metrics(compose_cfg, fashion_root, tmp_path, extra):
    runs = []
    for i in range(2):
        cfg = compose_cfg(tiny_overrides(fashion_root, **extra))
        tr = Trainer(cfg, tmp_path / str(i))
        m = tr.fit()
        params = {k: v.copy() for k, v in tr.model.named_params().items()}
        runs.append((m["history"]["train_loss"], m["test_loss"], params))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for k in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][k], runs[1][2][k])
    cfg = compose_cfg(tiny_overrides(fashion_root, **extra, **{"trainer.seed": "1"}))
    assert Trainer(cfg, tmp_path / "other").fit()["history"]["train_loss"] != runs[0][0]


def test_float64_and_a_cosine_schedule_drive_the_steps(compose_cfg, fashion_root, tmp_path):
    """dtype=float64 reaches every parameter, and each step runs with the cosine schedule's lr for that step."""
    from cnnpipe.callbacks import Callback
    from cnnpipe.optim import lr_at

    class Record(Callback):
        lrs = []

        def on_step_end(self, tr, step, result, lr, seconds):
            self.lrs.append(lr)
    cfg = compose_cfg(tiny_overrides(fashion_root, **{"dtype": "float64", "optim.schedule": "cosine",
                                                      "optim.min_lr": "0.001", "trainer.epochs": "2"}))
    tr = Trainer(cfg, tmp_path)
    tr.callbacks.append(Record())
    tr.fit()
    assert all(p.dtype == np.float64 for p in tr.model.named_params().values())
    n = 2 * tr.steps_per_epoch
    assert Record.lrs == [lr_at(cfg.optim, s, tr.steps_per_epoch, n) for s in range(n)]
    assert Record.lrs[0] == pytest.approx(cfg.optim.lr) and all(a > b for a, b in zip(Record.lrs, Record.lrs[1:]))
    assert 0 < Record.lrs[-1] - cfg.optim.min_lr < 0.05 * (cfg.optim.lr - cfg.optim.min_lr)    # near the floor


def test_lr_schedules():
    from omegaconf import OmegaConf

    from cnnpipe.optim import lr_at
    base = dict(lr=0.1, schedule="step", step_size=2, gamma=0.5, min_lr=0.0, warmup_steps=0, warmup_epochs=0.0)
    step = OmegaConf.create(base)
    assert [lr_at(step, s, 10, 100) for s in (0, 19, 20, 40)] == [0.1, 0.1, 0.05, 0.025]
    cos = OmegaConf.create({**base, "schedule": "cosine", "min_lr": 0.01})
    assert lr_at(cos, 0, 10, 100) == pytest.approx(0.1) and lr_at(cos, 100, 10, 100) == pytest.approx(0.01)
    assert lr_at(cos, 50, 10, 100) == pytest.approx(0.055)


def test_overfit_debug_config_drives_the_loss_to_zero(tmp_path, fashion_root):
    r = run_script("train.py", "debug=overfit", f"data.root={fashion_root}", "data.download=false",
                   "trainer.epochs=30", "logger.tensorboard=false", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["train_loss"] < 0.01 and m["epochs"] == 30


def test_user_command_runs_as_a_subprocess(tmp_path, fashion_root):
    r = run_script("train.py", "pool=mean", "conv.k=5", *tiny_overrides(fashion_root), f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "metrics.json").exists()
    assert "FLOPs" in (tmp_path / "train.log").read_text()


def test_numba_runs_on_the_openmp_threading_layer(tmp_path, fashion_root):
    """The trainer sets the thread count, which starts numba's threads, before it builds the model: the layer
    must be the one the backend chose (OpenMP: ~1 µs hand-offs), and a user's NUMBA_THREADING_LAYER wins."""
    r = run_script("train.py", "backend=numba", "backend.threads=2", *tiny_overrides(fashion_root),
                   "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'omp'}")
    assert r.returncode == 0, r.stderr
    assert "numba threading layer omp, 2 threads" in (tmp_path / "omp" / "train.log").read_text()
    r = run_script("train.py", "backend=numba", *tiny_overrides(fashion_root), "trainer.max_steps=2",
                   f"hydra.run.dir={tmp_path / 'wq'}", env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert r.returncode == 0, r.stderr                  # a user's explicit choice is kept
    assert "numba threading layer workqueue" in (tmp_path / "wq" / "train.log").read_text()


def test_non_finite_loss_stops_with_the_step_and_layer(tmp_path, fashion_root):
    r = run_script("train.py", *tiny_overrides(fashion_root, **{"optim.lr": "1e30", "trainer.epochs": "3"}),
                   "checkpoint.every_steps=1", f"hydra.run.dir={tmp_path}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "step" in err and "Traceback" not in err
    assert "first layer whose gradient went non-finite" in err or "logits overflowed" in err
    from cnnpipe.checkpoint import load_checkpoint
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.npz")     # the last good one is intact
    assert all(np.all(np.isfinite(v)) for k, v in ck.items() if k.startswith("param/"))
