"""Evaluation: loss, accuracy and predictions over a split; a checkpoint on the test split with per-class accuracy
and the confusion matrix."""
from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend, set_threads
from cnnpipe.checkpoint import checkpoint_config, load_checkpoint, section
from cnnpipe.data import batches, load_data
from cnnpipe.losses import log_softmax
from cnnpipe.metrics import confusion_matrix
from cnnpipe.model import build_model
from cnnpipe.resume import check_params


def evaluate_split(model, split, data, batch_size: int) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and predictions over a split, in eval mode (no dropout)."""
    loss_sum, preds = 0.0, []
    for x, y in batches(split, batch_size, mean=data.mean, std=data.std, dtype=model.dtype):
        logits = model.forward(x, train=False)                           # N,classes
        loss_sum -= float(log_softmax(logits)[np.arange(len(y)), y].sum())
        preds.append(logits.argmax(1))
    preds = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    n = max(len(split.y), 1)
    return loss_sum / n, float((preds == split.y).mean()) if len(preds) else 0.0, preds


def evaluate_checkpoint(path, overrides: list[str] = ()) -> dict:
    """Returns a dict: test_loss, test_acc, per_class_acc, confusion (rows true, columns predicted), classes."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    bad = [o for o in overrides if not (o.startswith("data.") or o.startswith("backend.") or
                                        o.startswith("trainer.eval_batch_size="))]
    if bad:
        raise ConfigError(f"evaluate.py accepts only data.*, backend.* and trainer.eval_batch_size overrides "
                          f"(the architecture comes from the checkpoint); got: {', '.join(bad)}.")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    set_threads(cfg.backend.threads, cfg.backend.name)
    model = build_model(cfg, get_backend(cfg.backend.name))
    check_params(model, ckpt)
    model.load_params(section(ckpt, "param/"))
    data = load_data(cfg.data, cfg.trainer.seed)
    loss, acc, preds = evaluate_split(model, data.test, data, cfg.trainer.eval_batch_size)
    confusion = confusion_matrix(data.test.y, preds, data.num_classes)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {"checkpoint": str(ckpt["_path"]), "test_loss": loss, "test_acc": acc, "classes": list(data.classes),
            "per_class_acc": per_class.tolist(), "confusion": confusion.tolist(), "n": int(len(data.test.y))}


def format_report(r: dict) -> str:
    lines = [f"checkpoint {r['checkpoint']}", f"test loss {r['test_loss']:.4f}   accuracy {r['test_acc']:.4f}   "
             f"({r['n']} images)", "", f"{'class':<14}{'accuracy':>9}"]
    lines += [f"{str(c)[:13]:<14}{a:>9.4f}" for c, a in zip(r["classes"], r["per_class_acc"])]
    k = len(r["classes"])
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              "      " + "".join(f"{j:>6}" for j in range(k))]
    lines += [f"{i:>6}" + "".join(f"{v:>6}" for v in row) for i, row in enumerate(r["confusion"])]
    return "\n".join(lines)
