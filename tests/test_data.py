"""cnnpipe.data: torchvision loaders on small files in the real on-disk formats, and the batch iterator.

The MNIST family is written as IDX files (gzipped archives in mirrors, extracted ones in root/<Class>/raw);
CIFAR as pickled batches. Where torchvision checks md5 sums, only the expected sums are replaced by those of
the test's own files; torchvision's real checking, extraction and reading code runs.
"""
import functools
import gzip
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torchvision.datasets as tvd
from datasets import idx_bytes, images, tar_cifar, write_cifar, write_mnist_family
from torchvision.datasets.utils import calculate_md5

from cnnpipe import ConfigError
from cnnpipe import data as D
from cnnpipe.data import sources

IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
MNIST_FAMILY = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


# ---------------------------------------------------------------------------------------------------------------
# the real formats (written by tests/datasets.py) and torchvision's md5 sums for them


def sample_ids(x):
    return x[:, 0, 0, 0].astype(np.int64) + 256 * x[:, 0, 0, 1].astype(np.int64)


def patch_resources(monkeypatch, cls, md5s):
    """Replace only the expected md5 sums in the class's resource list by those of the test's archives."""
    monkeypatch.setattr(cls, "resources", [(f, md5s[f]) for f, _ in cls.resources])


def patch_cifar_md5s(monkeypatch, cls, folder, tgz=None):
    """Replace only the expected md5 sums (batches, meta, and the tarball's) by those of the test's files."""
    base = os.path.join(folder, cls.base_folder)
    md5 = lambda f: calculate_md5(os.path.join(base, f))  # noqa: E731
    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    if tgz:
        monkeypatch.setattr(cls, "tgz_md5", calculate_md5(tgz))


def cfg(name, root, **kw):
    return {"name": name, "root": str(root), "download": False, "mirror": None, "val_size": 50,
            "limit_train": None, "limit_test": None, "augment": False, "crop_padding": 4, **kw}


@pytest.fixture(autouse=True)
def no_debian(monkeypatch):
    """Tests see no Debian package unless they install a fake one (the real-package test restores it)."""
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion_mnist": "/nonexistent/datasets/fashion-mnist"})


def leftovers(root):
    return [f for f in os.listdir(root) if f.startswith(".cnnpipe-staging")] if os.path.isdir(root) else []


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_unknown_name_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.name='svhn'.*mnist, fashion_mnist, kmnist, cifar10, cifar100"):
        D.load_data(cfg("svhn", tmp_path), 0)


