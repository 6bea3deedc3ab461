"""Export a checkpoint for people who use PyTorch or ONNX, and keep the export only if it reproduces our logits.

    python scripts/export.py ckpt=<checkpoint.npz | run dir> format=torch|onnx [out=<file>]
                             [data.<key>=<value> ...] [backend.<key>=<value> ...]

format=torch writes two files. `out` (default <run>/export/<checkpoint name>.pt) is a state_dict saved with
torch.save, tensors only, so `torch.load(out, weights_only=True)` reads it. Beside it, `out` with the suffix .py
is a standalone module that needs only torch: `build()` returns the nn.Sequential the state_dict's keys
(`<index>.weight`, `<index>.bias`) belong to, `load()` returns it with the weights in eval mode, `normalize()`
turns uint8 images into its input, and MEAN, STD, CLASSES record the data it was trained on.
format=onnx writes `out` (default <run>/export/<checkpoint name>.onnx): opset 17, input "input" N,C,H,W float32
with a dynamic batch axis N, output "logits" N,classes; mean, std and classes are in its metadata.
Both take normalized images, (pixel/255 - mean)/std with the training split's per-channel statistics, in
float32 (a float64 checkpoint is exported as float32). out= gets the format's suffix when it has none.

Before anything is kept, our model (numpy backend unless backend.name= says otherwise, float32) and the
artefact read back from disk compute the logits of the first test images of the run's dataset (data.root= etc.
as in scripts/evaluate.py). The artefact is used as its user would: the .py's load() and normalize() on the
uint8 images; the .onnx through onnxruntime, normalized with the mean/std of its metadata. The relative error,
max|ours - export| / max|ours| over the batch, must be at most 1e-5. The files are written under temporary
names in the output folder and renamed only after that check passes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from cnnpipe import ConfigError
from cnnpipe.checkpoint import load_checkpoint, run_dir_of
from cnnpipe.data import batches, load_data, normalize
from cnnpipe.jsonio import atomic_path
from cnnpipe.resume import model_from_checkpoint
from cnnpipe.torch_ref import torch_twin

FORMATS = {"torch": ".pt", "onnx": ".onnx"}     # format= -> default suffix of out=
OPSET = 17
TOLERANCE = 1e-5                                # max relative error of the exported logits
CHECK_IMAGES = 256                              # test images the logits check runs on
USAGE = ("python scripts/export.py ckpt=<checkpoint.npz | run dir> format=torch|onnx [out=<file>] "
         "[data.<key>=<value> ...] [backend.<key>=<value> ...]")


class ExportCheckError(Exception):
    """The exported artefact does not reproduce our logits: nothing was kept."""


# -- arguments --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[str, str, str | None, list[str]]:
    """(ckpt, format, out or None, data.*/backend.* overrides) from key=value arguments, or a ConfigError."""
    stray = [a for a in argv if "=" not in a]
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if stray or "ckpt" not in args or "format" not in args:
        missing = [k for k in ("ckpt", "format") if k not in args]
        why = (f"not understood: {' '.join(stray)}" if stray else f"missing: {', '.join(k + '=' for k in missing)}")
        raise ConfigError(f"usage: {USAGE} ({why}).")
    fmt = args["format"]
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not an export format: use format=torch (a state_dict plus the .py "
                          f"module it loads into) or format=onnx.")
    bad = [k for k in args if k not in ("ckpt", "format", "out") and not k.startswith(("data.", "backend."))]
    if bad:
        raise ConfigError(f"export.py does not know {', '.join(k + '=' for k in bad)}: it accepts ckpt=, format=, "
                          f"out=, data.* and backend.* (the architecture comes from the checkpoint). Usage: {USAGE}.")
    overrides = [f"{k}={v}" for k, v in args.items() if k.startswith(("data.", "backend."))]
    return args["ckpt"], fmt, args.get("out") or None, overrides


def output_path(out: str | None, fmt: str, ckpt) -> Path:
    """out= (the format's suffix added if it has none), or <run>/export/<checkpoint name><suffix>; a ConfigError
    if it cannot be written there."""
    path = Path(out) if out else run_dir_of(ckpt) / "export" / (Path(str(ckpt["_path"])).stem + FORMATS[fmt])
    if not path.suffix:
        path = path.with_suffix(FORMATS[fmt])
    other = {s: f for f, s in FORMATS.items() if f != fmt}
    if path.suffix in other:
        raise ConfigError(f"out={path} has the suffix of format={other[path.suffix]} but format={fmt}; name the "
                          f"file {path.with_suffix(FORMATS[fmt]).name} or pick format={other[path.suffix]}.")
    if fmt == "torch" and path.suffix == ".py":
        raise ConfigError(f"out={path} is where the state_dict goes, and its module definition is written beside it "
                          f"as {path.stem}.py: name the state_dict {path.with_suffix('.pt').name} instead.")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if path.is_dir() or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = (f"{path} is a directory" if path.is_dir() else
                f"{probe} is not a directory" if not probe.is_dir() else f"{probe} is not writable")
        raise ConfigError(f"Cannot write the export to out={path}: {what}. Give out= a file path in a folder you "
                          f"can write to; nothing was exported.")
    return path


# -- our model and the batch it is checked on -------------------------------------------------------------------
def load_model(ckpt, overrides: list[str]):
    """The checkpoint's network in float32 with its parameters (numpy backend unless backend.name= says), and its
    config plus the overrides."""
    return model_from_checkpoint(ckpt, overrides, dtype=np.float32, backend="numpy")


def check_batch(cfg):
    """The first CHECK_IMAGES test images as uint8 N,C,H,W and normalized as in training (float32), and the data."""
    data = load_data(cfg.data, cfg.trainer.seed)
    x, _ = next(batches(data.test, CHECK_IMAGES, mean=data.mean, std=data.std, dtype=np.float32))
    return data.test.x[:len(x)], x, data


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max|ours - theirs| / max|ours| over the batch (a logit scale, so near-zero logits do not blow it up)."""
    scale = float(np.max(np.abs(ours)))
    return float(np.max(np.abs(ours.astype(np.float64) - theirs))) / (scale if scale > 0 else 1.0)


def compare(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    """The relative error, or an ExportCheckError when it exceeds TOLERANCE (or the shapes differ)."""
    if theirs.shape != ours.shape:
        raise ExportCheckError(f"{what} returns logits of shape {theirs.shape}, ours are {ours.shape}.")
    err = relative_error(ours, theirs)
    if not err <= TOLERANCE:                                        # NaN fails too
        raise ExportCheckError(f"{what} does not reproduce our logits: max |ours - export| / max |ours| = "
                               f"{err:.2e} > {TOLERANCE:.0e}.")
    return err


# -- format=torch -----------------------------------------------------------------------------------------------
MODULE_TEMPLATE = '''"""{name}: a CNN trained with cnnpipe, as a standalone PyTorch module (needs only torch).

    from {stem} import load, normalize
    model = load()                          # build() with the weights of {weights}, in eval mode
    logits = model(normalize(images))       # images: uint8 N,{c},{h},{w} -> logits N,{k} (order of CLASSES)
"""
from pathlib import Path

import torch
from torch import nn

SOURCE = {source!r}
WEIGHTS = Path(__file__).with_name({weights!r})
IN_SHAPE = {in_shape!r}    # C,H,W
MEAN = {mean!r}    # per channel, of pixel/255 over the training split
STD = {std!r}
CLASSES = {classes!r}


def build() -> nn.Sequential:
    """The layer stack the state_dict belongs to: its keys are <index>.weight and <index>.bias."""
    return nn.Sequential(
{layers}
    )


def normalize(images) -> torch.Tensor:
    """uint8 pixels N,C,H,W -> the float32 input the network was trained on, (pixel/255 - MEAN) / STD."""
    x = torch.as_tensor(images).to(torch.float32) / 255                   # N,C,H,W
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, -1, 1, 1)      # 1,C,1,1
    std = torch.tensor(STD, dtype=torch.float32).view(1, -1, 1, 1)        # 1,C,1,1
    return (x - mean) / std


def load(weights=WEIGHTS) -> nn.Sequential:
    """build() with the exported weights, in eval mode (dropout off)."""
    model = build()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()
'''


def module_source(net, model, cfg, data, weights: Path, source) -> str:
    """The standalone .py for format=torch: each module written as its repr (a valid nn.<Module>(...) call)."""
    import torch
    x, rows = torch.zeros((1, *model.in_shape), dtype=torch.float32), []     # 1,C,H,W
    with torch.no_grad():
        for i, m in enumerate(net):
            x = m(x)
            rows.append((f"        nn.{m!r},", f"# {i}: -> {'x'.join(map(str, x.shape[1:]))}"))
    width = max(len(r[0]) for r in rows) + 2
    return MODULE_TEMPLATE.format(
        name=cfg.model.name, stem=weights.stem, weights=weights.name, source=str(source), c=model.in_shape[0],
        h=model.in_shape[1], w=model.in_shape[2], k=data.num_classes, in_shape=tuple(model.in_shape),
        mean=tuple(float(v) for v in data.mean), std=tuple(float(v) for v in data.std),
        classes=[str(c) for c in data.classes], layers="\n".join(a.ljust(width) + b for a, b in rows))


def state_dict_bytes(net) -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, buf)   # tensors only
    return buf.getvalue()


def run_torch(weights: Path, module_file: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the exported module read back from disk, as its user calls it: load(weights)(normalize(images))."""
    import torch
    namespace = {"__file__": str(module_file), "__name__": "cnnpipe_export_check"}
    exec(compile(module_file.read_text(), str(module_file), "exec"), namespace)
    net = namespace["load"](weights)
    with torch.no_grad():
        return net(namespace["normalize"](images)).numpy()                           # N,classes


# -- format=onnx ------------------------------------------------------------------------------------------------
def import_onnx():
    """onnx and onnxruntime, or a ConfigError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"format=onnx needs the module {e.name or 'onnx'}, which is not installed in this Python "
                          f"({sys.executable}). Install it with: pip install -e '.[export]' (from the repository "
                          f"root; 'make setup' installs every extra), or export with format=torch.") from None
    return onnx, onnxruntime


def onnx_bytes(net, example: np.ndarray, metadata: dict[str, str]) -> bytes:
    """The twin traced by torch's TorchScript-based exporter (needs only onnx), metadata added, checked."""
    import inspect

    import torch
    onnx, _ = import_onnx()
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with warnings.catch_warnings():                  # the exporter's deprecation and constant-folding notes
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.from_numpy(example),), buf, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=OPSET, **legacy)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = metadata["input"]
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the .onnx file through onnxruntime's CPU provider, normalized with the mean/std of its metadata."""
    _, ort = import_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    x = normalize(images, json.loads(meta["mean"]), json.loads(meta["std"]), np.float32)   # N,C,H,W
    return session.run(["logits"], {"input": x})[0]                                # N,classes


