"""Train the same network in PyTorch (same config, data pipeline, initial weights and optimizer) as a PyTorch user's
loop does, for comparison; writes metrics.json (and TensorBoard scalars) into its run directory:

    python scripts/torch_peer.py data.val_size=0 trainer.epochs=3      # prints test accuracy and epoch times
"""
from __future__ import annotations

import json

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnpipe.cli import run_command, run_guarded
from cnnpipe.commands import CONF_DIR
from cnnpipe.config import register_configs
from cnnpipe.torch_peer import train_torch

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    result = run_guarded(lambda: train_torch(cfg, run_dir), run_dir)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))


def main() -> None:
    run_command(hydra_main)                     # run dir free, creatable and locked (exit 2 if not)
