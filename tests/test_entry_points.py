"""The packaged commands (pyproject [project.scripts]): each, run from the venv's bin/, does what its scripts/*.py
does, and Hydra's shell completion for cnnpipe-train works in a real bash."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from completion import completion_query, completion_reply
from conftest import REPO, run_script, tiny_overrides

BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def run_entry(name, *args, cwd=None):
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=300, cwd=cwd or REPO)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_entry_point_is_installed_and_is_its_script(name):
    """cnnpipe-<x> calls the same main() as scripts/<x>.py."""
    assert (BIN / name).exists(), f"{name} is not installed: pip install -e ."
    module, func = SCRIPTS[name].split(":")
    script = (REPO / "scripts" / f"{name.removeprefix('cnnpipe-').replace('-', '_')}.py").read_text()
    assert f"from {module} import {func}" in script


def test_cnnpipe_train_trains_like_the_script(fashion_root, tmp_path):
    common = [*tiny_overrides(fashion_root), "trainer.max_steps=3"]
    r = run_entry("cnnpipe-train", *common, f"hydra.run.dir={tmp_path / 'entry'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'script'}")
    assert s.returncode == 0, s.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("entry", "script"))
    assert a["history"]["train_loss"] == b["history"]["train_loss"] and a["test_loss"] == b["test_loss"]
    assert (tmp_path / "entry" / "train.log").exists() and (tmp_path / "entry" / ".hydra").is_dir()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_root) -> Path:
    """A finished two-step run made by cnnpipe-train (its checkpoints for evaluate and export)."""
    run = tmp_path_factory.mktemp("entry") / "run"
    r = run_entry("cnnpipe-train", *tiny_overrides(fashion_root), "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_cnnpipe_evaluate_and_gradcheck_run(tiny_run, tmp_path):
    run = tiny_run
    r = run_entry("cnnpipe-evaluate", f"ckpt={run}")
    assert r.returncode == 0 and "confusion matrix" in r.stdout
    r = run_entry("cnnpipe-gradcheck", "model=lenet5", "pool=mean", cwd=tmp_path)
    assert r.returncode == 0 and "gradients within" in r.stdout
    r = run_entry("cnnpipe-evaluate")
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr


def test_cnnpipe_find_lr_makes_the_scripts_curve(fashion_root, tmp_path):
    common = [*tiny_overrides(fashion_root), "find_lr.steps=12", "find_lr.start=1e-4", "find_lr.end=0.01"]
    done = {"entry": run_entry("cnnpipe-find-lr", *common, f"hydra.run.dir={tmp_path / 'entry'}", cwd=tmp_path),
            "script": run_script("find_lr.py", *common, f"hydra.run.dir={tmp_path / 'script'}")}
    for name, r in done.items():
        assert r.returncode == 0, r.stderr[-2000:]
        assert "LR range test: 12 steps" in r.stdout and (tmp_path / name / "lr_find.png").exists()
    a, b = (json.loads((tmp_path / name / "lr_find.json").read_text()) for name in done)
    assert a == b and len(a["loss"]) == 12


def test_cnnpipe_export_writes_what_the_script_writes(tiny_run, tmp_path):
    """format=torch: the same report, the same standalone module and the same tensors as scripts/export.py."""
    args = [f"ckpt={tiny_run / 'checkpoints' / 'last.npz'}", "format=torch"]
    done = {"entry": run_entry("cnnpipe-export", *args, f"out={tmp_path / 'entry' / 'lenet.pt'}", cwd=tmp_path),
            "script": run_script("export.py", *args, f"out={tmp_path / 'script' / 'lenet.pt'}")}
    for r in done.values():
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (r.stdout.replace(str(tmp_path / name), "<out>") for name, r in done.items())
    assert a == b and ": match" in a, a
    a, b = (torch.load(tmp_path / name / "lenet.pt", weights_only=True) for name in done)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "entry" / "lenet.py").read_text() == (tmp_path / "script" / "lenet.py").read_text()


def test_cnnpipe_bench_help_is_the_scripts(tmp_path):
    """The benchmark itself takes minutes (tests/test_bench.py runs it); its command line is the same."""
    r, s = run_entry("cnnpipe-bench", "--help", cwd=tmp_path), run_script("bench.py", "--help")
    assert r.returncode == s.returncode == 0, r.stderr[-2000:]
    assert r.stdout == s.stdout and "--quick" in r.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_completion_for_cnnpipe_train_in_bash(tmp_path):
    """`cnnpipe-train -sc install=bash` installs Hydra's completion; completing `pool=` offers max and mean."""
    script = "\n".join([f"export PATH={BIN}:$PATH", 'eval "$(cnnpipe-train -sc install=bash)"',
                        "complete -p cnnpipe-train", completion_query("cnnpipe-train pool=")])
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hydra_bash_completion cnnpipe-train" in r.stdout
    assert sorted(completion_reply(r.stdout)) == ["pool=max", "pool=mean"], r.stdout
