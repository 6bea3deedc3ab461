"""Evaluation: loss, accuracy and predictions over a split; a checkpoint on the test split with per-class accuracy
and the confusion matrix."""
from __future__ import annotations

import numpy as np

from cnnpipe.checkpoint import load_checkpoint
from cnnpipe.data import batches, load_data
from cnnpipe.losses import log_softmax
from cnnpipe.metrics import confusion_matrix
from cnnpipe.resume import model_from_checkpoint


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
    model, cfg = model_from_checkpoint(ckpt, overrides)
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
