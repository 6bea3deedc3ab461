"""Train a CNN with hand-written backprop:  python scripts/train.py pool=mean conv.k=5"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnpipe.cli import run_guarded
from cnnpipe.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from cnnpipe.train import train
    return run_guarded(lambda: train(cfg, HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
