"""reference backend (the derivation written literally) vs torch autograd, finite differences, the numpy and numba
backends, the 1-D example of docs/derivation.md, and `debug=overfit` trained from the command line."""
import ast
import json
import re

import numpy as np
import pytest
from conftest import REPO, run_script
from kernel_oracle import (
    DTYPES,
    assert_close,
    case_id,
    check_conv_against_torch,
    check_pool_against_torch,
    conv_data,
    conv_shapes,
    fd_check_conv,
    fd_check_pool,
    random_conv_cases,
    random_pool_cases,
)
from test_backend_numpy import CONV_CASES, POOL_CASES  # the numpy backend's edge cases + randomized shapes

from cnnpipe import ConfigError
from cnnpipe.backends import get_backend
from cnnpipe.backends import numpy_backend as NP
from cnnpipe.backends import reference as B
from cnnpipe.gradcheck import gradcheck
from cnnpipe.losses import softmax_cross_entropy
from cnnpipe.model import build_model


def _conv_grads(backend, x, w, b, dy, S, P):
    y, cache = backend.conv2d_forward(x, w, b, stride=S, pad=P)
    return (y, *backend.conv2d_backward(dy, cache))


def _pool_grads(backend, x, dy, size, S, mode):
    y, cache = backend.pool2d_forward(x, size=size, stride=S, mode=mode)
    return y, backend.pool2d_backward(dy, cache)


def _pool_data_with_ties(case, dtype, seed):
    """Integers 0..2 tie in almost every window: the winner must still be the first maximum in row-major order."""
    N, C, H, W, k, S, mode = case
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(N, C, H, W)).astype(dtype)  # N,C,H,W
    dy = rng.standard_normal((N, C, *conv_shapes(H, W, k, S, 0))).astype(dtype)  # N,C,Ho,Wo
    return x, dy, k, S, mode


