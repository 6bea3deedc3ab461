"""Sweeps as a user runs them: real `scripts/train.py -m` subprocesses with real Hydra launchers and sweepers
(basic, joblib, submitit_local, a local Ray, optuna) on tiny IDX data; what each leaves in the sweep directory."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PY, REPO, run_script


def tiny(root: Path, sweep_dir: Path, **extra) -> list[str]:
    ov = {"data.root": root, "data.download": "false", "data.val_size": 32, "data.limit_train": 128,
          "data.limit_test": 64, "trainer.epochs": 1, "trainer.progress": "false", "logger.tensorboard": "false",
          "hydra.sweep.dir": sweep_dir}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def assert_ranked(rows, key="metric", maximize=True):
    vals = [float(r[key]) for r in rows if r["status"] == "finished"]
    assert vals == sorted(vals, reverse=maximize), vals
    assert [r["rank"] for r in rows if r["status"] == "finished"] == [str(i + 1) for i in range(len(vals))]


def test_joblib_sweep_of_four_jobs_writes_a_ranked_summary(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "hydra/launcher=joblib", "conv.k=3,5", "pool.mode=max,mean",
                      *tiny(fashion_root, sweep, **{"logger.tensorboard": "true", "logger.image_every": 1000}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(sweep)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    assert {r["params"] for r in rows} == {f"conv.k={k} pool.mode={m}" for k in (3, 5) for m in ("max", "mean")}
    assert all(r["metric_name"] == "val_acc" and r["metric"] == r["val_acc"] for r in rows)
    assert_ranked(rows)
    for r in rows:                                         # each job: its own dir, metrics, TensorBoard events
        job = sweep / r["dir"]
        metrics = json.loads((job / "metrics.json").read_text())
        assert float(r["test_acc"]) == pytest.approx(metrics["test_acc"])
        assert metrics["threads"] == 1                     # 2 jobs at a time on 2 cores: 1 thread each
        assert list(job.rglob("events.out.tfevents.*")), f"no TensorBoard events in {job}"
    md = (sweep / "summary.md").read_text()
    assert md.count("| finished |") == 4
    assert "Sweep summary: 4 jobs, 4 finished" in proc.stdout
    assert f"| 1 | {rows[0]['job']} | finished |" in proc.stdout     # the top rows are printed


def test_a_failing_job_is_recorded_and_the_others_finish(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_script("train.py", "-m", "conv.k=40,3", *tiny(fashion_root, sweep))
    assert r.returncode == 1, r.stderr[-3000:]             # the sweep ran to its end, and says a job failed
    assert "1 job(s) of the sweep did not finish" in r.stderr
    assert "Traceback" not in r.stderr
    rows = {row["params"]: row for row in summary(sweep)}
    assert rows["conv.k=3"]["status"] == "finished" and rows["conv.k=3"]["rank"] == "1"
    bad = rows["conv.k=40"]
    assert bad["status"] == "failed" and bad["rank"] == "" and bad["metric"] == ""
    assert "40x40 kernel does not fit" in bad["error"]
    assert (sweep / bad["dir"] / "job.json").exists() and not (sweep / bad["dir"] / "metrics.json").exists()
    assert "| failed |" in (sweep / "summary.md").read_text()
    assert not (sweep / "summary_by_config.csv").exists()   # no seeds varied: no seed statistics


def test_optuna_sweep_of_three_trials(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_script("train.py", "hparams_search=lenet_optuna", "hydra.sweeper.n_trials=3",
                   *tiny(fashion_root, sweep))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = summary(sweep)
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows)
    assert_ranked(rows)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(float(rows[0]["metric"]))    # the value train() returned
    for key, value in best["best_params"].items():
        assert f"{key}={value}" in rows[0]["overrides"].split()
    assert len({r["overrides"] for r in rows}) == 3                          # the sampler proposed 3 settings


def test_hparams_search_configs_and_command_line_optuna_compose():
    from cnnpipe.config import compose_config
    from cnnpipe.model import build_model
    names = sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml"))
    assert names
    for name in names:
        cfg = compose_config([f"hparams_search={name}"], return_hydra_config=True)
        sw = cfg.hydra.sweeper
        assert sw._target_.endswith("OptunaSweeper") and sw.n_trials > 0 and sw.sampler.seed is not None
        assert sw.params and cfg.optimized_metric and sw.direction == "maximize"
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert build_model(compose_config([f"hparams_search={name}"])).out_shape == (cfg.data.num_classes,)
    cfg = compose_config(["hydra/sweeper=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")


@pytest.mark.parametrize("overrides, expect", [
    (["hydra/launcher=joblib", "conv.k=3,5,7", "pool.mode=max,mean"], "min(cores, 6)"),     # n_jobs=-1: all cores
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "conv.k=3,5"], None),          # one at a time
    (["conv.k=3,5,7"], None),                                                            # basic launcher
    (["hydra/launcher=submitit_local", "conv.k=3,5"], "2"),                 # every job at once
    (["hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu", "hydra.launcher.cpus_per_task=8",
      "conv.k=3,5"], None),                                    # the allocation's own cores (SLURM_CPUS_PER_TASK)
    (["hydra/launcher=ray", "hydra.launcher.ray.init.address=auto", "conv.k=3,5"], None),  # a Ray cluster
    (["hydra/launcher=ray", "+hydra.launcher.ray.remote.num_cpus=1", "conv.k=3,5"], "ray1"),  # 1 CPU per task
])
def test_per_job_thread_limit_follows_the_launcher(overrides, expect):
    """job_threads on the real composed config of each launcher (jobs at a time = min(batch, launcher slots))."""
    from omegaconf import open_dict

    from cnnpipe.config import compose_config
    from cnnpipe.sweep.plan import cpu_count, job_threads
    launcher = [o for o in overrides if o.lstrip("+").startswith("hydra")]
    cfg = compose_config(launcher, return_hydra_config=True)
    with open_dict(cfg):                                    # what the sweep process sees: the raw sweep overrides
        cfg.hydra.overrides.task = [o for o in overrides if o not in launcher]
    threads, parallel = job_threads(cfg)
    cores = cpu_count()
    if expect == "ray1":
        assert (threads, parallel) == (1, cores)
        return
    want_parallel = 1 if expect is None else eval(expect, {"cores": cores, "min": min})
    if want_parallel <= 1:
        assert (threads, parallel) == (None, 1)
    else:
        assert (threads, parallel) == (max(cores // want_parallel, 1), want_parallel)


def test_submitit_local_two_jobs_and_explicit_threads(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_script("train.py", "-m", "hydra/launcher=submitit_local", "conv.k=3,5", "backend.threads=2",
                   *tiny(fashion_root, sweep))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    assert {r["params"] for r in rows} == {"conv.k=3", "conv.k=5"}
    for r in rows:                                          # backend.threads given: it wins over the automatic 1
        assert json.loads((sweep / r["dir"] / "metrics.json").read_text())["threads"] == 2


def test_ray_launcher_on_a_local_ray_two_jobs(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_script("train.py", "-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                   "+hydra.launcher.ray.init.include_dashboard=false", "pool.mode=max,mean",
                   *tiny(fashion_root, sweep), timeout=400, env={"RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rows = summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    assert {r["params"] for r in rows} == {"pool.mode=max", "pool.mode=mean"}
    for r in rows:
        assert json.loads((sweep / r["dir"] / "metrics.json").read_text())["threads"] == 1


def test_killed_sweep_resumes_skipping_finished_jobs(fashion_root, tmp_path):
    """Job 0 finishes, job 1 is killed (SIGKILL: no chance to clean up) after its first checkpoint, job 2 never
    starts. The same command with sweep.resume=true skips job 0, continues job 1 from last.npz, runs job 2."""
    sweep = tmp_path / "sweep"
    args = [str(REPO / "scripts" / "train.py"), "-m",
            *tiny(fashion_root, sweep, **{"trainer.epochs": "1,12,2", "checkpoint.every_steps": 1})]
    with open(tmp_path / "first.log", "w") as log:
        p = subprocess.Popen([PY, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ckpt = sweep / "1" / "checkpoints" / "last.npz"
        deadline = time.time() + 240
        while not ckpt.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert ckpt.exists(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (sweep / "1" / "metrics.json").exists() and not (sweep / "2").exists()
    done = sweep / "0" / "metrics.json"
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    assert json.loads((sweep / "1" / "job.json").read_text())["status"] == "running"   # died mid-job

    r = subprocess.run([PY, *args, "sweep.resume=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before            # finished job untouched
    assert "job 0 finished in an earlier run of this sweep: skipped" in r.stdout + r.stderr
    assert "resumed from" in (sweep / "1" / "train.log").read_text()
    m1 = json.loads((sweep / "1" / "metrics.json").read_text())
    assert m1["epochs"] == 12 and m1["steps"] == 12 * 2                      # 128 train images / batch 64
    rows = {row["job"]: row for row in summary(sweep)}
    assert [rows[j]["status"] for j in "012"] == ["finished"] * 3
    assert rows["1"]["resumed"] == "True" and rows["0"]["resumed"] == "False"

    # the same sweep dir with a different command is refused before any job starts: not one file changes
    args[args.index("trainer.epochs=1,12,2")] = "trainer.epochs=3,12,2"
    files = tree_state(sweep)
    r = subprocess.run([PY, *args, "sweep.resume=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "job 0" in err and "was run with the overrides" in err and "Traceback" not in err
    assert tree_state(sweep) == files


def tree_state(root: Path) -> dict:
    """Every file under root with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_launcher_that_is_not_installed_names_the_extra(tmp_path):
    """Hide the Ray plugin from the import system (as if `.[ray]` were not installed): one clear paragraph."""
    code = ("import sys, runpy\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.startswith('hydra_plugins.hydra_ray_launcher'): raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            f"sys.argv = ['train.py', '-m', 'hydra/launcher=ray', 'hydra.sweep.dir={tmp_path / 's'}']\n"
            f"runpy.run_path({str(REPO / 'scripts' / 'train.py')!r}, run_name='__main__')\n")
    r = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "hydra/launcher=ray needs a Hydra plugin that is not installed" in err and "Traceback" not in err
    assert "pip install -e '.[ray]'" in err and err.count("error:") == 1
    assert not (tmp_path / "s").exists()


