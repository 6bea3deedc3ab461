"""The README's Ray cluster commands on this machine: `ray start --head`, then the sweep with address=auto and
ray.remote.num_cpus=N: every job's metrics, the summary, and N threads per job.

The cluster listens on 127.0.0.1 only: Ray 2.x replaces a loopback --node-ip-address by the machine's outward
address and binds its gRPC servers to every interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps
the node on 127.0.0.1 and its ports on loopback. That same setting makes `ray start --address=...` refuse to add a
node ("Multi-node Ray clusters are not supported"), so there is no second node here: one would have to listen
on the machine's network address. RAY_TMPDIR keeps the session files (and `address=auto`'s lookup) in a
directory of this test, and marks the cluster's processes, which teardown stops one by one (`ray stop` would
stop every Ray on the machine)."""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import tempfile

import pytest
from conftest import tiny_overrides
from engines import listening, not_loopback, shell, stop_processes
from readme import readme_commands, with_overrides


@pytest.fixture
def ray_env():
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")          # short: Ray's unix sockets live below it
    marker = f"RAY_TMPDIR={tmp}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    try:
        yield env, marker
    finally:
        left = stop_processes(marker)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes still running after SIGKILL: {left}"


def test_readme_ray_cluster_sweep_gives_each_job_its_num_cpus(ray_env, fashion_root, tmp_path):
    env, marker = ray_env
    commands = readme_commands("Ray")
    [start] = [c for c in commands if c.startswith("ray start --head")]
    [sweep_command] = [c for c in commands if "hydra.launcher.ray.init.address=auto" in c]
    num_cpus = int(next(w.split("=", 1)[1] for w in shlex.split(sweep_command)
                        if w.startswith("+hydra.launcher.ray.remote.num_cpus=")))

    r = shell(start, env, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    sockets = listening(marker)
    assert sockets and not not_loopback(sockets), not_loopback(sockets)

    sweep = tmp_path / "sweep"
    r = shell(with_overrides(sweep_command, f"hydra.sweep.dir={sweep}", *tiny_overrides(fashion_root)), env,
              timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert "object_store_memory" not in r.stderr
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(row["status"] == "finished" for row in rows), rows
    assert "Sweep summary: 6 jobs, 6 finished" in r.stdout
    for row in rows:
        job = sweep / row["dir"]
        assert json.loads((job / "metrics.json").read_text())["threads"] == num_cpus
        assert f"{num_cpus} threads: num_cpus Ray reserved for this task)" in (job / "train.log").read_text()
    sockets = listening(marker)                                  # the workers the jobs ran in, too
    assert not not_loopback(sockets), not_loopback(sockets)
