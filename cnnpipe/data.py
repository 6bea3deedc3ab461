"""Data: a torchvision dataset → uint8 arrays in memory → normalized batches made on the fly.

Dimension letters: N samples, C channels, H,W image size.

    bundle = load_data(cfg.data, seed)          # whole splits as uint8 N,C,H,W + int64 labels
    for x, y in batches(bundle.train, 64, mean=bundle.mean, std=bundle.std, shuffle_seed=[seed, epoch]):
        ...                                     # x float32 N,C,H,W = (u8/255 - mean)/std,  y int64 N

Where the files come from, in this order (the first that works wins; `DataBundle.source` says which):
  1. `data.root`, where torchvision keeps them (`root/FashionMNIST/raw/...`, `root/cifar-10-batches-py/...`);
     torchvision checks CIFAR's extracted files against its md5 sums; `data.verify=false` skips that check for
     the files in `data.root` (a modified or synthetic copy in CIFAR's format), with a warning naming the folder;
  2. offline copies: Debian's package folder (`/usr/share/datasets/fashion-mnist`, from `apt install
     dataset-fashion-mnist`) and the user's `data.mirror` folder of the original archives (also the archives
     a previous download left in `root`). Each archive is checked against torchvision's own md5 sums (a
     mirror's not with `data.verify=false`: archives the user made, with a warning naming the folder), then
     extracted where torchvision expects it, and torchvision's loader reads it with download=False;
  3. torchvision's own download (data.download=true), with a short socket timeout;
  4. otherwise a ConfigError that lists every place looked and how to fix it.
New files are written to a staging folder inside `root` and moved into place only when complete, so a failed
copy or download leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnpipe import ConfigError

log = logging.getLogger(__name__)

# data.name → torchvision.datasets class name. Every accepted name is here.
DATASETS = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}
CIFAR = ("cifar10", "cifar100")                     # the names augmentation applies to
DEBIAN_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}    # offline copies from Debian packages
DEBIAN_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
DPKG_INFO = "/var/lib/dpkg/info"                    # <package>.md5sums: dpkg's record of the installed files
DOWNLOAD_TIMEOUT_S = 10.0                           # per socket operation: offline fails fast
_CARVE, _AUGMENT = 1, 2                             # spawn keys: independent random streams from one seed


# ---------------------------------------------------------------------------------------------------------------
# what load_data returns


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
    augment: bool = False       # data.augment as it applies here (only CIFAR is augmented)
    crop_padding: int = 4

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # C,H,W

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def preload_torchvision():
    """Import torchvision (and with it torch: seconds) in a background thread, so that it overlaps the numba
    warm-up; load_data's own import then finds it done or waits for it. An import error is left for that
    import to report."""
    def work():
        with contextlib.suppress(Exception):
            import torchvision.datasets  # noqa: F401

    thread = threading.Thread(target=work, name="cnnpipe-preload", daemon=True)
    thread.start()
    return thread


def dataset_class(name):
    """The torchvision dataset class for data.name, or a ConfigError naming the accepted names."""
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset this pipeline knows. Choose one of "
                          f"{', '.join(DATASETS)} (e.g. `data=fashion_mnist` or `data.name=cifar10`).")
    import torchvision.datasets
    return getattr(torchvision.datasets, DATASETS[name])


# ---------------------------------------------------------------------------------------------------------------
# load_data


def _opt(cfg, key, default):
    v = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if v is None else v


def _count(key, value, minimum, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{key}={value!r} must be an integer >= {minimum}"
                          f"{' or null' if optional else ''}. Fix it in conf/data/ or on the command line.")
    return int(value)


def load_data(cfg, seed: int) -> DataBundle:
    """Load data.name as in-memory uint8 splits, carve the validation split, compute the normalization."""
    name = _opt(cfg, "name", None)
    cls = dataset_class(name)
    root = os.path.expanduser(str(_opt(cfg, "root", "data")))
    with contextlib.suppress(Exception):  # relative to where the user started, not Hydra's run directory
        from hydra.utils import to_absolute_path
        root = to_absolute_path(root)
    root = os.path.abspath(root)
    mirror = _opt(cfg, "mirror", None)
    mirror = os.path.abspath(os.path.expanduser(str(mirror))) if mirror else None
    raw_val = (cfg.get("val_size", 5000) if isinstance(cfg, Mapping) else getattr(cfg, "val_size", 5000))
    val_size = _count("val_size", 0 if raw_val is None else raw_val, 0)
    limit_train = _count("limit_train", _opt(cfg, "limit_train", None), 1, optional=True)
    limit_test = _count("limit_test", _opt(cfg, "limit_test", None), 1, optional=True)
    crop_padding = _count("crop_padding", _opt(cfg, "crop_padding", 4), 0)
    augment = bool(_opt(cfg, "augment", False))
    if augment and name not in CIFAR:
        log.warning("data.augment=true is ignored for %s: random crops and flips are only used for CIFAR "
                    "(a flipped digit or glyph is a different character)", name)
        augment = False

    verify = bool(_opt(cfg, "verify", True))
    train_ds, test_ds, source = _open(name, cls, root, mirror, bool(_opt(cfg, "download", True)), verify)
    train, test = _to_split(train_ds), _to_split(test_ds)
    classes = [str(c) for c in test_ds.classes]
    for split, what in ((train, "train"), (test, "test")):
        if len(split) and (split.y.min() < 0 or split.y.max() >= len(classes)):
            raise ConfigError(f"The {what} labels of {name} (from {source}) are outside 0..{len(classes) - 1}: the "
                              f"files are not {cls.__name__}. Delete them and load again.")

    # validation carve: a seeded permutation; val takes the first val_size, train the rest (then limit_train)
    n = len(train)
    if val_size >= n:
        raise ConfigError(f"data.val_size={val_size} leaves no training data: {name}'s training split has {n} "
                          f"samples. Set data.val_size below {n} (0 turns the validation split off).")
    val = None
    if val_size or limit_train:
        perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_CARVE,))).permutation(n)
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


# ---------------------------------------------------------------------------------------------------------------
# finding the files: root, offline copies, download


def _open(name, cls, root, mirror, download, verify=True):
    """(train dataset, test dataset, source) from the first place that works; else a ConfigError."""
    looked = []
    where = _torchvision_folder(cls, root)
    unchecked = not verify and hasattr(cls, "tgz_md5")
    got = _load(_without_md5(cls) if unchecked else cls, root)
    if not isinstance(got, str):
        if unchecked:
            log.warning("data.verify=false: the %s files in %s were loaded without torchvision's md5 check; they "
                        "may not be the original %s", name, where, cls.__name__)
        return (*got, where)
    looked.append(f"{where} (data.root): {got}")

    for label, path, fill in _offline_copies(name, cls, root, mirror, looked, verify):
        problem = _install(root, fill)
        unchecked = not verify and label == "mirror"
        loader = _without_md5(cls) if unchecked and hasattr(cls, "tgz_md5") else cls
        got = _load(loader, root) if problem is None else problem
        if not isinstance(got, str):
            if unchecked:
                log.warning("data.verify=false: the %s archives in %s were used without torchvision's md5 check; "
                            "they may not be the original %s", name, path, cls.__name__)
            log.info("%s: copied %s from %s into %s", name, cls.__name__, path, where)
            return (*got, f"{label} {path}")
        looked.append(f"{label} {path}: {got}")

    urls = ", ".join(getattr(cls, "mirrors", None) or [cls.url])
    if not download:
        looked.append(f"download from {urls}: not tried (data.download=false)")
    else:
        log.info("%s: downloading %s from %s into %s", name, cls.__name__, urls, root)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            problem = _install(root, lambda stage: cls(stage, train=True, download=True))
        got = _load(cls, root) if problem is None else problem
        if not isinstance(got, str):
            return (*got, f"downloaded from {urls}")
        looked.append(f"download from {urls}: {' '.join(got.split())}")

    files = ", ".join(_archives(cls))
    debian = (f"install the Debian package ({'sudo apt install ' + DEBIAN_PACKAGES[name]}), "
              if name in DEBIAN_PACKAGES else "")
    raise ConfigError(
        f"Could not load the {name} dataset (torchvision {cls.__name__}). Looked in: "
        + "; ".join(f"({i + 1}) {s}" for i, s in enumerate(looked))
        + f". To fix: {debian}put the original archives ({files}) in a folder and set data.mirror=/that/folder, "
          f"point data.root=... at a folder that already holds {os.path.relpath(where, root)}, "
          f"or run once with network access and data.download=true.")


def _torchvision_folder(cls, root):
    if hasattr(cls, "base_folder"):
        return os.path.join(root, cls.base_folder)
    return os.path.join(root, cls.__name__, "raw")


def _archives(cls):
    return [cls.filename] if hasattr(cls, "tgz_md5") else [f for f, _ in cls.resources]


def _without_md5(cls):
    """CIFAR's class with its md5 sums set to None: torchvision's check_integrity then only asks that each file
    exists (data.verify=false)."""
    unchecked = lambda files: [[f, None] for f, _ in files]  # noqa: E731
    return type(cls.__name__, (cls,), {"train_list": unchecked(cls.train_list), "test_list": unchecked(cls.test_list),
                                       "meta": {**cls.meta, "md5": None}})


def _load(cls, root):
    """Both splits through torchvision with download=False, or a short reason why not."""
    try:
        return cls(root, train=True, download=False), cls(root, train=False, download=False)
    except Exception as e:  # torchvision raises RuntimeError when absent; corrupt files raise anything
        msg = str(e).split("\n")[0]
        if isinstance(e, RuntimeError) and msg.startswith("Dataset not found"):
            return "not found or corrupted (torchvision's md5 check failed)" if "corrupted" in msg else "not found"
        return f"unreadable ({type(e).__name__}: {msg})"


def _install(root, fill):
    """Let fill(stage) write torchvision's layout into a staging folder under root, then move it into root.

    Returns None, or a reason. The staging folder is removed either way: nothing half-written stays behind.
    """
    try:
        os.makedirs(root, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".cnnpipe-staging-", dir=root)
    except OSError as e:
        return f"cannot write into data.root ({e})"
    try:
        fill(stage)
        for dirpath, _, files in os.walk(stage):
            dest = os.path.join(root, os.path.relpath(dirpath, stage))
            os.makedirs(dest, exist_ok=True)
            for f in files:
                os.replace(os.path.join(dirpath, f), os.path.join(dest, f))
        return None
    except Exception as e:
        return f"failed ({type(e).__name__}: {str(e).strip()})"
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _socket_timeout(seconds):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _offline_copies(name, cls, root, mirror, looked, verify=True):
    """Yield (label, folder, fill) for each local folder holding a complete, checked set of archives (a mirror's
    only checked for presence when verify is false).

    Folders that exist but fail a check are reported in `looked`, with the file's name and the reason.
    """
    candidates = []
    if name in DEBIAN_DIRS:
        candidates.append(("debian package", DEBIAN_DIRS[name]))
    if mirror:
        subs = ["", cls.__name__, name, name.replace("_", "-"), os.path.join(cls.__name__, "raw")]
        if hasattr(cls, "base_folder"):
            subs.append(cls.base_folder)
        found = [os.path.normpath(os.path.join(mirror, s)) for s in dict.fromkeys(subs)
                 if os.path.isdir(os.path.join(mirror, s))]
        candidates += [("mirror", d) for d in found] or [("note", f"mirror {mirror} (data.mirror): no such folder")]
    else:
        candidates.append(("note", "data.mirror: not set"))
    # archives a previous download left in root (torchvision keeps them beside the extracted files)
    candidates.append(("archives in data.root", root if hasattr(cls, "tgz_md5") else _torchvision_folder(cls, root)))

    for label, folder in candidates:
        if label == "note":
            looked.append(folder)
            continue
        if not os.path.isdir(folder):
            if label == "debian package":
                looked.append(f"debian package {folder}: not installed")
            continue
        if label == "debian package":
            check = _debian_problem
        elif label == "mirror" and not verify:
            check = _missing_problem
        else:
            check = _md5_problem
        if hasattr(cls, "tgz_md5"):
            result = _cifar_fill(cls, folder, check)
        else:
            result = _idx_fill(cls, folder, check)
        if isinstance(result, str):
            if result or label != "archives in data.root":   # "" = nothing there; stay quiet about root
                looked.append(f"{label} {folder}: {result or 'none of ' + ', '.join(_archives(cls)) + ' found'}")
        else:
            yield label, folder, result


def _idx_fill(cls, folder, check):
    """MNIST family: the four gzipped IDX files, each checked, decompressed into <Class>/raw of the stage."""
    paths = [os.path.join(folder, f) for f, _ in cls.resources]
    present = [os.path.isfile(p) for p in paths]
    if not any(present):
        return ""
    if not all(present):
        return "missing " + ", ".join(f for (f, _), ok in zip(cls.resources, present) if not ok)
    for p, (_, md5) in zip(paths, cls.resources):
        problem = check(p, md5)
        if problem:
            return problem

    def fill(stage):
        from torchvision.datasets.utils import extract_archive
        os.makedirs(os.path.join(stage, cls.__name__, "raw"))
        for p in paths:
            extract_archive(p, os.path.join(stage, cls.__name__, "raw"))
    return fill


def _cifar_fill(cls, folder, check):
    """CIFAR: the python tarball (checked against tgz_md5) extracted into the stage; or an extracted folder."""
    from torchvision.datasets.utils import extract_archive
    tgz = os.path.join(folder, cls.filename)
    if os.path.isfile(tgz):
        problem = check(tgz, cls.tgz_md5)
        return problem if problem else (lambda stage: extract_archive(tgz, stage))
    # an already extracted folder (mirror/cifar-10-batches-py): every file checked against torchvision's md5s
    files = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
    if os.path.basename(folder) != cls.base_folder or not os.path.isfile(os.path.join(folder, files[0][0])):
        return ""
    for f, md5 in files:
        problem = check(os.path.join(folder, f), md5)
        if problem:
            return problem

    def fill(stage):
        os.makedirs(os.path.join(stage, cls.base_folder))
        for f, _ in files:
            shutil.copyfile(os.path.join(folder, f), os.path.join(stage, cls.base_folder, f))
    return fill


def _missing_problem(path, expected):
    """None if the file exists (data.verify=false: its md5 is not compared)."""
    return None if os.path.isfile(path) else f"missing {os.path.basename(path)}"


def _md5_problem(path, expected):
    """None if the file's md5 is torchvision's; else a sentence naming the file (and whose file it is)."""
    from torchvision.datasets.utils import calculate_md5
    if not os.path.isfile(path):
        return f"missing {os.path.basename(path)}"
    got = calculate_md5(path)
    if got == expected:
        return None
    owner = _known_md5s().get(got)
    why = f"it is {owner}" if owner else "corrupt, truncated or a different version: fetch it again"
    return f"{os.path.basename(path)} has md5 {got}, not torchvision's {expected} ({why})"


def _known_md5s():
    """md5 → "Dataset's file" for every archive of every dataset here: names a file put in the wrong folder."""
    import torchvision.datasets as tvd
    known = {}
    for cname in DATASETS.values():
        c = getattr(tvd, cname)
        for f, md5 in ([(c.filename, c.tgz_md5)] if hasattr(c, "tgz_md5") else c.resources):
            known[md5] = f"{cname}'s {f}"
    return known


def _debian_problem(path, md5):
    """Debian's gzip files are re-stamped (reproducible builds rewrite the gzip header's time), so their md5
    differs from torchvision's although the images are the same. Unless torchvision's md5 matches, check them
    against dpkg's own md5 record of the installed package, and check that the IDX header agrees with the
    decompressed size.
    """
    from torchvision.datasets.utils import calculate_md5
    got = calculate_md5(path)
    if got == md5:
        return None
    for sums in (os.path.join(DPKG_INFO, p + ".md5sums") for p in DEBIAN_PACKAGES.values()):
        if os.path.isfile(sums):
            with open(sums) as fh:
                record = dict(line.split()[::-1] for line in fh if line.strip())
            want = record.get(os.path.relpath(path, "/"))
            if want and got != want:
                return (f"{os.path.basename(path)} does not match dpkg's md5 record ({sums}): "
                        f"reinstall it with `sudo apt install --reinstall {os.path.basename(sums)[:-8]}`")
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(16)
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            size = struct.unpack("<I", fh.read(4))[0]  # gzip trailer: decompressed size mod 2**32
        kind, ndim = head[2], head[3]
        dims = struct.unpack(f">{ndim}I", head[4:4 + 4 * ndim])
    except (OSError, EOFError, struct.error, IndexError) as e:
        return f"{os.path.basename(path)} is not a gzipped IDX file ({e})"
    if kind != 0x08 or (4 + 4 * ndim + int(np.prod(dims))) % 2**32 != size:
        return f"{os.path.basename(path)}: IDX header {dims} does not match its size {size} (truncated?)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# batches


def num_batches(n: int, batch_size: int) -> int:
    """Batches in one pass over n samples; the last, partial one counts."""
    return -(-n // batch_size)


def batches(split: Split, batch_size: int, *, mean, std, dtype=np.float32, shuffle_seed=None, augment=False,
            crop_padding=4, start=0):
    """Yield (x, y) batches: x dtype N,C,H,W = (u8/255 - mean)/std, y int64 N. The last partial batch is kept.

    shuffle_seed: None = the split's order; else the order is default_rng(shuffle_seed).permutation(n).
    augment: random crop (zero padding crop_padding) + horizontal flip, all drawn for the whole pass up front,
    so start=k (skip the first k batches: resuming mid-epoch) yields exactly the batches an uninterrupted pass
    yields from there. Pass a new shuffle_seed each epoch (e.g. [seed, epoch]) for new crops.
    """
    x, y = split.x, split.y                                                 # uint8 N,C,H,W, int64 N
    n, C = len(y), x.shape[1]
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"batches: dtype must be float32 or float64, got {dtype}")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    nb = num_batches(n, batch_size)
    if not 0 <= start <= nb:
        raise ValueError(f"batches: start={start} is outside 0..{nb} ({n} samples, batch size {batch_size})")
    std = np.asarray(std, dtype=np.float64).reshape(C)
    scale = (1.0 / (255.0 * std)).astype(dtype).reshape(1, C, 1, 1)          # 1,C,1,1
    offset = (-np.asarray(mean, dtype=np.float64).reshape(C) / std).astype(dtype).reshape(1, C, 1, 1)
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    if augment:
        entropy = 0 if shuffle_seed is None else shuffle_seed
        rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(_AUGMENT,)))
        shift = rng.integers(0, 2 * crop_padding + 1, size=(2, n))            # 2,n: dy, dx of each position
        flip = rng.random(n) < 0.5                                            # n
    for b in range(start, nb):
        s = slice(b * batch_size, (b + 1) * batch_size)
        idx = order[s]
        xb = x[idx]                                                           # uint8 N,C,H,W
        if augment:
            xb = crop_flip(xb, shift[0, s], shift[1, s], flip[s], crop_padding)
        out = np.multiply(xb, scale, dtype=dtype)                             # N,C,H,W
        out += offset
        yield out, y[idx]


def crop_flip(x, dy, dx, flip, pad):
    """Sample i: the H×W window at (dy[i], dx[i]) of x[i] zero-padded by pad, mirrored left-right if flip[i]."""
    N, C, H, W = x.shape
    padded = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=x.dtype)     # N,C,H+2p,W+2p
    padded[:, :, pad:pad + H, pad:pad + W] = x
    windows = sliding_window_view(padded, (H, W), axis=(2, 3))              # N,C,2p+1,2p+1,H,W (a view)
    out = windows[np.arange(N), :, dy, dx]                                  # N,C,H,W (one gather)
    out[flip] = out[flip, :, :, ::-1]
    return out
