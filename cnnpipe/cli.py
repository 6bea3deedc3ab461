"""What every entry point shares: user errors become one paragraph on stderr and a non-zero exit."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from cnnpipe import ConfigError, rundir, runlock
from cnnpipe.sweep.plugins import missing_plugin
from cnnpipe.train import Interrupted

EXIT_CONFIG = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR2": 140}


def say(message: str, prefix="error: "):
    print("\n".join(textwrap.wrap(f"{prefix}{message}", width=110, break_on_hyphens=False,
                                   break_long_words=False)), file=sys.stderr)


def fail(message: str, code: int = EXIT_CONFIG):
    say(message)
    sys.exit(code)


def run_guarded(fn, run_dir=None):
    """Call fn(); a ConfigError exits 2 with its message, an interrupt exits 130/143 saying how to resume.

    With the run directory of a command Hydra started (run_command locked it before Hydra wrote there: see
    check_command_line), a ConfigError during the command's set-up leaves it as it was found
    (runlock.discard_unstarted), so a refused run is no run."""
    try:
        return fn()
    except ConfigError as e:
        if run_dir is not None:
            runlock.discard_unstarted(run_dir)
        fail(str(e))
    except Interrupted as e:
        say(f"stopped by {e.reason} after finishing the current step; {e.run_dir}/checkpoints/last.npz holds the "
            f"exact position. Resume with: python scripts/train.py resume={e.run_dir}", prefix="interrupted: ")
        sys.exit(EXIT_SIGNAL.get(e.reason, 1))


def run_command(hydra_main, resumes: bool = False):
    """Every command whose Hydra main makes a run directory (scripts/train.py, find_lr.py, torch_peer.py,
    gradcheck.py) runs so: check_command_line first (exit 2 before Hydra writes anything), then Hydra with the
    arguments it added; Ctrl-C outside the training loop (start-up, shutdown) exits 130."""
    sys.argv += check_command_line(sys.argv[1:], resumes)
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)
    finally:
        runlock.release_all()


def check_command_line(argv: list[str], resumes: bool = True) -> list[str]:
    """What a command checks before Hydra starts (Hydra writes into the run directory at once): the launcher and
    sweeper plugins are installed, the run (or sweep) directory is not another run's, not inside one, not in use,
    and can be created; then it locks that directory for the run. Returns the arguments to add (resume in place:
    Hydra's run directory is the resumed run's). `resumes`: the command continues runs (resume=).

    Two processes that name one directory at once: both pass the read-only checks, and hold() lets one of them
    lock it; the other is refused here, before Hydra starts. One that locks it after the first has ended sees the
    first's files when the checks run again under the lock, and is refused too. A directory named with ${...} is
    known only once Hydra resolves it: ResolvedDirCheck checks and locks it then, before Hydra writes there; the
    default directory is made and locked by the fresh_dir resolver. The lock binds cnnpipe's commands only
    (cnnpipe.runlock, also on NFS)."""
    if any(a in argv for a in ("-sc", "--shell-completion", "-h", "--help", "--hydra-help", "-c", "--cfg",
                               "--info")):
        return []                               # Hydra answers these without running anything
    try:
        message = missing_plugin(argv)
        if message:
            raise ConfigError(message)
        resume = rundir.arg_value(argv, "resume")
        if not resumes and resume not in (None, "", "null"):
            raise ConfigError(f"resume={resume}: resume= continues a training run (python scripts/train.py "
                              f"resume=<run>); {Path(sys.argv[0]).name} does not continue runs. Nothing was started.")
        extra = rundir.resume_in_place_args(argv) if resumes else []
        args = argv + extra
        _check_and_lock(args, resumes)
    except ConfigError as e:
        fail(str(e))
    _checked.update(argv=args, resumes=resumes)
    return extra


_checked: dict = {}                             # what check_command_line checked: argv (with its additions), resumes


def _check_and_lock(args: list[str], resumes: bool):
    rundir.check_not_busy(args)
    rundir.check_target_dir(args, resumes)
    rundir.check_creatable(args)
    _, target = rundir.target_dir(args)
    if target is not None and "${" not in target:
        runlock.hold(Path(target))
        rundir.check_target_dir(args, resumes)   # again, under the lock: a run that ended meanwhile is seen now


def check_resolved_dir(config, key: str):
    """The checks check_command_line could not make on a directory named with ${...}, made on what Hydra resolved
    it to, before Hydra writes there: `hydra.run.dir=runs/${name}` that names an existing run is refused like
    `hydra.run.dir=runs/train`."""
    argv = _checked.get("argv")
    if argv is None or "${" not in (rundir.arg_value(argv, key) or ""):
        return                                  # named on the command line (checked), or the default (fresh_dir)
    resolved = str(OmegaConf.select(config, key))
    args = [a for a in argv if a.split("=", 1)[0].lstrip("+") != key] + [f"{key}={resolved}"]
    try:
        _check_and_lock(args, _checked["resumes"])
    except ConfigError as e:
        refuse_unstarted(resolved, str(e))


def refuse_unstarted(directory, message: str):
    """Refuse a command before its task started: its directory is left as it was found (runlock.discard_unstarted),
    then exit 2 with the message."""
    runlock.discard_unstarted(Path(directory))
    fail(message)


class ResolvedDirCheck(Callback):
    """Hydra calls it once the config is composed and before it writes into the run (or sweep) directory
    (conf/hydra/default.yaml): check_resolved_dir on the directory Hydra is about to use."""

    def on_run_start(self, config, **kwargs):
        check_resolved_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs):
        check_resolved_dir(config, "hydra.sweep.dir")
