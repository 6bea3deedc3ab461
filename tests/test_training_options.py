"""Early stopping, the weights the final test uses, gradient clipping and learning-rate warmup: through the command
line a user types, read back from metrics.json, train.log, checkpoints and TensorBoard."""
from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
from conftest import run_script, tiny_overrides
from omegaconf import OmegaConf
from readme import readme_commands

from cnnpipe.checkpoint import load_checkpoint, save_atomic
from cnnpipe.optim import lr_at
from cnnpipe.step import Clip, global_norm

SMALL = {"data.val_size": "64", "data.limit_train": "128", "data.limit_test": "64", "trainer.batch_size": "64"}


def train(*args):
    r = run_script("train.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(run_dir, tag):
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def texts(run_dir, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events(run_dir).Tensors(tag)]


def moved(fashion_root, run_dir) -> dict[str, np.ndarray]:
    """Each parameter of the run's last.npz minus its initial value (the tiny config's seed gives the same start)."""
    from cnnpipe.config import compose_config
    from cnnpipe.model import build_model
    start = build_model(compose_config(tiny_overrides(fashion_root))).named_params()
    end = {k[6:]: v for k, v in load_checkpoint(run_dir).items() if k.startswith("param/")}
    return {k: (end[k] - start[k]).astype(np.float64) for k in start}


# a learning rate so small that val_loss moves by far less than min_delta: every epoch after the first is "no
# improvement", so the stop comes exactly `patience` epochs after epoch 1
PLATEAU = ["optim.lr=1e-9", "optim.momentum=0", "trainer.early_stopping.patience=2",
           "trainer.early_stopping.min_delta=0.01"]
# the weights train on, but no epoch beats the first by more than min_delta: the stop comes at epoch 3, with weights
# that differ from epoch 2's
NO_GAIN = ["trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=100"]


def test_early_stopping_stops_after_patience_epochs_and_says_why(fashion_root, tmp_path):
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL), "trainer.epochs=10", *PLATEAU, f"hydra.run.dir={run}")
    m = metrics(run)
    assert m["epochs"] == 3 and m["steps"] == 3 * 2
    assert m["stopped_early"].startswith("val_loss has not improved by more than 0.01 for 2 epochs")
    assert "early stopping after epoch 3: val_loss has not improved" in (run / "train.log").read_text()


def test_the_monitored_metric_and_its_mode_decide_the_stop(fashion_root, tmp_path):
    """train_loss falls every epoch here: watched for a fall (mode=min) the run goes on; watched for a rise
    (mode=max, as for an accuracy) epoch 1 stays the best and the run stops after patience epochs."""
    common = [*tiny_overrides(fashion_root, **SMALL), "trainer.epochs=4", "optim.lr=0.01",
              "trainer.early_stopping.patience=1", "trainer.early_stopping.monitor=train_loss"]
    for mode, epochs in (("min", 4), ("max", 2)):
        run = tmp_path / mode
        train(*common, f"trainer.early_stopping.mode={mode}", f"hydra.run.dir={run}")
        m = metrics(run)
        losses = m["history"]["train_loss"]
        assert all(b < a for a, b in zip(losses, losses[1:])), losses
        assert m["epochs"] == epochs, (mode, m["epochs"], m["stopped_early"])
        assert (m["stopped_early"] or "").startswith("train_loss has not improved" if mode == "max" else "")


def test_a_resumed_run_keeps_the_patience_count(fashion_root, tmp_path):
    """Epochs 1-2 (best at 1, one epoch without improvement), then resumed to 10: the stop comes at epoch 3, as in
    the run that never stopped; a fresh count would have taken epoch 3 as the new best and stopped at 5."""
    run = tmp_path / "run"
    common = [*tiny_overrides(fashion_root, **SMALL), *PLATEAU]
    train(*common, "trainer.epochs=2", f"hydra.run.dir={run}")
    assert metrics(run)["stopped_early"] is None
    train(*common, f"resume={run}", "trainer.epochs=10")
    assert metrics(run)["epochs"] == 3 and metrics(run)["stopped_early"]


