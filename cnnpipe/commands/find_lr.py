"""The LR range test:  python scripts/find_lr.py [training overrides] [find_lr.start=1e-5 find_lr.end=1 ...]
(or cnnpipe-find-lr ...). Trains a fresh copy of the configured model for a few hundred steps with a growing lr and
prints a suggested optim.lr; its run directory is outputs/find_lr/<time>/. It never changes the config."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cnnpipe.cli import fail, run_command, run_guarded
from cnnpipe.commands import CONF_DIR
from cnnpipe.config import register_configs
from cnnpipe.find_lr import find_lr, format_report
from cnnpipe.rundir import arg_value, is_multirun

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="find_lr")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    result = run_guarded(lambda: find_lr(cfg, run_dir), run_dir)
    print(format_report(result, run_dir))
    if result["suggestion"] is not None:                # the user's own settings, with the suggested lr
        keep = [o for o in HydraConfig.get().overrides.task
                if o.split("=", 1)[0].lstrip("+~") not in ("name", "optim.lr") and not o.startswith("find_lr.")]
        lr = f"optim.lr={result['suggestion']['lr']:.2g}"
        print(f"A short run to confirm it: python scripts/train.py {' '.join([*keep, lr])}")

def main() -> None:
    argv = sys.argv[1:]
    if is_multirun(argv):
        fail("scripts/find_lr.py runs one range test; -m (and hparams_search=) are for training sweeps. Run it once "
             "per setting you want to compare, e.g. python scripts/find_lr.py optim=adam.")
    if arg_value(argv, "resume") not in (None, "", "null"):
        fail("resume= continues a training run; the LR range test starts from the configured model's fresh "
             "weights, or from a checkpoint's weights with init_from=<run dir or checkpoint>.")
    run_command(hydra_main)                      # run dir free, creatable and locked (exit 2 if not)
