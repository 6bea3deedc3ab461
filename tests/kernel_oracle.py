"""One reusable oracle for backend kernels (tinygrad style): any backend module B, any shape, any dtype.

    from tests.kernel_oracle import (check_conv_against_torch, check_pool_against_torch,
                                     fd_check_conv, fd_check_pool, random_conv_cases, random_pool_cases)

    check_conv_against_torch(B, N, C, H, W, F, K, stride, pad, dtype)    # forward + rules 4, 5, 6 vs torch autograd
    check_pool_against_torch(B, N, C, H, W, size, stride, mode, dtype)   # forward + rules 2, 3 vs torch autograd
    fd_check_conv(B, N, C, H, W, F, K, stride, pad)                      # float64 central differences
    fd_check_pool(B, N, C, H, W, size, stride, mode)                     # float64, inputs kept off max ties
    conv_shapes(H, W, K, stride, pad) -> (Ho, Wo)                        # a window's output size (pool: pad 0)
    conv_data(case, dtype, seed) -> x, w, b, dy, stride, pad             # random arrays of a conv case
    EDGE_CONV_CASES, EDGE_POOL_CASES, DTYPES, case_id                    # the cases every backend is checked on
    random_conv_cases(seed, n) -> [(N, C, H, W, F, K, stride, pad), ...] # valid, varied shapes
    random_pool_cases(seed, n) -> [(N, C, H, W, size, stride, mode), ...]

Each check raises AssertionError naming the tensor and the error, and returns {name: relative error}.
Errors are normwise: max|got - ref| / max|ref|; tolerances 1e-10 (float64) and 1e-5 (float32).
The upstream gradient is a random dy, i.e. the loss is L = Σ y ⊙ dy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as TF

from cnnpipe.gradcheck import central_difference
from cnnpipe.shapes import out_size

TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
DTYPES = [np.float32, np.float64]

# hand-picked edges every backend is checked on (N, C, H, W, F, K, stride, pad); each backend's tests add the
# layer shapes and randomized cases they care about
EDGE_CONV_CASES = [
    (2, 3, 8, 8, 4, 3, 1, 1),    # odd K, "same" padding
    (2, 2, 9, 7, 3, 4, 1, 0),    # even K, rectangular
    (1, 2, 10, 11, 3, 2, 2, 0),  # even K, stride 2, remainder column dropped
    (2, 1, 7, 7, 2, 3, 3, 2),    # stride 3 with pad: padded rows no window reaches
    (3, 2, 5, 6, 2, 1, 2, 3),    # 1x1 kernel, big pad
    (1, 1, 2, 3, 1, 6, 1, 2),    # kernel larger than the unpadded input
]
EDGE_POOL_CASES = [                                             # (N, C, H, W, size, stride, mode)
    (2, 3, 8, 8, 2, 2, "max"), (2, 3, 8, 8, 2, 2, "mean"),      # tiled
    (2, 2, 7, 9, 2, 2, "max"), (2, 2, 7, 9, 2, 2, "mean"),      # uneven: remainder dropped, zero grad
    (2, 2, 9, 8, 3, 2, "max"), (2, 2, 9, 8, 3, 2, "mean"),      # overlapping
    (2, 2, 9, 10, 2, 3, "max"), (2, 2, 9, 10, 2, 3, "mean"),    # gapped
    (1, 2, 6, 6, 1, 1, "max"), (1, 2, 5, 5, 3, 1, "mean"),      # size 1; stride 1 heavy overlap
]


def case_id(case):
    return "-".join(map(str, case))


def rel_err(got, ref):
    """Normwise relative error max|got - ref| / max|ref| (0 when both are all zero)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-300))


def assert_close(name, got, ref, dtype, tol=None):
    """got must have ref's shape, the given dtype, and agree to the dtype's tolerance."""
    dtype = np.dtype(dtype)
    assert isinstance(got, np.ndarray), f"{name}: expected a numpy array, got {type(got).__name__}"
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype} (output dtype follows input)"
    err = rel_err(got, ref)
    tol = TOL[dtype] if tol is None else tol
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.1g}"
    return err


def _distinct(rng, shape, dtype, spacing=0.1):
    """Random values at least `spacing` apart: no max-pool ties, and FD steps cannot swap winners."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * spacing).reshape(shape).astype(dtype)


def _torch(a):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)


def conv_shapes(H, W, K, stride, pad):
    """Ho, Wo of a window: cnnpipe's own rule is fine here, since torch's output (its shape too) is the oracle."""
    return out_size(H, K, stride, pad), out_size(W, K, stride, pad)


def conv_data(case, dtype, seed=0):
    """x, w, b and an upstream dy for a conv case (N, C, H, W, F, K, stride, pad), standard normal in dtype, and
    the case's stride and pad."""
    N, C, H, W, F, K, S, P = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)  # N,C,H,W
    w = rng.standard_normal((F, C, K, K)).astype(dtype)  # F,C,K,K
    b = rng.standard_normal(F).astype(dtype)  # F
    dy = rng.standard_normal((N, F, *conv_shapes(H, W, K, S, P))).astype(dtype)  # N,F,Ho,Wo
    return x, w, b, dy, S, P


