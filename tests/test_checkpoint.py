"""Checkpoints: exact resume (both backends), real signals, atomic writes under fault injection, bad files refused."""
import json
import os
import pickle
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import PY, REPO, run_script, tiny_overrides

from cnnpipe import ConfigError
from cnnpipe.app import make_trainer
from cnnpipe.callbacks import Callback
from cnnpipe.checkpoint import CheckpointError, load_checkpoint, save_atomic
from cnnpipe.train import Interrupted, Trainer

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not (REPO / "cnnpipe/backends/numba/__init__.py").exists(), reason="numba backend missing"))]


def _overrides(root, backend, **extra):
    """A small convnet (it has dropout, whose RNG must resume too) trained with Adam."""
    return tiny_overrides(root, **{"backend": backend, "model": "convnet", "model.layers.0.filters": "4",
                                   "model.layers.3.filters": "8", "model.layers.7.units": "32", "optim": "adam",
                                   "data.limit_train": "192",
                                   "trainer.epochs": "2", "optim.lr": "0.001", **extra})


def _arrays(run_dir):
    ck = load_checkpoint(run_dir / "checkpoints" / "last.npz")
    return {k: v for k, v in ck.items() if k.split("/")[0] in ("param", "optim", "history", "trainer", "rng")
            and k != "trainer/epoch_sums"}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "history/epoch_seconds":
            continue
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class StopAt(Callback):
    def __init__(self, step):
        self.at = step

    def on_step_end(self, tr, step, result, lr, seconds):
        if step == self.at:
            tr.stop_requested = "SIGTERM"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_identical(compose_cfg, fashion_root, tmp_path, backend):
    straight = make_trainer(compose_cfg(_overrides(fashion_root, backend)), tmp_path / "straight")
    m_straight = straight.fit()
    # one epoch, then resume to two (a checkpoint at an epoch boundary)
    make_trainer(compose_cfg(_overrides(fashion_root, backend, **{"trainer.epochs": "1"})), tmp_path / "a").fit()
    resumed = make_trainer(compose_cfg(_overrides(fashion_root, backend, resume=str(tmp_path / "a"))), tmp_path / "a")
    assert resumed.step == resumed.steps_per_epoch
    m_resumed = resumed.fit()
    # stopped in the middle of epoch 1 (step 4 of 6), then resumed
    tr = make_trainer(compose_cfg(_overrides(fashion_root, backend)), tmp_path / "b")
    tr.callbacks.append(StopAt(4))
    with pytest.raises(Interrupted):
        tr.fit()
    assert int(load_checkpoint(tmp_path / "b")["trainer/batch_in_epoch"]) == 4 < tr.steps_per_epoch
    m_mid = make_trainer(compose_cfg(_overrides(fashion_root, backend, resume=str(tmp_path / "b"))),
                         tmp_path / "b").fit()
    for m in (m_resumed, m_mid):
        assert m["test_loss"] == m_straight["test_loss"]
        assert m["history"]["train_loss"] == m_straight["history"]["train_loss"]
    _assert_same(_arrays(tmp_path / "straight"), _arrays(tmp_path / "a"))
    _assert_same(_arrays(tmp_path / "straight"), _arrays(tmp_path / "b"))


