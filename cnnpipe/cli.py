"""What every entry point shares: user errors become one paragraph on stderr and a non-zero exit."""
from __future__ import annotations

import sys
import textwrap

from cnnpipe import ConfigError, rundir
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


def run_guarded(fn):
    """Call fn(); a ConfigError exits 2 with its message, an interrupt exits 130/143 saying how to resume."""
    try:
        return fn()
    except ConfigError as e:
        fail(str(e))
    except Interrupted as e:
        say(f"stopped by {e.reason} after finishing the current step; {e.run_dir}/checkpoints/last.npz holds the "
            f"exact position. Resume with: python scripts/train.py resume={e.run_dir}", prefix="interrupted: ")
        sys.exit(EXIT_SIGNAL.get(e.reason, 1))


def check_command_line(argv: list[str]) -> list[str]:
    """What scripts/train.py checks before Hydra starts (Hydra writes into the run directory at once): the
    launcher/sweeper plugins are installed, the run directory is not another run's and can be created. Returns
    the arguments to add (resume in place: Hydra's run directory is the resumed run's)."""
    if any(a in argv for a in ("-sc", "--shell-completion", "-h", "--help", "--hydra-help", "-c", "--cfg",
                               "--info")):
        return []                               # Hydra answers these without running anything
    try:
        message = missing_plugin(argv)
        if message:
            raise ConfigError(message)
        extra = rundir.resume_in_place_args(argv)
        rundir.check_target_dir(argv + extra)
        rundir.check_creatable(argv + extra)
    except ConfigError as e:
        fail(str(e))
    return extra
