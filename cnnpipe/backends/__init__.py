"""One place decides the backend; layers receive the backend object and never branch on it.

Contract (DESIGN.md), on C-contiguous float32/float64 arrays, output dtype follows input:

    y, cache   = B.conv2d_forward(x, w, b, stride=1, pad=0)          # x N,C,H,W  w F,C,K,K  b F
    dx, dw, db = B.conv2d_backward(dy, cache)                        # rules 4 (without h'), 5, 6
    y, cache   = B.pool2d_forward(x, size=2, stride=2, mode="max")   # "max" | "mean"
    dx         = B.pool2d_backward(dy, cache)                        # rules 2, 3

Beyond DESIGN.md, so that the numba backend owns every compute thread of a step: ReLU, the dense layers' product
and the optimizers' element-wise updates (numpy spells them out; numba splits or fuses them):

    y          = B.relu_forward(x)                                   # max(x, 0)
    dx         = B.relu_backward(delta, y)                           # rule 7: δ where y > 0
    out        = B.matmul(a, b)                                      # a @ b
    B.sgd_update(p, g, v, lr, momentum, nesterov, weight_decay, first)   # in place, PyTorch's formula
    B.adam_update(p, g, m, v, lr, b1, b2, eps, weight_decay, t)          # in place, PyTorch's formula

`Backend` states the contract for type checkers and readers; every module in BACKENDS implements it.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Protocol

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.backends.cores import given_cores


class Backend(Protocol):
    """The kernels a layer calls (a backend is a module with these functions)."""

    def conv2d_forward(self, x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1,
                       pad: int = 0) -> tuple[np.ndarray, Any]: ...           # y N,F,Ho,Wo, cache

    def conv2d_backward(self, dy: np.ndarray, cache: Any, need_dx: bool = True
                        ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]: ...   # dx, dW, db (rules 4-6)

    def pool2d_forward(self, x: np.ndarray, size: int = 2, stride: int = 2,
                       mode: str = "max") -> tuple[np.ndarray, Any]: ...      # y N,C,Ho,Wo, cache

    def pool2d_backward(self, dy: np.ndarray, cache: Any) -> np.ndarray: ...  # dx N,C,H,W (rules 2, 3)

    def relu_forward(self, x: np.ndarray) -> np.ndarray: ...

    def relu_backward(self, delta: np.ndarray, y: np.ndarray) -> np.ndarray: ...

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...

    def sgd_update(self, p: np.ndarray, g: np.ndarray, v: np.ndarray | None, lr: float, momentum: float = 0.0,
                   nesterov: bool = False, weight_decay: float = 0.0, first: bool = False) -> None: ...

    def adam_update(self, p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, b1: float,
                    b2: float, eps: float, weight_decay: float, t: int) -> None: ...

BACKENDS = {"numpy": "cnnpipe.backends.numpy_backend", "numba": "cnnpipe.backends.numba",
            "reference": "cnnpipe.backends.reference"}


def get_backend(name: str) -> Backend:
    """Return the backend module called `name`; a clear ConfigError for unknown or unavailable."""
    if name not in BACKENDS:
        raise ConfigError(f"Unknown backend '{name}'. Available backends: {', '.join(BACKENDS)}. "
                          f"Choose one with backend=<name>, e.g. backend=numpy.")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise ConfigError(f"Backend '{name}' cannot be used: {e}. Install it (pip install numba) "
                          f"or choose another backend: {', '.join(BACKENDS)}.") from None


def import_numba():
    """Import numba with its threading layer chosen before its worker threads start (they start at the first
    numba.set_num_threads or parallel kernel, and the layer cannot change after that). Unless
    NUMBA_THREADING_LAYER is set: OpenMP first, then workqueue (TBB last). Every parallel step of the numba
    backend runs in numba's threads (the GEMMs too, as single-threaded BLAS inside the parallel regions), so
    OpenMP workers that spin briefly between regions take no core from anyone and hand work over at once, where
    workqueue's threads poll with sleeps (figures: docs/numba.md)."""
    import numba
    from numba.np.ufunc import parallel
    if "NUMBA_THREADING_LAYER" not in os.environ and not parallel._is_initialized:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
        numba.config.THREADING_LAYER = "default"
    return numba


def set_threads(n: int | None, backend: str | None = None) -> int:
    """Limit the compute threads to n (None: the cores this process was given, see cores.given_cores). Returns n.

    numpy backend (or None): BLAS and numba (if loaded) get n threads.
    numba backend: numba gets n threads and BLAS one. Its kernels run every GEMM (conv and dense) inside
    numba's parallel regions, each thread calling single-threaded BLAS; a multi-threaded OpenBLAS call in
    between would leave OpenBLAS workers spinning on the cores the next numba region needs (docs/numba.md)."""
    if backend == "numba":
        get_backend("numba")       # loads the BLAS that numba's kernels call, so that it is limited below
    n = given_cores(n)[0]
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)
        if backend == "numba":
            threadpool_limits(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover
        pass
    try:
        numba = import_numba()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    if backend == "numba":
        from cnnpipe.backends.numba.runtime import set_parts
        set_parts(min(n, import_numba().config.NUMBA_NUM_THREADS))
    return n
