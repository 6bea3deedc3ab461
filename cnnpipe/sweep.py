"""Sweeps: what a multirun job does around train(), and what the sweep leaves behind.

    python scripts/train.py -m pool.mode=max,mean conv.k=3,5 hydra/launcher=joblib

Hydra's sweepers and launchers run the jobs (basic, joblib, submitit_local/slurm, ray; optuna); this module adds
what Hydra does not do:
- `run_job`: one job of a multirun. A failing job is recorded (status + error in <job dir>/job.json) and returns
  NaN instead of ending the sweep; with sweep.resume=true a finished job (metrics.json) is skipped and an
  interrupted one (checkpoints/last.npz) continues from its checkpoint.
- `SweepCallback` (hydra.callbacks in conf/train.yaml): before the jobs start, a per-job numba/BLAS thread limit
  when jobs share this machine's cores (and no object-store default for a Ray cluster, which ray.init refuses);
  after they end, summary.csv + summary.md in the sweep directory.
- `missing_plugin`: a launcher/sweeper plugin that is not installed is a clear error naming the extra to install.
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from cnnpipe.jsonio import read_json, write_json_atomic
from cnnpipe.metrics import optimized_metric, optimized_metric_name

from cnnpipe.backends.cores import THREADS_ENV, given_cores

log = logging.getLogger("cnnpipe.sweep")

JOB_FILE = "job.json"
SHOWN_METRICS = ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "epochs", "samples_per_second")
failed_jobs: list[dict] = []                # filled by on_multirun_end; scripts/train.py exits 1 when non-empty

# choice on the command line -> (module that must import, pip extra that brings it)
PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "sweep"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "sweep"),
    ("hydra/launcher", "ray"): ("hydra_plugins.hydra_ray_launcher", "ray"),
    ("hydra/launcher", "ray_aws"): ("hydra_plugins.hydra_ray_launcher", "ray"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
}
EXTRA_DEPS = {"hydra_plugins.hydra_ray_launcher": "ray", "hydra_plugins.hydra_optuna_sweeper": "optuna",
              "hydra_plugins.hydra_submitit_launcher": "submitit", "hydra_plugins.hydra_joblib_launcher": "joblib"}


# -- before Hydra starts: are the plugins the command line asks for installed? ---------------------------------
def missing_plugin(argv: list[str]) -> str | None:
    """The error paragraph for the first launcher/sweeper on the command line whose plugin is missing, else None.
    `hparams_search=<x>` configs select the optuna sweeper, so they need it too."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hparams_search" and value not in ("", "null"):
            key, value, how = "hydra/sweeper", "optuna", f"hparams_search={value} uses the optuna sweeper, which"
        else:
            how = f"{key}={value} needs a Hydra plugin that"
        if (key, value) not in PLUGINS:
            continue
        module, extra = PLUGINS[key, value]
        absent = [m for m in (module, EXTRA_DEPS[module]) if not _importable(m)]
        if absent:
            return (f"{how} is not installed in this Python ({sys.executable}): module {absent[0]} is missing. "
                    f"Install it with: pip install -e '.[{extra}]' (from the repository root; 'make test' installs "
                    f"every extra), or pick another: hydra/launcher=basic|joblib|submitit_local|submitit_slurm|ray, "
                    f"hydra/sweeper=basic|optuna.")
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- one job of a multirun --------------------------------------------------------------------------------------
def run_job(cfg, hc, train_fn) -> float:
    """Run one multirun job in its directory; returns the optimized metric, or NaN when the job failed.

    Never lets a bad value in one job end the sweep: the error goes to job.json (and the summary). A signal
    (Ctrl-C, SIGTERM) does end it: the job saves checkpoints/last.npz and the sweep exits, resumable with
    sweep.resume=true."""
    from cnnpipe import ConfigError
    from cnnpipe.train import Interrupted
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
        record.update(status="finished", metric_name=optimized_metric_name(cfg, read_json(job_dir / "metrics.json") or {}))
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


# -- the callback: thread limits before, summary after ---------------------------------------------------------
class SweepCallback(Callback):
    def on_multirun_start(self, config, **kwargs):
        from cnnpipe import ConfigError
        from cnnpipe.cli import fail
        try:
            check_sweep_dir(config)
        except ConfigError as e:
            fail(str(e))
        os.environ.pop(THREADS_ENV, None)                   # left by an earlier sweep of this process
        drop_ray_object_store_default(config)
        threads, parallel = job_threads(config)
        if threads is not None:
            os.environ[THREADS_ENV] = str(threads)
            print(f"[cnnpipe] {parallel} jobs at a time share this machine's {cpu_count()} cores: "
                  f"{threads} numba/BLAS thread(s) per job (set backend.threads=N to choose)", flush=True)

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_jobs(sweep_dir)
        if not rows:
            return
        direction = _direction(config, rows)
        rows = sort_rows(rows, direction)
        write_summary(sweep_dir, rows)
        failed_jobs[:] = [r for r in rows if r["status"] != "finished"]
        print(format_top(rows, sweep_dir, direction), flush=True)


