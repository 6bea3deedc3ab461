"""One place decides the backend; layers receive the backend object and never branch on it.

Contract (DESIGN.md), on C-contiguous float32/float64 arrays, output dtype follows input:

    y, cache   = B.conv2d_forward(x, w, b, stride=1, pad=0)          # x N,C,H,W  w F,C,K,K  b F
    dx, dw, db = B.conv2d_backward(dy, cache)                        # rules 4 (without h'), 5, 6
    y, cache   = B.pool2d_forward(x, size=2, stride=2, mode="max")   # "max" | "mean"
    dx         = B.pool2d_backward(dy, cache)                        # rules 2, 3
"""
from __future__ import annotations

import importlib

from cnnpipe import ConfigError

BACKENDS = {"numpy": "cnnpipe.backends.numpy_backend", "numba": "cnnpipe.backends.numba_backend"}


def get_backend(name: str):
    """Return the backend module called `name`; a clear ConfigError for unknown or unavailable."""
    if name not in BACKENDS:
        raise ConfigError(f"Unknown backend '{name}'. Available backends: {', '.join(BACKENDS)}. "
                          f"Choose one with backend=<name>, e.g. backend=numpy.")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise ConfigError(f"Backend '{name}' cannot be used: {e}. Install it (pip install numba) "
                          f"or choose another backend: {', '.join(BACKENDS)}.") from None


def set_threads(n: int | None) -> int:
    """Limit BLAS (and numba, if loaded) to n threads; None means all cores. Returns n used."""
    import os
    n = int(n) if n else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return n
