"""Every run writes only into its own directory: resume into a new directory, fine-tuning sweeps, init_from, and
directories another run holds, all through the command line a user types."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, REPO, run_script, tiny_overrides

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
    train("-m", *tiny_overrides(fashion_root, **SMALL), f"init_from={a}", "optim.lr=1e-12,0.02",
          f"hydra.sweep.dir={sweep}")
    jobs = [metrics(sweep / j) for j in "01"]
    assert [m["steps"] for m in jobs] == [4, 4]
    assert all("conv1.W" in m["init_from"]["loaded"] and m["init_from"]["skipped"] == [] for m in jobs)
    assert jobs[0]["test_loss"] == pytest.approx(metrics(a)["test_loss"], rel=1e-5)   # lr ~0: A's weights
    assert jobs[1]["test_loss"] != pytest.approx(metrics(a)["test_loss"], rel=1e-3)   # trained on from them
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
    assert r.returncode == 2 and "gives job 0 (" in err and "the same directory 'same'" in err
    assert "Traceback" not in err and not (tmp_path / "other").exists()


def test_sweep_jobs_whose_resolved_directories_collide_are_refused_before_any_runs(fashion_root, tmp_path):
    """override_dirname without the swept key (exclude_keys) names two jobs alike: refused before job 0 runs."""
    small = tiny_overrides(fashion_root, **SMALL, **{"trainer.max_steps": "1"})
    common = ["-m", *small, "optim.lr=0.01,0.02", "hydra.sweep.subdir=${hydra.job.override_dirname}"]
    r = run_script("train.py", *common, f"hydra.sweep.dir={tmp_path / 'clash'}",
                   "hydra.job.config.override_dirname.exclude_keys=[optim.lr]")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "job 0 (" in err and "optim.lr=0.01" in err and "job 1 (" in err, err
    assert "Traceback" not in err and not (tmp_path / "clash").exists()
    train(*common, f"hydra.sweep.dir={tmp_path / 'apart'}")             # with optim.lr in the name: two dirs
    done = sorted(str(m.parent) for m in (tmp_path / "apart").rglob("metrics.json"))
    assert len(done) == 2 and "optim.lr=0.01" in done[0] and "optim.lr=0.02" in done[1]


@pytest.fixture(scope="module")
def sweep_s(tmp_path_factory, fashion_root):
    """A finished two-job sweep (one step each), and the state of every file in it."""
    s = tmp_path_factory.mktemp("sweeps") / "S"
    train("-m", *tiny_overrides(fashion_root, **SMALL, **{"trainer.max_steps": "1"}), "conv.k=3,5",
          f"hydra.sweep.dir={s}")
    return s, tree_state(s)


@pytest.mark.parametrize("args, needle", [
    (["hydra.run.dir={A}/checkpoints"], "is inside the run {A}"),
    (["hydra.run.dir={A}/deeper/still"], "is inside the run {A}"),
    (["hydra.run.dir={A}/branch_${{now:%H-%M-%S}}"], "is inside the run {A}"),
    (["-m", "conv.k=3,5", "hydra.sweep.dir={A}"], "hydra.sweep.dir={A} already holds a run"),
    (["-m", "conv.k=3,5", "hydra.sweep.dir={A}/sweep"], "is inside the run {A}"),
    (["hydra.run.dir={S}"], "hydra.run.dir={S} already holds a sweep"),
    (["hydra.run.dir={S}/new"], "is inside the sweep {S}"),
    (["hydra.run.dir={S}/0"], "hydra.run.dir={S}/0 already holds a run"),
    (["-m", "conv.k=3,5", "hydra.sweep.dir={S}/0/inner"], "is inside the run {S}/0"),
])
def test_a_directory_inside_a_run_or_a_sweep_is_refused(run_a, sweep_s, fashion_root, args, needle):
    (a, a_before), (s, s_before) = run_a, sweep_s
    args = [x.format(A=a, S=s) for x in args]
    r = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), *args)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and needle.format(A=a, S=s) in err and "Traceback" not in err, err
    assert tree_state(a) == a_before and tree_state(s) == s_before


def test_a_directory_named_with_an_interpolation_is_checked_once_resolved(run_a, sweep_s, fashion_root, tmp_path):
    """${name} is "train": a copy of run A and of sweep S under that name are refused like their literal paths."""
    (a, _), (s, _) = run_a, sweep_s
    runs, sweeps = tmp_path / "runs", tmp_path / "sweeps"
    shutil.copytree(a, runs / "train")
    shutil.copytree(s, sweeps / "train")
    before = tree_state(tmp_path)
    for mode, args, needle in (
            ([], ["hydra.run.dir=" + str(runs) + "/${name}"], f"hydra.run.dir={runs}/train already holds a run"),
            (["-m"], ["conv.k=3,5", "hydra.sweep.dir=" + str(sweeps) + "/${name}"],
             f"hydra.sweep.dir={sweeps}/train already holds a sweep")):
        r = run_script("train.py", *mode, *tiny_overrides(fashion_root, **SMALL), *args)
        err = " ".join(r.stderr.split())
        assert r.returncode == 2 and needle in err and "Traceback" not in err, err
        assert tree_state(tmp_path) == before
    train(*tiny_overrides(fashion_root, **SMALL), "hydra.run.dir=" + str(runs) + "/${name}_new")
    assert metrics(runs / "train_new")["steps"] == 4


@pytest.mark.parametrize("script", ["torch_peer.py", "gradcheck.py", "find_lr.py"])
def test_every_command_that_makes_a_run_directory_checks_it_first(run_a, fashion_root, script):
    a, before = run_a
    r = run_script(script, *tiny_overrides(fashion_root, **SMALL), f"hydra.run.dir={a}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "already holds a run" in err and "resume=" not in err, err
    assert tree_state(a) == before
    r = run_script(script, *tiny_overrides(fashion_root, **SMALL), "hydra.run.dir=/proc/cnnpipe-run")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "cannot be created" in err and "Traceback" not in err and err.count("error:") == 1


@contextlib.contextmanager
def started(*args, log: Path):
    """scripts/train.py running in the background (its output in `log`); killed at the end if still running."""
    with open(log, "w") as out:
        proc = subprocess.Popen([PY, str(REPO / "scripts" / "train.py"), *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def frozen(proc: subprocess.Popen):
    """The process stopped (SIGSTOP) while the block runs: its files stand still, its lock stays held."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def wait_until(ready, proc: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"exited {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def refused_as_busy(r, pid: int) -> bool:
    err = " ".join(r.stderr.split())
    return r.returncode == 2 and "is in use" in err and f"process {pid}" in err and "Traceback" not in err


SLOW = {**SMALL, "trainer.epochs": "30"}             # a few seconds of training: long enough to be caught running


def test_a_run_that_is_training_is_locked_against_a_second_writer(fashion_root, tmp_path):
    """While a run trains (frozen with SIGSTOP, so that its files stand still), another start in its directory and
    a resume of it in place are refused before they write anything; the run then finishes as if alone."""
    run, log = tmp_path / "busy", tmp_path / "first.log"
    with started(*tiny_overrides(fashion_root, **SLOW), f"hydra.run.dir={run}", log=log) as first:
        wait_until(lambda: "data fashion_mnist" in text(run / "train.log"), first, log)
        with frozen(first):
            before = tree_state(run)
            second = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), "trainer.seed=7",
                                f"hydra.run.dir={run}")
            resumed = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), f"resume={run}")
            assert refused_as_busy(second, first.pid) and refused_as_busy(resumed, first.pid), second.stderr
            assert tree_state(run) == before
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert metrics(run)["epochs"] == 30 and metrics(run)["seed"] == 0
    assert "trainer.seed=7" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert not list((run / ".hydra").glob("resume-*"))


