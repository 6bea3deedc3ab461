"""Train the same network in PyTorch (same config, data pipeline, initial weights and optimizer) as a PyTorch user's
loop does, for comparison; writes metrics.json (and TensorBoard scalars) into its run directory:

    python scripts/torch_peer.py data.val_size=0 trainer.epochs=3      # prints test accuracy and epoch times
"""
import json
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
def main(cfg: DictConfig):
    from cnnpipe.torch_peer import train_torch
    result = run_guarded(lambda: train_torch(cfg, HydraConfig.get().runtime.output_dir))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))


if __name__ == "__main__":
    main()
