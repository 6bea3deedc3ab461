"""numba backend vs the numpy reference and torch autograd; determinism, fresh outputs, dtypes, caching."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from kernel_oracle import (  # noqa: E402
    DTYPES,
    EDGE_CONV_CASES,
    EDGE_POOL_CASES,
    TOL,
    case_id,
    check_conv_against_torch,
    check_pool_against_torch,
    conv_data,
    random_conv_cases,
    random_pool_cases,
    rel_err,
)

import cnnpipe.backends.numba as B  # noqa: E402
from cnnpipe import ConfigError  # noqa: E402
from cnnpipe.backends import get_backend, set_threads  # noqa: E402
from cnnpipe.backends import numpy_backend as REF  # noqa: E402
from cnnpipe.backends.numba import conv, dense, direct, optim, runtime  # noqa: E402

CONV_CASES = EDGE_CONV_CASES + [
    (3, 1, 28, 28, 6, 5, 1, 2),  # LeNet-5 conv1
    (3, 6, 14, 14, 16, 5, 1, 0),  # LeNet-5 conv2
    (2, 32, 14, 14, 8, 5, 1, 2),  # convnet conv2 (fewer filters)
    (2, 1, 28, 28, 32, 5, 1, 2),  # convnet conv1
    (2, 3, 32, 32, 12, 3, 1, 1),  # a CIFAR first layer, 3×3
] + random_conv_cases(seed=11, n=20) + random_conv_cases(  # direct.py's blocks of 4 filters (4 channels for rule 4)
    seed=13, n=8, kernels=(3, 5), strides=(1,), channels=range(4, 10), filters=range(4, 11))   # full, and the rest
POOL_CASES = EDGE_POOL_CASES + random_pool_cases(seed=12, n=20)


@pytest.fixture(params=["im2col", "im2col-openblas", "direct"])
def conv_path(request, monkeypatch):
    """A conv test runs on each of the backend's two convolutions: im2col + GEMM (on the GEMM the backend picks, and
    on numpy's OpenBLAS, the one it falls back to without MKL), and direct.py's (here for every unit-stride layer,
    not only the thin ones it is chosen for). Returns the convolution's name."""
    if request.param.startswith("im2col"):
        _all_im2col(monkeypatch)
    else:
        monkeypatch.setattr(direct, "MAX_FILTERS", 1 << 30)
        monkeypatch.setattr(direct, "MAX_TAPS", 1 << 30)
    if request.param == "im2col-openblas":
        _openblas_gemm(monkeypatch)
    return request.param.split("-")[0]


def _openblas_gemm(monkeypatch):
    """The kernels' GEMM is numpy's OpenBLAS even where MKL is installed (skips where it is OpenBLAS anyway: the
    test's other case runs on it)."""
    if "mkl" not in runtime.gemm_library():
        pytest.skip("the kernels' GEMM is OpenBLAS already")
    monkeypatch.setattr(runtime, "_GEMMS", {np.dtype(t): runtime.find_gemm(t, runtime.gemm_libraries(mkl=False))
                                            for t in DTYPES})
    assert "mkl" not in runtime.gemm_library()


def _all_im2col(monkeypatch):
    monkeypatch.setattr(direct, "MAX_FILTERS", 0)
    monkeypatch.setattr(direct, "THIN_CHANNELS", 0)


@pytest.fixture
def im2col(monkeypatch):
    """Tests of the kept columns: every layer through im2col."""
    _all_im2col(monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_matches_numpy_reference(case, dtype, conv_path):
    x, w, b, dy, S, P = conv_data(case, dtype, seed=sum(case))
    y, cache = B.conv2d_forward(x, w, b, stride=S, pad=P)
    assert cache.direct == (conv_path == "direct" and S == 1)
    y_ref, cache_ref = REF.conv2d_forward(x, w, b, stride=S, pad=P)
    got, ref = B.conv2d_backward(dy, cache), REF.conv2d_backward(dy, cache_ref)
    for name, g, r in zip(["y", "dx (rule 4)", "dw (rule 5)", "db (rule 6)"], (y, *got), (y_ref, *ref)):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert rel_err(g, r) <= TOL[np.dtype(dtype)], f"{name}: {rel_err(g, r):.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES[::2], ids=case_id)
def test_conv_matches_torch(case, dtype, conv_path):
    check_conv_against_torch(B, *case, dtype=dtype, seed=len(case) + sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_matches_numpy_reference_with_ties(case, dtype):
    """Integer-valued inputs: many ties, so the first-max-in-row-major rule is exercised everywhere."""
    N, C, H, W, R, S, mode = case
    rng = np.random.default_rng(H * W + R)
    x = rng.integers(0, 4, size=(N, C, H, W)).astype(dtype)  # N,C,H,W
    y, cache = B.pool2d_forward(x, size=R, stride=S, mode=mode)
    y_ref, cache_ref = REF.pool2d_forward(x, size=R, stride=S, mode=mode)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)  # N,C,Ho,Wo
    dx, dx_ref = B.pool2d_backward(dy, cache), REF.pool2d_backward(dy, cache_ref)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    if mode == "max":
        np.testing.assert_array_equal(y, y_ref)  # the same winners, exactly
    assert rel_err(y, y_ref) <= TOL[np.dtype(dtype)]
    assert rel_err(dx, dx_ref) <= TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES[::2], ids=case_id)
