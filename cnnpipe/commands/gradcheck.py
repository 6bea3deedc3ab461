"""Check the configured model's hand-written gradients against finite differences (float64).

    python scripts/gradcheck.py model=convnet pool=mean conv.k=4      (or cnnpipe-gradcheck ...)
Exits 1 when any parameter's (or the input's) max relative error exceeds gradcheck_tol (default 1e-5).
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from cnnpipe.cli import fail, run_command, run_guarded
from cnnpipe.commands import CONF_DIR
from cnnpipe.config import register_configs
from cnnpipe.gradcheck import format_table, gradcheck

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        tol = float(cfg.pop("gradcheck_tol", 1e-5))
        batch = int(cfg.pop("gradcheck_batch", 2))
    cfg.dtype = "float64"
    rows = run_guarded(lambda: gradcheck(cfg, batch=batch), HydraConfig.get().runtime.output_dir)
    print(f"gradcheck: model {cfg.model.name}, {cfg.pool.mode} pool, k={cfg.conv.k}, backend {cfg.backend.name}, "
          f"float64, batch {batch}, central differences")
    print(format_table(rows, tol))
    bad = [r[0] for r in rows if r[2] > tol]
    if bad:
        fail(f"gradient check failed for {', '.join(bad)} (tolerance {tol:g}).", code=1)
    print(f"all {len(rows)} gradients within {tol:g}")


def main() -> None:
    run_command(hydra_main)                     # run dir free, creatable and locked (exit 2 if not)