def test_the_readmes_early_stopping_command_stops_when_val_loss_stalls(fashion_root, tmp_path):
    """The README's line (30 epochs, patience 3) on tiny data with an lr too small to improve val_loss by min_delta:
    it stops after epoch 4 of 30."""
    [command] = [c for c in readme_commands("Training") if "trainer.early_stopping.patience" in c]
    words = shlex.split(command)
    assert words[:2] == ["python", "scripts/train.py"], command
    readme = dict(w.split("=", 1) for w in words[2:])
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **readme, **{"optim.lr": "1e-9", "optim.momentum": "0",
                                                              "trainer.early_stopping.min_delta": "0.01"}),
          f"hydra.run.dir={run}")
    m = metrics(run)
    patience = int(readme["trainer.early_stopping.patience"])
    assert m["epochs"] == patience + 1 < int(readme["trainer.epochs"])
    assert m["stopped_early"].startswith(f"val_loss has not improved by more than 0.01 for {patience} epochs")


@pytest.mark.parametrize("stop", [NO_GAIN, ["trainer.max_steps=5"]], ids=["early stopping", "max_steps"])
def test_last_npz_holds_the_weights_the_run_ended_with(fashion_root, tmp_path, stop):
    """checkpoint.every=2 and a run that ends in epoch 3 (early stopping after it; max_steps=5 inside it): last.npz
    is written when the run ends, so evaluating it gives the test figures of metrics.json (test_checkpoint=last)."""
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL), "trainer.epochs=10", "checkpoint.every=2",
          "trainer.test_checkpoint=last", *stop, f"hydra.run.dir={run}")
    m = metrics(run)
    assert m["epochs"] == 3 and m["test_checkpoint"] == "last"
    last = load_checkpoint(run / "checkpoints" / "last.npz")
    assert (int(last["trainer/epoch"]), int(last["trainer/step"])) == (3, m["steps"])
    r = run_script("evaluate.py", f"ckpt={run}/checkpoints/last.npz")
    assert r.returncode == 0, r.stderr
    assert f"test loss {m['test_loss']:.4f}   accuracy {m['test_acc']:.4f}" in r.stdout, (r.stdout, m)


def test_a_run_that_stopped_early_stays_stopped_on_resume(fashion_root, tmp_path):
    """The stop and its reason are in last.npz and in TensorBoard; resuming the stopped run says so and runs only
    the final test (no epoch 4), and the event file still holds the stop once."""
    run = tmp_path / "run"
    common = [*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true"}), *PLATEAU,
              "trainer.epochs=10"]
    train(*common, f"hydra.run.dir={run}")
    first = metrics(run)
    assert first["epochs"] == 3 and first["stopped_early"]
    assert str(load_checkpoint(run)["trainer/stopped_early"]) == first["stopped_early"]
    stop = first["stopped_early"]
    assert scalars(run, "train/stopped_early") == [(6, 1.0)]
    assert texts(run, "train/stopped_early/text_summary") == [(6, stop)]
    train(*common, f"resume={run}")
    m = metrics(run)
    assert (m["epochs"], m["steps"], m["stopped_early"], m["test_loss"]) == (3, 6, stop, first["test_loss"])
    assert m["resumed_from"]
    log = (run / "train.log").read_text()
    assert "already stopped early after epoch 3" in log and "epoch 4/10" not in log
    assert scalars(run, "train/stopped_early") == [(6, 1.0)]                  # the resume's purge dropped the first
    assert set(texts(run, "train/stopped_early/text_summary")) == {(6, stop)}   # texts are not purged: twice


def test_a_checkpoint_without_the_stop_reason_resumes_as_not_stopped(fashion_root, tmp_path):
    """Checkpoints written before the reason was saved have no trainer/stopped_early: they train on. The patience
    count (two epochs without improvement) is kept, so epoch 4 stops the run again."""
    run = tmp_path / "run"
    common = [*tiny_overrides(fashion_root, **SMALL), *PLATEAU, "trainer.epochs=10"]
    train(*common, f"hydra.run.dir={run}")
    old = {k: v for k, v in load_checkpoint(run).items() if k not in ("_path", "trainer/stopped_early")}
    save_atomic(run / "checkpoints" / "last.npz", old)
    train(*common, f"resume={run}")
    assert metrics(run)["epochs"] == 4 and metrics(run)["stopped_early"]