# ----------------------------------------------------------------------------- against torch, numpy, numba, FD

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_matches_torch(case, dtype):
    check_conv_against_torch(B, *case, dtype=dtype, seed=len(case) + sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_matches_torch(case, dtype):
    check_pool_against_torch(B, *case, dtype=dtype, seed=case[2] * case[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", random_conv_cases(seed=21, n=16), ids=case_id)
def test_conv_matches_numpy_backend(case, dtype):
    x, w, b, dy, S, P = conv_data(case, dtype, seed=sum(case))
    for name, got, ref in zip(("y", "dx (rule 4)", "dw (rule 5)", "db (rule 6)"),
                              _conv_grads(B, x, w, b, dy, S, P), _conv_grads(NP, x, w, b, dy, S, P)):
        assert_close(f"conv {name}", got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", POOL_CASES[:10] + random_pool_cases(seed=22, n=12), ids=case_id)
def test_pool_matches_numpy_backend_with_ties(case, dtype):
    x, dy, k, S, mode = _pool_data_with_ties(case, dtype, seed=case[2] * case[3] + case[4])
    y, dx = _pool_grads(B, x, dy, k, S, mode)
    y_np, dx_np = _pool_grads(NP, x, dy, k, S, mode)
    if mode == "max":                                      # the same winners: the same values, bit for bit
        np.testing.assert_array_equal(y, y_np)
    assert_close(f"{mode}-pool y", y, y_np, dtype)
    assert_close(f"{mode}-pool dx", dx, dx_np, dtype)


def test_conv_and_pool_match_numba_backend():
    NB = pytest.importorskip("cnnpipe.backends.numba")
    for dtype in DTYPES:
        for case in CONV_CASES[:8]:
            x, w, b, dy, S, P = conv_data(case, dtype, seed=3)
            for got, ref in zip(_conv_grads(B, x, w, b, dy, S, P), _conv_grads(NB, x, w, b, dy, S, P)):
                assert_close(f"conv {case_id(case)}", got, ref, dtype)
        for case in POOL_CASES[:10]:
            x, dy, k, S, mode = _pool_data_with_ties(case, dtype, seed=4)
            for got, ref in zip(_pool_grads(B, x, dy, k, S, mode), _pool_grads(NB, x, dy, k, S, mode)):
                assert_close(f"pool {case_id(case)}", got, ref, dtype)


@pytest.mark.parametrize("case", CONV_CASES[:6] + random_conv_cases(seed=23, n=6), ids=case_id)
def test_conv_finite_differences(case):
    fd_check_conv(B, *case)


@pytest.mark.parametrize("case", POOL_CASES[:10] + random_pool_cases(seed=24, n=6), ids=case_id)
def test_pool_finite_differences(case):
    fd_check_pool(B, *case)


# ----------------------------------------------------------------------------- the slides' vocabulary and edges

def test_conv2d_is_correlation_and_flip_makes_it_convolution():
    """conv2d is deep learning's convolution (scipy's correlate2d); with flip() it is the textbook convolution."""
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(0)
    for shape_a, shape_k in [((6, 7), (3, 3)), ((5, 5), (2, 4)), ((4, 9), (4, 1))]:
        a, k = rng.standard_normal(shape_a), rng.standard_normal(shape_k)
        np.testing.assert_allclose(B.conv2d(a, k, "valid"), signal.correlate2d(a, k, "valid"), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(B.conv2d(a, B.flip(k), "valid"), signal.convolve2d(a, k, "valid"),
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(B.flip(np.arange(6).reshape(2, 3)), [[5, 4, 3], [2, 1, 0]])
    np.testing.assert_array_equal(B.crop(B.zeropad(np.ones((2, 3)), 2), 2), np.ones((2, 3)))
    assert B.zeropad(np.ones((2, 3)), 1).sum() == 6 and B.zeropad(np.ones((2, 3)), 1).shape == (4, 5)
    np.testing.assert_array_equal(B.dilate(np.array([[1, 2], [3, 4]]), 2, (4, 3)),
                                  [[1, 0, 2], [0, 0, 0], [3, 0, 4], [0, 0, 0]])
    with pytest.raises(ValueError, match="valid"):
        B.conv2d(np.ones((3, 3)), np.ones((2, 2)), "full")


def test_overlapping_max_pool_accumulates():
    x = np.array([[[[0.0, 1.0, 0.0, 0.0, 0.0],
                    [0.0, 0.0, 9.0, 0.0, 0.0],
                    [0.0, 0.0, 0.0, 0.0, 0.0]]]])
    y, cache = B.pool2d_forward(x, size=3, stride=1, mode="max")      # 3 windows, all won by the 9
    dx = B.pool2d_backward(np.array([[[[1.0, 2.0, 4.0]]]]), cache)
    assert dx[0, 0, 1, 2] == 7.0 and dx.sum() == 7.0


def test_remainders_get_zero_gradient():
    """Rows/cols no window reaches (a stride that does not divide, an uneven pool) get exactly 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 8, 9))                            # conv K=3 stride 3: rows 6,7 and col 6..8
    y, cache = B.conv2d_forward(x, rng.standard_normal((2, 2, 3, 3)), np.zeros(2), stride=3, pad=0)
    dx = B.conv2d_backward(np.ones_like(y), cache)[0]
    assert y.shape == (2, 2, 2, 3) and not dx[:, :, 6:].any() and dx[:, :, :6].all()
    for mode in ("max", "mean"):
        p, pc = B.pool2d_forward(x[:, :, :7, :9], size=2, stride=2, mode=mode)   # 7x9: last row and col dropped
        dxp = B.pool2d_backward(np.ones_like(p), pc)
        assert p.shape == (2, 2, 3, 4) and not dxp[:, :, 6].any() and not dxp[:, :, :, 8].any()
        assert dxp.sum() == pytest.approx(p.size)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_need_dx_false_skips_rule4_only(dtype):
    x, w, b, dy, S, P = conv_data((2, 3, 9, 9, 4, 3, 2, 1), dtype, seed=0)
    _, cache = B.conv2d_forward(x, w, b, stride=S, pad=P)
    dx0, dw0, db0 = B.conv2d_backward(dy, cache, need_dx=False)
    dx1, dw1, db1 = B.conv2d_backward(dy, cache)
    assert dx0 is None and dx1 is not None and dx1.shape == x.shape
    np.testing.assert_array_equal(dw0, dw1)
    np.testing.assert_array_equal(db0, db1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dtype_follows_the_input(dtype):
    """Every output is in x's dtype, also when the weights or δ come in the other precision."""
    other = np.float64 if dtype == np.float32 else np.float32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 10, 10)).astype(dtype)
    y, cache = B.conv2d_forward(x, rng.standard_normal((4, 3, 3, 3)).astype(other), np.zeros(4, other), 1, 1)
    grads = B.conv2d_backward(np.ones(y.shape, other), cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads) and y.flags.c_contiguous
    for size, stride in [(2, 2), (3, 2), (2, 3)]:
        for mode in ("max", "mean"):
            p, pc = B.pool2d_forward(y, size=size, stride=stride, mode=mode)
            assert p.dtype == dtype and B.pool2d_backward(np.ones(p.shape, other), pc).dtype == dtype


@pytest.mark.parametrize("call", [
    lambda: B.conv2d_forward(np.zeros((1, 2, 5, 5)), np.zeros((3, 1, 3, 3)), np.zeros(3)),  # channel mismatch
    lambda: B.conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 5, 5)), np.zeros(1)),  # kernel too big
    lambda: B.conv2d_forward(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1), stride=0),
    lambda: B.conv2d_forward(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), np.zeros(1), pad=-1),
    lambda: B.pool2d_forward(np.zeros((1, 1, 5, 5)), size=2, stride=2, mode="median"),
    lambda: B.pool2d_forward(np.zeros((1, 1, 3, 3)), size=4, stride=1),
    lambda: B.pool2d_forward(np.zeros((5, 5)), size=2, stride=2),
])
def test_bad_shapes_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()


