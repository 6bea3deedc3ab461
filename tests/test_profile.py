"""trainer.profile=true through scripts/train.py: the table is printed and logged, profile.json has every layer,
the parts fill the step, conv/dense layers get GFLOP/s, and profiling leaves the numbers bit-identical."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_script, tiny_overrides

LENET5 = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten1", "dense1", "relu3", "dense2", "relu4",
          "dense3"]


@pytest.fixture(scope="module")
def runs(fashion_root, tmp_path_factory):
    """The same tiny run (numpy backend, TensorBoard on, two epochs) with and without the profile."""
    out = {}
    for profile in ("true", "false"):
        run_dir = tmp_path_factory.mktemp(f"profile-{profile}") / "run"
        r = run_script("train.py", *tiny_overrides(fashion_root, **{"logger.tensorboard": "true",
                                                                     "trainer.epochs": "2"}),
                       f"trainer.profile={profile}", f"hydra.run.dir={run_dir}")
        assert r.returncode == 0, r.stderr[-3000:]
        out[profile] = (r, run_dir)
    return out


def test_profile_table_and_json(runs):
    r, run_dir = runs["true"]
    for text in (r.stdout + r.stderr, (run_dir / "train.log").read_text()):
        assert "profile of epoch 1: 16 steps, 500 samples" in text and "profile of epoch 2" in text
        assert "conv2 backward" in text and "optimizer step" in text and "GFLOP/s" in text
    prof = json.loads((run_dir / "profile.json").read_text())
    assert [e["epoch"] for e in prof["epochs"]] == [1, 2] and "2× its forward FLOPs" in prof["footnote"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for e, epoch_seconds in zip(prof["epochs"], metrics["epoch_seconds"]):
        rows = {row["part"]: row for row in e["rows"]}
        assert [p for p in rows if p.endswith(" forward")] == [f"{n} forward" for n in LENET5]
        assert [p for p in rows if p.endswith(" backward")] == [f"{n} backward" for n in LENET5]
        assert {"data batch", "optimizer step", "TensorBoardLogger hooks", "Checkpointer hooks", "rest"} <= set(rows)
        assert abs(sum(row["share"] for row in e["rows"]) - 1) < 1e-9
        assert all(row["seconds"] >= 0 for row in e["rows"])           # rest too: the timed parts fit the window
        assert sum(row["seconds"] for row in e["rows"] if row["group"] == "layer") > 0.3 * e["window_seconds"]
        assert 0.5 * epoch_seconds < e["window_seconds"] < 1.5 * epoch_seconds + 0.1
        for name in LENET5:
            for pass_ in ("forward", "backward"):
                row = rows[f"{name} {pass_}"]
                assert row["seconds"] > 0
                assert (row["gflops"] > 0) if name[:4] in ("conv", "dens") else "gflops" not in row
        assert e["steps"] == 16 and e["samples"] == 500
        assert "TensorBoardLogger hooks" in e["after_loop_seconds"]    # its epoch-end hook, outside the step


def test_profiling_does_not_change_the_numbers(runs):
    on, off = runs["true"][1], runs["false"][1]
    m_on, m_off = (json.loads((d / "metrics.json").read_text()) for d in (on, off))
    for key in ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "train_acc", "steps"):
        assert m_on[key] == m_off[key], key
    assert m_on["history"]["train_loss"] == m_off["history"]["train_loss"]
    assert not (off / "profile.json").exists()
    with np.load(on / "checkpoints" / "last.npz", allow_pickle=False) as a, \
            np.load(off / "checkpoints" / "last.npz", allow_pickle=False) as b:
        assert set(a.files) == set(b.files)
        state = [k for k in a.files if k.startswith(("param/", "optim/", "rng/"))]     # not the timings
        assert any(k.startswith("param/") for k in state)
        for k in state:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
