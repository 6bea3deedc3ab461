"""What every numba kernel module shares: the thread budget, the GEMM and its BLAS pinning, work buffers, input
checks and the kernel registry that warm-up and the tests read."""
from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from importlib import metadata
from typing import Callable, NamedTuple

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.backends import import_numba

numba = import_numba()                     # the OpenMP threading layer where there is one (see import_numba)
import scipy.linalg.cython_blas  # noqa: E402,F401  the BLAS numba's np.dot calls: loaded now, so it can be pinned
from numba import njit  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# the kernel registry

class KernelGroup(NamedTuple):
    """One module's njit kernels: `kernels` are called from Python, `inner` only from inside other kernels (they
    compile with their callers); `warm(dtype)` runs every one of them for that dtype."""
    kernels: tuple
    inner: tuple
    warm: Callable[[np.dtype], None]


KERNELS: dict[str, KernelGroup] = {}      # module name -> its kernels, in import order


def register(module: str, kernels: tuple, warm: Callable[[np.dtype], None], inner: tuple = ()) -> None:
    """Enter a module's kernels into the registry (warm-up and the cache tests read only this)."""
    KERNELS[module] = KernelGroup(tuple(kernels), tuple(inner), warm)


def warmup(dtype: np.dtype | type = np.float32) -> None:
    """Compile (first process) or load from the disk cache (later ones) every registered kernel for `dtype`."""
    for group in KERNELS.values():
        group.warm(np.dtype(dtype))


# ----------------------------------------------------------------------------------------------------
# threads and BLAS

def workers() -> int:
    """The threads that run now: numba's thread count (cnnpipe.backends.set_threads; the trainer's thread
    governor may lower it while another process holds a core)."""
    return max(1, numba.get_num_threads())


_parts = [0]


def set_parts(n: int) -> None:
    """The run's thread budget: work is cut into parts by it, not by the threads running now, so that the results
    are the same bits whatever the governor does with the thread count."""
    _parts[0] = max(1, int(n))


def parts() -> int:
    """How many parts a kernel cuts its work into (set_parts; without it, the threads running now)."""
    return _parts[0] or workers()


