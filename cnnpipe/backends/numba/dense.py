"""The dense layers' product: blocks of `a @ b` (columns or rows) split over numba's threads, each one
single-threaded GEMM."""
from __future__ import annotations

import numpy as np
from numba import njit, prange  # after runtime: numba's threading layer is chosen there

from cnnpipe.backends.numba.runtime import blas_gemm, even_bounds, gemm, parts, register, single_blas

MATMUL_SPLIT_FLOPS = 2e7  # below this a product runs in one call in the calling thread (docs/numba.md)


@njit(parallel=True, cache=True, error_model="numpy")
def _matmul_rows(a, b, trans_b, bounds, out, fn):
    """out[r0:r1] = a[r0:r1] @ op(b) for each row block (one GEMM per task; op(b) = bᵀ when trans_b)."""
    for i in prange(len(bounds) - 1):
        r0, r1 = bounds[i], bounds[i + 1]
        gemm(fn, a[r0:r1], False, b, trans_b, out[r0:r1])


@njit(parallel=True, cache=True, error_model="numpy")
def _matmul_cols(a, b, trans_b, bounds, out, fn):
    """out[:, c0:c1] = a @ op(b)[:, c0:c1] for each column block: each task reads its own part of b."""
    for i in prange(len(bounds) - 1):
        c0, c1 = bounds[i], bounds[i + 1]
        if trans_b:
            gemm(fn, a, False, b[c0:c1], True, out[:, c0:c1])
        else:
            gemm(fn, a, False, b[:, c0:c1], False, out[:, c0:c1])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for the dense layers (forward x Wᵀ, backward δᵀx and δW), cut into one block per thread of the run's
    budget (runtime.parts), each block one single-threaded sgemm on numba's threads: blocks of output columns
    when the output is wider than tall (each task then reads only its part of a large weight matrix, forward
    x Wᵀ and backward δW), else blocks of rows. Letting OpenBLAS thread these itself would leave its workers
    spinning (OPENBLAS_THREAD_TIMEOUT) on the cores that the next numba parallel region needs; the blocks do not
    depend on the threads running now, so neither do the bits of the result."""
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
    split, size = (_matmul_cols, N) if N > M else (_matmul_rows, M)
    with single_blas():
        split(a, b, trans_b, even_bounds(size, parts()), out, blas_gemm(out.dtype))
    return out


def _warm(dtype: np.dtype) -> None:
    """Both splits, with b = W and with b = Wᵀ (W passed, transposed by the GEMM)."""
    a, bounds = np.ones((4, 3), dtype), np.array([0, 2, 4], np.int64)
    for bm, trans_b in ((np.ones((3, 5), dtype), False), (np.ones((5, 3), dtype), True)):
        with single_blas():
            for split in (_matmul_rows, _matmul_cols):
                split(a, bm, trans_b, bounds, np.empty((4, 5), dtype), blas_gemm(dtype))


register(__name__, (_matmul_rows, _matmul_cols), _warm)
