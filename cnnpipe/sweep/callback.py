"""The Hydra callback of every multirun (conf/hydra/default.yaml): the checks and thread limit before the jobs,
the summary after them."""
from __future__ import annotations

import os
from pathlib import Path

from hydra.experimental.callback import Callback

from cnnpipe import ConfigError
from cnnpipe.backends.cores import THREADS_ENV
from cnnpipe.cli import refuse_unstarted
from cnnpipe.sweep.by_config import format_top_configs, seed_statistics, write_by_config
from cnnpipe.sweep.plan import check_sweep_dir, cpu_count, drop_ray_object_store_default, job_threads
from cnnpipe.sweep.summary import collect_jobs, direction, format_top, sort_rows, write_summary

failed_jobs: list[dict] = []                # filled by on_multirun_end; scripts/train.py exits 1 when non-empty


class SweepCallback(Callback):
    def on_multirun_start(self, config, **kwargs):
        try:
            check_sweep_dir(config)
        except ConfigError as e:
            refuse_unstarted(config.hydra.sweep.dir, str(e))
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
        order = direction(config, rows)
        rows = sort_rows(rows, order)
        write_summary(sweep_dir, rows)
        failed_jobs[:] = [r for r in rows if r["status"] != "finished"]
        print(format_top(rows, sweep_dir, order), flush=True)
        configs = seed_statistics(rows, order)            # a sweep over trainer.seed: mean ± std per configuration
        if configs is not None:
            write_by_config(sweep_dir, configs)
            print(format_top_configs(configs, sweep_dir, order), flush=True)
