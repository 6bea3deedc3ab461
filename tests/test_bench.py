"""scripts/bench.py --quick as a user runs it: it finishes, and its JSON and markdown hold its sections.

A smoke test only: no timing is asserted (speed is measured by the benchmark, not by tests: DESIGN.md).
The scaling section is skipped here to keep the test short (three more worker processes); the benchmark
run that produced docs/bench.md exercises it.
"""
from __future__ import annotations

import json

from conftest import run_script


def test_bench_quick_writes_json_and_markdown(fashion_root, tmp_path):
    out = tmp_path / "bench"
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## next section\n")
    r = run_script("bench.py", "--quick", "--out", str(out), "--data-root", str(fashion_root), "--limit-train", "600",
                   "--models", "lenet5", "--pools", "max", "--skip", "scaling", "--readme", str(readme), "--rounds", "2",
                   timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.with_suffix(".json").read_text())

    rows = {r["backend"]: r for r in rep["epochs"]}
    assert set(rows) == {"numpy", "numba", "torch"} and len(rep["epochs"]) == 3 and rep["rounds"] == 2
    for b, row in rows.items():
        assert "error" not in row, row
        runs = row["runs_seconds_per_epoch"]                                  # two rounds; the row is the lower
        assert len(runs) == 2 and row["seconds_per_epoch"] == min(runs)      # middle (median) run
        assert row["steps"] == 10 and row["samples"] == 600 and row["full_epoch"]    # 600 images: one epoch < 20 steps
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 50
    assert rows["torch"]["ratio_to_torch"] == 1.0
    assert rows["numba"]["target"] == 1.0 and rows["numpy"]["target"] == 2.0
    # the same network, weights and batches: the three backends see the same first loss
    assert abs(rows["numpy"]["loss_first"] - rows["torch"]["loss_first"]) < 1e-3
    assert abs(rows["numba"]["loss_first"] - rows["torch"]["loss_first"]) < 1e-3

    for b in ("numpy", "numba", "torch"):
        ops = {(k["layer"].split()[0], k["op"]) for k in rep["kernels"][b]}
        assert {("conv1", "conv forward"), ("conv2", "conv backward"), ("pool1", "maxpool backward"),
                ("pool2", "meanpool forward")} <= ops

    s = rep["startup"]                                                   # --quick: warm cache only
    assert "numba_cold" not in s and len(s["numba_warm_runs"]) == 1
    for run in (s["numba_warm"], s["numpy"]):
        assert 0 < run["to_model_s"] <= run["to_first_step_s"], run

    md = out.with_suffix(".md").read_text()
    for heading in ("## Training epochs", "## Kernels", "## Start-up"):
        assert heading in md
    assert "lenet5 | max | numba" in md and "≤ 1.0×" in md

    text = readme.read_text()                                            # the section replaced between the markers
    assert text.startswith("# title\n\n<!-- bench:start -->\n### Results") and text.endswith("<!-- bench:end -->\n\n## next section\n")
    assert "old table" not in text and "lenet5 | max | numba" in text