def test_dense_and_optimizer_kernels_are_the_numpy_backends():
    """Re-exported, not copied: the dense product and the updates have one implementation."""
    assert (B.matmul, B.sgd_update, B.adam_update) == (NP.matmul, NP.sgd_update, NP.adam_update)


# ----------------------------------------------------------------------------- the 1-D example of docs/derivation.md

def _eval_int(expr, names):
    """Evaluate + - * arithmetic on integers and the given names; anything else in the doc is an error."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise AssertionError(f"docs/derivation.md: cannot read {ast.dump(node)} in {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


DOC = REPO / "docs" / "derivation.md"


def _doc_example(path=DOC):
    """The fenced block after the 1d-example marker: the inputs, and {name: value} for every worked line, each
    line's arithmetic and its symbolic comment (x_i, w_k, δ_i) checked to give the value written."""
    text = path.read_text(encoding="utf-8")
    block = re.search(r"<!-- 1d-example.*?-->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/derivation.md: the 1-D example block (after '<!-- 1d-example') is missing"
    inputs, values = {}, {}
    for line in block.group(1).splitlines():
        code, _, comment = line.partition("#")
        parts = [p.strip() for p in code.split("=")]
        if len(parts) == 2:
            inputs[parts[0]] = ast.literal_eval(parts[1])
        elif len(parts) == 3:
            name, expr, value = parts[0], parts[1], int(parts[2])
            assert _eval_int(expr, {}) == value, f"docs/derivation.md: {line.strip()!r}: arithmetic is wrong"
            symbols = {f"{s}{i + 1}": v for s in ("x", "w", "d") for i, v in
                       enumerate(inputs[{"x": "x", "w": "w", "d": "delta"}[s]])}
            symbolic = comment.strip().replace("·", "*").replace("δ", "d")
            assert _eval_int(symbolic, symbols) == value, f"docs/derivation.md: {line.strip()!r}: symbols disagree"
            values[name] = value
    return inputs, values


def test_one_d_example_in_the_doc():
    """Rules 4, 5, 6 on the page's 1-D example: a 5x1 column, the 3x1 filter as the middle column of a 3x3
    kernel (its other columns zero), pad=1 (the zero at each end); the reference backend gives the doc's numbers."""
    inputs, doc = _doc_example()
    names = ([f"y{i}" for i in range(1, 6)] + [f"dL/dw{k}" for k in range(1, 4)] + ["dL/db"]
             + [f"dL/dx{j}" for j in range(1, 6)] + ["dL/dx1 without flip"])
    assert sorted(doc) == sorted(names), f"docs/derivation.md: worked lines {sorted(doc)}, expected {sorted(names)}"
    x1d, w1d, delta1d = (np.array(inputs[k], dtype=np.float64) for k in ("x", "w", "delta"))
    x = x1d.reshape(1, 1, 5, 1)                                        # N,C,H,W = 1,1,5,1
    w = np.zeros((1, 1, 3, 3))                                         # F,C,K,K
    w[0, 0, :, 1] = w1d
    y, cache = B.conv2d_forward(x, w, np.zeros(1), stride=1, pad=1)
    dx, dw, db = B.conv2d_backward(delta1d.reshape(1, 1, 5, 1), cache)
    np.testing.assert_array_equal(y.ravel(), [doc[f"y{i}"] for i in range(1, 6)])
    np.testing.assert_array_equal(dw[0, 0, :, 1], [doc[f"dL/dw{k}"] for k in range(1, 4)])     # rule 5
    np.testing.assert_array_equal(dw[0, 0, :, [0, 2]], 0)                                      # only padding there
    np.testing.assert_array_equal(db, [doc["dL/db"]])                                          # rule 6
    np.testing.assert_array_equal(dx.ravel(), [doc[f"dL/dx{j}"] for j in range(1, 6)])        # rule 4
    # the same slide with the plane helpers, flipped and not (the 3x1 filter as a 3x1 kernel)
    delta_col, w_col = delta1d.reshape(5, 1), w1d.reshape(3, 1)
    flipped = B.conv2d(B.zeropad(delta_col, 1), B.flip(w_col), "valid")[:, 1]                 # 5x3 -> middle col
    unflipped = B.conv2d(B.zeropad(delta_col, 1), w_col, "valid")[:, 1]
    np.testing.assert_array_equal(flipped, dx.ravel())
    assert unflipped[0] == doc["dL/dx1 without flip"] != doc["dL/dx1"]


@pytest.mark.parametrize("good, bad, error", [
    ("+ 1*3 + 1*0 = 3 ", "+ 1*3 + 1*0 = 4 ", "arithmetic is wrong"),          # a wrong sum
    ("# δ1·0  + δ2·x1", "# δ1·0  + δ2·x2", "symbols disagree"),               # a wrong term in the formula
])
def test_doc_example_check_can_fail(tmp_path, good, bad, error):
    """A wrong number or term in the page is caught: the parser recomputes the page, it does not trust it."""
    text = DOC.read_text(encoding="utf-8")
    assert text.count(good) == 1
    fake = tmp_path / "derivation.md"
    fake.write_text(text.replace(good, bad), encoding="utf-8")
    with pytest.raises(AssertionError, match=error):
        _doc_example(fake)


# ----------------------------------------------------------------------------- whole models, config, command line

@pytest.mark.parametrize("overrides", [["pool=max"], ["pool=mean", "conv.k=4", "model.activation=tanh"],
                                       ["model=custom_example"]], ids=lambda o: "-".join(o))
def test_whole_lenet_gradients_match_numpy_backend_and_finite_differences(compose_cfg, overrides):
    """Rules 1-7 through a whole model: every gradient equals the numpy backend's (float64) and finite differences."""
    cfg = compose_cfg(["backend=reference", "dtype=float64"] + overrides)
    assert max(err for _, _, err in gradcheck(cfg, batch=2, samples=6)) < 1e-5
    models = [build_model(cfg, get_backend(name), dtype=np.float64) for name in ("reference", "numpy")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *models[0].in_shape))                  # N,C,H,W
    y = rng.integers(0, 10, size=3)
    for model in models:
        for layer in model.layers:
            if hasattr(layer, "need_dx"):
                layer.need_dx = True
    dxs = [m.backward(softmax_cross_entropy(m.forward(x, train=False), y)[1]) for m in models]
    assert_close("input δ", dxs[0], dxs[1], np.float64)
    ref_grads, np_grads = models[0].named_grads(), models[1].named_grads()
    assert ref_grads.keys() == np_grads.keys()
    for name in ref_grads:
        assert_close(name, ref_grads[name], np_grads[name], np.float64)


def test_registered_composes_and_unknown_names_list_it(compose_cfg):
    assert get_backend("reference") is B
    cfg = compose_cfg(["backend=reference"])
    assert cfg.backend.name == "reference" and cfg.backend.threads is None
    assert build_model(cfg).layers[0].B is B
    with pytest.raises(ConfigError, match="Available backends: .*reference"):
        get_backend("slides")


def test_overfit_from_the_command_line(tmp_path, fashion_root):
    """`python scripts/train.py backend=reference debug=overfit` (100 epochs on one batch of 64, LeNet-5) drives
    the loss to ~0, and its δ-maps reach TensorBoard."""
    r = run_script("train.py", "backend=reference", "debug=overfit", f"data.root={fashion_root}",
                   "data.download=false", f"hydra.run.dir={tmp_path}", timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["backend"] == "reference" and m["epochs"] == 100 and m["model"] == "lenet5"
    assert m["history"]["train_loss"][0] > 1.0 and m["train_loss"] < 0.01, m["history"]["train_loss"]
    log = (tmp_path / "train.log").read_text()
    assert "reference backend" in log and "epoch 100/100" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert {"delta/conv1", "delta/conv2"} <= set(ea.Tags()["images"])
