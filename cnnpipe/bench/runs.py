"""Running the user's commands as subprocesses and reading what they leave behind.

`scripts/train.py` (ours) and `scripts/torch_peer.py` (the PyTorch peer) run with the given overrides, one epoch,
their output going to a file (not a terminal: tqdm behaves as in a non-interactive run). A run's figures come from
its own files: metrics.json (epoch_seconds, samples_per_second), .hydra/config.yaml (batch size), its log
(train.log: the data line, the TensorBoard cost line) and the process's peak RSS (wait4).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT_TAG = "@@bench-result@@ "          # the internal harnesses (bare loop, kernels) print their JSON after it
DATA_LINE = re.compile(r"data (\w+): train (\d+), val (\d+), test (\d+)")
TB_LINE = re.compile(r"TensorBoard logging took ([\d.]+) s in the training loop and at epoch ends: ([\d.]+) % of the "
                     r"([\d.]+) s training loop; once a run: ([\d.]+) s opening the event file .*?, ([\d.]+) s for")
SCRIPTS = {"ours": "train.py", "torch": "torch_peer.py"}


@dataclass
class Proc:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    output: str                    # stdout and stderr together


def run(argv: list[str], log_path: Path, timeout: float | None = None, env: dict | None = None) -> Proc:
    """argv from the repository root, output into log_path; its peak RSS from wait4 (this child only)."""
    with open(log_path, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                             env=env)
        timer = threading.Timer(timeout, p.kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            if timer:
                timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    return Proc(p.returncode, wall, usage.ru_maxrss / 1024.0, log_path.read_text(errors="replace"))


def script(name: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / name)]


def merge(*override_lists: list[str]) -> list[str]:
    """Overrides with one value per key, the last one winning, in first-seen order."""
    out: dict[str, str] = {}
    for ov in override_lists:
        for o in ov:
            out[o.split("=", 1)[0]] = o
    return list(out.values())


def shown(argv: list[str], workdir: Path) -> str:
    """A command as a user types it: python scripts/..., the benchmark's temporary folder as <tmp>."""
    rel = ["python", *(os.path.relpath(a, REPO) if a.endswith(".py") else a for a in argv[1:])]
    return " ".join(rel).replace(str(workdir), "<tmp>")


def user_run(kind: str, overrides: list[str], workdir: Path, label: str, timeout: float = 1800,
             files: tuple[str, ...] = ()) -> dict:
    """One epoch of `python scripts/train.py` (kind "ours") or `scripts/torch_peer.py` ("torch") with overrides.
    A run stopped early by trainer.max_steps is extrapolated to the full epoch from its samples/s (full_epoch false).
    `files`: JSON files of the run directory to return too (row["files"][name])."""
    run_dir = workdir / label
    argv = script(SCRIPTS[kind]) + merge(overrides, ["trainer.epochs=1"], [f"hydra.run.dir={run_dir}"])
    p = run(argv, workdir / f"{label}.out", timeout)
    row = {"command": shown(argv[:-1], workdir), "wall_s": p.wall_s, "peak_rss_mb": p.peak_rss_mb,
           "run_dir": str(run_dir)}
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
        batch = int(re.search(r"^  batch_size: (\d+)$", (run_dir / ".hydra" / "config.yaml").read_text(), re.M)[1])
        log = (run_dir / SCRIPTS[kind].replace(".py", ".log")).read_text()      # Hydra's job log: train.log
        data = DATA_LINE.search(log)
        n_train = int(data[2])
        row["files"] = {f: json.loads((run_dir / f).read_text()) for f in files}
    except (OSError, ValueError, TypeError) as e:
        tail = p.output.strip().splitlines()[-8:]
        return {**row, "error": f"exit {p.returncode}: " + " | ".join(tail)[-600:] + f" ({type(e).__name__})"}
    finally:                                          # the big files go; metrics.json and the logs stay
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for f in run_dir.glob("events.out.tfevents.*"):
            f.unlink()
    seconds, sps = sum(m["epoch_seconds"]), m["samples_per_second"]
    row.update(seconds=seconds, steps=m["steps"], samples_per_second=sps, n_train=n_train, batch_size=batch,
               full_epoch=m["steps"] >= math.ceil(n_train / batch), epoch_seconds=n_train / sps,
               test_acc=m["test_acc"], threads=m.get("threads"), val=int(data[3]) > 0)
    tb = TB_LINE.search(log)
    if tb:
        row.update(tb_seconds=float(tb[1]), tb_share=float(tb[2]) / 100, tb_once_seconds=float(tb[4]) + float(tb[5]))
    if kind == "torch":
        row["logging_seconds"] = m.get("logging_seconds")
    return row


def harness(module: str, args: list[str], log_path: Path, timeout: float = 1800) -> dict:
    """`python -m cnnpipe.bench.<module> args` (an internal harness); its tagged JSON result, or {"error": ...}."""
    p = run([sys.executable, "-m", f"cnnpipe.bench.{module}", *args], log_path, timeout,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    for line in reversed(p.output.splitlines()):
        if line.startswith(RESULT_TAG):
            return {"result": json.loads(line[len(RESULT_TAG):]), "wall_s": p.wall_s}
    return {"error": f"exit {p.returncode}: " + " | ".join(p.output.strip().splitlines()[-5:])[-600:]}