# -- seed statistics: summary_by_config.csv/.md ----------------------------------------------------------------------
def by_config(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary_by_config.csv") as f:
        return list(csv.DictReader(f))


def job_metrics(sweep_dir: Path) -> list[tuple[dict, dict | None]]:
    """(overrides as a dict, metrics.json or None) of every job directory, read straight from the files."""
    out = []
    for job in sorted(sweep_dir.glob("*/job.json")):
        overrides = dict(o.split("=", 1) for o in json.loads(job.read_text())["overrides"])
        metrics = job.parent / "metrics.json"
        out.append((overrides, json.loads(metrics.read_text()) if metrics.exists() else None))
    return out


def assert_stats(row, metric, values):
    assert int(row[f"{metric}_n"]) == len(values)
    assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values), rel=1e-12)
    assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12)


def test_a_sweep_over_seeds_writes_mean_and_std_per_configuration(fashion_root, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_script("train.py", "-m", "trainer.seed=0,1,2", "conv.k=3,5", "optimized_metric=val_loss",
                   *tiny(fashion_root, sweep, **{"trainer.max_steps": 3}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(summary(sweep)) == 6
    rows = by_config(sweep)
    assert [row["params"] for row in sorted(rows, key=lambda row: row["params"])] == ["conv.k=3", "conv.k=5"]
    jobs = job_metrics(sweep)
    for row in rows:
        k = row["params"].split("=")[1]
        mine = [m for o, m in jobs if o["conv.k"] == k]
        assert row["n"] == "3" and row["failed"] == "0" and row["metric_name"] == "val_loss"
        assert sorted(row["seeds"].split()) == ["0", "1", "2"]
        assert sorted({o["trainer.seed"] for o, m in jobs if o["conv.k"] == k}) == ["0", "1", "2"]
        assert_stats(row, "metric", [m["val_loss"] for m in mine])
        for metric in ("val_loss", "val_acc", "test_acc", "test_loss", "train_loss"):
            assert_stats(row, metric, [m[metric] for m in mine])
    means = [float(row["metric_mean"]) for row in rows]
    assert means == sorted(means) and means[0] < means[1]          # val_loss: the lowest mean first
    assert [row["rank"] for row in rows] == ["1", "2"]
    md = (sweep / "summary_by_config.md").read_text()
    assert "| rank | params | val_loss mean ± std (n) |" in md and md.count(" (3) |") >= 2
    best = rows[0]
    line = (f"| 1 | {best['params']} | {float(best['metric_mean']):.4f} ± {float(best['metric_std']):.4f} (3) | 0 |")
    assert line in md and line in r.stdout                          # printed after the per-job summary
    assert r.stdout.index("Sweep summary: 6 jobs") < r.stdout.index("Seed statistics: 2 configuration(s)")


def test_seed_statistics_count_failed_jobs_without_averaging_them(fashion_root, tmp_path):
    """trainer.seed=-1 fails in every configuration, conv.k=40 in every job: they are counted, never averaged."""
    sweep = tmp_path / "sweep"
    r = run_script("train.py", "-m", "trainer.seed=0,-1,1", "conv.k=3,40",
                   *tiny(fashion_root, sweep, **{"trainer.max_steps": 2}))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "4 job(s) of the sweep did not finish" in r.stderr
    rows = {row["params"]: row for row in by_config(sweep)}
    good, bad = rows["conv.k=3"], rows["conv.k=40"]
    finished = [m for o, m in job_metrics(sweep) if o["conv.k"] == "3" and m is not None]
    assert len(finished) == 2
    assert (good["rank"], good["n"], good["failed"], good["metric_name"]) == ("1", "2", "1", "val_acc")
    assert sorted(good["seeds"].split()) == ["-1", "0", "1"]
    assert_stats(good, "metric", [m["val_acc"] for m in finished])
    assert_stats(good, "test_loss", [m["test_loss"] for m in finished])
    assert (bad["rank"], bad["n"], bad["failed"], bad["metric_mean"], bad["metric_std"]) == ("", "0", "3", "", "")
    assert list(rows) == ["conv.k=3", "conv.k=40"]                  # a configuration without results comes last
