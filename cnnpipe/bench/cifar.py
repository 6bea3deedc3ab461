"""CIFAR-10-shaped data for the benchmark: the real set is not reachable from every machine, and the cost of a step
depends on the shapes (3×32×32, 10 classes), not on the pictures. Written in CIFAR-10's python on-disk format
(cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta), which torchvision's CIFAR10 reads; its md5 sums
are the original set's, so the runs use data.verify=false."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def learnable_images(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """uint8 n,3,32,32 and labels n: class c is an 8×8 square of a class colour at a class place, on noise."""
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 90, (n, 3, 32, 32), dtype=np.uint8)                      # N,C,H,W
    colours = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [230, 40, 230],
                        [40, 230, 230], [230, 230, 230], [140, 90, 40], [90, 140, 230], [230, 140, 90]], np.uint8)
    for c in range(10):
        r, col = 2 + 10 * (c // 4), 2 + 7 * (c % 4)
        x[y == c, :, r:r + 8, col:col + 8] = colours[c][:, None, None]
    return x, y


def write_cifar10(root: Path, n_train: int = 50000, n_test: int = 10000, seed: int = 0) -> Path:
    """root/cifar-10-batches-py with n_train training images in five batches and n_test test images."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n_train, 6).astype(int)
    parts = [(f"data_batch_{i + 1}", bounds[i + 1] - bounds[i]) for i in range(5)] + [("test_batch", n_test)]
    for name, n in parts:
        x, y = learnable_images(n, rng)
        entry = {"batch_label": name, "labels": y.tolist(), "data": x.reshape(n, 3072),    # rows: R, G, B planes
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": int(bounds[1]), "num_vis": 3072}, f)
    return Path(root)
