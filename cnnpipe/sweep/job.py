"""One job of a multirun: train() in the job's directory, its record in job.json, a failure kept to the job."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from cnnpipe import ConfigError
from cnnpipe.backends.cores import given_cores
from cnnpipe.jsonio import read_json, write_json_atomic
from cnnpipe.metrics import optimized_metric, optimized_metric_name
from cnnpipe.train import Interrupted

log = logging.getLogger("cnnpipe.sweep")

JOB_FILE = "job.json"


def run_job(cfg, hc, train_fn) -> float:
    """Run one multirun job in its directory; returns the optimized metric, or NaN when the job failed.

    Never lets a bad value in one job end the sweep: the error goes to job.json (and the summary). A signal
    (Ctrl-C, SIGTERM) does end it: the job saves checkpoints/last.npz and the sweep exits, resumable with
    sweep.resume=true."""
    job_dir = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not o.startswith("sweep.resume=")]
    sweep_dir = Path(hc.sweep.dir)
    job_file = job_dir / JOB_FILE
    prior = read_json(job_file)
    record = {"num": hc.job.num, "overrides": overrides, "status": "running", "error": None,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0, "resumed": False}

    if cfg.sweep.resume and prior is not None and prior.get("overrides") != overrides:
        # another sweep's job (a sweeper whose jobs are not known up front: see check_sweep_dir): left as it was
        log.error(f"sweep.resume=true, but job {hc.job.num} in {job_dir} was run with the overrides "
                  f"{' '.join(prior.get('overrides') or [])!r}, and this sweep gives it {' '.join(overrides)!r}. "
                  f"Its results were left as they were. Resume with exactly the command that started the sweep, "
                  f"or use a new hydra.sweep.dir.")
        return math.nan
    if cfg.sweep.resume and prior is not None:
        record["seconds"] = float(prior.get("seconds") or 0.0)
    if cfg.sweep.resume and (job_dir / "metrics.json").exists():            # finished before: keep it as it is
        metrics = read_json(job_dir / "metrics.json")
        record = dict(prior or record, status="finished", error=None, skipped_on_resume=True)
        try:
            value = optimized_metric(cfg, metrics)
        except ConfigError as e:
            record.update(status="failed", error=str(e))
            value = math.nan
        record["metric_name"] = optimized_metric_name(cfg, metrics)
        write_json_atomic(job_file, record)
        log.info("job %s finished in an earlier run of this sweep: skipped (%s)", hc.job.num, job_dir)
        return value
    if cfg.sweep.resume and (job_dir / "checkpoints" / "last.npz").exists():
        cfg.resume = str(job_dir)              # continue in place (also a job that started from resume=<another run>)
        record["resumed"] = True
        log.info("job %s resumes from %s", hc.job.num, job_dir / "checkpoints" / "last.npz")

    record["threads"] = given_cores(cfg.backend.threads)[0]
    record["sweep_dir"] = str(sweep_dir)
    write_json_atomic(job_file, record)
    t0 = time.perf_counter()
    try:
        value = train_fn(cfg, str(job_dir), list(hc.overrides.task))
        metrics = read_json(job_dir / "metrics.json") or {}
        record.update(status="finished", metric_name=optimized_metric_name(cfg, metrics))
        return value
    except Interrupted as e:
        record.update(status="interrupted", error=f"stopped by {e.reason}")
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # its own SLURM job (time limit, preemption): the sweep
            log.warning("job %s stopped by %s; resume it with sweep.resume=true", hc.job.num, e.reason)
            return math.nan                                 # goes on and lists it as interrupted
        from cnnpipe.cli import EXIT_SIGNAL, say
        say(f"stopped by {e.reason}; this job's checkpoints/last.npz holds its position. Resume the whole sweep with "
            f"the same command plus: sweep.resume=true hydra.sweep.dir={sweep_dir}", prefix="interrupted: ")
        sys.exit(EXIT_SIGNAL.get(e.reason, 1))            # SystemExit passes through Hydra: the sweep stops
    except ConfigError as e:
        record.update(status="failed", error=str(e))
        log.error("job %s failed: %s", hc.job.num, e)
        return math.nan
    except Exception as e:                                 # a bug: keep the traceback in the job's log
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        log.error("job %s failed:\n%s", hc.job.num, traceback.format_exc())
        return math.nan
    finally:
        record["seconds"] += time.perf_counter() - t0
        write_json_atomic(job_file, record)