# -- the export -------------------------------------------------------------------------------------------------
def export_checkpoint(ckpt_path, fmt: str, out: str | None = None, overrides: list[str] = (),
                      _before_check=None) -> dict:
    """Write the export, check its logits against ours, keep it only then. Returns what was written and the error.

    `_before_check(files)` is a fault-injection point for tests: it may alter the temporary files."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not an export format: use format=torch or format=onnx.")
    if fmt == "onnx":
        import_onnx()                                # say which extra is missing before any work
    ckpt = load_checkpoint(ckpt_path)
    out_path = output_path(out, fmt, ckpt)
    model, cfg = load_model(ckpt, list(overrides))
    images, x, data = check_batch(cfg)
    ours = model.forward(x, train=False)                                               # N,classes
    net = torch_twin(model).eval()
    final = [out_path.with_suffix(".py"), out_path] if fmt == "torch" else [out_path]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as renames:         # the last entered is renamed first: the definition (.py), so
        tmp = [renames.enter_context(atomic_path(p)) for p in final[::-1]][::-1]   # a present out= has its .py
        if fmt == "torch":
            tmp[0].write_bytes(module_source(net, model, cfg, data, out_path, ckpt["_path"]).encode())
            tmp[1].write_bytes(state_dict_bytes(net))
        else:
            metadata = {"producer": "cnnpipe", "source": str(ckpt["_path"]), "model": str(cfg.model.name),
                        "mean": json.dumps([float(v) for v in data.mean]),
                        "std": json.dumps([float(v) for v in data.std]),
                        "classes": json.dumps([str(c) for c in data.classes]),
                        "input": "input: float32 N,C,H,W = (pixel/255 - mean)/std (mean, std: JSON lists per channel); "
                                 "output logits: N,classes (order of classes)"}
            tmp[0].write_bytes(onnx_bytes(net, x[:2], metadata))
        if _before_check is not None:
            _before_check(tmp)
        if fmt == "torch":
            theirs, what = run_torch(tmp[1], tmp[0], images), f"the PyTorch export ({final[0].name} + {final[1].name})"
        else:
            theirs, what = run_onnx(tmp[0], images), f"the ONNX export {final[0].name} (onnxruntime)"
        err = compare(ours, theirs, what)           # raises before any rename: nothing is kept
    return {"checkpoint": str(ckpt["_path"]), "format": fmt, "files": [str(p) for p in final],
            "images": int(len(x)), "dataset": str(cfg.data.name), "relative_error": err}


def format_report(r: dict) -> str:
    files = " + ".join(r["files"])
    return (f"exported {r['checkpoint']} as {r['format']}: {files}\n"
            f"logits check on {r['images']} {r['dataset']} test images: max |ours - export| / max |ours| = "
            f"{r['relative_error']:.2e} <= {TOLERANCE:.0e}: match")

