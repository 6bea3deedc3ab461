"""Export: a real trained run exported as a user would (scripts/export.py), loaded the way a PyTorch or ONNX user
loads it (without cnnpipe), logits compared with ours; a tampered artefact is caught; bad input exits 2."""
import functools
import json
import os
import re
import subprocess

import numpy as np
import pytest
from conftest import PY, REPO, run_script, tiny_overrides

from cnnpipe import export
from cnnpipe.checkpoint import checkpoint_config, load_checkpoint
from cnnpipe.commands import export as export_command
from cnnpipe.data import Split, batches, load_data
from cnnpipe.model import build_model

MODELS = {
    # LeNet-5: odd kernel (symmetric 'same'), max pool
    "lenet": {},
    # even kernel (asymmetric 'same': ZeroPad2d in PyTorch, Pad in ONNX), mean pool, dropout (off in eval)
    "convnet_k4_mean": {"model": "convnet", "conv.k": "4", "pool": "mean", "model.layers.0.filters": "4",
                        "model.layers.3.filters": "8", "model.layers.7.units": "32"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_root):
    """name -> run directory of a few real training steps (scripts/train.py, as a user runs it)."""
    out = {}
    for name, extra in MODELS.items():
        run_dir = tmp_path_factory.mktemp(name)
        r = run_script("train.py", *tiny_overrides(fashion_root, **{"data.limit_train": "256", "trainer.max_steps": "4",
                                                                  "hydra.run.dir": str(run_dir), **extra}))
        assert r.returncode == 0, r.stderr
        out[name] = run_dir
    return out


def our_logits(ckpt_path, images):
    """Our model (numpy backend, float32) on uint8 images N,C,H,W, normalized as in training."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg, dtype=np.float32)
    model.load_params({k[6:]: v for k, v in ckpt.items() if k.startswith("param/")})
    data = load_data(cfg.data, cfg.trainer.seed)
    x, _ = next(batches(Split(images, np.zeros(len(images), np.int64)), len(images), mean=data.mean, std=data.std))
    return model.forward(x, train=False), data


def rel_err(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def user_images(run_dir):
    data = load_data(checkpoint_config(load_checkpoint(run_dir)).data, 0)
    return data.test.x                                                  # uint8 N,1,28,28 (200 images)


def reported_error(stdout):
    """The figure the export prints, and that it said 'match'."""
    m = re.search(r"max \|ours - export\| / max \|ours\| = (\S+) <= 1e-05: match", stdout)
    assert m, stdout
    return float(m.group(1))


USER_TORCH = """
import sys
sys.modules["cnnpipe"] = None                   # a PyTorch user without cnnpipe: importing it would fail
sys.path.insert(0, ".")
import numpy as np, torch
from {stem} import build, load, normalize, CLASSES
state = torch.load("{stem}.pt", weights_only=True)
assert all(isinstance(v, torch.Tensor) for v in state.values()), state
model = build()
model.load_state_dict(state)                    # strict: the keys and shapes are exactly the definition's
model.eval()
images = np.load("images.npy")
with torch.no_grad():
    logits = model(normalize(images)).numpy()
    again = load()(normalize(images)).numpy()   # load() does the same from the file next to it
assert np.array_equal(logits, again)
np.save("logits.npy", logits)
print(len(CLASSES), sorted(m for m in sys.modules if m.startswith("cnnpipe") and sys.modules[m] is not None))
"""


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_loads_without_cnnpipe_and_matches(runs, name, tmp_path):
    run_dir = runs[name]
    default_out = name == "lenet"                           # out= omitted: <run>/export/<checkpoint name>.pt
    folder = run_dir / "export" if default_out else tmp_path / "exported"
    args = [f"ckpt={run_dir / 'checkpoints' / 'last.npz'}", "format=torch"]
    r = run_script("export.py", *args, *([] if default_out else [f"out={folder / 'net.pt'}"]))
    assert r.returncode == 0, r.stderr
    assert reported_error(r.stdout) <= 1e-5
    stem = "last" if default_out else "net"
    assert sorted(p.name for p in folder.iterdir()) == [f"{stem}.pt", f"{stem}.py"]   # no temporary left
    source = (folder / f"{stem}.py").read_text()
    if name == "convnet_k4_mean":
        assert "nn.ZeroPad2d((1, 2, 1, 2))" in source and "nn.AvgPool2d" in source and "nn.Dropout" in source
    else:
        assert "nn.MaxPool2d" in source and "ZeroPad2d" not in source

    images = user_images(run_dir)
    np.save(folder / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    u = subprocess.run([PY, "-c", USER_TORCH.format(stem=stem)], cwd=folder, env=env, capture_output=True,
                       text=True, timeout=120)
    assert u.returncode == 0, u.stderr
    assert u.stdout.split() == ["10", "[]"]                  # 10 classes, and no cnnpipe module was loaded
    ours, _ = our_logits(run_dir / "checkpoints" / "last.npz", images)
    theirs = np.load(folder / "logits.npy")
    assert theirs.shape == ours.shape == (len(images), 10)
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime_and_matches(runs, name, tmp_path, fashion_root):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    run_dir = runs[name]
    out = tmp_path / "net.onnx"
    r = run_script("export.py", f"ckpt={run_dir / 'checkpoints' / 'last.npz'}", "format=onnx", f"out={out}",
                   f"data.root={fashion_root}")                  # as scripts/evaluate.py takes it
    assert r.returncode == 0, r.stderr
    assert reported_error(r.stdout) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]

    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert ("AveragePool" in ops and "Pad" in ops) if name == "convnet_k4_mean" else "MaxPool" in ops
    assert model.opset_import[0].version == export.OPSET
    meta = {p.key: p.value for p in model.metadata_props}
    mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))   # the user's normalization
    assert len(json.loads(meta["classes"])) == 10

    images = user_images(run_dir)
    ours, data = our_logits(run_dir / "checkpoints" / "last.npz", images)
    np.testing.assert_allclose(mean, data.mean)
    np.testing.assert_allclose(std, data.std)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[1:] == [1, 28, 28]
    x = ((images / 255.0 - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)).astype(np.float32)
    theirs = session.run(["logits"], {"input": x})[0]
    assert theirs.shape == ours.shape == (len(images), 10)
    assert rel_err(ours, theirs) <= 1e-5
    one = session.run(["logits"], {"input": x[:1]})[0]           # the batch axis is dynamic
    assert one.shape == (1, 10) and rel_err(ours[:1], one) <= 1e-5


# -- the check itself -----------------------------------------------------------------------------------------
def scale_last_weight(files, factor=1.001):
    """Tamper with a temporary export: the last layer's weights ×1.001 (a 1e-3 change in the logits)."""
    import torch
    path = files[-1]
    if ".pt." in path.name:
        state = torch.load(path, weights_only=True)
        last = [k for k in state if k.endswith(".weight")][-1]
        state[last] = state[last] * factor
        torch.save(state, path)
    else:
        import onnx
        from onnx import numpy_helper
        model = onnx.load(path)
        last = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 10][-1]
        last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) * np.float32(factor), last.name))
        onnx.save(model, path)


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_a_tampered_export_is_caught_and_nothing_is_kept(runs, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"net{export.FORMATS[fmt]}"
    with pytest.raises(export.ExportCheckError, match=r"does not reproduce our logits: .* = \S+ > 1e-05"):
        export.export_checkpoint(runs["convnet_k4_mean"], fmt, str(out), _before_check=scale_last_weight)
    assert list(tmp_path.iterdir()) == []
    # and untampered, the same call keeps the files and reports a small error
    r = export.export_checkpoint(runs["convnet_k4_mean"], fmt, str(out))
    assert out.exists() and 0 <= r["relative_error"] <= 1e-5 and r["images"] == 200


def test_the_command_exits_1_when_the_check_fails(runs, tmp_path, monkeypatch, capsys):
    """main() with the tampering hook in place: one paragraph, exit 1, no file."""
    tampered = functools.partial(export.export_checkpoint, _before_check=scale_last_weight)
    monkeypatch.setattr(export_command, "export_checkpoint", tampered)
    with pytest.raises(SystemExit) as e:
        export_command.main([f"ckpt={runs['lenet']}", "format=torch", f"out={tmp_path / 'net.pt'}"])
    assert e.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: the PyTorch export (net.py + net.pt) does not reproduce our logits")
    assert "Nothing was written" in err and err.count("error:") == 1
    assert list(tmp_path.iterdir()) == []


def test_relative_error_is_against_the_largest_logit():
    ours = np.array([[1.0, -4.0], [0.5, 2.0]], np.float32)
    assert export.compare(ours, ours + np.float32(2e-5), "x") == pytest.approx(5e-6, rel=1e-2)
    for bad in (ours + np.float32(1e-4), ours * np.nan, ours[:1]):
        with pytest.raises(export.ExportCheckError):
            export.compare(ours, bad, "x")


# -- bad input ------------------------------------------------------------------------------------------------
BAD = {
    "missing ckpt": (["ckpt={tmp}/nope.npz", "format=torch"], "does not exist"),
    "corrupt ckpt": (["ckpt={tmp}/corrupt.npz", "format=onnx"], "is not a readable .npz file"),
    "unknown format": (["ckpt={run}", "format=tflite"], "use format=torch (a state_dict plus the .py module it "
                                                        "loads into) or format=onnx"),
    "no format": (["ckpt={run}"], "missing: format="),
    "unwritable out": (["ckpt={run}", "format=torch", "out={tmp}/afile/net.pt"], "afile is not a directory"),
    "suffix of the other format": (["ckpt={run}", "format=torch", "out={tmp}/net.onnx"], "has the suffix of "
                                                                                        "format=onnx"),
    "unknown key": (["ckpt={run}", "format=onnx", "optim.lr=1"], "does not know optim.lr="),
    "unknown data key": (["ckpt={run}", "format=onnx", "data.rooot=x"], "data.rooot is not a key"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(runs, case, tmp_path):
    args, expected = BAD[case]
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
    (tmp_path / "afile").write_text("a file, not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    if not any(a.startswith("out=") for a in args):
        args = [*args, "out={tmp}/x.onnx" if "format=onnx" in args else "out={tmp}/x.pt"]
    r = run_script("export.py", *[a.format(tmp=tmp_path, run=runs["lenet"]) for a in args])
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr
    assert expected in err and err.count("error:") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (runs["lenet"] / "export" / "last.onnx").exists()


def test_onnx_missing_names_the_extra(runs, tmp_path):
    """Hide onnxruntime from the import system (as if `.[export]` were not installed)."""
    code = ("import sys, runpy\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.startswith('onnxruntime'): raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            f"sys.argv = ['export.py', 'ckpt={runs['lenet']}', 'format=onnx', 'out={tmp_path / 'net.onnx'}']\n"
            f"runpy.run_path({str(REPO / 'scripts' / 'export.py')!r}, run_name='__main__')\n")
    r = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr
    assert "format=onnx needs the module onnxruntime" in err and "pip install -e '.[export]'" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
