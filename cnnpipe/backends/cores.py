"""How many cores this process was given, and by whom: a job's numba/BLAS threads follow its share, so that jobs
sharing a machine do not each start one thread per core and fight over them."""
from __future__ import annotations

import math
import os
import sys

THREADS_ENV = "CNNPIPE_JOB_THREADS"     # a sweep's per-job share of this machine (set by cnnpipe.sweep.callback)


def given_cores(threads: int | None = None) -> tuple[int, str]:
    """(cores, where that figure came from), the most specific grant first: backend.threads; the sweep's share
    (jobs running side by side on this machine); the CPUs Ray reserved for this task (a Ray started inside a
    SLURM allocation hands each task less than the allocation); SLURM_CPUS_PER_TASK inside a SLURM job;
    OMP_NUM_THREADS; else the CPUs this process may run on (its affinity mask)."""
    if threads:
        return int(threads), "backend.threads"
    share = _positive_int(os.environ.get(THREADS_ENV))
    if share:
        return share, f"{THREADS_ENV}, this sweep's share of the machine"
    ray_cpus = _ray_task_cpus()
    if ray_cpus:
        return ray_cpus, "num_cpus Ray reserved for this task"
    slurm = _positive_int(os.environ.get("SLURM_CPUS_PER_TASK")) if os.environ.get("SLURM_JOB_ID") else None
    if slurm:
        return slurm, "SLURM_CPUS_PER_TASK"
    omp = _positive_int((os.environ.get("OMP_NUM_THREADS") or "").split(",")[0])
    if omp:
        return omp, "OMP_NUM_THREADS"
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)), "CPU affinity"
    return os.cpu_count() or 1, "os.cpu_count()"


def _ray_task_cpus() -> int | None:
    """The CPUs of the Ray task or actor running in this process; never imports ray (a slow import)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:                        # a driver, or a Ray without the runtime context API
        return None
    return max(math.floor(cpus), 1) if cpus else None


def _positive_int(text: str | None) -> int | None:
    try:
        n = int(str(text).strip())
    except ValueError:
        return None
    return n if n > 0 else None
