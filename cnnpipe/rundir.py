"""Run directories: every run, resume and sweep job writes only into its own; another run's files are never
opened for writing.

Checked before Hydra starts (Hydra writes `.hydra/` and `train.log` into the run directory before any of our code
runs), from the command line: `python scripts/train.py <args>`. While a command runs, its directory is locked
(cnnpipe.runlock).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cnnpipe import ConfigError, runlock

# What a run leaves in its directory; any of them means the directory holds a run.
RUN_FILES = (".hydra", "train.log", "metrics.json", "checkpoints", "job.json")
# What a sweep leaves in its directory.
SWEEP_FILES = ("multirun.yaml", "summary.csv", "summary.md")
# What only a run or a sweep leaves: a folder above a new directory that holds one is a run or a sweep (a project
# folder may well have a checkpoints/ or a train.log of its own, so those alone do not count there).
RUN_MARKS = (".hydra", "job.json", "checkpoints/last.npz", "checkpoints/best.npz")
SWEEP_MARKS = ("multirun.yaml",)


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

    The Hydra resolver behind the default `hydra.run.dir` and `hydra.sweep.dir`; os.mkdir claims the name
    atomically, so two runs started at once cannot get the same directory, and the run locks it at once (before
    Hydra writes there). Hydra caches the result for the rest of the run."""
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        candidate = base if i == 0 else f"{base}_{i}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        runlock.hold(Path(candidate), made=True)
        return candidate
    raise ConfigError(f"Could not create a new run directory next to {base} (1000 names taken). Give one with "
                      f"hydra.run.dir=<path>.")


def arg_value(argv: list[str], key: str) -> str | None:
    """The value of `key=` (or `+key=`) on the command line; None when it is not there."""
    return next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == key), None)


def is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv or (arg_value(argv, "hparams_search") not in (None, "null"))


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
    if is_multirun(argv) or arg_value(argv, "hydra.run.dir") is not None:
        return []
    value = arg_value(argv, "resume")
    if not value or value == "null":
        return []
    run_dir = checkpoint_run_dir(Path(value))
    if run_dir is None or not run_dir.is_dir():
        return []                               # the loader reports the missing file clearly
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra/resume-${now:%Y-%m-%d_%H-%M-%S}"]


def target_dir(argv: list[str]) -> tuple[str, str | None]:
    """(key, value) of the directory the command line names for the command to write into: hydra.sweep.dir for a
    multirun, else hydra.run.dir; the value is None when it names none (the default: a new directory)."""
    key = "hydra.sweep.dir" if is_multirun(argv) else "hydra.run.dir"
    return key, arg_value(argv, key)


def resumed_in_place(argv: list[str]) -> bool:
    """resume=<A> with hydra.run.dir=<A> (given, or added by resume_in_place_args): A continues in its directory."""
    key, value = target_dir(argv)
    resume = arg_value(argv, "resume")
    if key != "hydra.run.dir" or value is None or not resume or resume == "null":
        return False
    source = checkpoint_run_dir(Path(resume))
    return source is not None and source.resolve() == Path(value).resolve()


def check_target_dir(argv: list[str], resumes: bool = True):
    """Refuse a run (or sweep) directory that holds a run or a sweep, or that lies inside one (a run's directory is
    its own, and a sweep makes its job directories itself), unless it is the run being resumed in place. Only
    reads: nothing is written before the command line passed. `resumes`: the command can continue a run."""
    key, value = target_dir(argv)
    if value is None or resumed_in_place(argv):
        return
    if "${" in value:                           # named when Hydra starts: only the folders above it are known now
        head = value.split("${", 1)[0]
        _refuse_inside(key, value, Path(head) if head.endswith("/") else Path(head or ".").parent)
        return
    target, multirun = Path(value), key == "hydra.sweep.dir"
    runs = run_traces(target)
    if runs:
        if multirun:
            how = (f"A sweep writes into a directory of its own: choose a new hydra.sweep.dir (its jobs can start "
                   f"from that run with resume={value} or init_from={value})")
        elif not resumes or arg_value(argv, "resume") not in (None, "", "null"):
            how = "Name a new hydra.run.dir"
        else:
            how = (f"To continue it, use resume={value} without hydra.run.dir; to branch from it, name a new "
                   f"hydra.run.dir")
        raise ConfigError(f"{key}={value} already holds a run ({', '.join(runs)}); cnnpipe never writes into "
                          f"another run's files. {how}.")
    sweeps = sweep_traces(target)
    if sweeps and not (multirun and arg_value(argv, "sweep.resume") in ("true", "True")):
        how = ("Choose a new hydra.sweep.dir, or finish that sweep with the command that started it plus "
               "sweep.resume=true" if multirun else
               f"Choose a new hydra.run.dir (one of its jobs continues with resume={value}/<job number>)")
        raise ConfigError(f"{key}={value} already holds a sweep ({', '.join(sweeps[:6])}"
                          f"{', ...' if len(sweeps) > 6 else ''}); cnnpipe never writes into another run's files. "
                          f"{how}.")
    _refuse_inside(key, value, target.parent)


def enclosing(folder: Path) -> tuple[Path, str, list[str]] | None:
    """The nearest of `folder` and the folders above it, up to the filesystem root, that is a run or a sweep: (it,
    "run" or "sweep", what marks it); None when none is."""
    folder = Path(folder).resolve()
    for d in (folder, *folder.parents):
        for kind, marks in (("run", RUN_MARKS), ("sweep", SWEEP_MARKS)):
            found = [m for m in marks if _exists(d / m)]
            if found:
                return d, kind, found
    return None


def _refuse_inside(key: str, value: str, folder: Path):
    found = enclosing(folder)
    if found is None:
        return
    where, kind, marks = found
    why = ("a sweep makes its job directories itself (finish it with the command that started it plus "
           "sweep.resume=true)" if kind == "sweep" else "a run's directory is its own")
    raise ConfigError(f"{key}={value} is inside the {kind} {where} (it has {', '.join(marks)}); cnnpipe never "
                      f"writes into another run's files, and {why}. Choose a directory outside it.")


def check_not_busy(argv: list[str]):
    """Refuse a directory that a running cnnpipe command holds, or that lies in a run or sweep one holds (a job of
    a sweep that still runs, resumed in place). Only reads the locks."""
    _, value = target_dir(argv)
    if value is None or "${" in value:
        return
    target = Path(value)
    around = enclosing(target.parent)
    for d in (target,) if around is None else (target, around[0]):
        pid = runlock.holder(d)
        if pid is not None:
            raise ConfigError(runlock.busy_message(d, pid))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:                             # unreadable: nothing we can tell, nothing we write into
        return False


def check_creatable(argv: list[str]):
    """Can the run (or sweep) directory be created? Otherwise Hydra fails with a traceback. Probes by making (and
    removing) a temporary directory in the nearest existing parent."""
    key = "hydra.sweep.dir" if is_multirun(argv) else "hydra.run.dir"
    value = arg_value(argv, key) or "outputs"
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
