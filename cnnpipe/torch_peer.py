"""The PyTorch peer of scripts/train.py: the same network, initial weights, batches and optimizer, trained by the
loop a PyTorch user writes (loss and accuracy read back each step, a tqdm bar, TensorBoard scalars every
logger.scalar_every steps), so that the benchmark compares what each user's command costs, not bare kernels.
It writes metrics.json into its run directory, as scripts/train.py does."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from cnnpipe.jsonio import write_json_atomic

log = logging.getLogger("cnnpipe")


def train_torch(cfg, run_dir) -> dict:
    """Train cfg's network in PyTorch for trainer.epochs (or trainer.max_steps); returns what metrics.json holds."""
    import torch
    from tqdm import tqdm

    from cnnpipe.data import batches, load_data, num_batches
    from cnnpipe.model import build_model
    from cnnpipe.optim import LrSchedule
    from cnnpipe.torch_ref import torch_optimizer, torch_train_step, torch_twin
    tc, run_dir, dtype = cfg.trainer, Path(run_dir), np.dtype(cfg.dtype)
    torch.manual_seed(tc.seed)
    if cfg.backend.threads:
        torch.set_num_threads(cfg.backend.threads)
    net = torch_twin(build_model(cfg))             # our initial weights, copied into the twin
    data = load_data(cfg.data, tc.seed)
    opt = torch_optimizer(net, cfg.optim)
    spe = num_batches(len(data.train.y), tc.batch_size)
    total = tc.epochs * spe
    lr_at = LrSchedule(cfg.optim, spe, total)
    writer = None
    if cfg.logger.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(run_dir))
    every, step, seen = cfg.logger.scalar_every, 0, 0
    h = {"train_loss": [], "train_acc": [], "val_acc": [], "epoch_seconds": []}
    logging_seconds = 0.0
    for epoch in range(tc.epochs):
        if tc.max_steps is not None and step >= tc.max_steps:
            break
        net.train()
        loss_sum = correct = n = 0
        w_loss = w_correct = w_n = 0                # the window since the last scalars
        bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not tc.progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        for x, y in batches(data.train, tc.batch_size, mean=data.mean, std=data.std, dtype=dtype,
                            shuffle_seed=[tc.seed, epoch], augment=data.augment, crop_padding=data.crop_padding):
            lr = lr_at(step)
            r = torch_train_step(net, opt, x, y, lr)               # loss.item() and the accuracy read back
            step += 1
            loss_sum, correct, n = loss_sum + r.loss * r.n, correct + r.correct, n + r.n
            w_loss, w_correct, w_n = w_loss + r.loss * r.n, w_correct + r.correct, w_n + r.n
            if writer is not None and every and step % every == 0:
                t = time.perf_counter()
                writer.add_scalar("train/loss", w_loss / w_n, step)
                writer.add_scalar("train/accuracy", w_correct / w_n, step)
                writer.add_scalar("train/lr", lr, step)
                w_loss = w_correct = w_n = 0
                logging_seconds += time.perf_counter() - t
            bar.update(1)
            if step % tc.log_every == 0:
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.3f}")
            if tc.max_steps is not None and step >= tc.max_steps:
                break
        h["epoch_seconds"].append(time.perf_counter() - t0)
        bar.close()
        seen += n
        h["train_loss"].append(loss_sum / n)
        h["train_acc"].append(correct / n)
        if data.val is not None:
            h["val_acc"].append(evaluate_twin(net, data.val, data, tc.eval_batch_size, dtype)[1])
        log.info("epoch %d: %.2f s, train loss %.4f%s", epoch + 1, h["epoch_seconds"][-1], h["train_loss"][-1],
                 f", val acc {h['val_acc'][-1]:.4f}" if h["val_acc"] else "")
    test_loss, test_acc = evaluate_twin(net, data.test, data, tc.eval_batch_size, dtype)
    if writer is not None:
        writer.add_scalar("test/accuracy", test_acc, step)
        writer.close()
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": h["val_acc"][-1] if h["val_acc"] else None,
               "train_loss": h["train_loss"][-1] if h["train_loss"] else None, "epochs": len(h["epoch_seconds"]),
               "steps": step, "epoch_seconds": h["epoch_seconds"],
               "samples_per_second": seen / max(sum(h["epoch_seconds"]), 1e-9), "logging_seconds": logging_seconds,
               "backend": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "seed": tc.seed, "model": cfg.model.name, "dataset": data.name, "history": h}
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def evaluate_twin(net, split, data, batch_size: int, dtype) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the twin over a split, in eval mode."""
    import torch

    from cnnpipe.data import batches
    net.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for x, y in batches(split, batch_size, mean=data.mean, std=data.std, dtype=dtype):     # x N,C,H,W  y N
            logits = net(torch.from_numpy(x))                                                  # N,classes
            loss_sum += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="sum"))
            correct += int((logits.argmax(1).numpy() == y).sum())
    net.train()
    return loss_sum / max(len(split.y), 1), correct / max(len(split.y), 1)
