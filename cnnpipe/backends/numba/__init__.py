"""numba backend: the fast kernels. They must agree with the numpy backend (float64 ~1e-10, float32 ~1e-5) and
are tested against it and PyTorch (tests/test_backend_numba.py). Why it is
built this way, with the measurements behind each choice: docs/numba.md.

Letters: N batch, C input channels, F filters, H,W input size, K kernel, S stride, Ho,Wo output size,
P = Ho*Wo output pixels, R pool window size, nb samples in one batch chunk.

How the work is split: every parallel step is one numba parallel region on numba's T threads (the OpenMP layer
where there is one, see cnnpipe.backends.import_numba), and the GEMMs run inside those regions as single-threaded
BLAS (runtime.gemm: MKL's sequential layer where the `fast` extra is installed on an Intel CPU, else numpy's own
OpenBLAS pinned to one thread), so exactly T threads compute: no BLAS/numba oversubscription and no Python between
the steps of a layer.
- thin conv layers (direct.py; direct.suits: unit stride, few filters, or a first layer on 1-3 channels): direct
  convolution, one sample's block of 4 output planes per task, each plane read as one flat array so every tap is
  one long vector loop shared by the block; rule 4 as the full convolution of zeropad(δ) with the flipped kernel,
  rule 5 as the valid correlation of zeropad(x) with δ.
- other conv layers (conv.py): the batch is cut into chunks (a chunk's columns stay in cache, at least one
  chunk per thread), one task per chunk. Forward per chunk: im2col col (C,K,K,nb,Ho,Wo) -> one sgemm
  W2d @ col -> bias add fused with the (F,nb,P) -> (N,F,P) reorder. Backward, one group of consecutive chunks
  per thread of the run's budget, per chunk: rule 5 dW2dᵀ += col2d @ δ, δ reordered to (nb·P, F), into the
  group's partial (the GEMM accumulates; the groups' partials are summed in order); rule 4 dx = col2im(W2dᵀ @ δ2d),
  δ2d reordered to (F,nb·P), the transposed convolution, which equals the full convolution of δ with the flipped
  kernel. Rule 6 db (both convolutions): one filter per task, each sample's plane summed in vector lanes, the
  planes' sums in sample order. Forward lends the batch's columns to the first backward when
  they fit KEEP_COL_BYTES (a small layer's training batch); otherwise backward rebuilds them chunk by chunk from
  the padded input (in cache, cheaper than reading a large column buffer back from memory), so memory stays
  bounded for any batch size. Backward only reads the cache.
- pools (pool.py): direct loops, prange over (n, c) planes, so threads write disjoint memory; 2×2 windows every 2
  have loops of their own that vectorize.
- dense layers (dense.py, matmul): blocks of the product's columns (or rows, when it is taller than wide), one
  GEMM each, in one parallel region; small products run in one call in the calling thread.
- ReLU (activation.py): one pass forward (max(x, 0)) and one backward (δ where y > 0), split over the
  threads for large arrays.
- optimizer updates (optim.py): one fused pass per parameter, split over the threads for large parameters.
- runtime.py: the thread budget, the GEMM and BLAS pinning, reused work buffers (returned arrays are always
  fresh), input checks, and the registry of every kernel, which warmup() and the tests read.

Adding a kernel:
1. @njit(cache=True, error_model="numpy") (parallel=True for a prange kernel, nogil=True for a serial one):
   cache=True so that a second process loads it from the disk cache instead of compiling it; numpy's error model
   so that a division by 0 gives inf or nan, as in numpy, instead of a check per element that keeps the loop
   from vectorizing (docs/numba.md: the Adam update).
2. Never read numba's thread count (numba.get_num_threads) inside a kernel: pass the number of parts in, from
   runtime.parts() (the run's thread budget). A kernel that reads it compiles and runs, but silently stops being
   cached; and cutting work by the threads running now would make results depend on the thread governor.
3. Register it: runtime.register(__name__, kernels, warm, inner) at the end of its module, with a warm(dtype)
   that calls it (inner: kernels called only from other kernels; they compile with their callers). The tests
   fail for a kernel missing from the registry or not warmed up.
4. A GEMM inside a kernel is runtime.gemm(fn, ...), with fn = runtime.blas_gemm(dtype) passed in as an argument
   (numba's np.dot calls scipy's slower BLAS; a function pointer baked into the kernel would keep it out of the
   disk cache), and the kernel runs under runtime.single_blas(), so BLAS does not add its own threads to numba's.
5. Parallel loops write disjoint outputs; reductions run in one fixed order (each part's partial accumulated in
   its chunks' order, the partials summed in part order) over parts cut by runtime.parts(), so the results are
   the same bits whatever threads run them.
6. Inside a loop, index arrays with the loop variable of a range(n) over a slice (xs = x[lo:hi]; xs[i]), not
   with x[lo + i]: numba cannot prove lo + i is not negative, adds its wraparound check, and the loop stops
   vectorizing.
7. Copy a row from one array to another with a loop (runtime.copy_row(dst, src), or the loop inline where that
   measures faster), not dst[...] = src[...]: numba's array assignment goes through a temporary in case the two
   overlap (docs/numba.md).
8. No integer division or remainder by a run-time value inside a loop (k // R, k % R): record the index the
   loop needs instead (max-pool's forward records each winner's position in the plane, not its offset in the
   window). One division per element made max-pool's backward 3× slower (docs/numba.md).
"""
from __future__ import annotations

from cnnpipe.backends.numba.activation import relu_backward, relu_forward
from cnnpipe.backends.numba.conv import conv2d_backward, conv2d_forward
from cnnpipe.backends.numba.dense import matmul
from cnnpipe.backends.numba.optim import adam_update, sgd_update
from cnnpipe.backends.numba.pool import pool2d_backward, pool2d_forward
from cnnpipe.backends.numba.runtime import numba, warmup

__all__ = ["conv2d_forward", "conv2d_backward", "pool2d_forward", "pool2d_backward", "relu_forward", "relu_backward",
           "matmul", "sgd_update", "adam_update", "warmup", "numba"]
