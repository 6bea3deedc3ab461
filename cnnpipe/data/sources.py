"""Where a dataset's files come from, in this order (the first that works wins):
  1. `data.root`, where torchvision keeps them; torchvision checks CIFAR's files against its md5 sums
     (`data.verify=false` skips that, with a warning);
  2. offline copies: the user's `data.mirror` folder of the original archives, Debian's package folder
     (`/usr/share/datasets/fashion-mnist`), and archives a previous download left in `root`; each archive is
     checked (md5, or dpkg's record for Debian's) and extracted where torchvision expects it;
  3. torchvision's own download (data.download=true), with a short socket timeout;
  4. otherwise a ConfigError that lists every place looked and how to fix it.
New files are written to a staging folder inside `root` and moved into place only when complete.
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

import numpy as np

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


def check_name(name):
    """A ConfigError naming the accepted names when data.name is not one of them."""
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset this pipeline knows. Choose one of "
                          f"{', '.join(DATASETS)} (e.g. `data=fashion_mnist` or `data.name=cifar10`).")


def dataset_class(name):
    """The torchvision dataset class for data.name, or a ConfigError naming the accepted names."""
    check_name(name)
    import torchvision.datasets
    return getattr(torchvision.datasets, DATASETS[name])


def warn_unchecked(name, where):
    log.warning("data.verify=false: the %s files in %s were loaded without torchvision's md5 check; they may not be "
                "the original %s", name, where, DATASETS[name])


def open_splits(name, cls, root, mirror, download, verify=True):
    """(train dataset, test dataset, source) from the first place that works; else a ConfigError."""
    looked = []
    where = _torchvision_folder(cls, root)
    unchecked = not verify and hasattr(cls, "tgz_md5")
    got = _load(_without_md5(cls) if unchecked else cls, root)
    if not isinstance(got, str):
        if unchecked:
            warn_unchecked(name, where)
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
    candidates = []                               # the mirror the user named comes first
    if mirror:
        subs = ["", cls.__name__, name, name.replace("_", "-"), os.path.join(cls.__name__, "raw")]
        if hasattr(cls, "base_folder"):
            subs.append(cls.base_folder)
        found = [os.path.normpath(os.path.join(mirror, s)) for s in dict.fromkeys(subs)
                 if os.path.isdir(os.path.join(mirror, s))]
        candidates += [("mirror", d) for d in found] or [("note", f"mirror {mirror} (data.mirror): no such folder")]
    else:
        candidates.append(("note", "data.mirror: not set"))
    if name in DEBIAN_DIRS:
        candidates.append(("debian package", DEBIAN_DIRS[name]))
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
