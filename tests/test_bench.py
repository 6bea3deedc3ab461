"""scripts/bench.py --quick as a user runs it, on small real-format data: its rows come from the user's commands'
own run directories (metrics.json of scripts/train.py and scripts/torch_peer.py), the ratios from those values,
and the README section is replaced between its markers. No timing is asserted (DESIGN.md: speed is measured by
the benchmark, not by tests)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_script

from cnnpipe.bench.report import load_targets


@pytest.fixture(scope="module")
def bench(fashion_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    readme = tmp / "README.md"
    readme.write_text("# title\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## next section\n")
    r = run_script("bench.py", "--quick", "--out", str(tmp / "bench"), "--data-root", str(fashion_root),
                   "--override", "data.val_size=100", "--models", "lenet5", "--backends", "numba", "--experiments",
                   "--cifar-size", "600", "200", "--sections", "headline", "cifar", "profile", "kernels", "startup",
                   "--workdir", str(tmp / "work"), "--readme", str(readme), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "bench.json").read_text()), (tmp / "bench.md").read_text(), readme.read_text()


def metrics_of(run: dict) -> dict:
    return json.loads((Path(run["run_dir"]) / "metrics.json").read_text())


@pytest.mark.parametrize("part", ["fashion", "cifar"])
def test_rows_come_from_the_user_commands(bench, part):
    rep = bench[0]
    groups = {s["key"]: s for s in rep[part]}
    key = "lenet5/max" if part == "fashion" else "cifar10/lenet5"
    rows = groups[key]["rows"]
    assert set(rows) == {"numba", "torch"}
    assert rows["numba"]["command"].startswith("python scripts/train.py ")
    assert rows["torch"]["command"].startswith("python scripts/torch_peer.py ")
    for b, row in rows.items():
        (run,) = row["runs"]                                             # --quick: one round
        m = metrics_of(run)
        assert m["backend"] == b and m["steps"] == run["steps"] == 8      # 500 training images, batch 64
        assert run["seconds"] == sum(m["epoch_seconds"]) and run["samples_per_second"] == m["samples_per_second"]
        assert run["n_train"] == 500 and run["full_epoch"]
        assert row["epoch_seconds"] == pytest.approx(500 / m["samples_per_second"])
        assert row["peak_rss_mb"] > 100 and row["bare_epoch_seconds"] > 0
        assert row["overhead"] == pytest.approx(row["epoch_seconds"] / row["bare_epoch_seconds"] - 1)
    ours, peer = (metrics_of(rows[b]["runs"][0]) for b in ("numba", "torch"))
    assert abs(ours["train_loss"] - peer["train_loss"]) < 1e-3      # the same network, weights and batches
    ratio = rows["numba"]["runs"][0]["epoch_seconds"] / rows["torch"]["runs"][0]["epoch_seconds"]
    assert rows["numba"]["ratio"] == pytest.approx(ratio)
    log = (Path(rows["numba"]["runs"][0]["run_dir"]) / "train.log").read_text()
    tb = re.search(r"TensorBoard logging took [\d.]+ s in the training loop and at epoch ends: ([\d.]+) % ", log)
    assert rows["numba"]["tb_share"] == pytest.approx(float(tb[1]) / 100) and rows["numba"]["tb_once_seconds"] > 0
    if part == "cifar":
        assert "data.verify=false: the cifar10 files in" in log and "train 500, val 100" in log
    else:
        novel = groups["lenet5/max/no-val"]["rows"]["numba"]
        assert novel["runs"][0]["val"] is False and metrics_of(novel["runs"][0])["val_acc"] is None


def test_profile_section(bench):
    rep, md, _ = bench
    (p,) = rep["profile"]
    epoch = p["files"]["profile.json"]["epochs"][0]
    assert p["command"].endswith("trainer.profile=true trainer.max_steps=30 trainer.epochs=1")
    assert abs(sum(r["share"] for r in epoch["rows"]) - 1) < 1e-9
    assert "| conv1 (conv 6 k5 s1 same) |" in md and "| optimizer step |" in md


def test_kernels_and_startup_sections(bench):
    rep, md, _ = bench
    for b in ("numba", "torch"):
        ops = {(k["layer"].split()[0], k["op"]) for k in rep["kernels"][b]}
        assert {("conv1", "conv forward"), ("conv2", "conv backward"), ("pool1", "maxpool backward"),
                ("pool2", "meanpool forward")} <= ops
    s = rep["startup"]                                                   # --quick: warm cache only
    assert "numba_cold" not in s and len(s["numba_warm_runs"]) == 1
    for run in (s["numba_warm"], s["numpy"]):
        assert 0 < run["to_model_s"] <= run["to_data_s"] <= run["to_first_step_s"], run
    warm, limit = s["numba_warm"], load_targets()["warm_start_s"]                 # docs/bench-targets.yaml
    mark = "✅" if warm["to_first_step_s"] <= limit else "❌"
    assert "## Kernels" in md and (f"| numba, warm cache | {warm['to_model_s']:.2f} | {warm['to_data_s']:.2f} | "
                                   f"{warm['to_first_step_s']:.2f} | ≤ {limit} s {mark} |") in md


def test_markdown_and_readme(bench):
    rep, md, readme = bench
    assert "## Fashion-MNIST: one epoch of the user's command" in md and "## CIFAR-10-shaped" in md
    row = rep["fashion"][0]["rows"]["numba"]
    assert f"| lenet5, max pool | numba | {row['epoch_seconds']:.2f} |" in md
    limit = load_targets()["ratio_to_torch"]["lenet5/numba"]                      # docs/bench-targets.yaml
    mark = "✅" if row["ratio"] <= limit else "❌"
    assert f"{row['ratio']:.2f}× ({min(row['ratios']):.2f}–{max(row['ratios']):.2f}) | ≤ {limit}× {mark} |" in md
    assert readme.startswith("# title\n\n<!-- bench:start -->\n### Results")
    assert readme.endswith("<!-- bench:end -->\n\n## next section\n") and "old table" not in readme
    assert "| lenet5, max pool | PyTorch peer |" in readme and "python scripts/torch_peer.py" in readme


def test_an_experiment_is_compared_by_its_own_time_per_sample_over_the_sgd_convnets():
    """A slower experiment gives a ratio above 1 in every round (the report checks it against ≤ 1 + the target)."""
    from cnnpipe.bench.headline import experiment_vs_sgd

    def summary(*samples_per_second):
        return {"rows": {"numba": {"runs": [{"round": k, "samples_per_second": s}
                                            for k, s in enumerate(samples_per_second)]}}}
    by_key = {"convnet/max": summary(2000.0, 1800.0), "fashion_convnet": summary(1000.0, 1200.0)}
    assert experiment_vs_sgd(by_key, ["fashion_convnet", "absent"]) == {"fashion_convnet": [2.0, 1.5]}
    assert experiment_vs_sgd({"fashion_convnet": by_key["fashion_convnet"]}, ["fashion_convnet"]) == {}
