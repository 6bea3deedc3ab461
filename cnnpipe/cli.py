"""What every entry point shares: user errors become one paragraph on stderr and a non-zero exit."""
from __future__ import annotations

import sys
import textwrap

from cnnpipe import ConfigError

EXIT_CONFIG = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR2": 140}


def say(message: str, prefix="error: "):
    print("\n".join(textwrap.wrap(f"{prefix}{message}", width=110, break_on_hyphens=False,
                                   break_long_words=False)), file=sys.stderr)


def fail(message: str, code: int = EXIT_CONFIG):
    say(message)
    sys.exit(code)


def run_guarded(fn):
    """Call fn(); a ConfigError exits 2 with its message, an interrupt exits 130/143 saying how to resume."""
    from cnnpipe.train import Interrupted
    try:
        return fn()
    except ConfigError as e:
        fail(str(e))
    except Interrupted as e:
        say(f"stopped by {e.reason} after finishing the current step; {e.run_dir}/checkpoints/last.npz holds the "
            f"exact position. Resume with: python scripts/train.py resume={e.run_dir}", prefix="interrupted: ")
        sys.exit(EXIT_SIGNAL.get(e.reason, 1))


def resume_run_dir_args(argv: list[str]) -> list[str]:
    """`resume=<run dir or its checkpoint>` continues in that run directory: point Hydra's run dir there too
    (its record of this invocation goes to .hydra/resume-<time>/, the original .hydra/ stays as it was)."""
    from pathlib import Path
    if "-m" in argv or "--multirun" in argv or any(a.startswith("hydra.run.dir=") for a in argv):
        return []
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if not value or value == "null":
        return []
    p = Path(value)
    run_dir = p if p.is_dir() else (p.parent.parent if p.parent.name == "checkpoints" else None)
    if run_dir is None or not run_dir.is_dir():
        return []                               # the loader reports the missing file clearly
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra/resume-${now:%Y-%m-%d_%H-%M-%S}"]


def check_output_dir_args(argv: list[str]):
    """Before Hydra creates the run directory: is the place it will go writable? (Otherwise Hydra fails
    with a traceback.) Checks hydra.run.dir / hydra.sweep.dir when given, else ./outputs."""
    import os
    from pathlib import Path
    multirun = "-m" in argv or "--multirun" in argv or any(a.startswith("hparams_search=") for a in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    value = next((a.split("=", 1)[1] for a in argv if a.startswith(key)), "outputs")
    target = Path(value.split("${", 1)[0] or ".")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a directory" if not probe.is_dir() else "is not writable"
        fail(f"The output directory {value} cannot be created: {probe} {what}. Choose another place with "
             f"{key}<path> (or fix the permissions) and run again; nothing was trained.")
