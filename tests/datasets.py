"""Small files in the datasets' real on-disk formats, for tests: the MNIST family as IDX files (gzipped archives, as
mirrors hold them, or extracted as torchvision keeps them) and CIFAR as pickled batches (extracted, or tarred)."""
import gzip
import os
import pickle
import struct
import tarfile

import numpy as np


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX: two zero bytes, type 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def images(n, c, h, w, seed, ids=True):
    """Real-ish uint8 images: smooth blobs plus noise, a different brightness per channel; the sample index is
    written into the first two pixels so a test can tell which sample went where."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(4, h - 4, (2, n, 1, 1, 1))
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)                  # n,1,H,W
    x = 200 * blob * np.linspace(0.6, 1.0, c)[None, :, None, None] + rng.normal(20, 15, (n, c, h, w))
    x = np.clip(x, 0, 255).astype(np.uint8)                                   # n,C,H,W
    if ids:
        x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x


def write_mnist_family(folder, n_train=300, n_test=100, gz=True, seed=0):
    """The four MNIST-family files in folder (gzipped archives, or extracted as torchvision keeps them)."""
    from torchvision.datasets.utils import calculate_md5  # torchvision on use: conftest imports idx_bytes
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": images(n_train, 1, 28, 28, seed)[:, 0],
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
              "t10k-images-idx3-ubyte": images(n_test, 1, 28, 28, seed + 1)[:, 0],
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    md5s = {}
    for name, a in arrays.items():
        path = os.path.join(folder, name + (".gz" if gz else ""))
        with (gzip.open(path, "wb") if gz else open(path, "wb")) as fh:
            fh.write(idx_bytes(a))
        md5s[os.path.basename(path)] = calculate_md5(path)
    return arrays, md5s


def write_cifar(folder, cls, per_batch=40, n_test=50, seed=0):
    """cifar-10-batches-py / cifar-100-python: pickled dicts with 'data' (n, 3072) rows R..G..B and labels."""
    base = os.path.join(folder, cls.base_folder)
    os.makedirs(base, exist_ok=True)
    rng = np.random.default_rng(seed)
    import torchvision.datasets as tvd
    hundred = cls is tvd.CIFAR100
    k = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    xs, ys = [], []
    files = [f for f, _ in cls.train_list] + [f for f, _ in cls.test_list]
    for i, f in enumerate(files):
        n = (per_batch * (5 if hundred else 1)) if f != files[-1] else n_test
        x = images(n, 3, 32, 32, seed + i, ids=False)
        y = rng.integers(0, k, n).tolist()
        entry = {"data": x.reshape(n, 3072), label_key: y, "filenames": [f"img{j}.png" for j in range(n)]}
        if hundred:
            entry["coarse_labels"] = [v // 5 for v in y]
        with open(os.path.join(base, f), "wb") as fh:
            pickle.dump(entry, fh)
        xs.append(x), ys.append(np.array(y))
    names = [f"class{j}" for j in range(k)]
    meta = {cls.meta["key"]: names} if not hundred else {"fine_label_names": names, "coarse_label_names": []}
    with open(os.path.join(base, cls.meta["filename"]), "wb") as fh:
        pickle.dump(meta, fh)
    train = (np.concatenate(xs[:-1]), np.concatenate(ys[:-1]))
    return train, (xs[-1], ys[-1]), names


def tar_cifar(src_folder, cls, dest_folder):
    os.makedirs(dest_folder, exist_ok=True)
    path = os.path.join(dest_folder, cls.filename)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(src_folder, cls.base_folder), arcname=cls.base_folder)
    return path
