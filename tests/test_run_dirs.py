"""Every run writes only into its own directory: resume into a new directory, fine-tuning sweeps, init_from, and
directories another run holds, all through the command line a user types."""
from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script, tiny_overrides

from cnnpipe.checkpoint import load_checkpoint

SMALL = {"data.val_size": "64", "data.limit_train": "256", "data.limit_test": "64", "trainer.batch_size": "64"}


def tree_state(root: Path) -> dict:
    """Every file under root with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def train(*args, **kw):
    r = run_script("train.py", *args, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, fashion_root):
    """A finished one-epoch LeNet-5 run (TensorBoard on), and the state of every file in it."""
    a = tmp_path_factory.mktemp("runs") / "A"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true"}), f"hydra.run.dir={a}")
    return a, tree_state(a)


def test_resume_into_a_new_directory_leaves_the_source_byte_identical(run_a, fashion_root, tmp_path):
    a, before = run_a
    b, straight = tmp_path / "B", tmp_path / "straight"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true"}),
          f"resume={a}/checkpoints/last.npz", "trainer.epochs=2", f"hydra.run.dir={b}")
    assert tree_state(a) == before
    assert {"metrics.json", "train.log", "checkpoints", ".hydra"} <= {p.name for p in b.iterdir()}
    assert list(b.glob("events.out.tfevents.*"))
    m = metrics(b)
    assert m["epochs"] == 2 and m["steps"] == 2 * 4 and m["resumed_from"] == str(a / "checkpoints" / "last.npz")
    assert int(load_checkpoint(b)["trainer/step"]) == 8
    # the continuation is the run that never stopped
    train(*tiny_overrides(fashion_root, **SMALL), "trainer.epochs=2", f"hydra.run.dir={straight}")
    assert m["history"]["train_loss"] == metrics(straight)["history"]["train_loss"]
    assert m["test_loss"] == metrics(straight)["test_loss"]


def test_resume_from_the_checkpoints_folder_continues_the_run_itself(run_a, fashion_root, tmp_path):
    """resume=<run>/checkpoints/ (what tab completion gives) names the run, not a new run inside its folder."""
    a = Path(shutil.copytree(run_a[0], tmp_path / "A"))
    train(*tiny_overrides(fashion_root, **SMALL), f"resume={a}/checkpoints/", "trainer.epochs=2")
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["best.npz", "last.npz"]
    assert metrics(a)["epochs"] == 2 and metrics(a)["steps"] == 8 and list((a / ".hydra").glob("resume-*"))


def test_a_fine_tuning_sweep_from_one_checkpoint_writes_only_its_job_dirs(run_a, fashion_root, tmp_path):
    a, before = run_a
    sweep = tmp_path / "sweep"
    r = train("-m", *tiny_overrides(fashion_root, **SMALL), f"resume={a}/checkpoints/last.npz", "trainer.epochs=2",
              "optim.lr=0.01,0.02", f"hydra.sweep.dir={sweep}")
    assert tree_state(a) == before
    jobs = [metrics(sweep / str(j)) for j in (0, 1)]
    assert [m["epochs"] for m in jobs] == [2, 2] and [m["steps"] for m in jobs] == [8, 8]
    assert jobs[0]["history"]["train_loss"][0] == jobs[1]["history"]["train_loss"][0]   # the same first epoch (A's)
    assert jobs[0]["history"]["train_loss"][1] != jobs[1]["history"]["train_loss"][1]   # then each its own lr
    assert "Sweep summary: 2 jobs, 2 finished" in r.stdout


def test_init_from_starts_a_new_run_from_the_weights(run_a, fashion_root, tmp_path):
    a, before = run_a
    c = tmp_path / "C"
    train(*tiny_overrides(fashion_root, **SMALL), f"init_from={a}", "optim.lr=1e-12", "optim.momentum=0",
          f"hydra.run.dir={c}")
    assert tree_state(a) == before
    m = metrics(c)
    assert m["steps"] == 4 and m["epochs"] == 1                     # step 0, a whole new epoch
    assert m["init_from"]["skipped"] == [] and "conv1.W" in m["init_from"]["loaded"]
    assert m["test_loss"] == pytest.approx(metrics(a)["test_loss"], rel=1e-5)   # lr ~0: A's weights, A's test loss
    saved_a, saved_c = load_checkpoint(a), load_checkpoint(c)
    np.testing.assert_allclose(saved_c["param/conv1.W"], saved_a["param/conv1.W"], atol=1e-9)
    assert int(saved_c["optim/t"]) == 4                              # the optimizer starts fresh


def test_init_from_strict_refuses_another_shape_and_lenient_skips_it(run_a, fashion_root, tmp_path):
    a, before = run_a
    other = [*tiny_overrides(fashion_root, **SMALL), f"init_from={a}/checkpoints/last.npz", "model.layers.9.units=64"]
    r = run_script("train.py", *other, f"hydra.run.dir={tmp_path / 'strict'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in err
    assert "dense2.W: model (64, 120) vs checkpoint (84, 120)" in err and "init_from_strict=false" in err
    train(*other, "init_from_strict=false", f"hydra.run.dir={tmp_path / 'lenient'}")
    m = metrics(tmp_path / "lenient")
    assert m["init_from"]["skipped"] == ["dense2.W", "dense2.b", "dense3.W"]
    assert "conv1.W" in m["init_from"]["loaded"] and "dense3.b" in m["init_from"]["loaded"]
    assert tree_state(a) == before


def test_init_from_with_the_optimizer_state_needs_the_same_optimizer(run_a, fashion_root, tmp_path):
    a, _ = run_a
    r = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), f"init_from={a}", "init_from_optimizer=true",
                   "optim=adam", f"hydra.run.dir={tmp_path / 'adam'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "no matching optimizer state" in err and "m/conv1.W" in err
    train(*tiny_overrides(fashion_root, **SMALL), f"init_from={a}", "init_from_optimizer=true",
          f"hydra.run.dir={tmp_path / 'sgd'}")
    assert int(load_checkpoint(tmp_path / "sgd")["optim/t"]) == 4 + 4     # A's 4 steps, then 4 more


def test_init_from_in_a_sweep_and_resume_with_init_from(run_a, fashion_root, tmp_path):
    a, before = run_a
    sweep = tmp_path / "sweep"
    train("-m", *tiny_overrides(fashion_root, **SMALL), f"init_from={a}", "optim.lr=0.001,0.002",
          f"hydra.sweep.dir={sweep}")
    assert [metrics(sweep / j)["steps"] for j in "01"] == [4, 4]
    assert tree_state(a) == before
    r = run_script("train.py", *tiny_overrides(fashion_root), f"init_from={a}", f"resume={a}",
                   f"hydra.run.dir={tmp_path / 'both'}")
    assert r.returncode == 2 and "Give one of them" in " ".join(r.stderr.split())


def test_a_directory_that_holds_a_run_is_refused_before_hydra_writes(run_a, fashion_root, tmp_path):
    a, before = run_a
    r = run_script("train.py", *tiny_overrides(fashion_root), f"hydra.run.dir={a}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "already holds a run" in err and f"resume={a}" in err
    assert tree_state(a) == before


def test_a_sweep_dir_that_holds_a_sweep_is_refused_and_jobs_cannot_share_a_dir(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    small = tiny_overrides(fashion_root, **SMALL, **{"trainer.max_steps": "1"})
    train("-m", *small, "conv.k=3", f"hydra.sweep.dir={sweep}")
    before = tree_state(sweep)
    r = run_script("train.py", "-m", *small, "conv.k=5", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2 and "already holds a sweep" in " ".join(r.stderr.split())
    assert tree_state(sweep) == before
    r = run_script("train.py", "-m", *small, "conv.k=3,5", f"hydra.sweep.dir={tmp_path / 'other'}",
                   "hydra.sweep.subdir=same")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "every job of the sweep the same directory" in err and "Traceback" not in err
    assert not (tmp_path / "other" / "same").exists()


def test_two_runs_in_one_second_get_two_directories(fashion_root, tmp_path):
    """The default run directory is outputs/<name>/<time>; when that second's directory is taken (another run
    started then), the run takes <time>_1. Here every second of the next minute is taken."""
    taken = tmp_path / "outputs" / "same"
    now = datetime.now()
    for s in range(60):
        d = taken / (now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S")
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text("{}")
    before = tree_state(taken)
    t0 = time.time()
    train(*tiny_overrides(fashion_root, **SMALL, **{"trainer.max_steps": "1"}), "name=same", cwd=tmp_path)
    assert time.time() - t0 < 60
    new = [d for d in taken.iterdir() if d.name.endswith("_1")]
    assert len(new) == 1 and (new[0] / "metrics.json").exists() and (new[0] / ".hydra").is_dir()
    assert {p: v for p, v in tree_state(taken).items() if not p.is_relative_to(new[0])} == before


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=-1", "optim.lr=-1.0 cannot work"), ("optim.lr=nan", "optim.lr=nan cannot work"),
    ("optim.lr=0", "optim.lr=0.0 cannot work"), ("optim.momentum=1.5", "momentum must be in [0, 1)"),
    ("optim.weight_decay=-0.1", "weight decay must be"), ("optim.schedule=step optim.step_size=0", "step_size"),
    ("optim.schedule=step optim.gamma=0", "gamma"), ("optim.schedule=cosine optim.min_lr=1", "min_lr"),
    ("optim=adam optim.betas=[0.9,1.0]", "betas"), ("optim=adam optim.eps=0", "eps must be"),
])
def test_values_that_cannot_train_are_refused_at_start(fashion_root, tmp_path, override, needle):
    r = run_script("train.py", *tiny_overrides(fashion_root), *override.split(), f"hydra.run.dir={tmp_path / 'r'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists() and "data fashion_mnist" not in \
        (tmp_path / "r" / "train.log").read_text()                  # refused before any data was loaded


def test_an_output_dir_that_cannot_be_created_is_one_paragraph(fashion_root):
    r = run_script("train.py", *tiny_overrides(fashion_root), "hydra.run.dir=/proc/cnnpipe-run")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "cannot be created" in err and "Traceback" not in err and err.count("error:") == 1
