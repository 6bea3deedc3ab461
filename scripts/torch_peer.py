"""Train the same network in PyTorch (same config, data pipeline, initial weights and optimizer) for comparison:

    python scripts/torch_peer.py data.val_size=0 trainer.epochs=3      # prints test accuracy and epoch times
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from cnnpipe.cli import run_guarded
from cnnpipe.config import register_configs

register_configs()


def train_torch(cfg):
    import torch

    from cnnpipe.data import batches, load_data, num_batches
    from cnnpipe.model import build_model
    from cnnpipe.optim import lr_at
    from cnnpipe.torch_ref import torch_optimizer, torch_train_step, torch_twin
    torch.manual_seed(cfg.trainer.seed)
    if cfg.backend.threads:
        torch.set_num_threads(cfg.backend.threads)
    net = torch_twin(build_model(cfg))             # our initial weights, copied into the twin
    data = load_data(cfg.data, cfg.trainer.seed)
    opt = torch_optimizer(net, cfg.optim)
    spe = num_batches(len(data.train.y), cfg.trainer.batch_size)
    total, step, seconds = cfg.trainer.epochs * spe, 0, []
    for epoch in range(cfg.trainer.epochs):
        net.train()
        t0 = time.perf_counter()
        for x, y in batches(data.train, cfg.trainer.batch_size, mean=data.mean, std=data.std,
                            shuffle_seed=[cfg.trainer.seed, epoch], augment=data.augment):
            torch_train_step(net, opt, x, y, lr_at(cfg.optim, step, spe, total))
            step += 1
        seconds.append(time.perf_counter() - t0)
        print(f"epoch {epoch + 1}: {seconds[-1]:.1f} s", flush=True)
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(data.test, 1000, mean=data.mean, std=data.std):
            correct += int((net(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return {"test_acc": correct / len(data.test.y), "epoch_seconds": seconds, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    result = run_guarded(lambda: train_torch(cfg))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