def planned_jobs(hydra_cfg) -> list[list[str]] | None:
    """Each job's overrides, in job-number order, as the basic sweeper will launch them; None for other sweepers
    (Optuna proposes its trials as it goes)."""
    if "BasicSweeper" not in str(hydra_cfg.sweeper.get("_target_", "")):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(hydra_cfg.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_sweep_dir(config):
    """Before any job starts: the jobs get distinct directories, and a resumed sweep is the same sweep (every
    existing job directory was run with the overrides this command gives that job number)."""
    from cnnpipe import ConfigError
    hydra_cfg = config.hydra
    subdir = str(OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir"))   # unresolved
    if not any(key in subdir for key in ("hydra.job.num", "hydra.job.id", "hydra.job.override_dirname")):
        raise ConfigError(f"hydra.sweep.subdir={subdir} gives every job of the sweep the same directory; "
                          f"each job must write into its own. Include ${{hydra.job.num}} (the default) or "
                          f"${{hydra.job.override_dirname}} in it.")
    if not config.sweep.resume:
        return
    sweep_dir, jobs = Path(str(hydra_cfg.sweep.dir)), planned_jobs(hydra_cfg)
    if jobs is None or not sweep_dir.is_dir():
        return
    for num, overrides in enumerate(jobs):
        overrides = [o for o in overrides if not o.startswith("sweep.resume=")]
        prior = read_json(sweep_dir / str(num) / JOB_FILE)
        if prior is not None and prior.get("overrides") != overrides:
            raise ConfigError(
                f"sweep.resume=true, but job {num} in {sweep_dir / str(num)} was run with the overrides "
                f"{' '.join(prior.get('overrides') or [])!r}, and this command gives it {' '.join(overrides)!r}: "
                f"{sweep_dir} holds another sweep. Nothing was run and its results are left as they were. Resume "
                f"with exactly the command that started the sweep, or use a new hydra.sweep.dir.")


def cpu_count() -> int:
    return given_cores()[0]


def drop_ray_object_store_default(config):
    """The Ray launcher passes ray.init an object_store_memory default unless the config has the key, and ray.init
    refuses it when connecting to a running cluster (the cluster sized its store at `ray start`): with an address,
    give the key the value None, which ray.init accepts. Runs before Hydra builds the launcher from this config."""
    launcher = config.hydra.launcher
    if "RayLauncher" not in str(launcher.get("_target_", "")) or not ray_address(launcher):
        return
    from omegaconf import open_dict
    with open_dict(launcher.ray.init):
        launcher.ray.init.setdefault("object_store_memory", None)


def ray_address(launcher) -> str | None:
    """The Ray cluster the launcher connects to (ray.init's address, else RAY_ADDRESS); None: a local Ray."""
    return launcher.ray.init.get("address") or os.environ.get("RAY_ADDRESS") or None


def job_threads(config) -> tuple[int | None, int]:
    """(threads per job, jobs at a time) when several jobs run at once on this machine; (None, 1) otherwise.

    Jobs at a time = min(jobs in a batch, the launcher's parallelism). Cluster launchers (submitit_slurm, Ray
    with an address) give each job its own allocation: no limit is set here for them."""
    hydra_cfg = config.hydra
    launcher, cores = hydra_cfg.launcher, cpu_count()
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        n = launcher.get("n_jobs")
        slots = 1 if n is None else (int(n) if n > 0 else max(cores + 1 + int(n), 1))
    elif "submitit_launcher" in target and "LocalLauncher" in target:
        slots = int(launcher.get("array_parallelism") or 256)
    elif "RayLauncher" in target and not ray_address(launcher):
        per_task = launcher.ray.get("remote", {}).get("num_cpus")
        if per_task:
            return int(per_task), max(cores // int(per_task), 1)
        slots = int(launcher.ray.init.get("num_cpus") or cores)
    else:
        return None, 1                                      # basic launcher: one at a time; clusters: their own cores
    jobs = batch_size(hydra_cfg)
    parallel = min(slots, jobs) if jobs else slots
    if parallel <= 1:
        return None, 1
    return max(cores // parallel, 1), parallel


def batch_size(hydra_cfg) -> int | None:
    """How many jobs the sweeper hands the launcher at once (None: unknown)."""
    sweeper = hydra_cfg.sweeper
    target = str(sweeper.get("_target_", ""))
    if "Optuna" in target:
        return int(sweeper.get("n_jobs") or 1)
    if "BasicSweeper" not in target:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
        n = math.prod(len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override())
    except Exception:                                       # glob sweeps etc.: let the launcher decide
        return None
    max_batch = sweeper.get("max_batch_size")
    return min(n, int(max_batch)) if max_batch else n


# -- the summary ----------------------------------------------------------------------------------------------
def collect_jobs(sweep_dir: Path) -> list[dict]:
    """One row per job directory under the sweep (job.json written by run_job; metrics.json by the trainer)."""
    rows = []
    job_dirs = {p.parent for p in sweep_dir.rglob(JOB_FILE)} | {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")}
    for d in sorted(job_dirs):
        job = read_json(d / JOB_FILE)
        if job is None:                                     # Hydra made the directory but the job never started
            import yaml
            overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []
            job = {"num": _num(d.name), "overrides": overrides, "status": "not started", "error": None, "seconds": 0.0}
        metrics = read_json(d / "metrics.json") if job.get("status") == "finished" else None
        row = {"job": job.get("num"), "status": job.get("status"), "metric_name": job.get("metric_name"),
               "metric": None, "overrides": " ".join(job.get("overrides") or []), "_overrides": job.get("overrides") or [],
               "seconds": round(float(job.get("seconds") or 0.0), 2), "threads": job.get("threads"),
               "resumed": job.get("resumed", False), "error": job.get("error"), "dir": str(d.relative_to(sweep_dir))}
        for k in SHOWN_METRICS:
            row[k] = metrics.get(k) if metrics else None
        if metrics and row["metric_name"]:
            row["metric"] = metrics.get(row["metric_name"])
        rows.append(row)
    mark_died(rows)
    mark_varied(rows)
    return rows


def mark_varied(rows):
    """`params`: the overrides whose value differs between jobs (what the sweep varied), for the tables."""
    lists = [dict(o.partition("=")[::2] for o in r.pop("_overrides")) for r in rows]
    keys = dict.fromkeys(k for d in lists for k in d)
    varied = [k for k in keys if len({d.get(k) for d in lists}) > 1] if len(rows) > 1 else list(keys)
    for r, d in zip(rows, lists):
        r["params"] = " ".join(f"{k}={d[k]}" for k in varied if k in d)


def mark_died(rows):
    """A job still 'running' when the sweep has ended died without a word (killed, out of memory, node lost)."""
    for r in rows:
        if r["status"] == "running":
            r["status"] = "died"
            r["error"] = r["error"] or "the job ended without recording a result (killed?); resume with sweep.resume=true"
    return rows


def _num(name):
    try:
        return int(name)
    except ValueError:
        return name


def _direction(config, rows) -> str:
    """The optuna sweeper's direction when there is one, else from the metric's name (…loss: minimize)."""
    direction = str(getattr(config.hydra.sweeper.get("direction"), "name", config.hydra.sweeper.get("direction")))
    if direction in ("minimize", "maximize"):
        return direction
    name = next((r["metric_name"] for r in rows if r["metric_name"]), "") or ""
    return "minimize" if "loss" in name else "maximize"


def sort_rows(rows, direction):
    """Finished jobs by the optimized metric (best first), then the others in job order."""
    sign = -1.0 if direction == "maximize" else 1.0
    ok = [r for r in rows if r["metric"] is not None and math.isfinite(r["metric"])]
    rest = [r for r in rows if r not in ok]
    ok.sort(key=lambda r: (sign * r["metric"], str(r["job"])))
    rest.sort(key=lambda r: str(r["job"]).zfill(8))
    for rank, r in enumerate(ok + rest, 1):
        r["rank"] = rank if r in ok else None
    return ok + rest


COLUMNS = ["rank", "job", "status", "metric_name", "metric", "params", "overrides", *SHOWN_METRICS, "seconds", "threads",
           "resumed", "error", "dir"]


def write_summary(sweep_dir: Path, rows):
    tmp = sweep_dir / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, sweep_dir / "summary.csv")
    (sweep_dir / "summary.md").write_text(markdown_table(rows) + "\n")


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows, columns=("rank", "job", "status", "metric", "params", "test_acc", "val_acc",
                                    "train_loss", "epochs", "seconds", "error")):
    name = next((r["metric_name"] for r in rows if r.get("metric_name")), "metric")
    columns = [c for c in columns if c != name]             # the optimized metric is shown once, as `metric`
    head = [name if c == "metric" else c for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_top(rows, sweep_dir, direction, top=5):
    n_ok = sum(r["status"] == "finished" for r in rows)
    head = (f"\nSweep summary: {len(rows)} jobs, {n_ok} finished, {len(rows) - n_ok} not "
            f"(sorted by {next((r['metric_name'] for r in rows if r['metric_name']), 'metric')}, {direction}); "
            f"all rows in {sweep_dir / 'summary.md'} and summary.csv")
    return head + "\n" + markdown_table(rows[:top]) + ("\n..." if len(rows) > top else "")

