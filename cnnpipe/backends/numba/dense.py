"""The dense layers' product: row blocks of `a @ b` split over numba's threads, each one single-threaded GEMM."""
from __future__ import annotations

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import blas_gemm, gemm, parts, register, single_blas

MATMUL_SPLIT_FLOPS = 2e7  # below this a product runs in one call in the calling thread (docs/numba.md)


@njit(parallel=True, cache=True)
def _matmul_rows(a, b, trans_b, bounds, out, fn):
    """out[r0:r1] = a[r0:r1] @ op(b) for each row block (one GEMM per task; op(b) = bᵀ when trans_b)."""
    for i in prange(len(bounds) - 1):
        r0, r1 = bounds[i], bounds[i + 1]
        gemm(fn, a[r0:r1], False, b, trans_b, out[r0:r1])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for the dense layers (forward x Wᵀ, backward δᵀx and δW): the rows of `a` cut into one block per
    thread of the run's budget (runtime.parts), each block one single-threaded sgemm on numba's threads. Letting
    OpenBLAS thread these itself would leave its workers spinning (OPENBLAS_THREAD_TIMEOUT) on the cores that the
    next numba parallel region needs; the blocks do not depend on the threads running now, so neither do the
    bits of the result."""
    M, K = a.shape                                       # a M,K (any strides, e.g. δᵀ)
    N = b.shape[1]                                       # b K,N
    out = np.empty((M, N), np.result_type(a, b))         # M,N (fresh)
    a = a if a.dtype == out.dtype else a.astype(out.dtype)
    b = b if b.dtype == out.dtype else b.astype(out.dtype)
    if 2.0 * M * N * K < MATMUL_SPLIT_FLOPS or parts() == 1:
        with single_blas():                              # one call in the calling thread
            return np.dot(a, b, out=out)
    a = np.ascontiguousarray(a)                          # e.g. δᵀ: the row blocks must be contiguous
    trans_b = not b.flags.c_contiguous and b.flags.f_contiguous
    b = b.T if trans_b else np.ascontiguousarray(b)      # e.g. Wᵀ: passed as W, transposed by the GEMM
    T = min(parts(), M)
    with single_blas():
        _matmul_rows(a, b, trans_b, np.array([r * M // T for r in range(T + 1)], np.int64), out, blas_gemm(out.dtype))
    return out


def _warm(dtype: np.dtype) -> None:
    """The split product, with b = W and with b = Wᵀ (W passed, transposed by the GEMM)."""
    a, bounds = np.ones((4, 3), dtype), np.array([0, 2, 4], np.int64)
    for bm, trans_b in ((np.ones((3, 5), dtype), False), (np.ones((5, 3), dtype), True)):
        with single_blas():
            _matmul_rows(a, bm, trans_b, bounds, np.empty((4, 5), dtype), blas_gemm(dtype))


register(__name__, (_matmul_rows,), _warm)
