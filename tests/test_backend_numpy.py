"""numpy backend (the reference) vs torch autograd, finite differences, and the literal rule-4/5 forms."""
import numpy as np
import pytest
from kernel_oracle import (
    DTYPES,
    EDGE_CONV_CASES,
    EDGE_POOL_CASES,
    case_id,
    check_conv_against_torch,
    check_pool_against_torch,
    fd_check_conv,
    fd_check_pool,
    random_conv_cases,
    random_pool_cases,
    rel_err,
)

from cnnpipe import ConfigError
from cnnpipe.backends import BACKENDS, get_backend
from cnnpipe.backends import numpy_backend as B
from cnnpipe.backends import reference as REF

# the shared edges + LeNet-5's layers + randomized shapes (K 1-6, stride 1-3, pad 0-3, H != W)
CONV_CASES = EDGE_CONV_CASES + [
    (2, 1, 28, 28, 6, 5, 1, 2),  # LeNet-5 conv1
    (2, 6, 14, 14, 16, 5, 1, 0),  # LeNet-5 conv2
] + random_conv_cases(seed=1, n=24)
POOL_CASES = EDGE_POOL_CASES + random_pool_cases(seed=2, n=24)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_matches_torch(case, dtype):
    check_conv_against_torch(B, *case, dtype=dtype, seed=len(case) + sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_matches_torch(case, dtype):
    check_pool_against_torch(B, *case, dtype=dtype, seed=case[2] * case[3])


@pytest.mark.parametrize("case", CONV_CASES[:6] + random_conv_cases(seed=3, n=6), ids=case_id)
def test_conv_finite_differences(case):
    fd_check_conv(B, *case)


@pytest.mark.parametrize("case", POOL_CASES[:10] + random_pool_cases(seed=4, n=6), ids=case_id)
def test_pool_finite_differences(case):
    fd_check_pool(B, *case)


@pytest.mark.parametrize("case", CONV_CASES[:8] + random_conv_cases(seed=5, n=8), ids=case_id)
def test_rule4_flipped_kernel_and_rule5_reference_equal_fast_path(case):
    """im2col + GEMM gives the literal formulas' numbers (the reference backend: full convolution of δ with the
    flipped kernel, valid correlation of the zero-padded input with δ)."""
    N, C, H, W, F, K, S, P = case
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, K, K)), rng.standard_normal(F)
    y, cache = B.conv2d_forward(x, w, b, stride=S, pad=P)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = B.conv2d_backward(dy, cache)
    ref_y, ref_cache = REF.conv2d_forward(x, w, b, stride=S, pad=P)
    ref_dx, ref_dw, ref_db = REF.conv2d_backward(dy, ref_cache)
    for got, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw), (db, ref_db)):
        assert rel_err(got, ref) < 1e-12


def test_flipped_kernel_reference_really_flips():
    """An asymmetric kernel: rule 4 without the flip would give a different (wrong) answer."""
    x = np.zeros((1, 1, 5, 5))
    w = np.arange(9.0).reshape(1, 1, 3, 3)
    y, cache = B.conv2d_forward(x, w, np.zeros(1))
    dy = np.zeros(y.shape)
    dy[0, 0, 1, 1] = 1.0  # one output neuron: its δ reaches x[1:4, 1:4] through w itself (unflipped)
    dx, _, _ = B.conv2d_backward(dy, cache)
    ref = REF.conv2d_backward(dy, REF.conv2d_forward(x, w, np.zeros(1))[1])[0]     # flip(W), written out
    np.testing.assert_array_equal(dx[0, 0, 1:4, 1:4], w[0, 0])
    np.testing.assert_array_equal(ref, dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_need_dx_false_skips_rule4_only(dtype):
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in [(2, 3, 9, 9), (4, 3, 3, 3), (4,)])
    y, cache = B.conv2d_forward(x, w, b, stride=2, pad=1)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx0, dw0, db0 = B.conv2d_backward(dy, cache, need_dx=False)
    dx1, dw1, db1 = B.conv2d_backward(dy, cache)
    assert dx0 is None and dx1 is not None and dx1.shape == x.shape
    np.testing.assert_array_equal(dw0, dw1)
    np.testing.assert_array_equal(db0, db1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dtype_preserved_everywhere(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 10, 10)).astype(dtype)
    w, b = rng.standard_normal((4, 3, 3, 3)).astype(dtype), rng.standard_normal(4).astype(dtype)
    y, cache = B.conv2d_forward(x, w, b, stride=1, pad=1)
    grads = B.conv2d_backward(np.ones_like(y), cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    for size, stride in [(2, 2), (3, 2), (2, 3)]:
        for mode in ("max", "mean"):
            p, pc = B.pool2d_forward(y, size=size, stride=stride, mode=mode)
            assert p.dtype == dtype and B.pool2d_backward(np.ones_like(p), pc).dtype == dtype


def test_max_pool_ties_go_to_first_max_in_row_major_order():
    x = np.zeros((1, 1, 4, 5), dtype=np.float32)  # every window is a tie
    for size, stride in [(2, 2), (3, 1), (2, 3)]:
        y, cache = B.pool2d_forward(x, size=size, stride=stride, mode="max")
        dx = B.pool2d_backward(np.ones_like(y), cache)
        expect = np.zeros_like(x)
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                expect[0, 0, i * stride, j * stride] += 1  # top-left of each window; overlaps accumulate
        np.testing.assert_array_equal(dx, expect)


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 3), (3, 2), (2, 3), (3, 1)])
def test_max_pool_winners_match_loop_reference_with_many_ties(size, stride):
    """Integer inputs in 0..2 tie constantly; the winner must be the first max in row-major order."""
    rng = np.random.default_rng(size * 10 + stride)
    x = rng.integers(0, 3, size=(2, 3, 11, 9)).astype(np.float64)
    y, cache = B.pool2d_forward(x, size=size, stride=stride, mode="max")
    dy = rng.standard_normal(y.shape)
    dx = B.pool2d_backward(dy, cache)
    ref_y, ref_dx = np.zeros_like(y), np.zeros_like(x)
    for n, c, i, j in np.ndindex(*y.shape):
        win = x[n, c, i * stride:i * stride + size, j * stride:j * stride + size]
        a, b = divmod(int(np.argmax(win)), size)  # np.argmax: first max in row-major order
        ref_y[n, c, i, j] = win[a, b]
        ref_dx[n, c, i * stride + a, j * stride + b] += dy[n, c, i, j]
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_allclose(dx, ref_dx, rtol=0, atol=1e-14)