def test_pool_matches_torch(case, dtype):
    check_pool_against_torch(B, *case, dtype=dtype, seed=case[2] * case[3])


def test_max_pool_ties_first_max_and_overlaps_accumulate():
    x = np.zeros((1, 1, 4, 5), dtype=np.float32)  # every window is a tie
    for size, stride in [(2, 2), (3, 1), (2, 3)]:
        y, cache = B.pool2d_forward(x, size=size, stride=stride, mode="max")
        dx = B.pool2d_backward(np.ones_like(y), cache)
        expect = np.zeros_like(x)
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                expect[0, 0, i * stride, j * stride] += 1  # top-left of each window; overlaps accumulate
        np.testing.assert_array_equal(dx, expect)


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2)], ids=["2x2", "3x3-s2"])
def test_max_pool_a_nan_wins_its_window_and_gets_its_delta(size, stride):
    """A NaN is its window's maximum wherever it sits (as in PyTorch), and rule 2 routes the window's δ to it."""
    x = np.arange(2 * 6 * 7, dtype=np.float32).reshape(1, 2, 6, 7)
    x[0, 1, 3, 3] = np.nan                               # only in window (1, 1) of either pooling, not its top-left
    y, cache = B.pool2d_forward(x, size=size, stride=stride, mode="max")
    assert np.isnan(y[0, 1, 1, 1]) and np.isnan(y).sum() == 1
    dx = B.pool2d_backward(np.ones_like(y), cache)
    assert dx[0, 1, 3, 3] == 1
    y_ref, cache_ref = REF.pool2d_forward(np.nan_to_num(x, nan=1e9), size=size, stride=stride, mode="max")
    np.testing.assert_array_equal(dx, REF.pool2d_backward(np.ones_like(y_ref), cache_ref))


