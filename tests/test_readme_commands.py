"""Every shell command of README.md, run as written: one test per command, named by its section and first words.

A command runs as a user with the venv active would type it: in bash, `python` and `cnnpipe-*` from the venv, from
a fresh working directory (holding a `scripts` link to this checkout's scripts/), with placeholders such as `<run>`
filled (the finished tiny run copied in first, since some commands change it) and small limits appended (tiny data
in the datasets' real on-disk formats, a few steps, two Optuna trials). `make` commands run in the repository. The
command must exit 0 and leave what the README promises (metrics.json, summary.csv, the export files, ...).

Each command meets exactly one rule of `rule_for`; a command no rule covers fails, so a new README command cannot
go untested. Commands that run elsewhere (the cluster, the full benchmark, the test suite itself) are skipped, with
the reason. Example output in the README belongs in ```text fences, which hold no commands."""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from conftest import REPO, make_fashion_root
from datasets import write_cifar, write_mnist_family
from readme import all_readme_commands, fenced_blocks, ray_cluster_step, with_overrides

from cnnpipe.rundir import checkpoint_run_dir

VENV_BIN = Path(sys.executable).parent
COMMANDS = all_readme_commands()
TINY = {"data.download": "false", "data.limit_train": "128", "data.limit_test": "64", "trainer.max_steps": "4"}
TINY_UNLESS_GIVEN = {"data.val_size": "64", "trainer.epochs": "1"}     # a value the command sets is kept
N_TRIALS = 2                                                          # hydra.sweeper.n_trials of Optuna searches
FIND_LR_STEPS = 30                                                    # find_lr.steps (its default: 200)
BENCH_SHRINK = ("--override data.val_size=100 --models lenet5 --backends numba --experiments --cifar-size 600 200 "
                "--quick-steps 5 --bare-budget 1")                   # bench.py's own options, after --quick
SKIPS = {
    "cluster": "runs for real on a one-node SLURM cluster in tests/cluster/test_slurm.py (make test-cluster, as root)",
    "ray cluster": "runs in tests/cluster/test_ray.py (make test-cluster, as root), on a two-node Ray cluster on "
                   "127.0.0.1: the export and the loopback head as written (the other head line is that one "
                   "without --node-ip-address=127.0.0.1, which the test checks), the join as written (Ray refuses "
                   "it on loopback, as the README says; the second node then comes from Ray's node API), the "
                   "sweep, and `ray stop` as stopping exactly the processes that test started (never `ray stop` "
                   "itself, which stops every Ray on the machine)",
    "suite": "the test suite itself: CI runs make test and make test-cluster (make test inside make test would "
             "recurse)",
    "bench": "the full benchmark takes ~20 min on an idle machine (docs/bench); the --quick line runs here",
    "pip": "make setup installs every extra (.[test,sweep,ray,export])",
}


def rule_for(heading: str, command: str):
    """The rule that runs (or skips) one README command; None for a command no rule covers."""
    words = shlex.split(command)
    if heading == "Ray" and ray_cluster_step(command):
        return skipped("ray cluster")
    if heading == "Ray" and script_of(words) == "train" and "hydra/launcher=ray" in words:
        return run_local_ray
    if heading == "SLURM":
        return skipped("cluster")
    if words[0] == "pip":
        return skipped("pip")
    if command in ("make test", "make test-cluster"):
        return skipped("suite")
    if command == "make bench":
        return skipped("bench")
    if words[:2] == ["make", "bench"] and "--quick" in command:
        return run_make_bench_quick
    if command == "make lint":
        return run_make_lint
    if command == "make train":
        return run_make_train
    if command == 'eval "$(cnnpipe-train -sc install=bash)"':
        return run_completion
    if words[:2] == ["tensorboard", "--logdir"] and len(words) == 3:
        return run_tensorboard
    return SCRIPT_RULES.get(script_of(words))


def script_of(words: list[str]) -> str | None:
    """`python scripts/<x>.py ...` or `cnnpipe-<x> ...` (an installed entry point) -> x."""
    if len(words) > 1 and words[0] == "python" and words[1].startswith("scripts/") and words[1].endswith(".py") \
            and (REPO / words[1]).is_file():
        return words[1][len("scripts/"):-len(".py")]
    if words[0].startswith("cnnpipe-") and (VENV_BIN / words[0]).exists():
        return words[0][len("cnnpipe-"):].replace("-", "_")
    return None