def test_max_pool_window_over_256_offsets():
    """size 17: 289 window offsets do not fit the uint8 winner index; the int32 path must be right."""
    check_pool_against_torch(B, 1, 2, 19, 18, 17, 1, "max", np.float64)


def test_overlapping_max_pool_accumulates():
    x = np.array([[[[0.0, 1.0, 0.0, 0.0, 0.0],
                    [0.0, 0.0, 9.0, 0.0, 0.0],
                    [0.0, 0.0, 0.0, 0.0, 0.0]]]])
    y, cache = B.pool2d_forward(x, size=3, stride=1, mode="max")  # 3 windows, all won by the 9
    dx = B.pool2d_backward(np.array([[[[1.0, 2.0, 4.0]]]]), cache)
    assert dx[0, 0, 1, 2] == 7.0 and dx.sum() == 7.0


@pytest.mark.parametrize("stride", [1, 2])
def test_chunked_im2col_matches_single_chunk(monkeypatch, stride):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((5, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y1, c1 = B.conv2d_forward(x, w, b, stride=stride, pad=1)
    dy = rng.standard_normal(y1.shape)
    g1 = B.conv2d_backward(dy, c1)
    cols_per_sample = 8 * 8 if stride == 1 else 4 * 4  # Ho*Wo
    monkeypatch.setattr(B, "COL_CHUNK_BYTES", 2 * 27 * cols_per_sample * 8)  # two samples a chunk -> 3 chunks
    y2, c2 = B.conv2d_forward(x, w, b, stride=stride, pad=1)
    assert c2[-2] is None and c2[-1] is not None  # the padded input was cached, not an im2col buffer
    g2 = B.conv2d_backward(dy, c2)
    assert rel_err(y2, y1) < 1e-14
    for a, r in zip(g2, g1):
        assert rel_err(a, r) < 1e-14


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_registered_backend_implements_the_contract(name):
    backend = get_backend(name)
    for fn in ("conv2d_forward", "conv2d_backward", "pool2d_forward", "pool2d_backward", "relu_forward",
               "relu_backward", "matmul", "sgd_update", "adam_update"):
        assert callable(getattr(backend, fn)), (name, fn)
    assert (backend is B) == (name == "numpy")


def test_an_unknown_backend_names_the_available_ones():
    with pytest.raises(ConfigError, match="Unknown backend 'cuda'. Available backends: " + ", ".join(BACKENDS)):
        get_backend("cuda")


@pytest.mark.parametrize("call", [
    lambda: B.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 1, 3, 3)), np.zeros(3)),  # channel mismatch
    lambda: B.conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 5, 5)), np.zeros(1)),  # kernel too big
    lambda: B.conv2d_forward(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1), stride=0),
    lambda: B.pool2d_forward(np.zeros((1, 1, 5, 5)), size=2, stride=2, mode="median"),
    lambda: B.pool2d_forward(np.zeros((1, 1, 3, 3)), size=4, stride=1),
])
def test_bad_shapes_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()