def even_bounds(n: int, k: int) -> np.ndarray:
    """[0, ..., n] cut into min(k, n) near-equal parts (int64, for a prange over the parts)."""
    k = max(1, min(k, n))
    return np.array([i * n // k for i in range(k + 1)], np.int64)


_BLAS = None


def _blas_libs():
    """threadpoolctl controllers of every loaded BLAS: numpy's OpenBLAS and scipy's (numba's np.dot calls
    scipy's BLAS; it is loaded with this module)."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        except Exception:  # pragma: no cover - threadpoolctl missing or unreadable: leave BLAS as it is
            _BLAS = []
    return _BLAS


class single_blas:
    """BLAS single-threaded while a parallel region calls it from every numba thread (a threaded BLAS inside
    would oversubscribe the cores); the caller's settings come back afterwards."""

    def __enter__(self):
        self.libs = [(lib, n) for lib in _blas_libs() if (n := lib.get_num_threads()) != 1]
        for lib, _ in self.libs:                         # already 1 (set_threads does it): nothing to do
            lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, n in self.libs:
            lib.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------
# the GEMM: MKL's where it is installed and the CPU is Intel's, else numpy's own BLAS; called from inside the kernels

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112           # CBLAS enum values
_GEMM_ARGS = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_MKL_SEQUENTIAL = 1                                      # MKL_THREADING_SEQUENTIAL


def _intel_cpu() -> bool:
    """Whether /proc/cpuinfo names an Intel CPU (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            return "GenuineIntel" in info.read(4096)
    except OSError:
        return False


@functools.cache
def _sequential_mkl() -> str | None:
    """The path of MKL's runtime library from the installed `mkl` wheel (the `fast` extra), switched to its
    sequential layer (each call runs in the thread that makes it: the kernels call it from numba's threads), on Intel
    CPUs only, where it was measured faster than OpenBLAS (docs/numba.md). None where any of that does not hold, and
    where an MKL is loaded already (a numpy built on MKL, say): switching its layer would make that one sequential
    too."""
    if not _intel_cpu() or any(lib.internal_api == "mkl" for lib in _blas_libs()):
        return None
    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    for path in sorted(os.path.realpath(f.locate()) for f in files if f.name.startswith("libmkl_rt.so")):
        try:
            dll = ctypes.CDLL(path)
        except OSError:
            continue
        # returns the layer in use: not sequential where something started this MKL with threads first
        if dll.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL) == _MKL_SEQUENTIAL:
            return path
    return None


def gemm_libraries(mkl: bool = True) -> list[str]:
    """The libraries blas_gemm takes cblas_?gemm from, best first: MKL (see _sequential_mkl) unless mkl is False,
    then every loaded OpenBLAS or other non-MKL BLAS, numpy's first (numba's own np.dot calls scipy's bundled BLAS,
    which runs small products at half the speed here: docs/numba.md). A loaded MKL other than ours is left out: its
    threads could not be pinned inside numba's (threadpoolctl sets MKL's thread count per calling thread)."""
    best = _sequential_mkl() if mkl else None
    loaded = [lib for lib in _blas_libs() if lib.internal_api != "mkl"]
    loaded.sort(key=lambda lib: "numpy" not in lib.filepath)
    return ([best] if best else []) + [lib.filepath for lib in loaded]


def find_gemm(dtype, libraries: list[str]) -> tuple[ctypes._CFuncPtr, str]:
    """cblas_sgemm or cblas_dgemm (as dtype) of the first of `libraries` that has one, and that library's path.
    Integer arguments are passed as 64-bit: right for ILP64 builds, and read correctly by LP64 ones (every argument
    of the C calling convention fills a 64-bit slot). Checked on a small product before use."""
    dtype = np.dtype(dtype)
    t, ctype = ("s" if dtype == np.float32 else "d"), _GEMM_ARGS[dtype]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    names = [f"{pre}cblas_{t}gemm{suf}" for pre in ("scipy_", "") for suf in ("64_", "")]
    for path in libraries:
        try:
            dll = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(dll, name, None)
            if fn is None:
                continue
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, ctype, ptr, i64, ptr, i64, ctype,
                           ptr, i64]
            if _gemm_works(fn, t):
                return fn, path
    raise ConfigError(f"numba backend: no BLAS library offers cblas_sgemm/cblas_dgemm (looked in {libraries}). "
                      f"Install numpy and scipy from PyPI wheels, which bundle OpenBLAS, or use backend=numpy.")


def _gemm_works(fn, t: str) -> bool:
    dt = np.float32 if t == "s" else np.float64
    a, b = np.arange(6, dtype=dt).reshape(2, 3), np.arange(12, dtype=dt).reshape(3, 4)
    out = np.zeros((2, 4), dt)
    fn(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, 2, 4, 3, 1.0, a.ctypes.data, 3, b.ctypes.data, 4, 0.0, out.ctypes.data, 4)
    return bool(np.array_equal(out, a @ b))


_GEMMS: dict = {}                                       # dtype -> (cblas function, its library's path)


def blas_gemm(dtype) -> ctypes._CFuncPtr:
    """The cblas GEMM for float32 or float64, found once; the kernels take it as an argument (a function pointer
    passed in at run time, so the compiled kernels stay in numba's disk cache)."""
    dtype = np.dtype(dtype)
    if dtype not in _GEMMS:
        _GEMMS[dtype] = find_gemm(dtype, gemm_libraries())
    return _GEMMS[dtype][0]


def gemm_library(dtype=np.float32) -> str:
    """The path of the library blas_gemm(dtype) comes from."""
    blas_gemm(dtype)
    return _GEMMS[np.dtype(dtype)][1]


@njit(nogil=True, cache=True, error_model="numpy")
def _ld(m):
    """The leading dimension (row stride in elements) of a 2-D array whose rows are contiguous: a C-contiguous
    array or a block of its columns. A single row's stride is arbitrary in numpy: its width then."""
    return m.strides[0] // m.itemsize if m.shape[0] > 1 else max(m.shape[1], 1)


@njit(nogil=True, cache=True, error_model="numpy")
def gemm(fn, a, trans_a, b, trans_b, out, accumulate=False):
    """out = op(a) @ op(b) (out += ... when accumulate) through fn (blas_gemm), op(m) = mᵀ when its flag is set;
    a, b and out 2-D arrays with contiguous rows (C-contiguous, or a block of columns of one; a transposed operand
    is passed untransposed, with its flag)."""
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    fn(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, M, N, K, 1.0,
       a.ctypes.data, _ld(a), b.ctypes.data, _ld(b), 1.0 if accumulate else 0.0, out.ctypes.data, _ld(out))


@njit(nogil=True, cache=True, error_model="numpy")
def copy_row(dst, src):
    """dst[i] = src[i] for 1-D arrays of one length, as a loop: numba's slice assignment dst[...] = src[...] goes
    through a temporary (the two could overlap) and costs ~5× more on short rows (docs/numba.md)."""
    for i in range(dst.size):
        dst[i] = src[i]


register(__name__, (), lambda dtype: None, inner=(gemm, _ld, copy_row))    # compiled with the kernels that call them


# ----------------------------------------------------------------------------------------------------
# work buffers

class _Buffer:
    """A pooled flat work array; `generation` moves on each time it is given back, which voids its leases."""

    def __init__(self, array: np.ndarray):
        self.array, self.generation = array, 0


class Lease(NamedTuple):
    """The use of a pooled buffer until it is given back (then `valid` is False and the contents are undefined)."""
    buffer: _Buffer
    generation: int

    @property
    def valid(self) -> bool:
        return self.buffer.generation == self.generation

    @property
    def array(self) -> np.ndarray:
        return self.buffer.array


_spare: dict = {}                           # (size, dtype) -> buffers given back, for the next lease


def lease(size: int, dtype) -> Lease:
    """A flat work buffer of `size` elements held until give_back: a spare one if one was given back."""
    spare = _spare.get((size, np.dtype(dtype).str))
    buf = spare.pop() if spare else _Buffer(np.empty(size, dtype))
    return Lease(buf, buf.generation)


def give_back(held: Lease) -> None:
    """The holder is done with the buffer: void every lease on it and keep up to two spares per size."""
    if not held.valid:
        return
    buf = held.buffer
    buf.generation += 1
    spare = _spare.setdefault((buf.array.size, buf.array.dtype.str), [])
    if len(spare) < 2:
        spare.append(buf)


DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NO_COLS = {d.str: np.empty(0, d) for d in DTYPES}              # "no kept columns" for the chunk kernels
NO_4D = {d.str: np.empty((0, 0, 0, 0), d) for d in DTYPES}     # "no padded input" / "no input gradient"
_tls = threading.local()


def scratch(role: str, shape: tuple, dtype) -> np.ndarray:
    """A C-contiguous work array of `shape`, reused across calls of the calling thread (contents undefined)."""
    bufs = _tls.__dict__.setdefault("bufs", {})
    size = math.prod(shape)
    key = (role, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


# ----------------------------------------------------------------------------------------------------
# inputs

def contiguous(a: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous array of `dtype` (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=dtype)


def check_input(x: np.ndarray, what: str) -> np.ndarray:
    """x must be a float32/float64 N,C,H,W array; returns it C-contiguous."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ConfigError(f"numba backend: {what} has dtype {x.dtype}, but the kernels work on float32 or "
                          f"float64 arrays. Convert the input with .astype(np.float32) before calling.")
    if x.ndim != 4:
        raise ConfigError(f"numba backend: {what} has shape {x.shape}, but an N,C,H,W array is expected. "
                          f"Put conv and pool layers before Flatten, on image-shaped inputs.")
    return x