def command_ids() -> list[str]:
    """The heading and the fewest first words (at least three) that tell the command from the others."""
    ids = []
    for heading, command in COMMANDS:
        words, n = command.split(), 3
        while n < len(words) and any(h == heading and c != command and c.split()[:n] == words[:n]
                                     for h, c in COMMANDS):
            n += 1
        ids.append(f"{heading}: {' '.join(words[:n])}")
    return [i if ids.count(i) == 1 else f"{i} #{ids[:k + 1].count(i)}" for k, i in enumerate(ids)]


@pytest.mark.parametrize(("heading", "command"), COMMANDS, ids=command_ids())
def test_readme_command(heading, command, request, tmp_path):
    rule = rule_for(heading, command)
    if rule is None:
        pytest.fail(f"No rule covers the README command `{command}` (section {heading!r}): add one to rule_for in "
                    f"tests/test_readme_commands.py, so that it runs here (or is skipped with the reason).")
    rule(Case(command, tmp_path, request))


def test_the_readme_has_commands_and_the_output_examples_are_text():
    """The collection itself: commands in every part of the README, and no example output taken for a command."""
    headings = {h for h, _ in COMMANDS}
    assert {"cnnpipe", "Training", "Checkpoints and resuming", "Export", "Benchmark", "The summary", "Optuna",
            "SLURM", "Ray", "Comparing jobs in TensorBoard"} <= headings, headings
    assert not [c for _, c in COMMANDS if c.startswith(("|", "Sweep summary", "[cnnpipe]", "from ", "model ="))]
    assert len(set(command_ids())) == len(COMMANDS)


# ---------------------------------------------------------------------------------------------------------------
# what every command shares: its working directory, the user's environment, the placeholders


