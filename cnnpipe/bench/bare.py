"""The bare loop: the training step alone over the trainer's batches, so the benchmark shows what the trainer and
its logging add to the user's command. A diagnosis harness, never the headline figure:

    python -m cnnpipe.bench.bare --backend numba --budget 10 -- model=lenet5 data.val_size=0

Ours is `cnnpipe.step.train_step`, the torch twin's `cnnpipe.torch_ref.torch_train_step` (loss and accuracy read
back), on the batches `scripts/train.py` makes (same seed, order, dtype, augmentation); no callbacks, no progress
bar. It prints one tagged JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cnnpipe.bench.runs import RESULT_TAG
from cnnpipe.config import compose_config


def step_function(cfg, backend: str):
    """step(x, y, lr) -> StepResult for ours (cfg's model on `backend`) or the torch twin (backend "torch")."""
    from cnnpipe.backends import get_backend, set_threads
    from cnnpipe.model import build_model
    if backend == "torch":
        import torch

        from cnnpipe.torch_ref import torch_optimizer, torch_train_step, torch_twin
        torch.manual_seed(cfg.trainer.seed)
        if cfg.backend.threads:
            torch.set_num_threads(cfg.backend.threads)
        net = torch_twin(build_model(cfg)).train()
        opt = torch_optimizer(net, cfg.optim)
        return lambda x, y, lr: torch_train_step(net, opt, x, y, lr)
    from cnnpipe.optim import build_optimizer
    from cnnpipe.step import train_step
    set_threads(cfg.backend.threads, backend)
    B = get_backend(backend)
    model = build_model(cfg, B)
    if hasattr(B, "warmup"):
        B.warmup(np.dtype(cfg.dtype))
    opt = build_optimizer(cfg.optim, model.named_params(), B)
    return lambda x, y, lr: train_step(model, opt, x, y, lr)


def bare_epoch(cfg, data, step, budget_s: float | None) -> dict:
    """One epoch of step() over the trainer's batches, stopped at trainer.max_steps or after budget_s seconds
    (the epoch time is then extrapolated from the samples done)."""
    from cnnpipe.data import batches, num_batches
    from cnnpipe.optim import LrSchedule
    tc = cfg.trainer
    spe = num_batches(len(data.train.y), tc.batch_size)
    lr_at = LrSchedule(cfg.optim, spe, spe)
    cap = min(spe, tc.max_steps or spe)
    steps = seen = 0
    t0 = time.perf_counter()
    for x, y in batches(data.train, tc.batch_size, mean=data.mean, std=data.std, dtype=np.dtype(cfg.dtype),
                        shuffle_seed=[tc.seed, 0], augment=data.augment, crop_padding=data.crop_padding):
        r = step(x, y, lr_at(steps))
        steps, seen = steps + 1, seen + r.n
        if steps >= cap or (budget_s and time.perf_counter() - t0 > budget_s):
            break
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "samples_per_second": seen / seconds, "full_epoch": steps == spe,
            "epoch_seconds": seconds * len(data.train.y) / seen}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, help="numpy, numba or torch (one a process: numba's and torch's "
                    "thread pools in one process wait on each other)")
    ap.add_argument("--budget", type=float, default=None, help="seconds before extrapolating")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from cnnpipe.data import load_data
    cfg = compose_config(args.overrides + ([] if args.backend == "torch" else [f"backend={args.backend}"]))
    step = step_function(cfg, args.backend)            # before the data loader imports torch, as in the trainer
    data = load_data(cfg.data, cfg.trainer.seed)
    print(RESULT_TAG + json.dumps(bare_epoch(cfg, data, step, args.budget)), flush=True)


if __name__ == "__main__":
    main()
