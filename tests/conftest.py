"""Shared fixtures: the real config composed with Hydra, shrunk for tests; small learnable data in the real
IDX format where torchvision's FashionMNIST looks for it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import idx_bytes

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def learnable_images(n, seed, size=28, classes=10):
    """Class c: a bright 6x6 square at a class-specific place, plus noise. Learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n).astype(np.uint8)
    x = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    for c in range(classes):
        r, col = 3 + 7 * (c // 4), 2 + 6 * (c % 4)
        x[y == c, r:r + 6, col:col + 6] = 230
    return x, y


def make_fashion_root(root: Path, n_train=600, n_test=200, seed=0) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = learnable_images(n, s)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    return root


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    return make_fashion_root(tmp_path_factory.mktemp("data"))


def tiny_overrides(root: Path, **extra) -> list[str]:
    ov = {"data.root": str(root), "data.download": "false", "data.val_size": "100", "data.limit_train": None,
          "data.limit_test": None, "trainer.epochs": "1", "trainer.batch_size": "32", "trainer.progress": "false",
          "logger.tensorboard": "false", "optim.lr": "0.01"}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items() if v is not None]


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides) -> the real train config (Hydra compose API), as scripts/train.py sees it."""
    from cnnpipe.config import compose_config
    return compose_config


def run_script(script, *args, timeout=300, env=None, cwd=None):
    """Run one of scripts/*.py as a user would; returns CompletedProcess (text)."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([PY, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd or REPO)