class Case:
    """One README command, its fresh working directory, and the module's fixtures, made when first asked for."""

    def __init__(self, command: str, cwd: Path, request):
        self.command, self.cwd, self.request = command, workdir(cwd), request

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def filled(self) -> str:
        """The command with its placeholders filled; what they name is copied into the working directory."""
        command = self.command
        if "outputs/train/<run>" in command:
            run = self.copy(self.fixture("finished_run"), "outputs/train")
            command = command.replace("outputs/train/<run>", f"outputs/train/{run.name}")
        if "outputs/multirun/<time>" in command:
            sweep = self.copy(self.fixture("finished_sweep"), "outputs/multirun")
            command = command.replace("outputs/multirun/<time>", f"outputs/multirun/{sweep.name}")
        if "data.mirror=/path/to/archives" in command:
            command = command.replace("/path/to/archives", str(self.fixture("mirror")))
        if "data.root=/elsewhere" in command:
            elsewhere = shutil.copytree(self.fixture("data_root"), self.cwd / "elsewhere")
            command = command.replace("data.root=/elsewhere", f"data.root={elsewhere}")
        left = [w for w in shlex.split(command) if "<" in w and ">" in w]
        assert not left, f"no rule fills the placeholders in {left} of `{self.command}`"
        return command

    def copy(self, src: Path, under: str) -> Path:
        return Path(shutil.copytree(src, self.cwd / under / src.name))

    def run(self, command: str, timeout: float = 300, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        r = sh(command, cwd or self.cwd, timeout, env)
        assert r.returncode == 0, f"`{command}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        return r


def workdir(folder: Path) -> Path:
    """A fresh working directory where `python scripts/train.py` works as written."""
    (folder / "scripts").symlink_to(REPO / "scripts")
    return folder


def user_env() -> dict:
    """The environment of a user with the venv active; the installed commands import this checkout's package, as
    `make setup`'s editable install makes them do."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def sh(command: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env={**user_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def given(command: str) -> dict[str, str]:
    """The command's key=value words."""
    return dict(w.split("=", 1) for w in shlex.split(command) if "=" in w and not w.startswith("-"))


def unless_given(command: str, overrides: dict[str, str]) -> str:
    have = given(command)
    return with_overrides(command, *[f"{k}={v}" for k, v in overrides.items() if k not in have])


def tiny(command: str, data_root: Path) -> str:
    """A training command's limits: tiny data, one epoch unless it names its own, a few steps at most."""
    have = given(command)
    extra = {} if "data.mirror" in have else {"data.root": str(data_root)}      # a mirror fills an empty root
    if have.get("data", "").startswith("cifar") or "data.mirror" in have:
        extra["data.verify"] = "false"             # files made here cannot match torchvision's md5 sums
    return with_overrides(unless_given(command, {**extra, **TINY_UNLESS_GIVEN}), *[f"{k}={v}" for k, v in TINY.items()])


def changed(cwd: Path, name: str, before: dict) -> list[Path]:
    return [p for p in cwd.rglob(name) if before.get(p) != p.stat().st_mtime_ns]


def stamps(cwd: Path, name: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in cwd.rglob(name)}


def run_of(path: Path) -> Path:
    """The run directory a resume= or init_from= value names (the run itself, its checkpoints/, or a checkpoint)."""
    return checkpoint_run_dir(path) or path


def tree_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# the module's fixtures: tiny data in the real formats, a mirror of archives, a finished run and a finished sweep


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """data.root with every dataset the README names, where torchvision keeps them: the MNIST family as IDX files
    (Fashion-MNIST learnable), CIFAR-10/100 as pickled batches."""
    root = make_fashion_root(tmp_path_factory.mktemp("data"))
    for i, cls in enumerate((tvd.MNIST, tvd.KMNIST)):
        write_mnist_family(root / cls.__name__ / "raw", gz=False, seed=10 + i)
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        write_cifar(root, cls)
    return root


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """A data.mirror folder: Fashion-MNIST's four archives (gzipped IDX), made here."""
    folder = tmp_path_factory.mktemp("mirror")
    write_mnist_family(folder, gz=True)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    """outputs/train/<run>: the README's first training command, tiny, finished (with best.npz and last.npz)."""
    cwd = workdir(tmp_path_factory.mktemp("run"))
    r = sh(tiny("python scripts/train.py", data_root), cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    [run] = (cwd / "outputs" / "train").iterdir()
    assert (run / "checkpoints" / "best.npz").exists() and (run / "metrics.json").exists()
    return run


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, data_root) -> Path:
    """outputs/multirun/<time>: a finished two-job sweep."""
    cwd = workdir(tmp_path_factory.mktemp("sweep"))
    r = sh(tiny("python scripts/train.py -m conv.k=3,5", data_root), cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    [sweep] = (cwd / "outputs" / "multirun").iterdir()
    assert (sweep / "summary.csv").exists()
    return sweep


@pytest.fixture(scope="module")
def repo_make():
    """`make` in the repository, where it would not first (re)install the venv (make test has just set it up)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("make would first run `make setup` (.venv/ missing, or older than pyproject.toml), which installs "
                    "packages: run make setup (make test does) and these commands run")


# ---------------------------------------------------------------------------------------------------------------
# rules


def skipped(why: str):
    def rule(case: Case):
        pytest.skip(SKIPS[why])
    return rule


def run_train(case: Case):
    """python scripts/train.py / cnnpipe-train: one run, or a sweep (-m, hparams_search=)."""
    command = case.filled()
    have = given(command)
    if "-m" in shlex.split(command) or "hparams_search" in have:
        return run_sweep(case, command)
    command = tiny(command, case.fixture("data_root"))
    source = None                                  # a run the command only reads
    if "init_from" in have or "resume" in have and "hydra.run.dir" in have:
        source = run_of(case.cwd / have.get("init_from", have.get("resume")))
    source_bytes = tree_bytes(source) if source else None
    before = stamps(case.cwd, "metrics.json")
    r = case.run(command)
    [path] = changed(case.cwd, "metrics.json", before)
    run, m = path.parent, json.loads(path.read_text())
    assert 0 <= m["test_acc"] <= 1 and m["steps"] >= 1 and m["epochs"] >= 1, m
    assert (run / "train.log").exists() and (run / "checkpoints" / "last.npz").exists()
    for key, field in (("data", "dataset"), ("model", "model"), ("backend", "backend"), ("dtype", "dtype")):
        if key in have:
            assert m[field] == have[key], (key, m[field])
    if "hydra.run.dir" in have:
        assert run == case.cwd / have["hydra.run.dir"]
    if source:                                     # read, not written: it stays byte for byte
        assert run != source and tree_bytes(source) == source_bytes
    if "resume" in have:
        assert m["resumed_from"], m
        if not source:                             # continued in place
            assert run == case.cwd / have["resume"]
        if "trainer.epochs" in have:               # to a later epoch: it goes on until the step limit
            assert m["steps"] == int(TINY["trainer.max_steps"]), m
    if "init_from" in have:
        assert m["init_from"]["loaded"], m["init_from"]
        assert bool(m["init_from"]["skipped"]) == (have.get("init_from_strict") == "false"), m["init_from"]
    if have.get("trainer.profile") == "true":
        assert "forward" in (run / "profile.json").read_text()
    if "data.mirror" in have:                      # the mirror the user named is looked at first
        assert f"from mirror {have['data.mirror']}" in (run / "train.log").read_text()
    return r


def run_local_ray(case: Case):
    """hydra/launcher=ray with no address: a local Ray on this machine. Ray's own settings keep it on the loopback
    address (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: tests/cluster/test_ray.py says why) and its files in this test's
    directory."""
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")           # short: Ray's unix sockets live below it
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_dir,
           "RAY_AUTH_MODE": "disabled"}
    try:
        run_sweep(case, case.filled(), env)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def run_sweep(case: Case, command: str, env: dict | None = None):
    """A sweep: the summary lists every job (every combination, or N_TRIALS Optuna trials), all finished."""
    have = given(command)
    optuna = "hparams_search" in have or have.get("hydra/sweeper") == "optuna"
    command = tiny(command, case.fixture("data_root"))
    if optuna:
        command = with_overrides(command, f"hydra.sweeper.n_trials={N_TRIALS}")
    if have.get("sweep.resume") == "true":         # the sweep it continues: the same command, run before
        first = shlex.join(w for w in shlex.split(command) if w != "sweep.resume=true")
        case.run(first, timeout=600, env=env)
    r = case.run(command, timeout=600, env=env)
    [summary] = case.cwd.rglob("summary.csv")
    with open(summary) as f:
        rows = list(csv.DictReader(f))
    jobs = N_TRIALS if optuna else math.prod(len(v.split(",")) for k, v in have.items()
                                             if "," in v and not k.startswith("hydra"))
    assert len(rows) == jobs and all(row["status"] == "finished" for row in rows), rows
    assert f"Sweep summary: {jobs} jobs, {jobs} finished" in r.stdout
    for row in rows:
        assert (summary.parent / row["dir"] / "metrics.json").exists()
    if have.get("sweep.resume") == "true":         # every job finished the first time: all are skipped
        for job in range(jobs):
            assert f"job {job} finished in an earlier run of this sweep: skipped" in r.stdout + r.stderr
    if optuna:
        assert (summary.parent / "optimization_results.yaml").exists()
    if have.get("hydra.sweeper.storage", "").startswith("sqlite:///"):
        assert (case.cwd / have["hydra.sweeper.storage"][len("sqlite:///"):]).stat().st_size > 0
    if "hydra.sweep.dir" in have:
        assert summary.parent == case.cwd / have["hydra.sweep.dir"]


def run_find_lr(case: Case):
    """The LR range test: lr_find.json in its run directory, and the suggested training command printed."""
    command = tiny(case.filled(), case.fixture("data_root"))
    r = case.run(with_overrides(command, f"find_lr.steps={FIND_LR_STEPS}"))
    [result] = case.cwd.glob("outputs/find_lr/*/lr_find.json")
    assert json.loads(result.read_text())["suggestion"]["lr"] > 0
    own = " ".join(shlex.split(case.command)[2:])
    assert f"A short run to confirm it: python scripts/train.py {own} " in r.stdout and " optim.lr=" in r.stdout


def run_torch_peer(case: Case):
    before = stamps(case.cwd, "metrics.json")
    case.run(tiny(case.filled(), case.fixture("data_root")))
    [path] = changed(case.cwd, "metrics.json", before)
    m = json.loads(path.read_text())
    assert 0 <= m["test_acc"] <= 1 and m["steps"] >= 1, m


def run_gradcheck(case: Case):
    r = case.run(case.filled())
    assert " gradients within " in r.stdout, r.stdout


def run_evaluate(case: Case):
    """Loss, per-class accuracy and the confusion matrix of a checkpoint (its data with a small test limit)."""
    command = case.filled()
    r = case.run(with_overrides(command, "data.download=false", f"data.limit_test={TINY['data.limit_test']}"))
    assert "confusion matrix" in r.stdout and "test loss" in r.stdout, r.stdout
    out = given(command).get("out")
    if out:
        result = json.loads((case.cwd / out).read_text())
        assert result["n"] == int(TINY["data.limit_test"]) and 0 <= result["test_acc"] <= 1


def run_export(case: Case):
    """The export file(s), kept after the logits check; format=torch's module used as the README shows."""
    command = case.filled()
    have = given(command)
    r = case.run(command)
    assert ": match" in r.stdout, r.stdout
    out = case.cwd / have["out"]
    assert out.stat().st_size > 0
    if have["format"] == "torch":
        assert out.with_suffix(".py").exists()
        [usage] = fenced_blocks("Export", "python")
        images = tvd.FashionMNIST(case.fixture("data_root"), train=False).data[:8, None].numpy()  # uint8 N,1,28,28
        np.save(case.cwd / "images.npy", images)
        code = f"import numpy as np\nimages = np.load('images.npy')\n{usage}assert tuple(logits.shape) == (8, 10)\n"
        case.run(f"python -c {shlex.quote(code)}")


def run_tensorboard(case: Case):
    """The server starts on the logdir and lists every run in it (a finished tiny run, or a sweep's jobs)."""
    command = case.filled()
    logdir = case.cwd / shlex.split(command)[2]
    if not logdir.exists():
        case.copy(case.fixture("finished_run"), "outputs/train")
    runs = {str(p.parent.relative_to(logdir)) for p in logdir.rglob("events.out.tfevents.*")}
    assert runs
    port = free_port()
    with open(case.cwd / "tensorboard.log", "w") as log:
        proc = subprocess.Popen(["bash", "-c", f"{command} --port {port} --host 127.0.0.1"], cwd=case.cwd,
                                env=user_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, listed = time.time() + 90, []
        while time.time() < deadline and not runs <= set(listed):
            assert proc.poll() is None, (case.cwd / "tensorboard.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as f:
                    listed = json.loads(f.read())
            except OSError:
                pass
            time.sleep(0.5)
        assert runs <= set(listed), (runs, listed, (case.cwd / "tensorboard.log").read_text()[-3000:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_completion(case: Case):
    """Hydra's bash completion for cnnpipe-train, installed in a real bash, answers a Tab after `pool=`."""
    from completion import completion_query, completion_reply
    r = case.run(f"{case.command}\ncomplete -p cnnpipe-train\n{completion_query('cnnpipe-train pool=')}")
    assert "hydra_bash_completion cnnpipe-train" in r.stdout, r.stdout
    assert sorted(completion_reply(r.stdout)) == ["pool=max", "pool=mean"], r.stdout


def run_make_lint(case: Case):
    case.fixture("repo_make")
    case.run(case.command, cwd=REPO)


def run_make_train(case: Case):
    """make train with ARGS: the tiny limits, and a run directory of the test's."""
    case.fixture("repo_make")
    run = case.cwd / "run"
    args = shlex.split(tiny("python scripts/train.py", case.fixture("data_root")))[2:] + [f"hydra.run.dir={run}"]
    case.run(f"{case.command} ARGS={shlex.quote(' '.join(args))}", cwd=REPO)
    assert 0 <= json.loads((run / "metrics.json").read_text())["test_acc"] <= 1


def run_make_bench_quick(case: Case):
    """The smoke benchmark, on tiny data and shrunk further with bench.py's own options (appended in ARGS), writing
    into the test's folder instead of /tmp."""
    case.fixture("repo_make")
    out = case.cwd / "bench"
    command = case.command.replace("--out /tmp/bench", f"--out {out}")
    assert command != case.command, case.command
    args = f"--data-root {case.fixture('data_root')} {BENCH_SHRINK} --workdir {case.cwd / 'work'}"
    case.run(f"{command} ARGS={shlex.quote(args)}", timeout=600, cwd=REPO)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["quick"] is True and report["fashion"] and out.with_suffix(".md").read_text().strip()


SCRIPT_RULES = {"train": run_train, "find_lr": run_find_lr, "torch_peer": run_torch_peer, "gradcheck": run_gradcheck,
                "evaluate": run_evaluate, "export": run_export}