def test_uneven_pool_remainder_gets_zero_gradient():
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 9))
    for mode in ("max", "mean"):
        y, cache = B.pool2d_forward(x, size=2, stride=2, mode=mode)
        assert y.shape == (2, 3, 3, 4)
        dx = B.pool2d_backward(np.ones_like(y), cache)
        assert np.all(dx[:, :, 6, :] == 0) and np.all(dx[:, :, :, 8] == 0)
        assert np.isclose(dx.sum(), y.size)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_need_dx_false_skips_rule4_only(dtype, conv_path):
    x, w, b, dy, S, P = conv_data((3, 3, 9, 9, 4, 3, 2 if conv_path == "im2col" else 1, 1), dtype)
    _, cache = B.conv2d_forward(x, w, b, stride=S, pad=P)
    dx0, dw0, db0 = B.conv2d_backward(dy, cache, need_dx=False)
    dx1, dw1, db1 = B.conv2d_backward(dy, cache)
    assert dx0 is None and dx1.shape == x.shape
    np.testing.assert_array_equal(dw0, dw1)
    np.testing.assert_array_equal(db0, db1)


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores")
def test_the_same_bits_whatever_the_threads_running_now(conv_path):
    """Work is cut by the run's thread budget, not by the threads running now, so the thread governor may drop to
    one thread mid-run without changing a bit: every kernel gives the same arrays with 2 threads and with 1."""
    x, w, b, dy, S, P = conv_data((2, 6, 14, 14, 16, 5, 1, 2), np.float32, seed=5)   # one chunk by size
    rng = np.random.default_rng(2)
    a, m = rng.standard_normal((64, 3136)).astype(np.float32), rng.standard_normal((3136, 300)).astype(np.float32)
    p0, g = rng.standard_normal(1 << 17).astype(np.float32), rng.standard_normal(1 << 17).astype(np.float32)
    set_threads(2, "numba")

    def everything():
        y, c = B.conv2d_forward(x, w, b, stride=S, pad=P)
        q, qc = B.pool2d_forward(y, 2, 2, "max")
        p, v = p0.copy(), np.zeros_like(p0)
        B.sgd_update(p, g, v, 0.1, 0.9, False, 1e-4, first=True)
        return (y, *B.conv2d_backward(dy, c), q, B.pool2d_backward(q, qc), B.matmul(a, m), p, v)
    try:
        both = everything()
        B.numba.set_num_threads(1)                   # what the governor does
        one = everything()
    finally:
        set_threads(None, "numba")
    for r2, r1 in zip(both, one):
        np.testing.assert_array_equal(r2, r1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rule5_partials_of_a_larger_thread_budget_sum_to_the_reference(im2col, dtype):
    """A thread budget of 3 cuts backward into 3 groups of chunks, each with its own rule-5 partial (dW2dᵀ), summed in
    order afterwards: dW agrees with the numpy backend's whatever the machine's cores."""
    x, w, b, dy, S, P = conv_data((7, 3, 9, 9, 12, 3, 1, 1), dtype, seed=8)
    _, ref_cache = REF.conv2d_forward(x, w, b, stride=S, pad=P)
    ref = REF.conv2d_backward(dy, ref_cache)
    try:
        runtime.set_parts(3)
        for kept in (True, False):                  # forward's columns, and columns rebuilt in backward
            _, cache = B.conv2d_forward(x, w, b, stride=S, pad=P)
            if not kept:
                runtime.give_back(cache.cols)
            assert len(conv.even_bounds(len(cache.bounds) - 1, runtime.parts())) - 1 == 3
            for got, want in zip(B.conv2d_backward(dy, cache), ref):
                assert rel_err(got, want) < TOL[np.dtype(dtype)]
    finally:
        set_threads(None, "numba")


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["default-chunks", "one-sample-chunks"])
def test_deterministic_and_chunking_agrees(monkeypatch, chunk_bytes, conv_path):
    """Two calls are bit-identical; a batch split into chunks (rule 5's sum over chunks) agrees too."""
    x, w, b, dy, S, P = conv_data((8, 6, 14, 14, 16, 5, 1, 2), np.float32, seed=3)
    y0, c0 = B.conv2d_forward(x, w, b, stride=S, pad=P)
    g0 = B.conv2d_backward(dy, c0)
    if chunk_bytes is not None:
        monkeypatch.setattr(conv, "COL_CHUNK_BYTES", chunk_bytes)
    runs = []
    for _ in range(2):
        y, c = B.conv2d_forward(x, w, b, stride=S, pad=P)
        runs.append((y, *B.conv2d_backward(dy, c)))
    for a, r in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, r)
    for a, r in zip(runs[0], (y0, *g0)):
        assert rel_err(a, r) <= 1e-6
    xp = np.random.default_rng(1).standard_normal((8, 16, 14, 14)).astype(np.float32)
    for mode in ("max", "mean"):
        p1, pc1 = B.pool2d_forward(xp, 2, 2, mode)
        p2, pc2 = B.pool2d_forward(xp, 2, 2, mode)
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(B.pool2d_backward(p1, pc1), B.pool2d_backward(p1, pc2))


