"""TensorBoard logging, read back by TensorBoard itself: its EventAccumulator, and a real `tensorboard` server."""
from __future__ import annotations

import io
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script, tiny_overrides
from omegaconf import open_dict
from PIL import Image

from cnnpipe.app import log_to_file
from cnnpipe.images import diverging, grid
from cnnpipe.tb import TensorBoardLogger
from cnnpipe.train import Trainer

LAYERS = ("conv1", "conv2", "dense1", "dense2", "dense3")          # LeNet-5's parameterized layers
TB_OVERRIDES = {"data.val_size": "64", "data.limit_train": "192", "data.limit_test": "64", "trainer.epochs": "2",
                "checkpoint.enabled": "false", "logger.scalar_every": "2", "logger.image_every": "4",
                "logger.histogram_every": "4", "logger.probe_images": "2"}


def accumulate(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def fit_with_logger(cfg, run_dir, step0=0):
    log_to_file(Path(run_dir) / "train.log")
    tr = Trainer(cfg, run_dir)
    tr.step = step0                                       # as a resumed run would start
    tr.callbacks.append(TensorBoardLogger(tr))
    return tr, tr.fit()


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, fashion_root):
    """One real tiny LeNet-5 run (2 epochs × 6 steps) with the logger; returns (run_dir, trainer, metrics, ea)."""
    from cnnpipe.config import compose_config
    cfg = compose_config(tiny_overrides(fashion_root, **TB_OVERRIDES))
    run_dir = tmp_path_factory.mktemp("tbrun")
    tr, metrics = fit_with_logger(cfg, run_dir)
    return run_dir, tr, metrics, accumulate(run_dir)


def test_one_event_file_in_the_run_dir_with_every_scalar(tb_run):
    run_dir, tr, metrics, ea = tb_run
    assert [p.parent for p in run_dir.rglob("events.out.tfevents.*")] == [run_dir]   # no sub-run (hparams)
    tags = set(ea.Tags()["scalars"])
    expected = {f"{split}/{m}" for split in ("train", "val", "test") for m in ("loss", "accuracy")}
    expected |= {"train/lr", "train/samples_per_second", "probe/loss"}
    for name in LAYERS:
        expected |= {f"grad_norm/{name}.W", f"grad_norm/{name}.b", f"weight_norm/{name}.W",
                     f"update_ratio/{name}", f"delta_norm/{name}"}
    assert expected <= tags, sorted(expected - tags)
    for tag in tags:
        values = [e.value for e in ea.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 4, 6, 8, 10, 12]    # the first step too
    assert [e.step for e in ea.Scalars("val/accuracy")] == [6, 12]
    assert ea.Scalars("test/accuracy")[-1].value == pytest.approx(metrics["test_acc"])
    assert all(e.value > 0 for tag in tags if tag.startswith(("grad_norm/", "delta_norm/", "update_ratio/"))
               for e in ea.Scalars(tag))
    assert ea.Scalars("train/lr")[0].value == pytest.approx(tr.cfg.optim.lr)


