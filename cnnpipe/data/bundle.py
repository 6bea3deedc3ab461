"""load_data: a dataset's splits as uint8 arrays in memory, the validation split carved with the run's seed, and the
per-channel normalization of the training split. Letters: N samples, C channels, H,W image size."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.config import DataConf
from cnnpipe.data import cache
from cnnpipe.data.sources import CIFAR, DATASETS, check_name, dataset_class, open_splits, warn_unchecked

log = logging.getLogger(__name__)
CARVE = 1                                           # spawn key of the validation carve's random stream


@dataclass
class Split:
    x: np.ndarray   # uint8 N,C,H,W, C-contiguous
    y: np.ndarray   # int64 N

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    name: str                   # "fashion_mnist", ...
    train: Split
    val: Split | None           # carved from the training split; None if data.val_size == 0
    test: Split
    classes: list[str]
    mean: np.ndarray            # float64 C: per-channel mean of pixel/255 over the training split
    std: np.ndarray             # float64 C
    source: str                 # where the files came from, for the log
    augment: bool               # data.augment as it applies here (only CIFAR is augmented)
    crop_padding: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # C,H,W

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_DEFAULTS = DataConf()                              # what a key cfg leaves out (or sets to null) means


def _opt(cfg, key):
    """data.<key> of cfg (a DictConfig, a plain mapping or an object), or DataConf's default where it is unset."""
    v = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    return getattr(_DEFAULTS, key) if v is None else v


def _count(key, value, minimum, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{key}={value!r} must be an integer >= {minimum}"
                          f"{' or null' if optional else ''}. Fix it in conf/data/ or on the command line.")
    return int(value)


def load_data(cfg: Mapping[str, Any] | DataConf, seed: int) -> DataBundle:
    """Load data.name as in-memory uint8 splits, carve the validation split, compute the normalization."""
    name = _opt(cfg, "name")
    check_name(name)
    root = _root(cfg)
    mirror = _opt(cfg, "mirror")
    mirror = os.path.abspath(os.path.expanduser(str(mirror))) if mirror else None
    val_size = _count("val_size", _opt(cfg, "val_size"), 0)
    limit_train = _count("limit_train", _opt(cfg, "limit_train"), 1, optional=True)
    limit_test = _count("limit_test", _opt(cfg, "limit_test"), 1, optional=True)
    crop_padding = _count("crop_padding", _opt(cfg, "crop_padding"), 0)
    augment = bool(_opt(cfg, "augment"))
    if augment and name not in CIFAR:
        log.warning("data.augment=true is ignored for %s: random crops and flips are only used for CIFAR "
                    "(a flipped digit or glyph is a different character)", name)
        augment = False

    verify = bool(_opt(cfg, "verify"))
    train, test, classes, source = _splits(name, root, mirror, bool(_opt(cfg, "download")), verify,
                                           bool(_opt(cfg, "cache")))
    for split, what in ((train, "train"), (test, "test")):
        if len(split) and (split.y.min() < 0 or split.y.max() >= len(classes)):
            raise ConfigError(f"The {what} labels of {name} (from {source}) are outside 0..{len(classes) - 1}: the "
                              f"files are not {DATASETS[name]}. Delete them and load again.")

    # validation carve: a seeded permutation; val takes the first val_size, train the rest (then limit_train)
    n = len(train)
    if val_size >= n:
        raise ConfigError(f"data.val_size={val_size} leaves no training data: {name}'s training split has {n} "
                          f"samples. Set data.val_size below {n} (0 turns the validation split off).")
    val = None
    if val_size or limit_train:
        perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(CARVE,))).permutation(n)
        if val_size:
            val = _take(train, np.sort(perm[:val_size]))
        train = _take(train, np.sort(perm[val_size:][:limit_train]))  # sorted: keep the files' order
    if limit_test:
        test = _take(test, np.arange(min(limit_test, len(test))))
    mean, std = channel_stats(train.x)
    log.info("data %s: train %d, val %d, test %d, %s; mean %s std %s; from %s", name, len(train),
             0 if val is None else len(val), len(test), "x".join(map(str, train.x.shape[1:])),
             np.round(mean, 4).tolist(), np.round(std, 4).tolist(), source)
    return DataBundle(name=name, train=train, val=val, test=test, classes=classes, mean=mean, std=std,
                      source=source, augment=augment, crop_padding=crop_padding)