def test_outputs_are_fresh_arrays_not_reused_buffers(conv_path):
    """A later call on the same shapes (reusing work buffers) must not change what an earlier call returned."""
    x, w, b, dy, S, P = conv_data((4, 3, 10, 10, 5, 3, 1, 1), np.float32, seed=5)
    y1, c1 = B.conv2d_forward(x, w, b, stride=S, pad=P)
    g1 = B.conv2d_backward(dy, c1)
    p1, pc1 = B.pool2d_forward(y1, 2, 2, "max")
    q1 = B.pool2d_backward(p1, pc1)
    keep = [a.copy() for a in (y1, *g1, p1, q1)]
    y2, c2 = B.conv2d_forward(x * 2 + 1, w - 1, b, stride=S, pad=P)
    B.conv2d_backward(dy * 3, c2)
    p2, pc2 = B.pool2d_forward(y2, 2, 2, "max")
    B.pool2d_backward(p2, pc2)
    for a, k in zip((y1, *g1, p1, q1), keep):
        np.testing.assert_array_equal(a, k)
    # the first cache still gives the first gradients after the second pair of calls
    for a, k in zip(B.conv2d_backward(dy, c1), keep[1:4]):
        np.testing.assert_array_equal(a, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dtype_preserved_and_mixed_dtype_grads_follow_the_input(dtype, conv_path):
    x, w, b, dy, S, P = conv_data((2, 3, 10, 10, 4, 3, 1, 1), dtype)
    y, cache = B.conv2d_forward(x, w.astype(np.float64), b.astype(np.float64), stride=S, pad=P)
    grads = B.conv2d_backward(dy.astype(np.float64), cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    for mode in ("max", "mean"):
        p, pc = B.pool2d_forward(y, size=3, stride=2, mode=mode)
        assert p.dtype == dtype and B.pool2d_backward(np.ones(p.shape), pc).dtype == dtype


def _registered(inner=True):
    """Every kernel in the runtime's registry (the ones warm-up compiles; with inner=True also those called only
    from inside other kernels)."""
    return [k for g in runtime.KERNELS.values() for k in (*g.kernels, *(g.inner if inner else ()))]


def test_every_kernel_is_registered_and_compiled_with_cache_true_and_numpys_error_model():
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher
    modules = [importlib.import_module(f"{B.__name__}.{m.name}") for m in pkgutil.iter_modules(B.__path__)]
    defined = {v for m in modules for v in vars(m).values() if isinstance(v, CPUDispatcher)}
    kernels = _registered()
    assert set(kernels) == defined and len(kernels) == len(defined) >= 17    # each registered once
    for k in kernels:
        assert not isinstance(k._cache, NullCache), f"{k.__name__} is not @njit(cache=True)"
        assert k.targetoptions.get("error_model") == "numpy", f"{k.__name__}: error_model='numpy' (package docstring)"


def test_the_adam_update_is_vector_code():
    """Python's error model checks every float division for 0, which keeps the update's loop scalar."""
    import re

    import numba
    k = optim._adam_range                       # compiled afresh with its own options (cached code keeps no IR)
    fresh = numba.njit(**{o: v for o, v in k.targetoptions.items() if o not in ("cache", "nopython")})(k.py_func)
    T, n = np.float32, 64
    fresh(*(np.ones(n, T) for _ in range(4)), *(T(x) for x in (1e-3, 0.9, 0.1, 0.999, 1e-3, 1e-8, 1, 0, 1e-38)), 0, n)
    llvm = fresh.inspect_llvm(fresh.signatures[0])
    assert re.search(r"fdiv <\d+ x float>", llvm), "the Adam update's division is not vectorized"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_warmup_compiles_every_kernel_for_that_dtype(dtype):
    B.warmup(dtype)
    name = np.dtype(dtype).name
    for k in _registered(inner=False):
        assert any(str(sig[0].dtype) == name for sig in k.signatures), f"{k.__name__} not warmed up for {name}"


def test_warm_kernels_are_saved_to_and_loaded_from_the_disk_cache(tmp_path):
    """cache=True alone is not proof: a kernel that reads a dynamic global (numba.get_num_threads() in a parallel
    kernel, say) silently stays uncached. A first process warms up into an empty NUMBA_CACHE_DIR; a second one
    must load every kernel from there and compile none."""
    code = ("import json, numpy as np\n"
            "import cnnpipe.backends.numba as B\n"
            "from cnnpipe.backends.numba.runtime import KERNELS\n"
            "B.warmup(np.float32)\n"
            "print(json.dumps({k.__name__: [sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())]\n"
            "                  for g in KERNELS.values() for k in (*g.kernels, *g.inner)}))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "2"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True, timeout=300).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert sum(misses for _, misses in runs[0].values()) > 0                 # the first one compiled
    used = {name: hm for name, hm in runs[1].items() if sum(hm)}
    assert {k.__name__ for k in _registered(inner=False)} <= set(used), used   # every warmed kernel loaded
    assert all(misses == 0 and hits > 0 for hits, misses in used.values()), used


def test_backend_numba_is_this_package_with_exactly_the_contract():
    """backend=numba gets this package; it exports the kernels of the contract, warmup and numba, nothing else."""
    assert get_backend("numba") is B
    assert sorted(B.__all__) == sorted(["conv2d_forward", "conv2d_backward", "pool2d_forward", "pool2d_backward",
                                        "relu_forward", "relu_backward", "matmul", "sgd_update", "adam_update",
                                        "warmup", "numba"])
    assert all(callable(getattr(B, name)) for name in B.__all__ if name != "numba")
    import numba
    assert B.numba is numba                              # the trainer logs B.numba.threading_layer()


@pytest.mark.parametrize("call", [
    lambda: B.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 1, 3, 3)), np.zeros(3)),  # channel mismatch
    lambda: B.conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 5, 5)), np.zeros(1)),  # kernel too big
    lambda: B.conv2d_forward(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1), stride=0),
    lambda: B.conv2d_forward(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1), pad=-1),
    lambda: B.conv2d_forward(np.zeros((1, 1, 5, 5), dtype=np.int64), np.zeros((1, 1, 3, 3)), np.zeros(1)),
    lambda: B.pool2d_forward(np.zeros((1, 1, 5, 5)), size=2, stride=2, mode="median"),
    lambda: B.pool2d_forward(np.zeros((1, 1, 3, 3)), size=4, stride=1),
    lambda: B.pool2d_forward(np.zeros((1, 5, 5)), size=2, stride=2),
])
def test_bad_input_raises_config_error(call):
    with pytest.raises(ConfigError):
        call()