def test_the_final_test_uses_best_or_last_weights_as_configured(fashion_root, tmp_path):
    """With a validation split the test runs on best.npz (by checkpoint.monitor); test_checkpoint=last: last.npz.
    A high lr makes the epochs differ, so best and last are different weights."""
    common = [*tiny_overrides(fashion_root, **SMALL), "trainer.epochs=4", "optim.lr=0.2"]
    for which in ("best", "last"):
        run = tmp_path / which
        train(*common, f"trainer.test_checkpoint={'auto' if which == 'best' else 'last'}", f"hydra.run.dir={run}")
        m = metrics(run)
        assert m["test_checkpoint"] == which
        r = run_script("evaluate.py", f"ckpt={run}/checkpoints/{which}.npz")
        assert r.returncode == 0, r.stderr
        assert f"test loss {m['test_loss']:.4f}" in r.stdout
    best, last = (load_checkpoint(tmp_path / "best" / "checkpoints" / f"{w}.npz") for w in ("best", "last"))
    assert int(best["trainer/epoch"]) != int(last["trainer/epoch"])       # the check above compares different weights
    assert metrics(tmp_path / "best")["test_loss"] != metrics(tmp_path / "last")["test_loss"]


def test_without_validation_the_test_uses_the_last_weights(fashion_root, tmp_path):
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **{**SMALL, "data.val_size": "0"}), f"hydra.run.dir={run}")
    assert metrics(run)["test_checkpoint"] == "last"


def test_clip_norm_bounds_every_update_and_is_counted(fashion_root, tmp_path):
    """Plain SGD with clip_norm c: the step moves the parameters by exactly lr·c, while grad_norm/total, logged
    before clipping, is far above c (after clipping it would be c); the step counts as clipped."""
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true", "logger.scalar_every": "1"}),
          "optim.momentum=0", "optim.lr=0.1", "optim.clip_norm=0.001", "trainer.max_steps=1",
          "checkpoint.every_steps=1", f"hydra.run.dir={run}")
    m = metrics(run)
    assert m["clipped_steps"] == m["steps"] == 1
    assert scalars(run, "train/clip_fraction") == [(1, 1.0)]
    assert scalars(run, "grad_norm/total")[0][1] > 10 * 0.001
    step = math.sqrt(sum(float(np.sum(d ** 2)) for d in moved(fashion_root, run).values()))
    assert step == pytest.approx(0.1 * 0.001, rel=1e-3)


def test_grad_norm_scalars_are_the_norms_of_the_gradients_the_step_applied(fashion_root, tmp_path):
    """One plain SGD step moves each parameter by -lr·g: grad_norm/<param> is ‖moved‖/lr for each parameter, and
    grad_norm/total the norm of all of them together."""
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true", "logger.scalar_every": "1"}),
          "optim.momentum=0", "optim.lr=0.1", "trainer.max_steps=1", "checkpoint.every_steps=1",
          f"hydra.run.dir={run}")
    moves = moved(fashion_root, run)
    for name, d in moves.items():
        assert scalars(run, f"grad_norm/{name}")[0][1] == pytest.approx(np.linalg.norm(d) / 0.1, rel=1e-4), name
    total = math.sqrt(sum(float(np.sum(d ** 2)) for d in moves.values())) / 0.1
    assert scalars(run, "grad_norm/total") == [(1, pytest.approx(total, rel=1e-4))]


def test_clip_value_bounds_every_entry_of_the_update_and_is_counted(fashion_root, tmp_path):
    """Plain SGD with clip_value v: no entry moves by more than lr·v in the step, and the largest move is exactly
    that (raw gradient entries are far larger); the step counts as clipped, in metrics.json and TensorBoard."""
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true", "logger.scalar_every": "1"}),
          "optim.momentum=0", "optim.lr=0.1", "optim.clip_value=1e-3", "trainer.max_steps=1",
          f"hydra.run.dir={run}")
    m = metrics(run)
    assert m["clipped_steps"] == m["steps"] == 1
    assert scalars(run, "train/clip_fraction") == [(1, 1.0)]
    largest = max(float(np.abs(d).max()) for d in moved(fashion_root, run).values())
    assert largest == pytest.approx(0.1 * 1e-3, rel=1e-2)          # float32 weights: steps of lr·v to ~0.1 %


def test_clip_rescales_to_the_norm_and_clips_values():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((4, 5)), "b": rng.standard_normal(3) * 10}
    raw = {k: v.copy() for k, v in grads.items()}
    assert Clip(norm=1.0)(grads) and global_norm(grads) == pytest.approx(1.0)
    np.testing.assert_allclose(grads["a"] / raw["a"], grads["b"][0] / raw["b"][0])   # one common scale
    grads = {k: v.copy() for k, v in raw.items()}
    assert Clip(value=0.5)(grads) and max(np.abs(g).max() for g in grads.values()) == 0.5
    assert not Clip(norm=1e9, value=1e9)({k: v.copy() for k, v in raw.items()})


