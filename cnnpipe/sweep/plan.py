"""Before any job starts: distinct job directories, a resumed sweep that is the same sweep, the threads each job
gets when jobs share this machine, and a Ray-cluster setting ray.init refuses."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from cnnpipe import ConfigError
from cnnpipe.backends.cores import given_cores
from cnnpipe.jsonio import read_json
from cnnpipe.sweep.job import JOB_FILE


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
    hydra_cfg = config.hydra
    check_distinct_subdirs(config)
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


def check_distinct_subdirs(config):
    """Every job of the sweep gets a directory of its own: hydra.sweep.subdir holds the job's number or id (the
    default: ${hydra.job.num}), or, resolved for each planned job as the launcher will resolve it, names no two jobs
    alike (${hydra.job.override_dirname} with exclude_keys can)."""
    subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir"))   # unresolved
    if "hydra.job.num" in subdir or "hydra.job.id" in subdir:
        return
    fix = ("each job must write into its own. Include ${hydra.job.num} (the default) in hydra.sweep.subdir, "
           "e.g. hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}.")
    jobs = planned_jobs(config.hydra)
    if jobs is None:
        raise ConfigError(f"hydra.sweep.subdir={subdir} has no ${{hydra.job.num}}, and this sweeper proposes its "
                          f"jobs as it goes, so nothing shows before they run that two jobs get different "
                          f"directories; {fix}")
    seen: dict[str, int] = {}
    for num, job_dir in enumerate(job_subdirs(config, jobs)):
        if job_dir in seen:
            first = seen[job_dir]
            raise ConfigError(f"hydra.sweep.subdir={subdir} gives job {first} ({' '.join(jobs[first])}) and job "
                              f"{num} ({' '.join(jobs[num])}) the same directory {job_dir!r}; {fix} Nothing was "
                              f"run.")
        seen[job_dir] = num


def job_subdirs(config, jobs: list[list[str]]) -> list[str]:
    """Each job's hydra.sweep.subdir as Hydra's launchers resolve it: the job's own config (Hydra's config loader,
    so override_dirname and every interpolation are the job's), with its number."""
    from hydra.core.global_hydra import GlobalHydra
    loader = GlobalHydra.instance().hydra.config_loader
    dirs = []
    for num, overrides in enumerate(jobs):
        job_cfg = loader.load_sweep_config(config, list(overrides))
        with open_dict(job_cfg):
            job_cfg.hydra.job.num = job_cfg.hydra.job.id = num
        dirs.append(str(job_cfg.hydra.sweep.subdir))
    return dirs


def cpu_count() -> int:
    return given_cores()[0]


def drop_ray_object_store_default(config):
    """The Ray launcher passes ray.init an object_store_memory default unless the config has the key, and ray.init
    refuses it when connecting to a running cluster (the cluster sized its store at `ray start`): with an address,
    give the key the value None, which ray.init accepts. Runs before Hydra builds the launcher from this config."""
    launcher = config.hydra.launcher
    if "RayLauncher" not in str(launcher.get("_target_", "")) or not ray_address(launcher):
        return
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
    if "Optuna" in str(sweeper.get("_target_", "")):
        return int(sweeper.get("n_jobs") or 1)
    try:
        jobs = planned_jobs(hydra_cfg)
    except Exception:                                       # glob sweeps etc.: let the launcher decide
        return None
    if jobs is None:
        return None
    max_batch = sweeper.get("max_batch_size")
    return min(len(jobs), int(max_batch)) if max_batch else len(jobs)
