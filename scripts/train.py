"""Train a CNN with hand-written backprop:  python scripts/train.py pool=mean conv.k=5"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnpipe.cli import resume_run_dir_args, run_guarded
from cnnpipe.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from cnnpipe.train import train
    hc = HydraConfig.get()
    return run_guarded(lambda: train(cfg, hc.runtime.output_dir, list(hc.overrides.task)))


if __name__ == "__main__":
    sys.argv += resume_run_dir_args(sys.argv[1:])
    main()
