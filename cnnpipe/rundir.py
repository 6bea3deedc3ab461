"""Run directories: every run, resume and sweep job writes only into its own; another run's files are never
opened for writing.

Checked before Hydra starts (Hydra writes `.hydra/` and `train.log` into the run directory before any of our code
runs), from the command line: `python scripts/train.py <args>`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cnnpipe import ConfigError

# What a run leaves in its directory; any of them means the directory holds a run.
RUN_FILES = (".hydra", "train.log", "metrics.json", "checkpoints", "job.json")
# What a sweep leaves in its directory.
SWEEP_FILES = ("multirun.yaml", "summary.csv", "summary.md")


def run_traces(path: Path) -> list[str]:
    """The names of the run files in `path` (TensorBoard event files count too)."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [name for name in RUN_FILES if (path / name).exists()]
    if next(path.glob("events.out.tfevents.*"), None) is not None:
        found.append("TensorBoard events")
    return found


def sweep_traces(path: Path) -> list[str]:
    """The names of what a sweep left in `path`: its own files and job directories that hold a run."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [name for name in SWEEP_FILES if (path / name).exists()]
    found += [f"job {d.name}/" for d in sorted(path.iterdir()) if d.is_dir() and run_traces(d)]
    return found


def fresh_dir(base: str) -> str:
    """A directory no run has: `base`, or `base_1`, `base_2`, ... when another run started in the same second.

    The Hydra resolver behind the default `hydra.run.dir`; os.mkdir claims the name atomically, so two runs
    started at once cannot get the same directory. Hydra caches the result for the rest of the run."""
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        candidate = base if i == 0 else f"{base}_{i}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"Could not create a new run directory next to {base} (1000 names taken). Give one with "
                      f"hydra.run.dir=<path>.")


def _arg(argv: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == key), None)


def is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv or (_arg(argv, "hparams_search") not in (None, "null"))


def checkpoint_run_dir(path: Path) -> Path | None:
    """The run directory a `resume=`/`init_from=`/`ckpt=` value names: <run> for <run>, for <run>/checkpoints (what
    tab completion gives) and for <run>/checkpoints/x.npz; None for a file elsewhere."""
    path = Path(path)
    if path.is_dir():
        is_folder = path.name == "checkpoints" and not (path / "checkpoints").is_dir()    # not a run named so
        return path.parent if is_folder else path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def resume_in_place_args(argv: list[str]) -> list[str]:
    """`resume=<run dir or its checkpoint>` with no run directory named continues that run in its own directory:
    point Hydra there too (its record of this invocation goes to .hydra/resume-<time>/, the original .hydra/ stays
    as it was)."""
    if is_multirun(argv) or _arg(argv, "hydra.run.dir") is not None:
        return []
    value = _arg(argv, "resume")
    if not value or value == "null":
        return []
    run_dir = checkpoint_run_dir(Path(value))
    if run_dir is None or not run_dir.is_dir():
        return []                               # the loader reports the missing file clearly
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra/resume-${now:%Y-%m-%d_%H-%M-%S}"]


def check_target_dir(argv: list[str]):
    """Refuse to start in a run (or sweep) directory that another run already holds: the user named a directory
    with hydra.run.dir / hydra.sweep.dir, and it is not the run being resumed in place."""
    if is_multirun(argv):
        value = _arg(argv, "hydra.sweep.dir")
        if value is None or "${" in value or _arg(argv, "sweep.resume") in ("true", "True"):
            return
        traces = sweep_traces(Path(value))
        if traces:
            raise ConfigError(
                f"hydra.sweep.dir={value} already holds a sweep ({', '.join(traces[:6])}"
                f"{', ...' if len(traces) > 6 else ''}); cnnpipe never writes into another run's files. Choose a new "
                f"hydra.sweep.dir, or finish that sweep with the command that started it plus sweep.resume=true.")
        return
    value = _arg(argv, "hydra.run.dir")
    if value is None or "${" in value:
        return
    target = Path(value)
    resume = _arg(argv, "resume")
    if resume and resume != "null":
        source = checkpoint_run_dir(Path(resume))
        if source is not None and source.resolve() == target.resolve():
            return                              # resume=<A> hydra.run.dir=<A>: continue A in place
    traces = run_traces(target)
    if traces:
        how = (f"To continue it, use resume={value} without hydra.run.dir; to branch from it, name a new "
               f"hydra.run.dir" if not resume else "Name a new hydra.run.dir for the continued run")
        raise ConfigError(f"hydra.run.dir={value} already holds a run ({', '.join(traces)}); cnnpipe never writes "
                          f"into another run's files. {how}.")


def check_creatable(argv: list[str]):
    """Can the run (or sweep) directory be created? Otherwise Hydra fails with a traceback. Probes by making (and
    removing) a temporary directory in the nearest existing parent."""
    key = "hydra.sweep.dir" if is_multirun(argv) else "hydra.run.dir"
    value = _arg(argv, key) or "outputs"
    target = Path(value.split("${", 1)[0] or ".")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = None if probe.is_dir() else f"{probe} is not a directory"
    if problem is None:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".cnnpipe-probe-", dir=probe))
        except OSError as e:
            problem = f"nothing can be created in {probe} ({e.strerror})"
    if problem:
        raise ConfigError(f"The output directory {value} cannot be created: {problem}. Choose another place with "
                          f"{key}=<path> (or fix the permissions) and run again; nothing was trained.")


def check_writable(run_dir: Path) -> None:
    """The run directory exists and takes files, or a ConfigError saying which and how to fix it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"The run directory {run_dir} is not writable ({e.strerror}). Choose another with "
                          f"hydra.run.dir=<path>, or fix its permissions, then run again.") from None