def test_warmup_rises_linearly_then_the_schedule_runs(fashion_root, tmp_path):
    cfg = OmegaConf.create({"lr": 0.1, "schedule": "cosine", "min_lr": 0.0, "warmup_steps": 4, "warmup_epochs": 0.0,
                            "step_size": 1, "gamma": 0.1})
    lrs = [lr_at(cfg, s, 10, 24) for s in range(24)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true", "logger.scalar_every": "1"}),
          "optim.lr=0.1", "optim.warmup_epochs=1.5", "trainer.epochs=2", f"hydra.run.dir={run}")
    logged = [v for _, v in scalars(run, "train/lr")]
    assert logged[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])          # 1.5 epochs of 2 steps: 3 warmup steps


def test_warmup_runs_in_front_of_the_step_schedule(fashion_root, tmp_path):
    """3 warmup steps, then ×0.5 every epoch (2 steps), counted from the warmup's end: TensorBoard's train/lr of
    every step."""
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true", "logger.scalar_every": "1"}),
          "optim.lr=0.1", "optim.warmup_steps=3", "optim.schedule=step", "optim.step_size=1", "optim.gamma=0.5",
          "trainer.epochs=4", f"hydra.run.dir={run}")
    expected = [0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025]
    logged = scalars(run, "train/lr")
    assert [s for s, _ in logged] == list(range(1, 9)) and [v for _, v in logged] == pytest.approx(expected)


def test_a_warmup_shorter_than_a_step_is_one_step(fashion_root, tmp_path):
    """0.2 epochs of 2 steps round to 0; the warmup asked for still takes one step, and the cosine runs over the
    3 steps after it: TensorBoard's train/lr of every step."""
    run = tmp_path / "run"
    train(*tiny_overrides(fashion_root, **SMALL, **{"logger.tensorboard": "true", "logger.scalar_every": "1"}),
          "optim.lr=0.1", "optim.warmup_epochs=0.2", "optim.schedule=cosine", "optim.min_lr=0", "trainer.epochs=2",
          f"hydra.run.dir={run}")
    assert [v for _, v in scalars(run, "train/lr")] == pytest.approx([0.1, 0.1, 0.075, 0.025])


@pytest.mark.parametrize("value, shown", [("-1", "-1.0"), ("nan", "nan")])
def test_a_warmup_in_epochs_that_cannot_work_is_named(fashion_root, tmp_path, value, shown):
    r = run_script("train.py", *tiny_overrides(fashion_root), f"optim.warmup_epochs={value}",
                   f"hydra.run.dir={tmp_path / 'r'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"optim.warmup_epochs={shown} cannot work" in err and "Traceback" not in err
    assert "warmup_steps" not in err


@pytest.mark.parametrize("override, needle", [
    ("trainer.early_stopping.patience=0", "patience=0"),
    ("trainer.early_stopping.patience=2 trainer.early_stopping.monitor=test_acc", "not a per-epoch metric"),
    ("trainer.early_stopping.patience=2 data.val_size=0", "needs a validation split"),
    ("trainer.early_stopping.patience=2 trainer.early_stopping.mode=up", "choose min, max or auto"),
    ("trainer.early_stopping.patience=2 trainer.early_stopping.min_delta=-0.1", "min_delta=-0.1: must be a finite"),
    ("trainer.early_stopping.patience=2 trainer.early_stopping.min_delta=nan", "min_delta=nan: must be a finite"),
    ("trainer.test_checkpoint=middle", "choose best, last or auto"),
    ("trainer.test_checkpoint=best checkpoint.enabled=false", "needs checkpoints/best.npz"),
    ("optim.clip_norm=-1", "clipping threshold"), ("optim.clip_value=0", "clipping threshold"),
    ("optim.warmup_steps=3 optim.warmup_epochs=1", "not both"), ("optim.warmup_steps=-1", ">= 0"),
])
def test_option_values_that_cannot_work_are_refused(fashion_root, tmp_path, override, needle):
    r = run_script("train.py", *tiny_overrides(fashion_root), *override.split(), f"hydra.run.dir={tmp_path / 'r'}")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and needle in err and "Traceback" not in err
