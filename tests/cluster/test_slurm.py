"""The README's SLURM command on a real one-node SLURM cluster (tests/cluster/slurm.sh: munged, slurmctld, slurmd,
on 127.0.0.1 only), through Hydra's submitit_slurm launcher: every job's metrics and the summary, threads that
follow cpus_per_task, and a sweep cut off by its time limit, then finished with sweep.resume=true."""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import statistics
import subprocess

import pytest
from conftest import make_fashion_root, tiny_overrides
from engines import REPO, listening, not_loopback, shell
from readme import readme_commands, with_overrides

SLURM_SH = REPO / "tests" / "cluster" / "slurm.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster for this module, stopped afterwards (also when a test failed): the environment
    its commands need, and the marker (SLURM_CONF=...) that its daemons' and jobs' environments carry."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start munged, slurmctld and slurmd, which needs root: run make test-cluster as "
                    "root")
    state = tmp_path_factory.mktemp("slurm")
    marker = f"SLURM_CONF={state / 'slurm.conf'}"
    try:
        up = subprocess.run([str(SLURM_SH), "up", str(state)], capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout + up.stderr
        yield dict(os.environ, SLURM_CONF=str(state / "slurm.conf")), marker
    finally:
        subprocess.run([str(SLURM_SH), "down", str(state)], capture_output=True, timeout=180)


def readme_slurm_command() -> str:
    [command] = readme_commands("SLURM")
    return command


def setting(command: str, key: str) -> str:
    return next(w.split("=", 1)[1] for w in shlex.split(command) if w.startswith(key + "="))


def summary(sweep) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def readme_sweep(slurm, tmp_path_factory, fashion_root):
    """The README's command as written, on tiny data, into a sweep directory of the test's."""
    env, _ = slurm
    sweep = tmp_path_factory.mktemp("readme") / "sweep"
    command = with_overrides(readme_slurm_command(), f"hydra.sweep.dir={sweep}", *tiny_overrides(fashion_root))
    return sweep, shell(command, env, timeout=900)


def test_readme_slurm_sweep_runs_every_job_with_cpus_per_task_threads(slurm, readme_sweep):
    _, marker = slurm
    sweep, r = readme_sweep
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    rows = summary(sweep)
    assert len(rows) == 6 and all(row["status"] == "finished" for row in rows), rows
    assert "Sweep summary: 6 jobs, 6 finished" in r.stdout
    assert (sweep / "summary.md").read_text().count("| finished |") == 6
    cpus = int(setting(readme_slurm_command(), "hydra.launcher.cpus_per_task"))
    for row in rows:
        job = sweep / row["dir"]
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["threads"] == cpus and metrics["backend"] == "numba"
        assert f"{cpus} threads: SLURM_CPUS_PER_TASK)" in (job / "train.log").read_text()
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 6      # each job was its own SLURM job
    sockets = listening(marker)
    assert sockets and not not_loopback(sockets), sockets


def test_a_sweep_cut_off_by_its_time_limit_resumes_from_its_checkpoints(slurm, readme_sweep, tmp_path):
    """The README's command narrowed to two jobs (conv.k=5, both pools) on data that takes ~150 s to train at the
    speed the README sweep's jobs had (a margin: a job that happens to train faster must still be training when the
    warning comes), with a two-minute limit and its warning 30 s before: SLURM's SIGUSR2 (sent at slurmctld's 30-s
    checks, up to 60 s early: here 30-90 s after the start, once every job is training) cuts both off; the same
    command with sweep.resume=true (and the README's limit) finishes them from their checkpoints. (With a one-minute
    limit the warning can come in any of the first 30 s, also in the second before submitit installs its handlers,
    which kills the job.)"""
    env, _ = slurm
    sweep_before, _ = readme_sweep
    sps = statistics.median(json.loads((sweep_before / row["dir"] / "metrics.json").read_text())["samples_per_second"]
                            for row in summary(sweep_before) if "conv.k=5" in row["overrides"])
    n_train = 20000
    epochs = max(2, math.ceil(150 * sps / n_train))             # ~150 s of training at the speed measured above
    root = make_fashion_root(tmp_path / "data", n_train=n_train, n_test=200)
    sweep = tmp_path / "sweep"
    command = with_overrides(readme_slurm_command(), "conv.k=5", f"hydra.sweep.dir={sweep}",
                             *tiny_overrides(root, **{"trainer.epochs": epochs}))

    cut = shell(with_overrides(command, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30"), env,
                timeout=600)
    assert cut.returncode == 1, (cut.stdout[-3000:], cut.stderr[-5000:])
    assert "2 job(s) of the sweep did not finish" in cut.stderr and "sweep.resume=true" in cut.stderr
    rows = summary(sweep)
    assert [(row["status"], row["error"]) for row in rows] == [("interrupted", "stopped by SIGUSR2")] * 2, rows
    for row in rows:
        assert (sweep / row["dir"] / "checkpoints" / "last.npz").exists()
        assert not (sweep / row["dir"] / "metrics.json").exists()

    done = shell(with_overrides(command, "sweep.resume=true"), env, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    rows = summary(sweep)
    assert [(row["status"], row["resumed"]) for row in rows] == [("finished", "True")] * 2, rows
    for row in rows:
        job = sweep / row["dir"]
        assert json.loads((job / "job.json").read_text())["resumed"] is True
        assert json.loads((job / "metrics.json").read_text())["epochs"] == epochs
        log = (job / "train.log").read_text()
        assert "SIGUSR2 received" in log and "resumed from" in log and ", step 0 " not in log
