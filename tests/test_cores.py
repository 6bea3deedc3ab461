"""The cores a job was given (cnnpipe/backends/cores.py), read from the real environment and the real affinity mask
of a fresh process, and the thread count a run then uses (scripts/train.py: train.log and metrics.json)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import PY, REPO, run_script, tiny_overrides

from cnnpipe.backends.cores import THREADS_ENV

GRANTS = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", THREADS_ENV)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in GRANTS}
    env.update(extra, PYTHONPATH=str(REPO))
    return env


def cores_in_fresh_process(threads=None, affinity=None, **env) -> tuple[int, str]:
    """given_cores() in a new interpreter with exactly these variables (and this affinity mask, if given)."""
    code = "import json, os, sys\n"
    if affinity is not None:
        code += f"os.sched_setaffinity(0, {sorted(affinity)!r})\n"
    code += ("from cnnpipe.backends.cores import given_cores\n"
             f"print(json.dumps([*given_cores({threads!r}), 'ray' in sys.modules]))\n")
    out = subprocess.run([PY, "-c", code], env=clean_env(**env), capture_output=True, text=True, check=True)
    n, source, ray_imported = json.loads(out.stdout)
    assert not ray_imported                                  # never imported just to ask
    return n, source


def test_the_affinity_mask_is_the_default():
    cpus = sorted(os.sched_getaffinity(0))
    assert cores_in_fresh_process() == (len(cpus), "CPU affinity")
    assert cores_in_fresh_process(affinity=cpus[:1]) == (1, "CPU affinity")


@pytest.mark.parametrize("env, want", [
    ({"OMP_NUM_THREADS": "3"}, (3, "OMP_NUM_THREADS")),
    ({"OMP_NUM_THREADS": "3,1"}, (3, "OMP_NUM_THREADS")),                      # nested levels: the outer one
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "5", "OMP_NUM_THREADS": "3"}, (5, "SLURM_CPUS_PER_TASK")),
    ({"SLURM_CPUS_PER_TASK": "5", "OMP_NUM_THREADS": "3"}, (3, "OMP_NUM_THREADS")),   # not inside a SLURM job
    ({THREADS_ENV: "2", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "5"}, (2, f"{THREADS_ENV}, this sweep's share "
                                                                               "of the machine")),
])
def test_the_most_specific_grant_wins(env, want):
    assert cores_in_fresh_process(**env) == want


def test_explicit_threads_win_over_every_grant():
    assert cores_in_fresh_process(threads=4, affinity=[0], SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="1",
                                  OMP_NUM_THREADS="1", **{THREADS_ENV: "1"}) == (4, "backend.threads")


@pytest.mark.parametrize("value", ["", "0", "-2", "four"])
def test_unusable_values_are_skipped(value):
    n, source = cores_in_fresh_process(OMP_NUM_THREADS=value, SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK=value)
    assert (n, source) == (len(os.sched_getaffinity(0)), "CPU affinity")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_run_inside_a_slurm_job_uses_its_cpus_per_task(fashion_root, tmp_path, backend):
    """What a SLURM job step sees (SLURM_JOB_ID, SLURM_CPUS_PER_TASK): the run's threads follow it and train.log
    says where the number came from."""
    run_dir = tmp_path / "run"
    r = run_script("train.py", *tiny_overrides(fashion_root), f"backend={backend}", f"hydra.run.dir={run_dir}",
                   env={"SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "", THREADS_ENV: ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["threads"] == 1
    assert f"({backend} backend, float32, 1 threads: SLURM_CPUS_PER_TASK)" in (run_dir / "train.log").read_text()
