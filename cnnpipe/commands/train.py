"""Train a CNN with hand-written backprop:  python scripts/train.py pool=mean conv.k=5  (or cnnpipe-train ...)"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnpipe.app import train
from cnnpipe.cli import run_command, run_guarded
from cnnpipe.commands import CONF_DIR
from cnnpipe.config import register_configs
from cnnpipe.sweep.callback import failed_jobs
from cnnpipe.sweep.job import run_job

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:                 # a failing job is recorded, the sweep goes on (cnnpipe/sweep/)
        return run_job(cfg, hc, train)
    return run_guarded(lambda: train(cfg, hc.runtime.output_dir, list(hc.overrides.task)), hc.runtime.output_dir)


def main() -> None:
    run_command(hydra_main, resumes=True)          # plugins installed, run dir free, creatable, locked (exit 2 if not)
    if failed_jobs:                                # the summary lists them; the exit code says so too
        print(f"{len(failed_jobs)} job(s) of the sweep did not finish (see summary.md).", file=sys.stderr)
        if any(j["status"] == "interrupted" for j in failed_jobs):
            print("Interrupted jobs continue from their checkpoints/last.npz when you run the same command again "
                  "with sweep.resume=true.", file=sys.stderr)
        sys.exit(1)