def check_conv_against_torch(B, N, C, H, W, F, K, stride, pad, dtype, seed=0):
    """B.conv2d_forward/backward vs torch.nn.functional.conv2d + autograd in the same dtype."""
    x, w, b, dy, _, _ = conv_data((N, C, H, W, F, K, stride, pad), dtype, seed)
    y, cache = B.conv2d_forward(x, w, b, stride=stride, pad=pad)
    dx, dw, db = B.conv2d_backward(dy, cache)
    tx, tw, tb = _torch(x), _torch(w), _torch(b)
    ty = TF.conv2d(tx, tw, tb, stride=stride, padding=pad)
    ty.backward(torch.from_numpy(dy))
    return {"y": assert_close("conv y", y, ty.detach().numpy(), dtype),
            "dx": assert_close("conv dx (rule 4)", dx, tx.grad.numpy(), dtype),
            "dw": assert_close("conv dw (rule 5)", dw, tw.grad.numpy(), dtype),
            "db": assert_close("conv db (rule 6)", db, tb.grad.numpy(), dtype)}


def check_pool_against_torch(B, N, C, H, W, size, stride, mode, dtype, seed=0):
    """B.pool2d_forward/backward vs torch max_pool2d / avg_pool2d + autograd (distinct inputs: no ties)."""
    rng = np.random.default_rng(seed)
    x = _distinct(rng, (N, C, H, W), dtype)  # N,C,H,W
    Ho, Wo = conv_shapes(H, W, size, stride, 0)
    dy = rng.standard_normal((N, C, Ho, Wo)).astype(dtype)  # N,C,Ho,Wo
    y, cache = B.pool2d_forward(x, size=size, stride=stride, mode=mode)
    dx = B.pool2d_backward(dy, cache)
    tx = _torch(x)
    pool = TF.max_pool2d if mode == "max" else TF.avg_pool2d
    ty = pool(tx, kernel_size=size, stride=stride)
    ty.backward(torch.from_numpy(dy))
    rule = "rule 2" if mode == "max" else "rule 3"
    return {"y": assert_close(f"{mode}-pool y", y, ty.detach().numpy(), dtype),
            "dx": assert_close(f"{mode}-pool dx ({rule})", dx, tx.grad.numpy(), dtype)}


def _fd_compare(name, analytic, loss, a, rng, max_entries, eps, tol):
    idx = np.arange(a.size) if a.size <= max_entries else rng.choice(a.size, max_entries, replace=False)
    num = central_difference(loss, a, idx, eps)
    got = np.asarray(analytic).reshape(-1)[idx]
    err = float(np.max(np.abs(got - num)) / max(np.max(np.abs(num)), 1.0))
    assert err <= tol, f"{name}: finite-difference relative error {err:.3g} > {tol:.1g}"
    return err


def fd_check_conv(B, N, C, H, W, F, K, stride, pad, seed=0, max_entries=40, eps=1e-5, tol=1e-7):
    """Rules 4, 5, 6 vs float64 central differences of L = Σ conv(x, w, b) ⊙ R (up to max_entries each)."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, K, K)), rng.standard_normal(F)
    R = rng.standard_normal((N, F, *conv_shapes(H, W, K, stride, pad)))  # N,F,Ho,Wo

    def loss():
        return float(np.sum(B.conv2d_forward(x, w, b, stride=stride, pad=pad)[0] * R))

    dx, dw, db = B.conv2d_backward(R, B.conv2d_forward(x, w, b, stride=stride, pad=pad)[1])
    return {"dx": _fd_compare("conv dx (rule 4)", dx, loss, x, rng, max_entries, eps, tol),
            "dw": _fd_compare("conv dw (rule 5)", dw, loss, w, rng, max_entries, eps, tol),
            "db": _fd_compare("conv db (rule 6)", db, loss, b, rng, max_entries, eps, tol)}


def fd_check_pool(B, N, C, H, W, size, stride, mode, seed=0, max_entries=60, eps=1e-5, tol=1e-7):
    """Rules 2, 3 vs float64 central differences of L = Σ pool(x) ⊙ R; x distinct, 0.1 apart (≫ eps)."""
    rng = np.random.default_rng(seed)
    x = _distinct(rng, (N, C, H, W), np.float64)
    R = rng.standard_normal((N, C, *conv_shapes(H, W, size, stride, 0)))  # N,C,Ho,Wo

    def loss():
        return float(np.sum(B.pool2d_forward(x, size=size, stride=stride, mode=mode)[0] * R))

    dx = B.pool2d_backward(R, B.pool2d_forward(x, size=size, stride=stride, mode=mode)[1])
    rule = "rule 2" if mode == "max" else "rule 3"
    return {"dx": _fd_compare(f"{mode}-pool dx ({rule})", dx, loss, x, rng, max_entries, eps, tol)}


def random_conv_cases(seed, n, kernels=range(1, 7), strides=range(1, 4), channels=range(1, 5), filters=range(1, 5)):
    """n valid conv shapes (N, C, H, W, F, K, stride, pad): by default K 1-6, stride 1-3, C and F 1-4; pad 0-3,
    H != W often."""
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < n:
        K, S, P = int(rng.choice(kernels)), int(rng.choice(strides)), int(rng.integers(0, 4))
        H, W = (int(v) for v in rng.integers(max(1, K - 2 * P), K + 9, size=2))
        if H + 2 * P >= K:
            cases.append((int(rng.integers(1, 4)), int(rng.choice(channels)), H, W, int(rng.choice(filters)), K, S, P))
    return cases


def random_pool_cases(seed, n):
    """n valid pool shapes (N, C, H, W, size, stride, mode): size 1-4, stride 1-4 (overlap, gaps, tiling)."""
    rng, cases = np.random.default_rng(seed), []
    for _ in range(n):
        k, S = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        H, W = (int(v) for v in rng.integers(k, k + 9, size=2))
        cases.append((int(rng.integers(1, 4)), int(rng.integers(1, 4)), H, W, k, S, str(rng.choice(["max", "mean"]))))
    return cases
