"""Sweeps: what a multirun job does around train(), and what the sweep leaves behind.

    python scripts/train.py -m pool.mode=max,mean conv.k=3,5 hydra/launcher=joblib

Hydra's sweepers and launchers run the jobs (basic, joblib, submitit_local/slurm, ray; optuna); this package adds
what Hydra does not do:
- job.run_job: one job of a multirun. A failing job is recorded (status + error in <job dir>/job.json) and returns
  NaN instead of ending the sweep; with sweep.resume=true a finished job (metrics.json) is skipped and an
  interrupted one (checkpoints/last.npz) continues from its checkpoint.
- callback.SweepCallback (hydra.callbacks in conf/hydra/default.yaml): before the jobs start, the checks and
  per-job thread limit of plan.py; after they end, summary.csv + summary.md (summary.py) in the sweep directory,
  and for a sweep over trainer.seed the mean ± std of each configuration (by_config.py: summary_by_config.*).
- plugins.missing_plugin: a launcher/sweeper plugin that is not installed is a clear error naming the extra.
"""