def test_a_run_shorter_than_scalar_every_logs_its_first_step_and_each_epoch_end(fashion_root, tmp_path):
    """2 epochs × 3 steps with scalar_every 50: every scalar family at steps 1 (the first), 3 and 6 (the epochs'
    last steps), and at no other step."""
    run = tmp_path / "short"
    r = run_script("train.py", *tiny_overrides(fashion_root, **{
        "data.val_size": "64", "data.limit_train": "192", "trainer.batch_size": "64", "trainer.epochs": "2",
        "logger.tensorboard": "true", "logger.scalar_every": "50", "checkpoint.enabled": "false"}),
        f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    ea = accumulate(run)
    families = ["train/loss", "train/accuracy", "train/lr", "train/samples_per_second", "grad_norm/total",
                *[f"grad_norm/{layer}.{k}" for layer in LAYERS for k in "Wb"], "delta_norm/conv1", "delta_norm/conv2",
                *[f"update_ratio/{layer}" for layer in LAYERS], "weight_norm/dense3.b"]
    for tag in families:
        assert [e.step for e in ea.Scalars(tag)] == [1, 3, 6], tag


def test_the_logger_reports_its_own_cost_in_train_log(tb_run):
    """Every run's train.log says what logging cost against the training loop (how the ≤ 5 % figure is measured)."""
    run_dir, tr, metrics, ea = tb_run
    logger = next(cb for cb in tr.callbacks if isinstance(cb, TensorBoardLogger))
    line = next(s for s in (run_dir / "train.log").read_text().splitlines() if "TensorBoard logging took" in s)
    found = re.search(r"took ([\d.]+) s in the training loop and at epoch ends: ([\d.]+) % of the ([\d.]+) s "
                      r"training loop; once a run: ([\d.]+) s opening the event file .*, ([\d.]+) s for the final",
                      line)
    secs, pct, loop, opened, ended = map(float, found.groups())
    trained = sum(metrics["epoch_seconds"])
    assert logger.seconds > 0 and secs == pytest.approx(logger.seconds, abs=0.006)
    assert loop == pytest.approx(trained, abs=0.06)
    assert pct == pytest.approx(100 * logger.seconds / trained, abs=0.06)
    assert opened == pytest.approx(logger.open_seconds, abs=0.006) and logger.open_seconds > 0
    assert ended == pytest.approx(logger.end_seconds, abs=0.006) and logger.end_seconds > 0


def test_images_decode_and_delta_maps_are_not_blank(tb_run):
    _, tr, _, ea = tb_run
    tags = set(ea.Tags()["images"])
    expected = {"input/probe", "confusion/val"} | {f"{k}/{c}" for k in ("delta", "activation", "filters")
                                                   for c in ("conv1", "conv2")}
    assert expected <= tags, sorted(expected - tags)
    assert [e.step for e in ea.Images("delta/conv1")] == [4, 8, 12]
    from cnnpipe.images import grid
    one = grid(np.zeros((1, 1, 28, 28, 3), np.uint8))                     # one probe picture, as the logger draws it
    probe = ea.Images("input/probe")[0]
    assert (probe.height, probe.width) == (one.shape[0], 2 * one.shape[1])   # the two probes side by side
    assert [e.step for e in ea.Images("confusion/val")] == [6, 12]
    for tag in tags:
        for ev in ea.Images(tag):
            assert ev.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n", tag
            im = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
            assert im.shape[:2] == (ev.height, ev.width) and im.std() > 0, tag
    for layer in ("conv1", "conv2"):
        events = ea.Images(f"delta/{layer}")
        for ev in events:                                                  # both probe images in one grid
            im = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB")).astype(int)
            coloured = (im.max(2) - im.min(2)) > 40                       # red or blue: a signed δ
            assert coloured.mean() > 0.005, f"{layer} δ-map is blank at step {ev.step}"
            assert (im[..., 0] > im[..., 2] + 40).any() and (im[..., 2] > im[..., 0] + 40).any(), \
                f"{layer} δ-map shows only one sign"


def test_histograms_and_hparams_decode(tb_run):
    from tensorboard.plugins.hparams import plugin_data_pb2
    _, tr, metrics, ea = tb_run
    hists = set(ea.Tags()["histograms"])
    for name in LAYERS:
        assert {f"weights/{name}.W", f"grads/{name}.W", f"deltas/{name}"} <= hists
        assert [e.step for e in ea.Histograms(f"grads/{name}.W")] == [4, 8, 12]
    content = ea.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hp["model.name"] == "lenet5" and hp["pool.mode"] == "max" and hp["conv.k"] == 5
    assert hp["optim.lr"] == pytest.approx(tr.cfg.optim.lr) and hp["backend.name"] == "numpy"
    assert {i.name for i in exp.hparam_infos} == set(hp)
    metric_tags = {m.name.tag for m in exp.metric_infos}
    assert metric_tags == {"hparams/test_acc", "hparams/test_loss", "hparams/train_loss", "hparams/val_acc",
                           "hparams/val_loss"}
    for tag in metric_tags:                                    # the values the HPARAMS table shows
        assert ea.Scalars(tag)[-1].value == pytest.approx(metrics[tag.split("/")[1]])
    assert end.status == 1                                     # STATUS_SUCCESS


def test_probe_does_not_change_training(compose_cfg, fashion_root, tmp_path):
    """Images, histograms and scalars every step: bit-identical parameters to a run without logging (a dropout layer
    replaces dense1, so a probe that drew from the dropout generator would show up too)."""
    ov = tiny_overrides(fashion_root, **{**TB_OVERRIDES, "trainer.epochs": "1", "logger.scalar_every": "1",
                                          "logger.image_every": "1", "logger.histogram_every": "1",
                                          "model.layers.7.type": "dropout", "model.layers.7.p": "0.3"})
    params = []
    for with_tb in (False, True):
        tr = Trainer(compose_cfg(ov), tmp_path / str(with_tb))
        if with_tb:
            tr.callbacks.append(TensorBoardLogger(tr))
        m = tr.fit()
        params.append(({k: v.copy() for k, v in tr.model.named_params().items()}, m["history"]["train_loss"]))
    assert params[0][1] == params[1][1]
    for k in params[0][0]:
        np.testing.assert_array_equal(params[0][0][k], params[1][0][k])
    assert len(accumulate(tmp_path / "True").Images("delta/conv2")) == 6


def test_resumed_steps_continue_and_the_update_ratio_is_true(compose_cfg, fashion_root, tmp_path):
    """Steps continue from tr.step. Plain SGD: Δθ = -lr·g, so the logged ‖Δθ‖/‖θ_before‖ must agree with the logged
    gradient norm and (post-step) weight norm: ‖θ_before‖ lies within ‖θ_after‖ ± lr·‖g‖."""
    ov = tiny_overrides(fashion_root, **{**TB_OVERRIDES, "trainer.epochs": "1", "logger.histogram_every": "0",
                                         "optim.momentum": "0", "optim.lr": "0.05"})
    fit_with_logger(compose_cfg(ov), tmp_path, step0=1000)
    ea = accumulate(tmp_path)
    assert [e.step for e in ea.Scalars("train/loss")] == [1001, 1002, 1004, 1006]
    assert [e.step for e in ea.Images("delta/conv1")] == [1004, 1006]    # every image_every, and the last step
    assert not ea.Tags()["histograms"]

    def last(tag):
        return [e.value for e in ea.Scalars(tag)]
    for name in LAYERS:
        g = np.hypot(last(f"grad_norm/{name}.W"), last(f"grad_norm/{name}.b"))
        w_after = np.hypot(last(f"weight_norm/{name}.W"), last(f"weight_norm/{name}.b"))
        step = 0.05 * g                                                   # ‖Δθ‖ exactly
        ratio = np.array(last(f"update_ratio/{name}"))
        assert np.all(ratio >= step / (w_after + step) * (1 - 1e-4)), name
        assert np.all(ratio <= step / (w_after - step) * (1 + 1e-4)), name
        assert np.all(ratio > 0)


def test_hydra_overrides_become_hparams_and_the_switch_works(fashion_root, tmp_path):
    """As in a Hydra job (HydraConfig set, as @hydra.main does): the job's overrides are HPARAMS columns.
    make_trainer (the real wiring) adds the logger only with logger.tensorboard=true."""
    from hydra.core.hydra_config import HydraConfig

    from cnnpipe.app import make_trainer
    from cnnpipe.config import compose_config
    from cnnpipe.tb import run_hparams
    common = tiny_overrides(fashion_root, **{"trainer.max_steps": "3", "checkpoint.enabled": "false"})
    cfg = compose_config([*common, "pool=mean", "conv.k=3", "resume=null"], return_hydra_config=True)
    off = compose_config(common)
    try:
        HydraConfig.instance().set_config(cfg)
        hp = run_hparams(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert hp["pool"] == "mean" and hp["pool.mode"] == "mean" and hp["conv.k"] == 3 and "resume" not in hp
    assert hp["trainer.max_steps"] == 3 and hp["data.download"] == "false" and hp["conv.padding"] == "same"
    assert not any(isinstance(cb, TensorBoardLogger) for cb in make_trainer(off, tmp_path / "off").callbacks)
    with open_dict(off):
        off.logger.tensorboard = True
    assert any(isinstance(cb, TensorBoardLogger) for cb in make_trainer(off, tmp_path / "on").callbacks)


def test_diverging_colour_map_is_symmetric_around_zero():
    rgb = diverging(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), 2.0)
    assert rgb[2].tolist() == [255, 255, 255]                             # zero is white
    assert rgb[0, 2] > rgb[0, 0] and rgb[4, 0] > rgb[4, 2]                # negative blue, positive red
    assert (255 - rgb[1]).sum() == pytest.approx((255 - rgb[3]).sum(), abs=90) and (rgb[1] != rgb[3]).any()
    g = grid(np.zeros((5, 3, 3, 3), np.uint8), px=3)                     # 5 tiles → 3×2 grid with 2-px gaps
    assert g.shape == (2 * 5 + 2, 3 * 5 + 2, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_a_real_tensorboard_server_serves_the_run(tb_run):
    run_dir, *_ = tb_run
    logdir = run_dir.parent
    exe = Path(sys.executable).with_name("tensorboard")
    port = _free_port()
    proc = subprocess.Popen([str(exe), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                             "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base, run = f"http://127.0.0.1:{port}", run_dir.name
    try:
        deadline, scalars = time.time() + 60, {}
        while time.time() < deadline and run not in scalars:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                scalars = _get(f"{base}/data/plugin/scalars/tags")
            except OSError:
                pass
            time.sleep(0.5)
        assert run in scalars, f"tensorboard did not serve {run}: {scalars}"
        assert {"train/loss", "grad_norm/conv1.W", "delta_norm/conv2", "val/accuracy"} <= set(scalars[run])
        images = _get(f"{base}/data/plugin/images/tags")
        assert {"delta/conv1", "delta/conv2", "filters/conv1", "confusion/val"} <= set(images[run])
        points = _get(f"{base}/data/plugin/scalars/scalars?run={run}&tag=train/loss")
        assert [p[1] for p in points] == [1, 2, 4, 6, 8, 10, 12]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_without_validation_the_confusion_comes_from_training_predictions(compose_cfg, fashion_root, tmp_path):
    """No validation split: confusion/train each epoch from the epoch's own training predictions, confusion/test
    once at the end from the final test's predictions."""
    ov = tiny_overrides(fashion_root, **{**TB_OVERRIDES, "data.val_size": "0", "logger.image_every": "0"})
    tr, m = fit_with_logger(compose_cfg(ov), tmp_path)
    ea = accumulate(tmp_path)
    assert [e.step for e in ea.Images("confusion/train")] == [6, 12]
    assert [e.step for e in ea.Images("confusion/test")] == [12]
    assert "confusion/val" not in ea.Tags()["images"]
    logger = next(cb for cb in tr.callbacks if isinstance(cb, TensorBoardLogger))
    assert logger.train_confusion.sum() == 0                # reset after each epoch's image
