"""The README's Ray cluster commands on this machine, with every Ray port on 127.0.0.1: a head started with the
README's loopback line (`export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, `ray start --head --port=... \
--node-ip-address=127.0.0.1`), a second node (its own raylet), then the README's sweep with address=auto and
ray.remote.num_cpus=1: its jobs land on both nodes, every job's metrics, the summary, and one thread per job.

Why the second node does not come from the README's `ray start --address=<head node>:6379` (Ray 2.60, in
.venv/lib/python3.11/site-packages/ray):
- Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read once, _private/ray_constants.py:657-661), Ray replaces every
  loopback address by the machine's outward one: `ray start` passes --node-ip-address through
  services.resolve_ip_for_localhost (scripts/scripts.py:855), which for 127.0.0.1 returns get_node_ip_address()
  (_private/services.py:799-800), i.e. node_ip_address_from_perspective(), the address of the default route
  (services.py:821); the join address goes the same way (canonicalize_bootstrap_address, services.py:716), and
  the node IP of a joining node without the flag is then taken from the perspective of that rewritten address
  (scripts.py:1230-1232). A node whose IP is not loopback binds its servers to every interface (e.g. the
  dashboard agent: dashboard/agent.py:164-166). So a joining node would listen beyond 127.0.0.1 and dial the
  machine's outward address.
- With it set to 0, get_node_ip_address() returns 127.0.0.1 (services.py:815-819) and every server binds to
  loopback, but `ray start --address=...` stops at once: "Multi-node Ray clusters are not supported on Windows and
  OSX" (scripts/scripts.py:1168-1181). The test runs the README's join line like that and checks this refusal.
So the second node is started as `ray start --address` itself starts one after that check
(ray._private.node.Node(ray_params, head=False), scripts/scripts.py:1238), with node_ip_address=127.0.0.1, as
Ray's own multi-node tests do (ray.cluster_utils.Cluster). RAY_TMPDIR keeps the session files (and `address=auto`'s
lookup) in a directory of this test and marks the cluster's processes, which teardown stops one by one: the
README's `ray stop` would stop every Ray on the machine."""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from conftest import tiny_overrides
from engines import listening, not_loopback, shell, stop_processes
from readme import ray_cluster_step, readme_commands, with_overrides

README_PORT = "6379"                         # the head's port in the README; the test takes a free one
SECOND_NODE = """
import sys
from ray._private.node import Node
from ray._private.parameter import RayParams
Node(RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1), head=False,
     shutdown_at_exit=False, spawn_reaper=False)
"""


@pytest.fixture
def ray_env():
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")          # short: Ray's unix sockets live below it
    marker = f"RAY_TMPDIR={tmp}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # on loopback even if the README lost its export line (the test checks that it has it)
    env.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    try:
        yield env, marker
    finally:
        left = stop_processes(marker)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes still running after SIGKILL: {left}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_steps() -> dict[str, list[str]]:
    """The README's Ray cluster commands by what this test does with them (readme.ray_cluster_step)."""
    steps: dict[str, list[str]] = {}
    for command in readme_commands("Ray"):
        step = ray_cluster_step(command)
        if step:
            steps.setdefault(step, []).append(command)
    return steps


def ray_json(command: str, env: dict) -> list[dict]:
    r = shell(command, env, timeout=120)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(r.stdout)


def test_readme_ray_cluster_sweep_runs_on_two_loopback_nodes(ray_env, fashion_root, tmp_path):
    env, marker = ray_env
    steps = readme_steps()
    assert steps["env"] == ["export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"], steps["env"]
    [cluster_head, loopback_head] = steps["head"]
    assert sorted(shlex.split(loopback_head)) == sorted([*shlex.split(cluster_head), "--node-ip-address=127.0.0.1"])
    [join], [sweep_command], [stop] = steps["join"], steps["sweep"], steps["stop"]
    assert stop == "ray stop"                                   # done by the fixture, for this test's processes only
    port = free_port()
    address = f"127.0.0.1:{port}"

    r = shell(f"{with_overrides(loopback_head, f'--port={port}')} --num-cpus=1", env, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    sockets = listening(marker)
    assert sockets and not not_loopback(sockets), not_loopback(sockets)

    r = shell(join.replace(f"<head node>:{README_PORT}", address), env, timeout=120)
    assert r.returncode != 0 and "Multi-node Ray clusters are not supported" in r.stdout + r.stderr, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", SECOND_NODE, address], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    nodes = ray_json(f"ray list nodes --address={address} --format=json", env)
    assert [(n["state"], n["node_ip"], n["resources_total"]["CPU"]) for n in nodes] == [("ALIVE", "127.0.0.1", 1)] * 2
    assert len(listening(marker)) > len(sockets)                # the second raylet's servers, on loopback too
    assert not not_loopback(listening(marker)), not_loopback(listening(marker))

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
        assert json.loads((job / "metrics.json").read_text())["threads"] == 1
        assert "1 threads: num_cpus Ray reserved for this task)" in (job / "train.log").read_text()
    tasks = ray_json(f"ray list tasks --address={address} --format=json --filter name=_run_job --limit=100", env)
    assert len(tasks) == 6 and {t["state"] for t in tasks} == {"FINISHED"}, tasks
    assert {t["node_id"] for t in tasks} == {n["node_id"] for n in nodes}        # jobs ran on both nodes
    sockets = listening(marker)                                  # the workers the jobs ran in, too
    assert not not_loopback(sockets), not_loopback(sockets)