def _root(cfg) -> str:
    """data.root as an absolute path, relative to where the user started (not Hydra's run directory)."""
    root = os.path.expanduser(str(_opt(cfg, "root")))
    with contextlib.suppress(Exception):
        from hydra.utils import to_absolute_path
        root = to_absolute_path(root)
    return os.path.abspath(root)


def needs_torchvision(cfg) -> bool:
    """Whether load_data(cfg) will import torchvision: False when it will read the data cache."""
    name, verify = _opt(cfg, "name"), bool(_opt(cfg, "verify"))
    if name not in DATASETS or not _opt(cfg, "cache"):
        return True
    where = cache.cache_path(name, _root(cfg), verify)
    return where is None or not where.is_file()


def _splits(name, root, mirror, download, verify, use_cache) -> tuple[Split, Split, list[str], str]:
    """(train, test, classes, source): the cached arrays when data.root's files are the ones they came from, else
    through torchvision (which finds or fetches the files: sources.open_splits), cached for the next run."""
    where = cache.cache_path(name, root, verify) if use_cache else None
    got = cache.read(where)
    if got is not None:
        if not verify and name in CIFAR:
            warn_unchecked(name, os.path.join(root, cache.FOLDERS[name]))
        source = f"{os.path.join(root, cache.FOLDERS[name])} (arrays cached in {where.parent})"
        return (Split(got["train_x"], got["train_y"]), Split(got["test_x"], got["test_y"]),
                [str(c) for c in got["classes"]], source)
    train_ds, test_ds, source = open_splits(name, dataset_class(name), root, mirror, download, verify)
    train, test = _to_split(train_ds), _to_split(test_ds)
    classes = [str(c) for c in test_ds.classes]
    if use_cache:                                     # the files are in data.root now, wherever they came from
        cache.write(cache.cache_path(name, root, verify), {"train_x": train.x, "train_y": train.y, "test_x": test.x,
                                                           "test_y": test.y, "classes": np.array(classes)})
    return train, test, classes, source


def _to_split(ds) -> Split:
    """A torchvision dataset's whole split, from its arrays (never per-item PIL)."""
    data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    x = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)   # N,H,W or N,H,W,C → N,C,H,W
    targets = ds.targets.numpy() if hasattr(ds.targets, "numpy") else ds.targets
    return Split(np.ascontiguousarray(x, dtype=np.uint8), np.ascontiguousarray(targets, dtype=np.int64))


def _take(split: Split, idx) -> Split:
    return Split(np.ascontiguousarray(split.x[idx]), np.ascontiguousarray(split.y[idx]))


def channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of x/255 (float64 C), exactly: integer sums of u8 and u8² in chunks."""
    N, C = x.shape[:2]
    s, s2 = np.zeros(C, np.int64), np.zeros(C, np.int64)
    for i in range(0, N, chunk):
        c = x[i:i + chunk].astype(np.int32)                                 # n,C,H,W
        s += c.sum(axis=(0, 2, 3), dtype=np.int64)
        c *= c
        s2 += c.sum(axis=(0, 2, 3), dtype=np.int64)
    count = max(N * x.shape[2] * x.shape[3], 1)
    mean = s / count / 255.0
    std = np.sqrt(np.maximum(s2 / count / 255.0**2 - mean**2, 0.0))
    std[std == 0] = 1.0   # a constant channel: leave its scale alone
    return mean, std