def test_two_starts_in_one_directory_at_once_give_one_run(fashion_root, tmp_path):
    """Two processes started together with the same hydra.run.dir: one runs, the other is refused (exit 2) whichever
    gets there first, and the directory holds the one run's files only."""
    run = tmp_path / "B"
    with started(*tiny_overrides(fashion_root, **SLOW), "trainer.seed=1", f"hydra.run.dir={run}",
                 log=tmp_path / "1.log") as one, \
            started(*tiny_overrides(fashion_root, **SLOW), "trainer.seed=2", f"hydra.run.dir={run}",
                    log=tmp_path / "2.log") as two:
        codes = [one.wait(timeout=300), two.wait(timeout=300)]
    assert sorted(codes) == [0, 2], codes
    winner, loser = (1, 2) if codes[0] == 0 else (2, 1)
    refusal = " ".join((tmp_path / f"{loser}.log").read_text().split())
    assert "is in use" in refusal or "already holds a run" in refusal
    assert metrics(run)["seed"] == winner
    assert f"trainer.seed={winner}" in (run / ".hydra" / "overrides.yaml").read_text()
    assert (run / "train.log").read_text().count("model lenet5") == 1         # the loser never logged there


def test_a_sweep_that_is_running_is_locked_against_its_resume(fashion_root, tmp_path):
    """sweep.resume=true on a sweep that still runs, and a resume in place of one of its jobs, are refused before
    they write anything; the sweep then finishes."""
    sweep, log = tmp_path / "S", tmp_path / "sweep.log"
    command = ["-m", *tiny_overrides(fashion_root, **SLOW), "conv.k=3,5", f"hydra.sweep.dir={sweep}"]
    with started(*command, log=log) as first:
        wait_until(lambda: "data fashion_mnist" in text(sweep / "0" / "train.log"), first, log)
        with frozen(first):
            before = tree_state(sweep)
            again = run_script("train.py", *command, "sweep.resume=true")
            job = run_script("train.py", *tiny_overrides(fashion_root, **SMALL), f"resume={sweep}/0")
            assert refused_as_busy(again, first.pid) and refused_as_busy(job, first.pid), (again.stderr, job.stderr)
            assert tree_state(sweep) == before
        assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert [metrics(sweep / j)["epochs"] for j in "01"] == [30, 30]


