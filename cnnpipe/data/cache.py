"""The arrays torchvision decoded from a dataset's files, kept beside them (`<data.root>/.cnnpipe-cache/`), so that a
later run whose files are unchanged reads them back without importing torch and torchvision, the largest part of
a run's start-up time and memory. `data.cache=false` always loads through torchvision.

A cache file is named by a fingerprint of everything the arrays depend on: the dataset, the folder torchvision
reads and every file in it (name, size, modification time), and data.verify (a copy loaded without the md5 check
never serves a run that asks for it). A file that changes, appears or goes gives a new name: torchvision loads
again and the stale cache file is removed. Writing is best effort: a read-only data.root just has no cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from cnnpipe.jsonio import atomic_path

log = logging.getLogger(__name__)

CACHE_DIR = ".cnnpipe-cache"
FORMAT = 1                                  # bump when the stored arrays change meaning
# data.name → the folder under data.root that torchvision reads (its classes' raw_folder / base_folder; a test
# checks this against torchvision)
FOLDERS = {
    "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
    "kmnist": "KMNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}


def cache_path(name: str, root: str, verify: bool) -> Path | None:
    """Where the arrays of data.name's files under root are cached; None when torchvision's folder is not there."""
    folder = Path(root) / FOLDERS[name]
    try:
        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file())
    except OSError:
        return None
    key = json.dumps([FORMAT, name, bool(verify), str(folder.resolve()), files])
    return Path(root) / CACHE_DIR / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def read(path: Path | None) -> dict[str, np.ndarray] | None:
    """The cached arrays (train_x, train_y, test_x, test_y, classes), or None when there are none to read."""
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y", "classes")}
    except (OSError, ValueError, KeyError) as e:          # absent, being replaced, or damaged: load anew
        if not isinstance(e, FileNotFoundError):
            log.debug("data cache %s unreadable (%s): loading through torchvision", path, e)
        return None


def write(path: Path | None, arrays: dict[str, np.ndarray]) -> None:
    """Keep the arrays at path (atomically), and drop the dataset's stale cache files; never fails the run."""
    if path is None:
        return
    try:
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        for old in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log.debug("data cache not written to %s (%s)", path, e)
