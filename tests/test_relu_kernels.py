"""Rule 7 for ReLU in every backend: relu_forward/relu_backward against PyTorch autograd and float64 finite
differences on randomized shapes (the kernels the ReLU layer calls; tanh and sigmoid are numpy in the layer)."""
import numpy as np
import pytest
import torch
from kernel_oracle import DTYPES, assert_close

from cnnpipe.backends import get_backend
from cnnpipe.gradcheck import central_difference

BACKENDS = ["reference", "numpy", "numba"]
SHAPES = [tuple(int(d) for d in np.random.default_rng(seed).integers(1, 9, size=ndim)) + extra
          for seed, (ndim, extra) in enumerate([(2, ()), (4, ()), (3, (33,)), (2, (70_001,))])]   # the last: big


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_relu_matches_torch_autograd(backend, shape, dtype):
    B, rng = get_backend(backend), np.random.default_rng(sum(shape))
    x, dy = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = torch.relu(tx)
    (ref_dx,) = torch.autograd.grad(ty, tx, torch.from_numpy(dy))
    y = B.relu_forward(x)
    assert_close("relu y", y, ty.detach().numpy(), dtype)
    assert_close("relu dx", B.relu_backward(dy, y), ref_dx.numpy(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_backward_matches_finite_differences(backend):
    """L = Σ relu(x) ⊙ dy in float64, x kept at least 0.05 from the kink at 0 (the FD step is 1e-6)."""
    B, rng = get_backend(backend), np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 5, 6))
    x = np.where(np.abs(x) < 0.05, 0.05 * np.sign(x + 1e-12), x)
    dy = rng.standard_normal(x.shape)
    dx = B.relu_backward(dy, B.relu_forward(x))
    idx = np.arange(x.size)
    fd = central_difference(lambda: float(np.sum(B.relu_forward(x) * dy)), x, idx, 1e-6).reshape(x.shape)
    assert_close("relu dx vs finite differences", dx, fd, np.float64, tol=1e-7)
