"""Shared cores: what a run keeps of its speed when it does not have the machine to itself. (a) Two jobs of one
sweep on two cores (`scripts/train.py -m ... hydra/launcher=joblib`), each job's samples/s against one job alone;
(b) one job beside a busy core (a spinning process pinned to core 0) against the same job alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cnnpipe.bench.runs import run, script, shown, user_run

SPIN = "while True:\n    pass"


def sweep_jobs(overrides: list[str], workdir: Path, label: str) -> dict:
    """Two jobs (trainer.seed=0,1) of one joblib sweep, one epoch each; each job's samples/s from its metrics.json."""
    sweep_dir = workdir / label
    argv = [*script("train.py"), "-m", *overrides, "trainer.epochs=1", "trainer.seed=0,1", "hydra/launcher=joblib",
            f"hydra.sweep.dir={sweep_dir}"]
    p = run(argv, workdir / f"{label}.out", timeout=1800)
    jobs = []
    for job in ("0", "1"):
        try:
            jobs.append(json.loads((sweep_dir / job / "metrics.json").read_text())["samples_per_second"])
        except (OSError, ValueError, KeyError):
            return {"error": f"exit {p.returncode}: job {job} left no metrics.json: "
                             + " | ".join(p.output.strip().splitlines()[-5:])[-600:], "command": shown(argv, workdir)}
    return {"jobs_samples_per_second": jobs, "command": shown(argv[:-1], workdir), "wall_s": p.wall_s}


def beside_busy_core(overrides: list[str], workdir: Path, label: str) -> dict:
    """One run while another process spins on core 0 for the whole run."""
    spin = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        os.sched_setaffinity(spin.pid, {0})
        return user_run("ours", overrides, workdir, label)
    finally:
        spin.kill()
        spin.wait()


def shared_section(overrides: list[str], workdir: Path, rounds: int) -> dict:
    """Rounds of: alone, two sweep jobs, beside a busy core; each as % of the median alone."""
    alone, pairs, busy = [], [], []
    for k in range(rounds):
        alone.append(user_run("ours", overrides, workdir, f"shared-alone-r{k}"))
        pairs.append(sweep_jobs(overrides, workdir, f"shared-sweep-r{k}"))
        busy.append(beside_busy_core(overrides, workdir, f"shared-busy-r{k}"))
    ok = sorted(r["samples_per_second"] for r in alone if "error" not in r)
    out = {"alone": alone, "sweep": pairs, "busy": busy, "cores": os.cpu_count()}
    if not ok:
        return out
    solo = ok[(len(ok) - 1) // 2]
    out["alone_samples_per_second"] = solo
    out["sweep_job_share"] = [s / solo for r in pairs if "error" not in r for s in r["jobs_samples_per_second"]]
    out["busy_share"] = [r["samples_per_second"] / solo for r in busy if "error" not in r]
    return out