def test_conv_restores_blas_threads_and_handles_one_thread(conv_path):
    """The chunk kernels call BLAS single-threaded; the caller's BLAS and numba thread counts come back."""
    import numba
    from threadpoolctl import threadpool_info
    before = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    x, w, b, dy, S, P = conv_data((4, 3, 9, 9, 5, 3, 1, 1), np.float64, seed=7)
    y2, c2 = B.conv2d_forward(x, w, b, stride=S, pad=P)
    g2 = B.conv2d_backward(dy, c2)
    assert [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"] == before
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        y1, c1 = B.conv2d_forward(x, w, b, stride=S, pad=P)
        g1 = B.conv2d_backward(dy, c1)
    finally:
        numba.set_num_threads(n)
    for a, r in zip((y1, *g1), (y2, *g2)):
        assert rel_err(a, r) <= 1e-12


def test_kept_columns_equal_rebuilt_columns(monkeypatch, im2col):
    """Forward keeps its columns for backward when they fit; rebuilding them instead (a big batch, or a
    second backward on the same cache) gives bit-identical gradients, even if the thread count changed."""
    import numba
    x, w, b, dy, S, P = conv_data((6, 4, 11, 11, 5, 3, 2, 1), np.float32, seed=11)
    y, c = B.conv2d_forward(x, w, b, stride=S, pad=P)
    assert c.cols is not None and c.cols.valid           # kept: small batch
    n = numba.get_num_threads()
    numba.set_num_threads(1)                             # backward chunks would differ from forward's
    try:
        kept = B.conv2d_backward(dy, c)
    finally:
        numba.set_num_threads(n)
    assert not c.cols.valid                              # used once, given back
    again = B.conv2d_backward(dy, c)                     # rebuilt from x
    monkeypatch.setattr(conv, "KEEP_COL_BYTES", 0)
    y0, c0 = B.conv2d_forward(x, w, b, stride=S, pad=P)
    assert c0.cols is None                               # too big to keep: rebuilt in backward
    rebuilt = B.conv2d_backward(dy, c0)
    np.testing.assert_array_equal(y, y0)
    for k, a, r in zip(kept, again, rebuilt):
        np.testing.assert_array_equal(k, r)
        np.testing.assert_array_equal(a, r)


@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no-dx"])
def test_second_backward_after_a_forward_reused_the_columns(need_dx, im2col):
    """The first backward gives forward's column buffer back; a forward on other data takes it over. A second
    backward on the first cache must rebuild its columns, not read the other batch's; both caches give the
    gradients of their own batch, equal to the numpy reference."""
    x1, w, b, dy1, S, P = conv_data((4, 3, 10, 10, 5, 3, 1, 1), np.float32, seed=21)
    x2, _, _, dy2, _, _ = conv_data((4, 3, 10, 10, 5, 3, 1, 1), np.float32, seed=22)
    _, c1 = B.conv2d_forward(x1, w, b, stride=S, pad=P)
    first = B.conv2d_backward(dy1, c1, need_dx=need_dx)
    _, c2 = B.conv2d_forward(x2, w, b, stride=S, pad=P)
    assert c2.cols.buffer is c1.cols.buffer and c2.cols.valid and not c1.cols.valid   # the buffer changed hands
    second = B.conv2d_backward(dy1, c1, need_dx=need_dx)
    other = B.conv2d_backward(dy2, c2, need_dx=need_dx)
    for got, (x, dy) in ((first, (x1, dy1)), (second, (x1, dy1)), (other, (x2, dy2))):
        ref = REF.conv2d_backward(dy, REF.conv2d_forward(x, w, b, stride=S, pad=P)[1])
        assert (got[0] is None) == (not need_dx)
        for g, r in zip(got, ref):
            if g is not None:
                assert rel_err(g, r) <= TOL[np.dtype(np.float32)]
    for a, r in zip(first, second):
        np.testing.assert_array_equal(a, r)


def test_backward_reads_the_kept_columns_without_writing_them(im2col):
    """The cache is backward's input only: the kept columns hold forward's im2col after backward too."""
    x, w, b, dy, S, P = conv_data((4, 3, 10, 10, 5, 3, 1, 1), np.float32, seed=23)
    _, c = B.conv2d_forward(x, w, b, stride=S, pad=P)
    before = c.cols.array.copy()
    B.conv2d_backward(dy, c)
    np.testing.assert_array_equal(c.cols.array, before)


def test_thin_unit_stride_layers_go_direct_and_wide_ones_through_im2col():
    """LeNet-5's convolutions (6 filters on 1 channel, 16 on 6), the convnet's (32 on 1, 64 on 32) and its CIFAR
    first layer (32 on 3), 5×5, with the shipped thresholds: the first layers (1-3 channels, 3×3 or 5×5) and a
    thin one (few filters) go direct; inner layers with few taps but many filters (1×1 on 64 channels, 3×3 on
    8) and a stride of 2 take im2col."""
    rng = np.random.default_rng(0)
    for (C, F, K, stride), want in {(1, 6, 5, 1): True, (6, 16, 5, 1): False, (1, 32, 5, 1): True,
                                    (3, 32, 5, 1): True, (3, 32, 3, 1): True, (4, 32, 5, 1): False,
                                    (4, 8, 5, 1): True, (32, 64, 5, 1): False, (1, 6, 5, 2): False,
                                    (64, 128, 1, 1): False, (8, 64, 3, 1): False, (3, 32, 2, 1): False}.items():
        x = rng.standard_normal((2, C, 12, 12)).astype(np.float32)
        _, cache = B.conv2d_forward(x, np.ones((F, C, K, K), np.float32), np.zeros(F, np.float32), stride, K // 2)
        assert cache.direct == want, (C, F, K, stride)


@pytest.mark.parametrize("engine", ["picked", "openblas"])
@pytest.mark.parametrize("split", [0, 1e30], ids=["split", "one-call"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("b_transposed", [True, False], ids=["b=Wt", "b=W"])
@pytest.mark.parametrize("M,K,N", [(3, 5, 2), (64, 400, 120), (120, 64, 400), (257, 300, 33), (1, 7, 9)])
def test_matmul_agrees_with_numpy(monkeypatch, dtype, M, K, N, split, b_transposed, engine):
    """The dense layers' product: split over the workers by columns (wider than tall) or rows (large), or one
    call (small), any strides; a single row too; on the GEMM the backend picks and on numpy's OpenBLAS."""
    monkeypatch.setattr(dense, "MATMUL_SPLIT_FLOPS", split)
    if engine == "openblas":
        if split:
            pytest.skip("one call goes to numpy's np.dot, on OpenBLAS, whatever the kernels' GEMM")
        _openblas_gemm(monkeypatch)
    rng = np.random.default_rng(M * N + K)
    a = rng.standard_normal((K, M)).astype(dtype).T                     # a transposed view, like δᵀ
    b = rng.standard_normal((N, K)).astype(dtype).T if b_transposed else rng.standard_normal((K, N)).astype(dtype)
    got = B.matmul(a, b)
    assert got.shape == (M, N) and got.dtype == dtype and got.flags.c_contiguous
    assert rel_err(got, a.astype(np.float64) @ b.astype(np.float64)) <= (1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(got, B.matmul(a, b))                  # deterministic


@pytest.mark.parametrize("n", [5, 3 * optim.UPDATE_SPLIT + 7], ids=["serial", "parallel"])
@pytest.mark.parametrize("opt", ["sgd", "sgd_nesterov_wd", "sgd_plain", "adam_wd"])
def test_optimizer_updates_agree_with_numpy_in_float32(opt, n):
    """The fused update kernels give the numpy backend's float32 arithmetic, step after step."""
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(np.float32)
    ours, ref = ([p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)] for _ in range(2))   # p, m, v
    for t in range(1, 5):
        g = rng.standard_normal(n).astype(np.float32)
        for backend, (p, m, v) in ((B, ours), (REF, ref)):
            if opt == "adam_wd":
                backend.adam_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 1e-3, t)
            elif opt == "sgd_plain":
                backend.sgd_update(p, g, None, 0.05)
            else:
                nesterov = opt == "sgd_nesterov_wd"
                backend.sgd_update(p, g, m, 0.05, 0.9, nesterov, 1e-2 if nesterov else 0.0, first=t == 1)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(a, r, rtol=2e-6, atol=1e-7)
    assert not np.array_equal(ours[0], p0)


@pytest.mark.parametrize("n", [5, 3 * optim.UPDATE_SPLIT + 7], ids=["serial", "parallel"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_decaying_optimizer_state_is_flushed_to_zero_not_left_subnormal(opt, n, dtype):
    """A unit whose gradient stays 0: its momentum (Adam: m and v) decays geometrically; below the smallest normal
    number both backends set it to 0 at the same step (subnormals cost ~100 cycles an operation on x86)."""
    tiny = np.finfo(dtype).tiny
    states = []
    for backend in (B, REF):
        p, g = np.ones(n, dtype), np.zeros(n, dtype)
        m, v = np.full(n, tiny * 4, dtype), np.full(n, tiny * 4, dtype)
        seen = []
        for t in range(1, 40):
            if opt == "adam":
                backend.adam_update(p, g, m, v, 1e-3, 0.5, 0.5, 1e-8, 0.0, t)
            else:
                backend.sgd_update(p, g, m, 0.05, 0.5, False, 0.0)
            bufs = (m, v) if opt == "adam" else (m,)
            assert not any(np.any((b != 0) & (np.abs(b) < tiny)) for b in bufs), (backend.__name__, t)
            seen.append(float(m[0]))
        states.append(seen)
    assert states[0] == states[1] and states[0][0] > 0 and states[0][-1] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (64, 6, 28, 28)], ids=["serial", "split"])
def test_relu_agrees_with_numpy(dtype, shape):
    """Rule 7 for ReLU: max(x, 0) forward, δ where y > 0 backward; exact zeros and NaN as numpy has them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[:3] = (0.0, -0.0, np.nan)
    delta = rng.standard_normal(shape).astype(dtype)
    y = B.relu_forward(x)
    np.testing.assert_array_equal(y, REF.relu_forward(x))
    np.testing.assert_array_equal(B.relu_backward(delta, y), REF.relu_backward(delta, REF.relu_forward(x)))
    assert y.dtype == dtype and y.shape == shape


def test_the_gemm_is_sequential_mkl_where_the_fast_extra_is_installed_on_an_intel_cpu():
    """`make setup` installs the `fast` extra (the mkl wheel); on an Intel CPU the kernels' GEMM is then MKL's
    cblas_sgemm in its sequential layer (one thread a call: numba's threads make the calls), else OpenBLAS's."""
    import ctypes
    from importlib import metadata
    try:
        metadata.version("mkl")
    except metadata.PackageNotFoundError:
        pytest.skip("the mkl wheel (the fast extra) is not installed")
    path = runtime.gemm_library(np.float32)
    assert path == runtime.gemm_library(np.float64)
    if not runtime._intel_cpu():
        assert "mkl" not in path
        return
    mkl = ctypes.CDLL(path)
    address = ctypes.cast(runtime.blas_gemm(np.float32), ctypes.c_void_p).value
    assert address == ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p).value
    assert mkl.MKL_Set_Threading_Layer(-1) == 1                         # -1 asks; 1: MKL_THREADING_SEQUENTIAL
