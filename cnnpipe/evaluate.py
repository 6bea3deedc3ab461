"""Evaluate a checkpoint on the test split: loss, accuracy, per-class accuracy, confusion matrix."""
from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend, set_threads
from cnnpipe.checkpoint import check_params, checkpoint_config, load_checkpoint
from cnnpipe.data import load_data
from cnnpipe.model import build_model


def evaluate_checkpoint(path, overrides: list[str] = ()):
    """Returns a dict: test_loss, test_acc, per_class_acc, confusion (rows true, columns predicted), classes."""
    from cnnpipe.train import evaluate_split
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
    model.load_params({k[6:]: v for k, v in ckpt.items() if k.startswith("param/")})
    data = load_data(cfg.data, cfg.trainer.seed)
    loss, acc, preds = evaluate_split(model, data.test, data, cfg.trainer.eval_batch_size)
    k = data.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (data.test.y, preds), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {"checkpoint": str(ckpt["_path"]), "test_loss": loss, "test_acc": acc, "classes": list(data.classes),
            "per_class_acc": per_class.tolist(), "confusion": confusion.tolist(), "n": int(len(data.test.y))}


def format_report(r) -> str:
    lines = [f"checkpoint {r['checkpoint']}", f"test loss {r['test_loss']:.4f}   accuracy {r['test_acc']:.4f}   "
             f"({r['n']} images)", "", f"{'class':<14}{'accuracy':>9}"]
    lines += [f"{str(c)[:13]:<14}{a:>9.4f}" for c, a in zip(r["classes"], r["per_class_acc"])]
    k = len(r["classes"])
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              "      " + "".join(f"{j:>6}" for j in range(k))]
    lines += [f"{i:>6}" + "".join(f"{v:>6}" for v in row) for i, row in enumerate(r["confusion"])]
    return "\n".join(lines)
