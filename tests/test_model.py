"""Whole-model gradients: hand-written backprop against finite differences (float64) and PyTorch autograd."""
import numpy as np
import pytest
import torch

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend
from cnnpipe.gradcheck import gradcheck
from cnnpipe.losses import softmax_cross_entropy
from cnnpipe.model import build_model
from cnnpipe.optim import SGD, Adam
from cnnpipe.torch_ref import torch_twin

ARCHS = [["model=lenet5"], ["model=convnet"], ["model=custom_example"]]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a[0])
@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("k", [5, 4])
def test_model_gradients_match_finite_differences(compose_cfg, arch, pool, k):
    cfg = compose_cfg(arch + [f"pool={pool}", f"conv.k={k}"])
    rows = gradcheck(cfg, batch=2, samples=6, seed=k)
    worst = {name: err for name, _, err in rows}
    assert set(worst) >= {"conv1.W", "conv1.b", "input"}
    assert max(worst.values()) < 1e-5, worst


def test_gradcheck_detects_a_wrong_rule(compose_cfg, monkeypatch):
    """The check must be able to fail: a mean-pool backward that forgets the 1/size² weight is caught."""
    from cnnpipe.backends import numpy_backend as B
    real = B.pool2d_backward
    monkeypatch.setattr(B, "pool2d_backward", lambda dy, cache: real(dy, cache) * 4.0)
    rows = gradcheck(compose_cfg(["pool=mean"]), batch=2, samples=4)
    assert max(err for _, _, err in rows) > 1e-2


@pytest.mark.parametrize("overrides", [
    ["model=lenet5", "pool=max"], ["model=lenet5", "pool=mean", "conv.k=3"], ["model=convnet", "conv.k=4"],
    ["model=custom_example", "pool=mean"], ["model=lenet5", "conv.stride=2", "conv.k=3", "model.activation=sigmoid"],
])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", ["numpy", "numba", "reference"])
def test_model_gradients_match_torch_autograd(compose_cfg, overrides, dtype, backend):
    cfg = compose_cfg(overrides + [f"dtype={dtype}", f"backend={backend}"])
    model = build_model(cfg)
    for layer in model.layers:
        if hasattr(layer, "need_dx"):
            layer.need_dx = True
    net = torch_twin(model).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, *model.in_shape)).astype(dtype)
    y = rng.integers(0, 10, size=4)
    loss, delta = softmax_cross_entropy(model.forward(x, train=False), y)
    dx = model.backward(delta)
    xt = torch.from_numpy(x).requires_grad_()
    lt = torch.nn.functional.cross_entropy(net(xt), torch.from_numpy(y))
    lt.backward()
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == "float64" else dict(rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(loss, lt.item(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    ours = [g for layer in model.layers for g in (layer.grads.get("W"), layer.grads.get("b")) if g is not None]
    theirs = [p.grad.numpy() for p in net.parameters()]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.dtype == np.dtype(dtype)
        if dtype == "float32":    # float32 sums of many terms cancel: the error scales with the array's largest
            tol = dict(rtol=2e-4, atol=2e-6 * max(1.0, float(np.abs(b).max())))   # entries, not with each entry
        np.testing.assert_allclose(a, b, **tol)


@pytest.mark.parametrize("size", [4, 1 << 17], ids=["small", "large"])   # numba: serial / parallel update
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name", ["sgd", "sgd_plain", "sgd_nesterov_wd", "adam"])
def test_optimizers_follow_torch(name, backend, size):
    rng = np.random.default_rng(0)
    B = get_backend(backend)
    p0 = {"w": rng.standard_normal((3, size)), "b": rng.standard_normal(4)}
    ours = {k: v.copy() for k, v in p0.items()}
    tp = [torch.tensor(p0["w"], requires_grad=True), torch.tensor(p0["b"], requires_grad=True)]
    if name == "adam":
        opt, topt = Adam(ours, 1e-2, weight_decay=1e-3, backend=B), torch.optim.Adam(tp, 1e-2, weight_decay=1e-3)
    elif name == "sgd":
        opt, topt = SGD(ours, 0.1, momentum=0.9, backend=B), torch.optim.SGD(tp, 0.1, momentum=0.9)
    elif name == "sgd_plain":
        opt, topt = SGD(ours, 0.1, backend=B), torch.optim.SGD(tp, 0.1)
    else:
        opt = SGD(ours, 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, backend=B)
        topt = torch.optim.SGD(tp, 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for _ in range(5):
        g = {"w": rng.standard_normal((3, size)), "b": rng.standard_normal(4)}
        opt.step(g, lr=opt.lr)
        for t, k in zip(tp, ("w", "b")):
            t.grad = torch.tensor(g[k])
        topt.step()
    np.testing.assert_allclose(ours["w"], tp[0].detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours["b"], tp[1].detach().numpy(), rtol=1e-12, atol=1e-15)


def test_dropout_is_identity_in_eval_and_scaled_in_training(compose_cfg):
    model = build_model(compose_cfg(["model=convnet", "dtype=float64"]))
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28))
    a, b = model.forward(x, train=False), model.forward(x, train=False)
    np.testing.assert_array_equal(a, b)
    drop = next(layer for layer in model.layers if layer.kind == "dropout")
    h = np.ones((1000, 50))
    out = drop.forward(h, train=True)
    assert set(np.unique(out)) == {0.0, 1 / 0.6}
    assert abs((out == 0).mean() - 0.4) < 0.02


@pytest.mark.parametrize("overrides, words", [
    (["conv.k=15"], ["conv2", "6x14x14", "smaller than 1x1"]),
    (["conv.k=0"], ["conv1", "k=0"]),
    (["model.activation=swish"], ["swish", "relu"]),
    (["data=cifar100", "model.layers.11.units=10"], ["100 classes"]),
])
def test_impossible_architectures_name_the_layer(compose_cfg, overrides, words):
    with pytest.raises(ConfigError) as e:
        build_model(compose_cfg(overrides))
    for w in words:
        assert w in str(e.value)


def test_summary_counts_parameters(compose_cfg):
    model = build_model(compose_cfg(["model=lenet5"]))
    net = torch_twin(model, copy_weights=False)
    assert model.param_count() == sum(p.numel() for p in net.parameters()) == 61706
    assert "conv1" in model.summary() and "61,706" in model.summary()
