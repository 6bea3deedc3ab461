"""Data: a torchvision dataset → uint8 arrays in memory → normalized batches made on the fly.

    bundle.py   load_data: the splits, the validation carve, the normalization (DataBundle, Split)
    sources.py  where the files come from (data.root, offline copies, download) and how they are checked
    cache.py    torchvision's arrays kept beside the files: a later run reads them without importing torch
    batches.py  batches: the normalized (and augmented) mini-batches of a split

Dimension letters: N samples, C channels, H,W image size.

    bundle = load_data(cfg.data, seed)          # whole splits as uint8 N,C,H,W + int64 labels
    for x, y in batches(bundle.train, 64, mean=bundle.mean, std=bundle.std, shuffle_seed=[seed, epoch]):
        ...                                     # x float32 N,C,H,W = (u8/255 - mean)/std,  y int64 N

Where the files come from (data.root, data.mirror, Debian's copy, a download) and how they are checked:
sources.py.
"""
from cnnpipe.data.batches import batches, crop_flip, normalize, num_batches
from cnnpipe.data.bundle import DataBundle, Split, channel_stats, load_data, needs_torchvision
from cnnpipe.data.sources import DATASETS, DEBIAN_DIRS, dataset_class, preload_torchvision

__all__ = ["DATASETS", "DEBIAN_DIRS", "DataBundle", "Split", "batches", "channel_stats", "crop_flip",
           "dataset_class", "load_data", "needs_torchvision", "normalize", "num_batches", "preload_torchvision"]
