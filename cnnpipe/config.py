"""Structured-config schemas: a wrong type or an unknown key fails at composition with Hydra's own message.

Value checks that need shapes (k >= 1, a stack whose spatial size falls below 1, ...) happen when the
model is built (cnnpipe.model.build_model), before any data is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class LayerConf:
    """One entry of a model's layer stack.
    `type`: conv | pool | act | relu | tanh | sigmoid | flatten | dense | dropout.
    Unset fields take the shared defaults (conv.*, pool.*, model.activation)."""
    type: str = MISSING
    filters: Optional[int] = None       # conv
    k: Optional[int] = None             # conv (default conv.k)
    stride: Optional[int] = None        # conv / pool (default conv.stride / pool.stride)
    padding: Optional[Any] = None       # conv: same | valid | int (default conv.padding)
    size: Optional[int] = None          # pool (default pool.size)
    mode: Optional[str] = None          # pool: max | mean (default pool.mode)
    units: Optional[int] = None         # dense
    p: Optional[float] = None           # dropout


@dataclass
class ModelConf:
    name: str = MISSING
    activation: str = "relu"            # what `act` layers are
    init: str = "he"                    # he | glorot
    layers: List[LayerConf] = field(default_factory=list)


@dataclass
class ConvConf:
    k: int = 5
    stride: int = 1
    padding: Any = "same"


@dataclass
class PoolConf:
    mode: str = "max"
    size: int = 2
    stride: int = 2


@dataclass
class BackendConf:
    name: str = "numpy"
    threads: Optional[int] = None       # None: the cores this process was given (cnnpipe/backends/cores.py)
    adapt_threads: bool = True          # numba: fewer threads while another process holds a core (governor.py)


@dataclass
class DataConf:
    name: str = "fashion_mnist"
    root: str = "data"
    download: bool = True
    mirror: Optional[str] = None
    verify: bool = True                 # false: files in data.root and data.mirror load without md5 check
    cache: bool = True                  # keep torchvision's arrays beside the files for the next run (data/cache.py)
    val_size: int = 5000
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    augment: bool = False
    crop_padding: int = 4
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28


@dataclass
class OptimConf:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"          # constant | step | cosine
    step_size: int = 5                  # epochs between ×gamma (schedule=step)
    gamma: float = 0.1
    min_lr: float = 0.0                 # cosine floor
    warmup_steps: int = 0               # linear warmup from lr/warmup to lr, before the schedule
    warmup_epochs: float = 0.0          # ... the same, counted in epochs (one of the two)
    clip_norm: Optional[float] = None   # rescale the gradients when their global L2 norm exceeds this
    clip_value: Optional[float] = None  # clip every gradient entry to [-clip_value, clip_value]


@dataclass
class EarlyStoppingConf:
    patience: Optional[int] = None      # epochs without improvement before stopping (null: never stop early)
    monitor: str = "val_loss"           # a per-epoch metric: val_loss, val_acc, train_loss, train_acc
    mode: str = "auto"                  # min | max | auto (min for *_loss, max otherwise)
    min_delta: float = 0.0              # an improvement smaller than this does not count


@dataclass
class TrainerConf:
    epochs: int = 3
    batch_size: int = 64
    eval_batch_size: int = 1000
    seed: int = 0                       # >= 0
    log_every: int = 50                 # steps between train.log lines / tqdm postfix updates
    max_steps: Optional[int] = None     # stop after this many steps in total (debug)
    progress: bool = True               # tqdm bars
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    test_checkpoint: str = "auto"       # weights the final test uses: best | last | auto (best with a val split)
    profile: bool = False               # time per layer, optimizer, data, hooks each epoch (cnnpipe/profile.py)


@dataclass
class LoggerConf:
    tensorboard: bool = True
    scalar_every: int = 50              # steps between train/ scalars and gradient norms
    image_every: int = 500              # steps between δ-map / activation / filter images
    histogram_every: int = 0            # steps between histograms (0: off)
    confusion_every_epoch: bool = True
    probe_images: int = 1               # fixed test images shown in the image dashboards


@dataclass
class CheckpointConf:
    enabled: bool = True
    every: int = 1                      # epochs between checkpoints/last.npz
    every_steps: Optional[int] = None   # also every N steps
    monitor: Optional[str] = None       # best.npz by this per-epoch metric (higher is better for *_acc, lower for
                                        # *_loss); null: val_acc, or train_loss without a validation split


@dataclass
class SweepConf:
    resume: bool = False                # re-run a multirun into an existing sweep dir: skip finished jobs


@dataclass
class FindLrConf:
    """scripts/find_lr.py, the LR range test: the lr grows exponentially from start to end over `steps` steps."""
    start: float = 1e-5                 # > 0
    end: float = 1.0                    # > start
    steps: int = 200                    # >= 10 (fewer when the loss diverges first)
    diverge: float = 4.0                # stop once the smoothed loss exceeds diverge × its lowest value (> 1)
    smoothing: float = 0.98             # β of the loss's bias-corrected moving average, in [0, 1) (0: the raw loss)


@dataclass
class TrainConf:
    model: ModelConf = MISSING
    conv: ConvConf = field(default_factory=ConvConf)
    pool: PoolConf = field(default_factory=PoolConf)
    backend: BackendConf = field(default_factory=BackendConf)
    data: DataConf = field(default_factory=DataConf)
    optim: OptimConf = field(default_factory=OptimConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    sweep: SweepConf = field(default_factory=SweepConf)
    find_lr: FindLrConf = field(default_factory=FindLrConf)
    dtype: str = "float32"              # float32 | float64
    resume: Optional[str] = None        # a checkpoint .npz or a run directory: continue that run
    init_from: Optional[str] = None     # a checkpoint .npz or a run directory: a new run from its weights
    init_from_strict: bool = True       # every parameter must match by name and shape (false: skip the others)
    init_from_optimizer: bool = False   # also take the optimizer state (momentum, Adam moments)
    optimized_metric: Optional[str] = None   # what train() returns; None: val_acc, or test_acc without validation
    name: str = "train"


def register_configs():
    from omegaconf import OmegaConf

    from cnnpipe.rundir import fresh_dir
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConf)
    OmegaConf.register_new_resolver("fresh_dir", fresh_dir, use_cache=True, replace=True)


def compose_config(overrides: list[str] = (), return_hydra_config: bool = False, config_name: str = "train"):
    """The train config as scripts/train.py composes it (Hydra's compose API, conf/ of this checkout), for
    library use: tests, the benchmark, the LR finder. config_name: another entry config of conf/ (find_lr)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()
