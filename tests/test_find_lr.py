"""The LR range test as a user runs it: `scripts/find_lr.py` on tiny IDX data, its files read back (JSON, the PNG
with PIL, the TensorBoard events with TensorBoard's EventAccumulator), and its refusals of bad values."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_script, tiny_overrides
from PIL import Image

from cnnpipe.find_lr import SKIP_BEGIN

RANGE = {"find_lr.start": "1e-4", "find_lr.end": "10", "find_lr.steps": "80"}     # diverges on the tiny data


def conf_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "conf").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(REPO)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def lr_run(tmp_path_factory, fashion_root):
    """One range test from a fresh directory (its default run directory is outputs/find_lr/<time>/ there)."""
    cwd = tmp_path_factory.mktemp("find_lr")
    before = conf_hash()
    r = run_script("find_lr.py", *tiny_overrides(fashion_root, **{"logger.tensorboard": "true", **RANGE}), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert conf_hash() == before                                  # the config is read, never written
    runs = list((cwd / "outputs" / "find_lr").iterdir())
    assert len(runs) == 1
    return r, runs[0], json.loads((runs[0] / "lr_find.json").read_text())


def test_the_range_test_writes_its_curve_and_suggests_an_lr(lr_run):
    r, run, res = lr_run
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents")) == \
        [".cnnpipe.lock", ".hydra", "find_lr.log", "lr_find.json", "lr_find.png"]   # no checkpoint, no metrics
    lr, smoothed = np.array(res["lr"]), np.array(res["smoothed_loss"])
    n = res["steps"]
    assert len(lr) == len(res["loss"]) == n and 2 * SKIP_BEGIN < n < 80
    ratio = 1e5 ** (1 / 79)                                        # (end/start)^(1/(steps-1))
    assert lr[0] == pytest.approx(1e-4) and np.allclose(lr[1:] / lr[:-1], ratio, rtol=1e-9)
    beta, avg = 0.98, 0.0                                          # the smoothed loss: fast.ai's debiased average
    for i, loss in enumerate(res["loss"]):
        avg = beta * avg + (1 - beta) * loss
        assert smoothed[i] == pytest.approx(avg / (1 - beta ** (i + 1)), rel=1e-12)
    assert res["stopped"] == "diverged" and res["stop_lr"] == lr[-1]   # stopped early: the loss blew up
    assert smoothed[-1] > 4 * smoothed.min() and smoothed[-1] > smoothed[-2]
    s = res["suggestion"]
    assert 1e-4 <= s["lr"] <= 10 and s["lr"] < res["stop_lr"] and s["lr"] in res["lr"]
    i = res["lr"].index(s["lr"])
    assert smoothed[i] < smoothed[i - 1] and i < int(np.argmin(smoothed))   # on the falling part of the curve
    assert s["range"][0] <= s["lr"] <= s["range"][1] and s["min_loss_lr"] == lr[int(np.argmin(smoothed))]
    out = " ".join(r.stdout.split())
    assert f"suggested optim.lr={s['lr']:.3g}" in out and "heuristic" in out and "short training run" in out
    assert f"optim.lr={s['lr']:.2g}" in out.split("python scripts/train.py", 1)[1]
    png = Image.open(run / "lr_find.png")
    assert png.size == (720, 420) and png.mode == "RGB"
    red = np.all(np.asarray(png) == (200, 30, 30), axis=2)                 # the suggestion's marker line
    assert red.sum(0).max() > 200


def test_the_curve_starts_from_the_trainers_model_and_first_batch(lr_run, fashion_root, tmp_path):
    """The first recorded loss is the first training step's: same weights, same batch, same train_step."""
    _, _, res = lr_run
    r = run_script("train.py", *tiny_overrides(fashion_root, **{"trainer.max_steps": "1"}),
                   f"hydra.run.dir={tmp_path / 'train'}")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["history"]["train_loss"] == [res["loss"][0]]


def test_tensorboard_holds_the_scalars_and_the_curve(lr_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run, res = lr_run
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    n = res["steps"]
    for tag, key in (("lr_find/loss", "loss"), ("lr_find/smoothed_loss", "smoothed_loss"), ("lr_find/lr", "lr")):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == list(range(1, n + 1))
        assert np.allclose([e.value for e in events], res[key], rtol=1e-6)
    (image,) = ea.Images("lr_find/curve")
    assert (image.width, image.height, image.step) == (720, 420, n)


@pytest.mark.parametrize("clip", ["optim.clip_norm=1e-4", "optim.clip_value=1e-6"])
def test_the_range_test_clips_gradients_as_training_does(fashion_root, tmp_path, clip):
    """The same range as lr_run, which diverges; with a tiny optim.clip_* every step moves the weights by at most
    lr × the clip, so the loss stays where it started and the test runs to find_lr.end."""
    run = tmp_path / "run"
    r = run_script("find_lr.py", *tiny_overrides(fashion_root, **RANGE), clip, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "lr_find.json").read_text())
    assert res["stopped"] == "end" and res["steps"] == 80
    assert min(res["smoothed_loss"]) > 0.9 * res["smoothed_loss"][0]       # unclipped it falls to an eighth, then up
    key, value = clip.split("=")
    assert res["settings"][key.removeprefix("optim.")] == float(value)


@pytest.mark.parametrize("args, needle", [
    (["find_lr.start=0"], "find_lr.start=0.0 cannot work"),
    (["find_lr.start=1", "find_lr.end=0.1"], "find_lr.end=0.1 cannot work"),
    (["find_lr.steps=5"], "find_lr.steps=5 cannot work: the test needs at least 10 steps"),
    (["find_lr.diverge=1"], "find_lr.diverge=1.0 cannot work"),
    (["find_lr.smoothing=1"], "find_lr.smoothing=1.0 cannot work"),
    (["find_lr.end=nan"], "find_lr.end=nan cannot work"),
    (["-m", "find_lr.steps=50,100"], "runs one range test"),
    (["resume=outputs/train/x"], "init_from="),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_values_exit_2_with_one_clear_paragraph(args, needle, tmp_path):
    """Checked before any data is looked for (data.root names nothing) and before anything is written."""
    run = tmp_path / "run"
    r = run_script("find_lr.py", f"data.root={tmp_path / 'nothing'}", "data.download=false", *args,
                   f"hydra.run.dir={run}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and needle in err and "Traceback" not in err and err.count("error:") == 1, err
    assert "dataset" not in err.lower() and not (run / "lr_find.json").exists()
    assert not (tmp_path / "sweep").exists()


def test_a_wrongly_typed_value_fails_at_composition(tmp_path):
    r = run_script("find_lr.py", "find_lr.steps=many", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode != 0 and "find_lr.steps" in r.stderr and "Traceback" not in r.stderr


def test_the_schema_defaults_and_the_commands_run_directory(compose_cfg):
    cfg = compose_cfg([])
    assert dict(cfg.find_lr) == {"start": 1e-5, "end": 1.0, "steps": 200, "diverge": 4.0, "smoothing": 0.98}
    assert cfg.name == "train"
    find = compose_cfg(["pool=mean"], config_name="find_lr")
    assert find.name == "find_lr" and find.pool.mode == "mean" and find.find_lr == cfg.find_lr
    assert Path(REPO / "scripts" / "find_lr.py").read_text().count("cnnpipe.commands.find_lr import main") == 1