def test_checkpoint_needs_no_pickle_and_holds_the_state(compose_cfg, fashion_root, tmp_path):
    make_trainer(compose_cfg(_overrides(fashion_root, "numpy", **{"trainer.epochs": "1"})), tmp_path).fit()
    with np.load(tmp_path / "checkpoints" / "last.npz", allow_pickle=False) as z:
        keys = set(z.files)
        assert all(z[k].dtype.kind in "biufU" for k in keys)     # numbers and unicode text only
    assert {"format_version", "config", "rng/dropout", "trainer/epoch", "trainer/step", "trainer/batch_in_epoch",
            "trainer/best", "optim/t", "optim/m/conv1.W", "optim/v/dense2.b", "param/conv1.W"} <= keys
    assert (tmp_path / "checkpoints" / "best.npz").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_position_and_resume_continues(tmp_path, fashion_root, sig):
    run, epochs = tmp_path / "run", 40
    args = [PY, str(REPO / "scripts/train.py"), *_overrides(fashion_root, "numpy", **{
        "data.limit_train": None, "trainer.epochs": str(epochs), "model": "lenet5", "optim": "sgd"}),
        "checkpoint.every_steps=5", f"hydra.run.dir={run}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 180                       # wait until the loop runs: the first step checkpoint exists
    while time.time() < deadline and not (run / "checkpoints" / "last.npz").exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == (130 if sig == signal.SIGINT else 143), err
    err = " ".join(err.split())
    assert f"resume={run}" in err and "Traceback" not in err
    ck = load_checkpoint(run)
    stopped_at = int(ck["trainer/step"])
    assert 0 < stopped_at < epochs * 16
    r = run_script("train.py", f"resume={run}")
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == epochs and m["steps"] == epochs * 16                # 500 train samples / 32 = 16 steps
    assert f"resumed from {run}" in (run / "train.log").read_text()


def test_sigusr2_during_set_up_stops_after_the_first_step(tmp_path, fashion_root):
    """SLURM's time-limit warning (SIGUSR2) can come up to a minute early, even while the run is still setting up
    (here: the numba warm-up right after the model summary): the run keeps it, trains one step and saves it."""
    run = tmp_path / "run"
    args = [PY, str(REPO / "scripts/train.py"), *_overrides(fashion_root, "numba", **{"trainer.epochs": "5"}),
            f"hydra.run.dir={run}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and "model convnet" not in _read(run / "train.log"):
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR2)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 140, err
    assert f"resume={run}" in " ".join(err.split()) and "Traceback" not in err
    assert int(load_checkpoint(run)["trainer/step"]) == 1


def _read(path):
    return path.read_text() if path.exists() else ""


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path):
    """Fault injection: the writer dies (SIGKILL) between the temporary file and the rename."""
    path = tmp_path / "last.npz"
    save_atomic(path, {"format_version": np.array(1), "config": np.array("a: 1"), "x": np.arange(3)})
    code = (f"import os, signal, numpy as np; from cnnpipe.checkpoint import save_atomic; "
            f"save_atomic({str(path)!r}, {{'format_version': np.array(1), 'config': np.array('a: 2'), "
            f"'x': np.arange(10**6)}}, _before_rename=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))")
    r = subprocess.run([PY, "-c", code], cwd=REPO)
    assert r.returncode == -signal.SIGKILL
    ck = load_checkpoint(path)
    np.testing.assert_array_equal(ck["x"], np.arange(3))
    with pytest.raises(RuntimeError):               # in-process failure: old file intact, no temp file left
        save_atomic(path, {"x": np.arange(5)}, _before_rename=lambda tmp: (_ for _ in ()).throw(RuntimeError()))
    np.testing.assert_array_equal(load_checkpoint(path)["x"], np.arange(3))
    assert not (tmp_path / f".last.npz.{os.getpid()}.tmp").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fashion_root):
    run = tmp_path_factory.mktemp("finished")
    r = run_script("train.py", *tiny_overrides(fashion_root, **{"trainer.epochs": "2"}), f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    return run


def _bad_files(tmp_path, finished_run):
    good = (finished_run / "checkpoints" / "last.npz").read_bytes()
    files = {"truncated": good[: len(good) // 2], "random bytes": np.random.default_rng(0).bytes(4096)}
    for name, data in files.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
    with open(tmp_path / "pickled.npz", "wb") as f:
        np.savez(f, format_version=np.array(1), config=np.array(""), evil=np.array([{"a": 1}], dtype=object))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"W": 1}))
    return {**{n: tmp_path / f"{n}.npz" for n in files}, "pickled": tmp_path / "pickled.npz",
            "not npz": tmp_path / "plain.pkl", "missing": tmp_path / "nope.npz"}


@pytest.mark.parametrize("kind, needle", [("truncated", "truncated or corrupted"), ("random bytes", "not a readable"),
                                          ("pickled", "pickled"), ("not npz", "not a readable"),
                                          ("missing", "does not exist")])
@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_bad_checkpoints_are_refused_clearly(tmp_path, finished_run, fashion_root, kind, needle, script):
    path = _bad_files(tmp_path, finished_run)[kind]
    arg = f"resume={path}" if script == "train.py" else f"ckpt={path}"
    extra = [f"hydra.run.dir={tmp_path / 'run'}"] if script == "train.py" else []
    r = run_script(script, arg, *extra)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and needle in err and str(path) in err and "Traceback" not in err


def test_wrong_architecture_is_refused_with_the_differences(tmp_path, finished_run, compose_cfg, fashion_root):
    r = run_script("train.py", f"resume={finished_run}", "model=convnet", "conv.k=3")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "architecture differs" in err and "conv.k: checkpoint 5 vs now 3" in err
    cfg = compose_cfg(tiny_overrides(fashion_root, model="convnet"))
    tr = Trainer(cfg, tmp_path)
    from cnnpipe.resume import restore
    with pytest.raises(CheckpointError, match=r"conv2.W: model \(64, 32, 5, 5\) vs checkpoint \(16, 6, 5, 5\)"):
        restore(tr, load_checkpoint(finished_run))
    r = run_script("evaluate.py", f"ckpt={finished_run}", "model.name=x")
    assert r.returncode == 2 and "only data." in r.stderr


def test_evaluate_reproduces_the_final_test_accuracy(finished_run, tmp_path):
    m = json.loads((finished_run / "metrics.json").read_text())
    tested = m["test_checkpoint"]                                    # the weights the final test used
    r = run_script("evaluate.py", f"ckpt={finished_run}/checkpoints/{tested}.npz", f"out={tmp_path / 'e.json'}")
    assert r.returncode == 0, r.stderr
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["test_acc"] == m["test_acc"] and e["test_loss"] == pytest.approx(m["test_loss"], rel=1e-12)
    conf = np.array(e["confusion"])
    assert conf.sum() == e["n"] and np.trace(conf) / e["n"] == pytest.approx(e["test_acc"])
    assert f"test loss {m['test_loss']:.4f}   accuracy {m['test_acc']:.4f}" in r.stdout      # the report says so
    assert "confusion matrix" in r.stdout


def test_unwritable_output_dir_fails_before_training(tmp_path, fashion_root):
    (tmp_path / "file").write_text("x")
    r = run_script("train.py", *tiny_overrides(fashion_root), f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "cannot be created" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="not writable"):
        from cnnpipe.rundir import check_writable
        check_writable(tmp_path / "file" / "run")
