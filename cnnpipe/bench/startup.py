"""Start-up: `python scripts/train.py backend=numba` from launch to its first finished training step, with a cold
numba cache (a fresh NUMBA_CACHE_DIR: every kernel compiles) and a warm one (the same folder again)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cnnpipe.bench.runs import REPO, script, shown

STEP1 = re.compile(r"\bstep 1 loss\b")


def time_startup(backend: str, cache_dir: Path | None, workdir: Path, overrides=(), timeout: float = 300) -> dict:
    """Seconds to the model summary, to the data line and to the first step (the trainer's `step 1` debug line,
    shown by hydra.verbose=cnnpipe and log_every=1). cache_dir=None: numba's default cache."""
    run_dir = Path(tempfile.mkdtemp(prefix="startup-", dir=workdir)) / "run"
    argv = [*script("train.py"), f"backend={backend}", *overrides,
            "trainer.max_steps=1", "trainer.log_every=1", "trainer.progress=false", "hydra.verbose=cnnpipe",
            f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, **({"NUMBA_CACHE_DIR": str(cache_dir)} if cache_dir else {}))
    marks, lines = {}, []
    t0 = time.perf_counter()
    p = subprocess.Popen([argv[0], "-u", *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=REPO, env=env)
    try:
        for line in p.stdout:
            now = time.perf_counter() - t0
            lines.append(line)
            for key, hit in (("model", "] - model " in line), ("data", "] - data " in line),
                             ("step1", STEP1.search(line))):
                if hit and key not in marks:
                    marks[key] = now
            if "step1" in marks or now > timeout:
                break
    finally:
        if p.poll() is None:
            p.terminate()                  # the rest (the test-set evaluation) is not start-up
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    command = ("NUMBA_CACHE_DIR=<fresh dir> " if cache_dir else "") + shown(argv[:-1], workdir)
    if "step1" not in marks:
        return {"error": f"no first step seen (exit {p.returncode}): {''.join(lines[-5:]).strip()[-800:]}",
                "command": command}
    return {"to_model_s": marks.get("model"), "to_data_s": marks.get("data"), "to_first_step_s": marks["step1"],
            "command": command}


def startup_section(workdir: Path, rounds: int, cold: bool = True, overrides=()) -> dict:
    """Cold (a fresh NUMBA_CACHE_DIR) then warm (the same folder) numba start-up, and numpy's for reference.
    cold=False: warm runs only, on numba's default cache."""
    cache = None
    out = {}
    if cold:
        cache = workdir / "numba-cache"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        out["numba_cold"] = time_startup("numba", cache, workdir, overrides)      # empty cache: compiles all
        out["cache_files"] = sum(1 for f in cache.rglob("*") if f.suffix in (".nbi", ".nbc"))
    warm = [time_startup("numba", cache, workdir, overrides) for _ in range(rounds)]
    ok = [w for w in warm if "error" not in w]
    out["numba_warm_runs"] = warm
    out["numba_warm"] = min(ok, key=lambda w: w["to_first_step_s"]) if ok else warm[-1]
    out["numpy"] = time_startup("numpy", cache, workdir, overrides)
    c, w = out.get("numba_cold", {"error": "not run"}), out["numba_warm"]
    if "error" not in c and "error" not in w:
        out["cold_compile_s"] = c["to_first_step_s"] - w["to_first_step_s"]
    return out