@pytest.mark.parametrize("name", list(MNIST_FAMILY))
def test_mnist_family_from_root(tmp_path, name):
    """Extracted IDX files where torchvision keeps them: root/<Class>/raw/."""
    cls_name = MNIST_FAMILY[name]
    arrays, _ = write_mnist_family(tmp_path / cls_name / "raw", gz=False)
    b = D.load_data(cfg(name, tmp_path, val_size=0), 0)
    assert b.name == name and b.source == str(tmp_path / cls_name / "raw")
    assert b.train.x.shape == (300, 1, 28, 28) and b.test.x.shape == (100, 1, 28, 28) and b.val is None
    assert b.train.x.dtype == np.uint8 and b.train.y.dtype == np.int64 and b.train.x.flags.c_contiguous
    np.testing.assert_array_equal(b.train.x[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(b.test.y, arrays["t10k-labels-idx1-ubyte"])
    assert b.classes == list(getattr(tvd, cls_name).classes) and b.num_classes == 10 and b.in_shape == (1, 28, 28)
    x = b.train.x / 255.0
    np.testing.assert_allclose(b.mean, [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(b.std, [x.std()], rtol=1e-10)


@pytest.mark.parametrize("cls", [tvd.CIFAR10, tvd.CIFAR100])
def test_cifar_from_root(tmp_path, monkeypatch, cls):
    (xtr, ytr), (xte, yte), names = write_cifar(tmp_path, cls)
    patch_cifar_md5s(monkeypatch, cls, tmp_path)
    name = cls.__name__.lower()
    b = D.load_data(cfg(name, tmp_path, val_size=0), 0)
    assert b.source == str(tmp_path / cls.base_folder) and b.classes == names
    assert b.train.x.shape == (200, 3, 32, 32) and b.in_shape == (3, 32, 32) and b.train.x.flags.c_contiguous
    np.testing.assert_array_equal(b.train.x, xtr)        # CIFAR rows are R..G..B planes: N,C,H,W as written
    np.testing.assert_array_equal(b.train.y, ytr)
    np.testing.assert_array_equal(b.test.x, xte)
    np.testing.assert_array_equal(b.test.y, yte)
    np.testing.assert_allclose(b.mean, (xtr / 255.0).mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(b.std, (xtr / 255.0).std(axis=(0, 2, 3)), rtol=1e-10)


def test_cifar_corrupt_file_in_root_is_reported(tmp_path, monkeypatch):
    write_cifar(tmp_path, tvd.CIFAR10)
    patch_cifar_md5s(monkeypatch, tvd.CIFAR10, tmp_path)
    with open(tmp_path / tvd.CIFAR10.base_folder / "data_batch_3", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ConfigError, match="cifar-10-batches-py \\(data.root\\): not found or corrupted"):
        D.load_data(cfg("cifar10", tmp_path), 0)


def test_mirror_mnist_family_md5_checked_then_extracted(tmp_path, monkeypatch):
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    arrays, md5s = write_mnist_family(mirror, gz=True)
    # torchvision's own md5 sums: the fake archives are rejected, by name
    with pytest.raises(ConfigError) as e:
        D.load_data(cfg("kmnist", root, mirror=str(mirror)), 0)
    msg = str(e.value)
    assert f"mirror {mirror}: train-images-idx3-ubyte.gz has md5 {md5s['train-images-idx3-ubyte.gz']}" in msg
    assert tvd.KMNIST.resources[0][1] in msg and "fetch it again" in msg
    assert not (root / "KMNIST").exists() and leftovers(root) == []
    # with the expected sums set to these files', the real extraction and loading run
    patch_resources(monkeypatch, tvd.KMNIST, md5s)
    b = D.load_data(cfg("kmnist", root, mirror=str(mirror), val_size=0), 0)
    assert b.source == f"mirror {mirror}"
    assert sorted(os.listdir(root / "KMNIST" / "raw")) == sorted(IDX_FILES) and leftovers(root) == []
    np.testing.assert_array_equal(b.train.x[:, 0], arrays["train-images-idx3-ubyte"])
    # the next run finds them in root
    assert D.load_data(cfg("kmnist", root), 0).source.startswith(str(root / "KMNIST" / "raw"))


def test_mirror_names_the_dataset_a_wrong_file_belongs_to(tmp_path, monkeypatch):
    """MNIST's archives in a mirror asked for Fashion-MNIST: the message says whose files they are."""
    _, md5s = write_mnist_family(tmp_path / "m", gz=True)
    patch_resources(monkeypatch, tvd.MNIST, md5s)
    with pytest.raises(ConfigError, match="it is MNIST's train-images-idx3-ubyte.gz"):
        D.load_data(cfg("fashion_mnist", tmp_path / "root", mirror=str(tmp_path / "m")), 0)


def test_mirror_subfolder_and_missing_file(tmp_path, monkeypatch):
    _, md5s = write_mnist_family(tmp_path / "m" / "MNIST", gz=True)
    os.remove(tmp_path / "m" / "MNIST" / "t10k-labels-idx1-ubyte.gz")
    patch_resources(monkeypatch, tvd.MNIST, {**md5s, "t10k-labels-idx1-ubyte.gz": "0" * 32})
    with pytest.raises(ConfigError, match="MNIST: missing t10k-labels-idx1-ubyte.gz"):
        D.load_data(cfg("mnist", tmp_path / "root", mirror=str(tmp_path / "m")), 0)


def test_archives_left_in_root_are_extracted(tmp_path, monkeypatch):
    """A download that kept the .gz files but lost the extracted ones is repaired offline."""
    raw = tmp_path / "MNIST" / "raw"
    _, md5s = write_mnist_family(raw, gz=True)
    patch_resources(monkeypatch, tvd.MNIST, md5s)
    b = D.load_data(cfg("mnist", tmp_path), 0)
    assert b.source == f"archives in data.root {raw}" and len(b.train) + len(b.val) == 300


@pytest.mark.parametrize("cls", [tvd.CIFAR10, tvd.CIFAR100])
def test_mirror_cifar_tarball(tmp_path, monkeypatch, cls):
    (xtr, _), _, _ = write_cifar(tmp_path / "src", cls)
    tgz = tar_cifar(tmp_path / "src", cls, tmp_path / "mirror")
    name, root = cls.__name__.lower(), tmp_path / "root"
    patch_cifar_md5s(monkeypatch, cls, tmp_path / "src")   # the batches' sums; the tarball's stays torchvision's
    with pytest.raises(ConfigError, match=f"{cls.filename} has md5 {calculate_md5(tgz)}, not torchvision's"):
        D.load_data(cfg(name, root, mirror=str(tmp_path / "mirror")), 0)
    assert not (root / cls.base_folder).exists() and leftovers(root) == []
    monkeypatch.setattr(cls, "tgz_md5", calculate_md5(tgz))
    b = D.load_data(cfg(name, root, mirror=str(tmp_path / "mirror"), val_size=0), 0)
    assert b.source == f"mirror {tmp_path / 'mirror'}" and leftovers(root) == []
    np.testing.assert_array_equal(b.train.x, xtr)


def test_mirror_cifar_extracted_folder(tmp_path, monkeypatch):
    (xtr, _), _, _ = write_cifar(tmp_path / "mirror", tvd.CIFAR10)
    with pytest.raises(ConfigError, match="data_batch_1 has md5 .* not torchvision's"):
        D.load_data(cfg("cifar10", tmp_path / "root", mirror=str(tmp_path / "mirror")), 0)
    patch_cifar_md5s(monkeypatch, tvd.CIFAR10, tmp_path / "mirror")
    b = D.load_data(cfg("cifar10", tmp_path / "root", mirror=str(tmp_path / "mirror"), val_size=0), 0)
    assert b.source == f"mirror {tmp_path / 'mirror' / 'cifar-10-batches-py'}"
    np.testing.assert_array_equal(b.train.x, xtr)


@pytest.mark.parametrize("kind", ["kmnist", "cifar10 tarball", "cifar100 folder"])
def test_mirror_of_own_archives_loads_with_verify_false(tmp_path, caplog, kind):
    """Archives a user made in the original formats (their md5 sums are not torchvision's): refused by default;
    data.verify=false extracts and loads them, warns naming the mirror, and still says which file is missing."""
    name, how = (kind.split() + [""])[:2]
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    if name == "kmnist":
        arrays, _ = write_mnist_family(mirror, gz=True)
        xtr, where = arrays["train-images-idx3-ubyte"][:, None], mirror
    else:
        cls = getattr(tvd, name.upper())
        (xtr, _), _, _ = write_cifar(tmp_path / "src" if how == "tarball" else mirror, cls)
        if how == "tarball":
            tar_cifar(tmp_path / "src", cls, mirror)
        where = mirror if how == "tarball" else mirror / cls.base_folder
    with pytest.raises(ConfigError, match=f"mirror {re.escape(str(where))}: .* has md5 .*, not torchvision's"):
        D.load_data(cfg(name, root, mirror=str(mirror)), 0)
    assert leftovers(root) == []
    with caplog.at_level(logging.WARNING, logger="cnnpipe.data"):
        b = D.load_data(cfg(name, root, mirror=str(mirror), val_size=0, verify=False), 0)
    assert b.source == f"mirror {where}" and leftovers(root) == []
    np.testing.assert_array_equal(b.train.x, xtr)
    assert f"data.verify=false: the {name} archives in {where} were used without torchvision's md5 check" \
        in caplog.text
    if how != "tarball":                                     # a file of the set missing is still named
        first = sorted(os.listdir(where))[0]
        os.remove(where / first)
        with pytest.raises(ConfigError, match=f"mirror {re.escape(str(where))}: missing {first}"):
            D.load_data(cfg(name, tmp_path / "root2", mirror=str(mirror), verify=False), 0)


def test_debian_folder(tmp_path, monkeypatch):
    """Debian re-stamps the gzip headers, so torchvision's md5 cannot match: dpkg's record and the IDX
    header-vs-size check are used instead."""
    deb, root = tmp_path / "deb", tmp_path / "root"
    arrays, md5s = write_mnist_family(deb, gz=True)
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion_mnist": str(deb)})
    monkeypatch.setattr(sources, "DPKG_INFO", str(tmp_path / "dpkg"))
    b = D.load_data(cfg("fashion_mnist", root, val_size=0), 0)
    assert b.source == f"debian package {deb}"
    np.testing.assert_array_equal(b.test.x[:, 0], arrays["t10k-images-idx3-ubyte"])
    # a file that differs from dpkg's record is refused, with the reinstall command
    os.makedirs(tmp_path / "dpkg")
    with open(tmp_path / "dpkg" / "dataset-fashion-mnist.md5sums", "w") as fh:
        for f, m in md5s.items():
            fh.write(f"{'0' * 32 if f.startswith('t10k-labels') else m}  {os.path.relpath(deb / f, '/')}\n")
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.gz does not match dpkg's md5 record.*"
                                          "apt install --reinstall dataset-fashion-mnist"):
        D.load_data(cfg("fashion_mnist", tmp_path / "root2"), 0)
    # a truncated archive is refused by the size check
    os.remove(tmp_path / "dpkg" / "dataset-fashion-mnist.md5sums")
    with gzip.open(deb / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(idx_bytes(arrays["train-images-idx3-ubyte"])[:-784])
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.gz: IDX header \\(300, 28, 28\\) does not match"):
        D.load_data(cfg("fashion_mnist", tmp_path / "root3"), 0)


def test_a_mirror_the_user_names_comes_before_debians_copy(tmp_path, monkeypatch):
    """Both a Debian folder and data.mirror hold Fashion-MNIST: the mirror the user named is used."""
    deb, mirror = tmp_path / "deb", tmp_path / "mirror"
    write_mnist_family(deb, gz=True)
    arrays, md5s = write_mnist_family(mirror, gz=True, seed=7)
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion_mnist": str(deb)})
    monkeypatch.setattr(sources, "DPKG_INFO", str(tmp_path / "dpkg"))
    patch_resources(monkeypatch, tvd.FashionMNIST, md5s)
    b = D.load_data(cfg("fashion_mnist", tmp_path / "root", mirror=str(mirror), val_size=0), 0)
    assert b.source == f"mirror {mirror}"
    np.testing.assert_array_equal(b.test.x[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert D.load_data(cfg("fashion_mnist", tmp_path / "root2", val_size=0), 0).source == f"debian package {deb}"


REAL_DEBIAN = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(REAL_DEBIAN), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion_mnist": REAL_DEBIAN})
    b = D.load_data(cfg("fashion_mnist", tmp_path, val_size=0), 0)
    assert b.source == f"debian package {REAL_DEBIAN}"
    assert b.train.x.shape == (60000, 1, 28, 28) and b.test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(b.train.y).tolist() == [6000] * 10 and np.bincount(b.test.y).tolist() == [1000] * 10
    assert b.classes[0] == "T-shirt/top" and abs(b.mean[0] - 0.2860) < 1e-3 and abs(b.std[0] - 0.3530) < 1e-3


def test_nothing_found_offline_lists_every_place(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as e:
        D.load_data(cfg("fashion_mnist", root, mirror=str(tmp_path / "nowhere")), 0)
    msg = str(e.value)
    for part in [f"{root / 'FashionMNIST' / 'raw'} (data.root): not found",
                 "debian package /nonexistent/datasets/fashion-mnist: not installed",
                 f"mirror {tmp_path / 'nowhere'} (data.mirror): no such folder",
                 "not tried (data.download=false)",
                 "sudo apt install dataset-fashion-mnist", "data.mirror=/that/folder", "data.root=",
                 "train-images-idx3-ubyte.gz", "data.download=true"]:
        assert part in msg, part
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="data.mirror: not set.*cifar-10-python.tar.gz"):
        D.load_data(cfg("cifar10", root), 0)
    assert leftovers(root) == []


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_through_torchvision(tmp_path, monkeypatch):
    """torchvision's real downloader, from a local HTTP server: files land in root, nothing else stays."""
    served, root = tmp_path / "served", tmp_path / "root"
    arrays, md5s = write_mnist_family(served, gz=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        monkeypatch.setattr(tvd.MNIST, "mirrors", [url])
        patch_resources(monkeypatch, tvd.MNIST, md5s)
        b = D.load_data(cfg("mnist", root, download=True, val_size=0), 0)
    finally:
        server.shutdown()
        server.server_close()
    assert b.source == f"downloaded from {url}" and leftovers(root) == []
    np.testing.assert_array_equal(b.train.x[:, 0], arrays["train-images-idx3-ubyte"])
    assert set(IDX_FILES) <= set(os.listdir(root / "MNIST" / "raw"))


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tvd.MNIST, "mirrors", ["http://127.0.0.1:1/"])   # nothing listens on port 1
    with pytest.raises(ConfigError, match="download from http://127.0.0.1:1/: failed .*Connection refused"):
        D.load_data(cfg("mnist", tmp_path, download=True), 0)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# validation carve and limits


@pytest.fixture
def mnist_root(tmp_path):
    write_mnist_family(tmp_path / "MNIST" / "raw", gz=False)
    return tmp_path


def test_val_carve_sizes_disjoint_and_seeded(mnist_root):
    b = D.load_data(cfg("mnist", mnist_root, val_size=70), seed=3)
    tr, va = sample_ids(b.train.x), sample_ids(b.val.x)
    assert len(tr) == 230 and len(va) == 70 and len(b.test) == 100
    assert set(tr).isdisjoint(va) and sorted(np.concatenate([tr, va])) == list(range(300))
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()            # the files' order is kept
    same = D.load_data(cfg("mnist", mnist_root, val_size=70), seed=3)
    other = D.load_data(cfg("mnist", mnist_root, val_size=70), seed=4)
    np.testing.assert_array_equal(sample_ids(same.val.x), va)
    assert set(sample_ids(other.val.x)) != set(va)
    # labels travel with their images
    full = D.load_data(cfg("mnist", mnist_root, val_size=0), 0)
    np.testing.assert_array_equal(b.val.y, full.train.y[va])


def test_limits_apply_after_the_carve(mnist_root):
    ref = D.load_data(cfg("mnist", mnist_root, val_size=70), seed=3)
    b = D.load_data(cfg("mnist", mnist_root, val_size=70, limit_train=40, limit_test=25), seed=3)
    np.testing.assert_array_equal(b.val.x, ref.val.x)                      # the carve does not move
    assert len(b.train) == 40 and set(sample_ids(b.train.x)) <= set(sample_ids(ref.train.x))
    np.testing.assert_array_equal(b.test.x, ref.test.x[:25])
    big = D.load_data(cfg("mnist", mnist_root, val_size=0, limit_train=10_000, limit_test=10_000), 0)
    assert len(big.train) == 300 and len(big.test) == 100


@pytest.mark.parametrize("bad, match", [({"val_size": 300}, "data.val_size=300 leaves no training data"),
                                        ({"val_size": -1}, "data.val_size=-1 must be an integer >= 0"),
                                        ({"limit_train": 0}, "data.limit_train=0 must be an integer >= 1 or null"),
                                        ({"crop_padding": 1.5}, "data.crop_padding=1.5 must be an integer")])
def test_bad_sizes_are_config_errors(mnist_root, bad, match):
    with pytest.raises(ConfigError, match=match):
        D.load_data(cfg("mnist", mnist_root, **bad), 0)


def test_dictconfig_and_defaults(mnist_root):
    from omegaconf import OmegaConf
    node = OmegaConf.create({"name": "mnist", "root": str(mnist_root), "download": False})
    with pytest.raises(ConfigError, match="data.val_size=5000 leaves no training data"):  # the default
        D.load_data(node, 0)
    node.val_size, node.limit_test = 10, None
    b = D.load_data(node, 0)
    assert (len(b.train), len(b.val), len(b.test), b.augment) == (290, 10, 100, False)


# ---------------------------------------------------------------------------------------------------------------
# batches


def test_num_batches():
    assert [D.num_batches(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_normalization(dtype, tol):
    x = images(500, 3, 32, 32, 0, ids=False)
    split = D.Split(x, np.arange(500, dtype=np.int64) % 10)
    mean, std = D.channel_stats(x)
    out = list(D.batches(split, 64, mean=mean, std=std, dtype=dtype))
    assert [len(b[0]) for b in out] == [64] * 7 + [52]                      # the partial batch is kept
    xs = np.concatenate([b[0] for b in out])
    assert all(b[0].dtype == dtype and b[0].flags.c_contiguous and b[1].dtype == np.int64 for b in out)
    np.testing.assert_allclose(xs.mean(axis=(0, 2, 3), dtype=np.float64), 0, atol=tol)
    np.testing.assert_allclose(xs.std(axis=(0, 2, 3), dtype=np.float64), 1, atol=tol * 10)
    want = (x / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(xs, want, rtol=tol, atol=tol)


def test_shuffle_is_deterministic_and_covers_each_sample_once():
    x = images(103, 1, 8, 8, 0)
    split = D.Split(x, np.arange(103, dtype=np.int64))
    kw = dict(mean=[0.5], std=[0.25])
    ys = lambda seed: np.concatenate([y for _, y in D.batches(split, 10, shuffle_seed=seed, **kw)])  # noqa: E731
    np.testing.assert_array_equal(ys(None), np.arange(103))
    np.testing.assert_array_equal(ys([1, 0]), np.random.default_rng([1, 0]).permutation(103))
    np.testing.assert_array_equal(ys([1, 0]), ys([1, 0]))
    assert not np.array_equal(ys([1, 0]), ys([1, 1])) and sorted(ys([1, 1])) == list(range(103))
    for xb, yb in D.batches(split, 10, shuffle_seed=[1, 0], **kw):        # images travel with their labels
        np.testing.assert_array_equal(sample_ids(np.round((xb * 0.25 + 0.5) * 255).astype(np.uint8)), yb)


@pytest.mark.parametrize("augment", [False, True])
def test_start_resumes_exactly(augment):
    x = images(90, 3, 12, 12, 1, ids=False)
    split = D.Split(x, np.arange(90, dtype=np.int64))
    kw = dict(mean=[0.3] * 3, std=[0.2] * 3, shuffle_seed=[7, 2], augment=augment, crop_padding=2)
    full = list(D.batches(split, 16, **kw))
    for k in (0, 1, 3, 5, 6):
        rest = list(D.batches(split, 16, start=k, **kw))
        assert len(rest) == len(full) - k
        for (a, ya), (b, yb) in zip(full[k:], rest):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ValueError, match="start=7"):
        next(D.batches(split, 16, start=7, **kw))


def test_augmentation_is_crop_and_flip_of_the_padded_image():
    x = images(40, 3, 10, 10, 2, ids=False)
    split = D.Split(x, np.arange(40, dtype=np.int64))
    p = 2
    got = np.concatenate([xb for xb, _ in D.batches(split, 16, mean=[0] * 3, std=[1 / 255] * 3, dtype=np.float64,
                                                    augment=True, crop_padding=p, shuffle_seed=[0, 0])])
    ys = np.concatenate([yb for _, yb in D.batches(split, 16, mean=[0] * 3, std=[1 / 255] * 3,
                                                   shuffle_seed=[0, 0])])
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    found = []
    for img, i in zip(got, ys):
        matches = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)
                   if np.array_equal(img, (lambda w: w[..., ::-1] if f else w)(padded[i, :, dy:dy + 10, dx:dx + 10]))]
        assert matches, f"sample {i} is not a crop/flip of its padded image"
        found.append(matches[0])
    dy, dx, f = np.array(found).T
    assert 0 < f.sum() < 40 and len(set(zip(dy, dx))) > 5                  # both flips, many offsets
    # another epoch (shuffle_seed) draws other crops for the same samples
    kw = dict(mean=[0] * 3, std=[1 / 255] * 3, dtype=np.float64, crop_padding=p, shuffle_seed=[0, 1])
    got1 = np.concatenate([xb for xb, _ in D.batches(split, 16, augment=True, **kw)])
    ys1 = np.concatenate([yb for _, yb in D.batches(split, 16, **kw)])
    assert not np.array_equal(got[np.argsort(ys)], got1[np.argsort(ys1)])


def test_augmentation_only_changes_cifar(tmp_path, monkeypatch, caplog):
    write_mnist_family(tmp_path / "MNIST" / "raw", gz=False)
    write_cifar(tmp_path, tvd.CIFAR10)
    patch_cifar_md5s(monkeypatch, tvd.CIFAR10, tmp_path)
    with caplog.at_level(logging.WARNING, logger="cnnpipe.data"):
        m = D.load_data(cfg("mnist", tmp_path, augment=True), 0)
    assert m.augment is False and "data.augment=true is ignored for mnist" in caplog.text
    c = D.load_data(cfg("cifar10", tmp_path, augment=True, crop_padding=3), 0)
    assert c.augment is True and c.crop_padding == 3
    for b, changed in ((m, False), (c, True)):
        kw = dict(mean=b.mean, std=b.std, shuffle_seed=[0, 0])
        plain = np.concatenate([xb for xb, _ in D.batches(b.train, 32, **kw)])
        aug = np.concatenate([xb for xb, _ in D.batches(b.train, 32, augment=b.augment,
                                                        crop_padding=b.crop_padding, **kw)])
        assert (not np.array_equal(plain, aug)) == changed


def test_synthetic_cifar_refused_unless_verify_false(tmp_path):
    """A CIFAR-format folder that is not the original (md5 sums differ) is refused by default; data.verify=false
    trains on it through scripts/train.py and says so in train.log, naming the folder."""
    from conftest import run_script, tiny_overrides
    write_cifar(tmp_path / "root", tvd.CIFAR10)
    folder = tmp_path / "root" / tvd.CIFAR10.base_folder
    args = [*tiny_overrides(tmp_path / "root"), "data=cifar10", "data.val_size=0"]
    r = run_script("train.py", *args, f"hydra.run.dir={tmp_path / 'refused'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"{folder} (data.root): not found or corrupted" in err, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = run_script("train.py", *args, "data.verify=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"data.verify=false: the cifar10 files in {folder} were loaded without torchvision's md5 check" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "cifar10" and metrics["steps"] == 200 // 32 + 1


# ---------------------------------------------------------------------------------------------------------------
# the cache of torchvision's arrays

def test_cache_folders_are_torchvisions():
    from cnnpipe.data import cache
    assert cache.FOLDERS.keys() == sources.DATASETS.keys()
    for name, folder in cache.FOLDERS.items():
        cls = getattr(tvd, sources.DATASETS[name])
        assert sources._torchvision_folder(cls, "/r") == f"/r/{folder}", name


def test_a_second_load_reads_the_cache_without_torch_and_gives_the_same_arrays(tmp_path):
    """First load: torchvision (and the cache is written); second load, in a fresh process: the same arrays, and
    neither torch nor torchvision imported."""
    write_mnist_family(tmp_path / "FashionMNIST" / "raw", gz=False)
    first = D.load_data(cfg("fashion_mnist", tmp_path), 3)
    assert first.source == str(tmp_path / "FashionMNIST" / "raw")
    assert len(list((tmp_path / ".cnnpipe-cache").glob("fashion_mnist-*.npz"))) == 1
    code = ("import sys, json, numpy as np; from cnnpipe import data as D; "
            f"b = D.load_data({cfg('fashion_mnist', tmp_path)!r}, 3); "
            "np.savez(sys.argv[1], x=b.train.x, y=b.train.y, vx=b.val.x, tx=b.test.x, ty=b.test.y); "
            "print(json.dumps([b.source, b.classes, 'torch' in sys.modules, 'torchvision' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "got.npz")], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    source, classes, torch_loaded, torchvision_loaded = json.loads(out.strip().splitlines()[-1])
    assert "arrays cached in" in source and classes == first.classes
    assert not torch_loaded and not torchvision_loaded
    with np.load(tmp_path / "got.npz") as got:
        for key, ref in {"x": first.train.x, "y": first.train.y, "vx": first.val.x, "tx": first.test.x,
                         "ty": first.test.y}.items():
            np.testing.assert_array_equal(got[key], ref)


def test_a_changed_file_is_loaded_anew_and_the_stale_cache_goes(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_family(folder, gz=False, seed=0)
    a = D.load_data(cfg("mnist", tmp_path, val_size=0), 0)
    stale = list((tmp_path / ".cnnpipe-cache").glob("mnist-*.npz"))
    arrays, _ = write_mnist_family(folder, gz=False, seed=1)                  # other images, same names
    b = D.load_data(cfg("mnist", tmp_path, val_size=0), 0)
    assert b.source == str(folder)                                           # through torchvision again
    np.testing.assert_array_equal(b.train.x[:, 0], arrays["train-images-idx3-ubyte"])
    assert not np.array_equal(a.train.x, b.train.x)
    fresh = list((tmp_path / ".cnnpipe-cache").glob("mnist-*.npz"))
    assert len(fresh) == 1 and fresh != stale


def test_cache_false_neither_reads_nor_writes_it(tmp_path):
    write_mnist_family(tmp_path / "KMNIST" / "raw", gz=False)
    D.load_data(cfg("kmnist", tmp_path, cache=False), 0)
    assert not (tmp_path / ".cnnpipe-cache").exists()
    D.load_data(cfg("kmnist", tmp_path), 0)                                   # writes it
    assert len(list((tmp_path / ".cnnpipe-cache").glob("kmnist-*.npz"))) == 1
    b = D.load_data(cfg("kmnist", tmp_path, cache=False), 0)
    assert b.source == str(tmp_path / "KMNIST" / "raw")


def test_a_cache_that_cannot_be_written_leaves_the_load_as_it_is(tmp_path):
    """(A file where the cache folder would go: what a read-only data.root amounts to, even for root.)"""
    write_mnist_family(tmp_path / "MNIST" / "raw", gz=False)
    (tmp_path / ".cnnpipe-cache").write_text("not a folder")
    for _ in range(2):
        b = D.load_data(cfg("mnist", tmp_path), 0)
        assert b.train.x.shape[0] == 250 and b.source == str(tmp_path / "MNIST" / "raw")


def test_an_unverified_cache_never_serves_a_verified_load(tmp_path, caplog):
    """A synthetic CIFAR folder loaded with verify=false is cached under that setting; with verify=true the md5
    check still refuses it, and a cached verify=false load still says it was not checked."""
    write_cifar(tmp_path, tvd.CIFAR10)
    folder = tmp_path / tvd.CIFAR10.base_folder
    D.load_data(cfg("cifar10", tmp_path, val_size=0, verify=False), 0)
    with pytest.raises(ConfigError, match="not found or corrupted"):
        D.load_data(cfg("cifar10", tmp_path, val_size=0, verify=True), 0)
    with caplog.at_level(logging.WARNING):
        b = D.load_data(cfg("cifar10", tmp_path, val_size=0, verify=False), 0)
    assert "arrays cached in" in b.source
    assert f"data.verify=false: the cifar10 files in {folder} were loaded without torchvision's md5 check" \
        in caplog.text