def test_a_killed_run_leaves_no_lock_behind(fashion_root, tmp_path):
    """The lock is the kernel's (flock): it goes with the process, so a run killed with SIGKILL resumes at once."""
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    with started(*tiny_overrides(fashion_root, **SLOW, **{"checkpoint.every_steps": "1"}), f"hydra.run.dir={run}",
                 log=log) as first:
        wait_until(lambda: (run / "checkpoints" / "last.npz").exists(), first, log)
        first.kill()
        first.wait()
    train(*tiny_overrides(fashion_root, **SMALL), f"resume={run}", "trainer.epochs=1")
    assert metrics(run)["resumed_from"]


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
    assert "data fashion_mnist" not in r.stdout + r.stderr              # refused before any data was loaded
    assert not (tmp_path / "r").exists()                                # and a refused run leaves no directory


def test_a_refused_run_leaves_its_directory_as_it_was_so_the_same_command_runs_once_fixed(fashion_root, tmp_path):
    """A run refused by a value check never trained: the directory Hydra made for it goes (the default one too),
    a directory the user made keeps only what it had, and the same hydra.run.dir then takes the fixed run."""
    small = tiny_overrides(fashion_root, **SMALL, **{"trainer.max_steps": "1"})
    r = run_script("train.py", *small, "optim.lr=-1", cwd=tmp_path)
    assert r.returncode == 2 and not [p for p in tmp_path.rglob("*") if p.is_file()]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    r = run_script("train.py", *small, "optim.lr=-1", f"hydra.run.dir={mine}")
    assert r.returncode == 2 and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    for run in (tmp_path / "again", mine):
        if run.name == "again":
            assert run_script("train.py", *small, "optim.lr=-1", f"hydra.run.dir={run}").returncode == 2
        train(*small, f"hydra.run.dir={run}")
        assert metrics(run)["steps"] == 1 and (run / ".hydra").is_dir()


def test_an_output_dir_that_cannot_be_created_is_one_paragraph(fashion_root):
    r = run_script("train.py", *tiny_overrides(fashion_root), "hydra.run.dir=/proc/cnnpipe-run")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "cannot be created" in err and "Traceback" not in err and err.count("error:") == 1
