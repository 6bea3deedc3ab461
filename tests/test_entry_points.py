"""The packaged commands (pyproject [project.scripts]): each is its scripts/*.py, and Hydra's shell completion for
cnnpipe-train works in a real bash."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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


def test_cnnpipe_evaluate_and_gradcheck_run(fashion_root, tmp_path):
    run = tmp_path / "run"
    assert run_entry("cnnpipe-train", *tiny_overrides(fashion_root), "trainer.max_steps=2",
                     f"hydra.run.dir={run}").returncode == 0
    r = run_entry("cnnpipe-evaluate", f"ckpt={run}")
    assert r.returncode == 0 and "confusion matrix" in r.stdout
    r = run_entry("cnnpipe-gradcheck", "model=lenet5", "pool=mean", cwd=tmp_path)
    assert r.returncode == 0 and "gradients within" in r.stdout
    r = run_entry("cnnpipe-evaluate")
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_completion_for_cnnpipe_train_in_bash(tmp_path):
    """`cnnpipe-train -sc install=bash` installs Hydra's completion; completing `pool=` offers max and mean."""
    script = f"""
        export PATH={BIN}:$PATH
        eval "$(cnnpipe-train -sc install=bash)"
        complete -p cnnpipe-train
        COMP_LINE="cnnpipe-train pool="
        COMP_POINT=${{#COMP_LINE}}
        COMP_WORDS=(cnnpipe-train pool=)
        COMP_CWORD=1
        hydra_bash_completion
        echo "REPLY: ${{COMPREPLY[*]}}"
    """
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hydra_bash_completion cnnpipe-train" in r.stdout
    reply = r.stdout.split("REPLY:", 1)[1].split()
    assert sorted(reply) == ["pool=max", "pool=mean"], r.stdout
