"""The commands users type: each module's `main()` is both `scripts/<name>.py` and the `cnnpipe-<name>` entry point
(pyproject.toml [project.scripts]). Hydra's commands read conf/ of this checkout."""
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
