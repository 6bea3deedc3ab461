"""Train a CNN with hand-written backprop:  python scripts/train.py pool=mean conv.k=5"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnpipe.cli import check_command_line, run_guarded
from cnnpipe.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from cnnpipe.app import train
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:                 # a failing job is recorded, the sweep goes on (cnnpipe/sweep.py)
        from cnnpipe.sweep import run_job
        return run_job(cfg, hc, train)
    return run_guarded(lambda: train(cfg, hc.runtime.output_dir, list(hc.overrides.task)))


if __name__ == "__main__":
    from cnnpipe import sweep
    sys.argv += check_command_line(sys.argv[1:])   # plugins installed, run dir free and creatable (exit 2 if not)
    try:
        main()
    except KeyboardInterrupt:                      # Ctrl-C outside the training loop (start-up, shutdown)
        print("interrupted.", file=sys.stderr)
        sys.exit(130)
    if sweep.failed_jobs:                          # the summary lists them; the exit code says so too
        print(f"{len(sweep.failed_jobs)} job(s) of the sweep did not finish (see summary.md).", file=sys.stderr)
        if any(j["status"] == "interrupted" for j in sweep.failed_jobs):
            print("Interrupted jobs continue from their checkpoints/last.npz when you run the same command again "
                  "with sweep.resume=true.", file=sys.stderr)
        sys.exit(1)
