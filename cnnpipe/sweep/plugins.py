"""Before Hydra starts: are the launcher and sweeper plugins the command line asks for installed?"""
from __future__ import annotations

import importlib.util
import sys

# choice on the command line -> (module that must import, pip extra that brings it)
PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "sweep"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "sweep"),
    ("hydra/launcher", "ray"): ("hydra_plugins.hydra_ray_launcher", "ray"),
    ("hydra/launcher", "ray_aws"): ("hydra_plugins.hydra_ray_launcher", "ray"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/sweeper", "optuna_search"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),   # conf/hydra/sweeper/
}
EXTRA_DEPS = {"hydra_plugins.hydra_ray_launcher": "ray", "hydra_plugins.hydra_optuna_sweeper": "optuna",
              "hydra_plugins.hydra_submitit_launcher": "submitit", "hydra_plugins.hydra_joblib_launcher": "joblib"}


def missing_plugin(argv: list[str]) -> str | None:
    """The error paragraph for the first launcher/sweeper on the command line whose plugin is missing, else None.
    `hparams_search=<x>` configs select the optuna sweeper, so they need it too."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hparams_search" and value not in ("", "null"):
            key, value, how = "hydra/sweeper", "optuna", f"hparams_search={value} uses the optuna sweeper, which"
        else:
            how = f"{key}={value} needs a Hydra plugin that"
        if (key, value) not in PLUGINS:
            continue
        module, extra = PLUGINS[key, value]
        absent = [m for m in (module, EXTRA_DEPS[module]) if not _importable(m)]
        if absent:
            return (f"{how} is not installed in this Python ({sys.executable}): module {absent[0]} is missing. "
                    f"Install it with: pip install -e '.[{extra}]' (from the repository root; 'make test' installs "
                    f"every extra), or pick another: hydra/launcher=basic|joblib|submitit_local|submitit_slurm|ray, "
                    f"hydra/sweeper=basic|optuna.")
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
